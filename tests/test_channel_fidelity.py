"""One test (or a few) per fidelity rule of docs/design.md, the channel model: it must behave like the H100's."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pipellm_client import chunks, errors, keys
from pipellm_client.channel import (
    KEY_RING_SIZE,
    MSG_CTR_MAX,
    KeyEpoch,
    PredictingReceiver,
    RotationPolicy,
    Sender,
    make_nonce,
)
from pipellm_client.endpoint import ChannelSecrets, CpuEndpoint, MsgKind

from .conftest import make_pair


def seal(tx: Sender, data: bytes) -> tuple[object, bytes]:
    iv = tx.reserve()
    out = bytearray(len(data) + 16)
    tx.seal_into(iv, data, memoryview(out))
    return iv, bytes(out)


def open_next(rx, msg: bytes) -> bytes:
    out = bytearray(len(msg) - 16)
    rx.open_next(msg, memoryview(out))
    return bytes(out)


# -- Cipher: AES-256-GCM, 96-bit IV, 128-bit tag, no AAD ------------------------------------------
def test_cipher_is_plain_aes256_gcm_without_aad() -> None:
    key, mask = os.urandom(32), os.urandom(12)
    tx, _ = make_pair(key, mask)
    _iv, msg = seal(tx, b"weights" * 100)
    assert len(msg) == 700 + 16
    assert AESGCM(key).decrypt(make_nonce(mask, 0, 1), msg, None) == b"weights" * 100


# -- Per direction: own key, own mask, own counters -----------------------------------------------
def test_each_direction_has_its_own_key_and_counters() -> None:
    master = os.urandom(32)
    h2d = keys.derive_channel_key(master, keys.channel_label(0, "h2d"))
    d2h = keys.derive_channel_key(master, keys.channel_label(0, "d2h"))
    assert h2d != d2h and len(h2d) == len(d2h) == 32
    ep = CpuEndpoint([ChannelSecrets(0, h2d, os.urandom(12), d2h, os.urandom(12))], RotationPolicy())
    ep.send(0, b"x" * 32, memoryview(bytearray(48)))
    assert ep.d2h[0].msg_ctr == 1 and ep.h2d[0].msg_ctr == 0


# -- Nonce layout, pre-increment, overflow --------------------------------------------------------
def test_nonce_layout_and_pre_increment() -> None:
    mask = os.urandom(12)
    tx, _ = make_pair(mask=mask)
    first = tx.reserve()
    assert first.msg_ctr == 1, "the first message of a channel uses counter 1"
    raw = struct.pack("<IQ", 1, 0)
    assert first.nonce == bytes(a ^ b for a, b in zip(raw, mask, strict=True))
    assert make_nonce(mask, 7, 0xDEADBEEF) == bytes(
        a ^ b for a, b in zip(struct.pack("<IQ", 0xDEADBEEF, 7), mask, strict=True)
    )


def test_iv_overflow_is_refused() -> None:
    tx, rx = make_pair()
    tx.msg_ctr = MSG_CTR_MAX - 1
    last = tx.reserve()
    assert last.msg_ctr == MSG_CTR_MAX
    with pytest.raises(errors.IvOverflow, match="IV overflow"):
        tx.reserve()
    rx.msg_ctr = MSG_CTR_MAX
    with pytest.raises(errors.IvOverflow):
        rx.open_next(b"\0" * 32, memoryview(bytearray(16)))


# -- The receiver never takes an IV from the sender -------------------------------------------------
@pytest.mark.parametrize("attack", ["tamper_ct", "tamper_tag", "replay", "reorder", "drop"])
def test_attacks_kill_the_channel_and_nothing_is_accepted(attack: str) -> None:
    tx, rx = make_pair()
    msgs = [seal(tx, bytes([i]) * 64)[1] for i in range(4)]
    assert open_next(rx, msgs[0]) == bytes([0]) * 64
    if attack == "tamper_ct":
        bad = bytearray(msgs[1])
        bad[5] ^= 1
        feed = bytes(bad)
    elif attack == "tamper_tag":
        bad = bytearray(msgs[1])
        bad[-1] ^= 0x80
        feed = bytes(bad)
    elif attack == "replay":
        feed = msgs[0]
    elif attack == "reorder":
        feed = msgs[2]
    else:  # drop message 1, deliver message 2 in its place
        feed = msgs[2]
    out = bytearray(64)
    with pytest.raises(errors.TagMismatch):
        rx.open_next(feed, memoryview(out))
    assert out == bytes(64), "nothing of the failed message is written"
    assert rx.dead
    for m in msgs[1:]:
        with pytest.raises(errors.ChannelDead):
            open_next(rx, m)


# -- Encrypt in any order, submit in IV order; a reserved IV is used exactly once ------------------
def test_encrypt_in_any_order_submit_in_iv_order() -> None:
    tx, rx = make_pair()
    ivs = [tx.reserve() for _ in range(16)]
    payloads = [os.urandom(100 + i) for i in range(16)]
    sealed: dict[int, bytes] = {}
    order = list(range(16))
    random.Random(1).shuffle(order)
    for i in order:
        out = bytearray(len(payloads[i]) + 16)
        tx.seal_into(ivs[i], payloads[i], memoryview(out))
        sealed[i] = bytes(out)
    for i in range(16):
        tx.submit(ivs[i])
        assert open_next(rx, sealed[i]) == payloads[i]


def test_reserved_iv_is_used_once() -> None:
    tx, _ = make_pair()
    iv = tx.reserve()
    tx.seal_into(iv, b"a" * 16, memoryview(bytearray(32)))
    with pytest.raises(errors.IvReuse, match="already used"):
        tx.seal_into(iv, b"b" * 16, memoryview(bytearray(32)))
    other, _ = make_pair()
    with pytest.raises(errors.UnreservedIv):
        tx.take(other.reserve(), 16)


def test_submit_out_of_order_is_refused() -> None:
    tx, _ = make_pair()
    a, b = tx.reserve(), tx.reserve()
    tx.seal_into(b, b"b", memoryview(bytearray(17)))
    with pytest.raises(errors.OutOfOrder):
        tx.submit(b)
    with pytest.raises(errors.OutOfOrder, match="before anything was encrypted"):
        tx.submit(a)


def test_slot_too_small_is_refused() -> None:
    tx, _ = make_pair()
    with pytest.raises(errors.SlotError, match="exactly 116"):
        tx.seal_into(tx.reserve(), b"x" * 100, memoryview(bytearray(100)))


# -- D2H: the CPU predicts, may decrypt out of order, keeps 16 key versions ---------------------------
def _d2h_pair() -> tuple[CpuEndpoint, PredictingReceiver]:
    key, mask = os.urandom(32), os.urandom(12)
    ep = CpuEndpoint([ChannelSecrets(0, os.urandom(32), os.urandom(12), key, mask)], RotationPolicy())
    label = keys.channel_label(0, "d2h")
    return ep, PredictingReceiver(label, KeyEpoch(label, 0, key, mask), RotationPolicy())


def test_d2h_predicted_ivs_decrypt_out_of_order() -> None:
    ep, cpu = _d2h_pair()
    sent = []
    for i in range(8):
        slot = bytearray(64 + 16)
        ver, chan = ep.send(0, bytes([i]) * 64, memoryview(slot))
        sent.append((cpu.predict(ver, chan), bytes(slot)))
    for pred, msg in reversed(sent):
        out = bytearray(64)
        cpu.open(pred, msg, memoryview(out))
        assert out == bytes([pred.msg_ctr - 1]) * 64


def test_d2h_tag_failure_is_fatal() -> None:
    ep, cpu = _d2h_pair()
    slot = bytearray(48)
    ver, chan = ep.send(0, b"k" * 32, memoryview(slot))
    slot[0] ^= 1
    with pytest.raises(errors.TagMismatch):
        cpu.open(cpu.predict(ver, chan), bytes(slot), memoryview(bytearray(32)))
    with pytest.raises(errors.ChannelDead):
        cpu.predict(ver, chan)


def test_d2h_keeps_last_16_key_versions() -> None:
    ep, cpu = _d2h_pair()
    slot = bytearray(48)
    ver, chan = ep.send(0, b"o" * 32, memoryview(slot))
    pred = cpu.predict(ver, chan)
    for _ in range(KEY_RING_SIZE - 1):
        cpu.rotate_key()
        ep.rotate_d2h_key(0)
    out = bytearray(32)
    cpu.open(pred, bytes(slot), memoryview(out))  # 15 rotations later: still decrypts
    assert out == b"o" * 32
    ver2, chan2 = ep.send(0, b"n" * 32, memoryview(slot))
    cpu.open(cpu.predict(ver2, chan2), bytes(slot), memoryview(out))
    assert out == b"n" * 32
    cpu.rotate_key()  # version 0 leaves the ring
    with pytest.raises(errors.KeyVersionExpired):
        cpu.predict(0, 0)


# -- Keys: ECDH P-384 -> master -> HKDF-Expand per label; masks from the endpoint ----------------------
def test_key_agreement_gives_both_sides_the_same_keys() -> None:
    daemon, endpoint = keys.KeyAgreement(), keys.KeyAgreement()
    assert len(daemon.public_bytes) == 97
    tr = keys.Transcript(daemon.public_bytes, endpoint.public_bytes)
    m1 = daemon.master_secret(endpoint.public_bytes, tr)
    m2 = endpoint.master_secret(daemon.public_bytes, tr)
    assert m1 == m2 and len(m1) == 32
    label = keys.channel_label(0, "h2d")
    assert label == "Lce00_h2d_user" and keys.channel_label(1, "d2h") == "Lce01_d2h_user"
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    expected = HKDFExpand(hashes.SHA256(), 32, label.encode()).derive(m1)
    assert keys.derive_channel_key(m1, label) == expected
    masks = [keys.new_mask() for _ in range(4)]
    assert keys.open_masks(m1, tr, keys.seal_masks(m2, tr, masks), 4) == masks
    wrong = keys.Transcript(daemon.public_bytes, keys.KeyAgreement().public_bytes)
    with pytest.raises(keys.KeyAgreementError):
        keys.open_masks(m1, wrong, keys.seal_masks(m2, tr, masks), 4)


def test_bad_public_key_is_refused() -> None:
    ka = keys.KeyAgreement()
    tr = keys.Transcript(ka.public_bytes, b"\x04" + b"\0" * 96)
    with pytest.raises(keys.KeyAgreementError, match="not a valid P-384 point"):
        ka.master_secret(b"\x04" + b"\0" * 96, tr)
    with pytest.raises(keys.KeyAgreementError, match="97-byte"):
        ka.master_secret(b"short", tr)


def test_keys_never_show_in_repr() -> None:
    key = os.urandom(32)
    epoch = KeyEpoch("Lce00_h2d_user", 0, key, os.urandom(12))
    secrets = ChannelSecrets(0, key, os.urandom(12), key, os.urandom(12))
    text = repr(epoch) + repr(secrets) + repr(epoch._key) + str(Sender("x", epoch, RotationPolicy()).snapshot())
    assert key.hex() not in text and repr(key) not in text


# -- Key rotation: usage = bytes/16 + messages; lower marks pending; upper kills ----------------------
def test_key_usage_and_thresholds() -> None:
    policy = RotationPolicy(upper=1000, lower=500)
    tx, _ = make_pair(policy=policy)
    seal(tx, b"x" * 160)  # 160/16 + 1 = 11
    assert tx.epoch.usage == 11 and not tx.key_rotation_pending
    while tx.epoch.usage < 500:
        seal(tx, b"x" * 1600)
    assert tx.key_rotation_pending
    with pytest.raises(errors.KeyExhausted):
        while True:
            seal(tx, b"x" * 1600)
    assert tx.dead
    with pytest.raises(errors.ChannelDead):
        tx.reserve()


def test_key_rotation_derivation_and_effects() -> None:
    key, mask = os.urandom(32), os.urandom(12)
    tx, rx = make_pair(key, mask)
    seal(tx, b"a")
    tx.chan_ctr = rx.chan_ctr = 3
    stale = tx.reserve()
    assert tx.rotate_key() == 1
    rx.rotate_key(1)
    expected_key, expected_mask = keys.rotate_key(key, "Lce00_h2d_user")
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    assert expected_key == HKDFExpand(hashes.SHA256(), 32, b"Lce00_h2d_user").derive(hashlib.sha256(key).digest())
    assert tx.epoch.key_bytes() == expected_key and tx.epoch.mask == expected_mask != mask
    assert tx.msg_ctr == 0 and tx.chan_ctr == 3 and tx.epoch.version == 1
    with pytest.raises(errors.UnreservedIv, match="key rotation"):
        tx.take(stale, 1)
    iv, msg = seal(tx, b"after rotation")
    assert iv.msg_ctr == 1
    assert AESGCM(expected_key).decrypt(make_nonce(expected_mask, 3, 1), msg, None) == b"after rotation"
    assert open_next(rx, msg) == b"after rotation"


# -- IV rotation: chan_ctr+1, msg_ctr=0, same key; in-band ------------------------------------------
def test_iv_rotation() -> None:
    key = os.urandom(32)
    tx, rx = make_pair(key, policy=RotationPolicy(iv_rotation_remaining=MSG_CTR_MAX - 3))
    ivs = [tx.reserve() for _ in range(3)]
    assert tx.iv_rotation_due
    tx.seal_into(ivs[0], b"first", memoryview(bytearray(21)))
    abandoned = ivs[1]
    assert tx.rotate_iv() == 1
    assert tx.msg_ctr == 0 and tx.epoch.key_bytes() == key and not tx.iv_rotation_due
    with pytest.raises(errors.UnreservedIv, match="IV rotation"):
        tx.take(abandoned, 1)
    # The receiver applies the rotation in stream order: after message 1 of epoch 0.
    iv, msg = seal(tx, b"second")
    assert (iv.chan_ctr, iv.msg_ctr) == (1, 1)
    with pytest.raises(errors.TagMismatch):
        open_next(make_pair(key)[1], msg)  # a receiver that missed the rotation rejects it
    rx.rotate_iv(1)
    assert open_next(rx, msg) == b"second"
    with pytest.raises(errors.ChannelDead):
        rx.rotate_iv(5)


# -- Units: 1 MiB chunks, one IV and tag each, last chunk short ------------------------------------------
def test_chunking() -> None:
    parts = list(chunks.split(100, (5 << 20) + 7))
    assert [p.length for p in parts] == [1 << 20] * 5 + [7]
    assert parts[0].offset == 100 and parts[-1].offset == 100 + (5 << 20)
    assert parts[-1].dst_offset == 5 << 20
    assert chunks.count((5 << 20) + 7) == 6


# -- The endpoint: NOPs and DISCARDs consume IVs; DATA needs a destination -------------------------------
def test_endpoint_nop_and_discard() -> None:
    from pipellm_client.endpoint import NOP_PLAINTEXT

    key, mask = os.urandom(32), os.urandom(12)
    tx = Sender("Lce00_h2d_user", KeyEpoch("Lce00_h2d_user", 0, key, mask), RotationPolicy())
    ep = CpuEndpoint([ChannelSecrets(0, key, mask, os.urandom(32), os.urandom(12))], RotationPolicy())
    _iv, nop = seal(tx, NOP_PLAINTEXT)
    ep.receive(0, MsgKind.NOP, nop)
    _iv, spec = seal(tx, b"speculative" * 10)
    ep.receive(0, MsgKind.DISCARD, spec)
    _iv, data = seal(tx, b"real")
    dst = bytearray(4)
    ep.receive(0, MsgKind.DATA, data, memoryview(dst))
    assert dst == b"real" and ep.h2d[0].msg_ctr == 3
    _iv, not_nop = seal(tx, b"NOPE")
    with pytest.raises(errors.TagMismatch, match="not a NOP"):
        ep.receive(0, MsgKind.NOP, not_nop)
    assert ep.dead
