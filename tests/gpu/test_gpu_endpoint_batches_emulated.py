"""CudaEndpoint's batches, message by message, on the CPU (emulated CuPy running the real aesgcm.cu).

A sender with the session's keys seals H2D messages into a bounce "arena"; the endpoint receives them in
`batch()` blocks. What is pinned down here:

* every DATA/DISCARD message of a channel's batch gets its nonce from the endpoint's own counter, in
  order, and the whole batch costs one launch sequence (one CTR launch);
* a bad tag anywhere in a batch kills the channel and leaves *every* destination of the batch untouched:
  those of the messages before it (which authenticated), at it and after it; none of them is accepted;
* a batch ends before a NOP, a rotation, or when it fills the device buffers; an error inside the block
  drops the queue and kills its channels;
* D2H sends in a batch are encrypted in one launch sequence, each under its own counter value;
* outside a batch every message is decrypted before `receive` returns (a batch of one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from gpu_emu_runner import cxx_compiler
from pipellm_client import keys
from pipellm_client.arena import ArenaLayout
from pipellm_client.channel import KeyEpoch, RotationPolicy, Sender, make_nonce
from pipellm_client.endpoint import NOP_PLAINTEXT, ChannelSecrets, MsgKind
from pipellm_client.errors import ChannelDead, TagMismatch
from pipellm_client.gpu import aesgcm_cuda
from pipellm_client.gpu.params import KERNEL_CTR_DECRYPT, KERNEL_ENCRYPT, KERNEL_GHASH_CT

pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler to build the emulator")

CHUNK = 4096
LAYOUT = ArenaLayout(CHUNK, h2d_slots=6, d2h_slots=4)


class Host:
    """The daemon's side of two copy engines: senders with the session keys, and a bounce arena."""

    def __init__(self, fake_cp: Any) -> None:
        from pipellm_client.gpu.endpoint import CudaEndpoint

        self.cp = fake_cp
        policy = RotationPolicy()
        self.secrets, self.tx = [], []
        for ce in range(2):
            hk, dk = os.urandom(32), os.urandom(32)
            hm, dm = keys.new_mask(), keys.new_mask()
            self.secrets.append(ChannelSecrets(ce, hk, hm, dk, dm))
            label = keys.channel_label(ce, "h2d")
            self.tx.append(Sender(label, KeyEpoch(label, 0, hk, hm), policy))
        self.arena = bytearray(LAYOUT.size)
        self.ep = CudaEndpoint(self.secrets, policy, LAYOUT)
        self.ep.attach_arena(SimpleNamespace(view=memoryview(self.arena)))
        self.kernels = aesgcm_cuda._kernels(aesgcm_cuda.DEFAULT_PARAMS, 0)

    def seal(self, ce: int, slot: int, plaintext: bytes) -> memoryview:
        """Encrypt the channel's next message into an H2D slot; returns the message's arena view."""
        tx = self.tx[ce]
        iv = tx.reserve()
        off = LAYOUT.h2d_slot(slot)
        view = memoryview(self.arena)[off : off + len(plaintext) + 16]
        tx.seal_into(iv, plaintext, view)
        tx.submit(iv)
        return view

    def calls(self, name: str) -> int:
        return int(self.kernels[name].calls)


@pytest.fixture
def host(fake_cp: Any) -> Iterator[Host]:
    h = Host(fake_cp)
    yield h
    h.ep.close()


def _data(n: int) -> bytes:
    return os.urandom(n)


def test_a_batch_is_one_launch_sequence_with_each_messages_own_nonce(host: Host) -> None:
    cp, ep = host.cp, host.ep
    sizes = [CHUNK, CHUNK, 1000, 17, CHUNK - 1]
    plain = [_data(n) for n in sizes]
    msgs = [host.seal(0, i, p) for i, p in enumerate(plain)]
    dsts = [cp.full(n, 0x11, dtype=cp.uint8) for n in sizes]
    ctr0, ghash0 = host.calls(KERNEL_CTR_DECRYPT), host.calls(KERNEL_GHASH_CT)
    with ep.batch():
        for m, d in zip(msgs, dsts, strict=True):
            ep.receive(0, MsgKind.DATA, m, d)
        assert all((d.get() == 0x11).all() for d in dsts), "nothing is written before the batch runs"
    assert [d.get().tobytes() for d in dsts] == plain
    assert host.calls(KERNEL_CTR_DECRYPT) - ctr0 == 1 and host.calls(KERNEL_GHASH_CT) - ghash0 == 1
    assert ep.batches == 1 and ep.largest_batch == len(sizes)
    assert ep.h2d[0].msg_ctr == len(sizes) and ep.h2d[0].messages == len(sizes) and ep.accepted == len(sizes)


def test_discards_are_verified_in_the_batch_and_written_nowhere(host: Host) -> None:
    cp, ep = host.cp, host.ep
    plain = [_data(CHUNK) for _ in range(4)]
    msgs = [host.seal(0, i, p) for i, p in enumerate(plain)]
    dsts = [cp.zeros(CHUNK, dtype=cp.uint8) for _ in range(4)]
    with ep.batch():
        for i, (m, d) in enumerate(zip(msgs, dsts, strict=True)):
            ep.receive(0, MsgKind.DISCARD if i == 1 else MsgKind.DATA, m, d)
    assert [d.get().tobytes() for i, d in enumerate(dsts) if i != 1] == [p for i, p in enumerate(plain) if i != 1]
    assert not dsts[1].get().any() and ep.accepted == 3 and ep.batches == 1
    bad = host.seal(0, 0, _data(100))
    bad[3] ^= 1
    after = host.seal(0, 1, _data(CHUNK))
    out = cp.full(CHUNK, 0x5E, dtype=cp.uint8)
    with pytest.raises(TagMismatch, match="no destination of its batch of 2 was written"), ep.batch():
        ep.receive(0, MsgKind.DISCARD, bad)  # a bad DISCARD sinks its batch too
        ep.receive(0, MsgKind.DATA, after, out)
    assert (out.get() == 0x5E).all()


@pytest.mark.parametrize("bad", [0, 2, 4])
def test_a_bad_tag_leaves_every_destination_of_the_batch_untouched(host: Host, bad: int) -> None:
    cp, ep = host.cp, host.ep
    msgs = [host.seal(0, i, _data(CHUNK - 5 * i)) for i in range(5)]
    msgs[bad][len(msgs[bad]) // 2] ^= 0x04  # the untrusted host flips a bit in the arena
    dsts = [cp.full(CHUNK - 5 * i, 0xA0 + i, dtype=cp.uint8) for i in range(5)]
    with pytest.raises(TagMismatch, match=f"msg {bad + 1} .*no destination of its batch of 5"), ep.batch():
        for m, d in zip(msgs, dsts, strict=True):
            ep.receive(0, MsgKind.DATA, m, d)
    for i, d in enumerate(dsts):
        assert (d.get() == 0xA0 + i).all(), f"destination {i} written (the bad message is {bad})"
    assert ep.accepted == 0 and ep.h2d[0].messages == 0, "nothing of the batch was accepted"
    assert "tag mismatch" in (ep.dead or "")
    with pytest.raises(ChannelDead):
        ep.receive(0, MsgKind.DATA, host.seal(0, 5, _data(16)), cp.zeros(16, dtype=cp.uint8))
    # The other channel is independent (the session above it is what dies; that is the SDK's job).
    ok = _data(300)
    out = cp.zeros(300, dtype=cp.uint8)
    ep.receive(1, MsgKind.DATA, host.seal(1, 0, ok), out)
    assert out.get().tobytes() == ok


def test_a_nop_or_a_rotation_ends_the_batch(host: Host) -> None:
    cp, ep = host.cp, host.ep
    first = [_data(CHUNK) for _ in range(2)]
    dsts = [cp.zeros(CHUNK, dtype=cp.uint8) for _ in range(4)]
    with ep.batch():
        for i, p in enumerate(first):
            ep.receive(0, MsgKind.DATA, host.seal(0, i, p), dsts[i])
        nop = host.seal(0, 2, NOP_PLAINTEXT)
        ep.receive(0, MsgKind.NOP, nop)  # runs the two before it, then itself
        assert [d.get().tobytes() for d in dsts[:2]] == first
        assert ep.batches == 2
        host.tx[0].rotate_iv()
        later = _data(CHUNK)
        ep.rotate_iv(0, 1)
        ep.receive(0, MsgKind.DATA, host.seal(0, 3, later), dsts[2])
        host.tx[0].rotate_iv()
        ep.rotate_iv(0, 2)  # runs the one before it
        assert dsts[2].get().tobytes() == later and ep.batches == 3
        last = _data(CHUNK)
        ep.receive(0, MsgKind.DATA, host.seal(0, 4, last), dsts[3])
    assert dsts[3].get().tobytes() == last and ep.batches == 4
    assert ep.h2d[0].chan_ctr == 2 and ep.h2d[0].msg_ctr == 1


def test_a_full_batch_runs_before_it_takes_another_message(host: Host) -> None:
    cp, ep = host.cp, host.ep
    n = LAYOUT.h2d_slots + 2
    plain = [_data(CHUNK // 2 + i) for i in range(n)]
    dsts = [cp.zeros(len(p), dtype=cp.uint8) for p in plain]
    with ep.batch():
        for i, (p, d) in enumerate(zip(plain, dsts, strict=True)):
            ep.receive(0, MsgKind.DATA, host.seal(0, i % LAYOUT.h2d_slots, p), d)
            if i + 1 == LAYOUT.h2d_slots:
                assert ep.batches == 0  # full, but runs only when the next message comes
    assert [d.get().tobytes() for d in dsts] == plain
    assert ep.batches == 2 and ep.largest_batch == LAYOUT.h2d_slots


def test_an_error_inside_the_block_drops_the_queue_and_kills_its_channel(host: Host) -> None:
    cp, ep = host.cp, host.ep
    d = cp.full(CHUNK, 0x42, dtype=cp.uint8)
    with pytest.raises(RuntimeError, match="caller"), ep.batch():
        ep.receive(0, MsgKind.DATA, host.seal(0, 0, _data(CHUNK)), d)
        raise RuntimeError("the caller failed")
    assert (d.get() == 0x42).all() and ep.accepted == 0
    assert "abandoned" in (ep.dead or "")


def test_outside_a_batch_each_message_is_decrypted_at_once(host: Host) -> None:
    cp, ep = host.cp, host.ep
    for i in range(3):
        p = _data(CHUNK - i)
        out = cp.zeros(len(p), dtype=cp.uint8)
        ep.receive(0, MsgKind.DATA, host.seal(0, i, p), out)
        assert out.get().tobytes() == p and ep.batches == i + 1
    bad = host.seal(0, 3, _data(64))
    bad[-1] ^= 1
    out = cp.full(64, 0x99, dtype=cp.uint8)
    with pytest.raises(TagMismatch, match="msg 4"):
        ep.receive(0, MsgKind.DATA, bad, out)
    assert (out.get() == 0x99).all() and ep.accepted == 3


def test_d2h_sends_in_a_batch_are_one_encrypt_launch(host: Host) -> None:
    cp, ep = host.cp, host.ep
    secrets = host.secrets[0]
    srcs = [cp.asarray(np.frombuffer(_data(n), np.uint8)) for n in (CHUNK, 1000, 33)]
    slots = [
        memoryview(host.arena)[LAYOUT.d2h_slot(i) : LAYOUT.d2h_slot(i) + int(s.size) + 16] for i, s in enumerate(srcs)
    ]
    enc0 = host.calls(KERNEL_ENCRYPT)
    with ep.batch():
        got = [ep.send(0, s, slot) for s, slot in zip(srcs, slots, strict=True)]
        assert all(not any(slot) for slot in slots), "nothing leaves the device before the batch runs"
    assert host.calls(KERNEL_ENCRYPT) - enc0 == 1
    assert got == [(0, 0)] * 3
    aead = AESGCM(secrets.d2h_key)
    for k, (s, slot) in enumerate(zip(srcs, slots, strict=True), start=1):
        nonce = make_nonce(secrets.d2h_mask, 0, k)  # the endpoint's own D2H counter: 1, 2, 3
        assert aead.decrypt(nonce, bytes(slot), None) == s.get().tobytes()
    # A rotation between sends ends the batch: the messages before it keep the old key.
    before = cp.asarray(np.frombuffer(_data(200), np.uint8))
    with ep.batch():
        ep.send(0, before, slots[0][: 200 + 16])
        version = ep.rotate_d2h_key(0)
        assert aead.decrypt(make_nonce(secrets.d2h_mask, 0, 4), bytes(slots[0][:216]), None) == before.get().tobytes()
    assert version == 1


def test_destinations_must_be_device_memory(host: Host) -> None:
    """A host array would be copied to the device and the plaintext would land in the copy: refused."""
    from pipellm_client.errors import InvalidArgument

    ep = host.ep
    with pytest.raises(InvalidArgument, match="must be GPU memory"):
        ep.dest_view(np.zeros(64, np.uint8))
    with pytest.raises(InvalidArgument, match="must be GPU memory"):
        ep.source_view(bytearray(64))
    pytest.importorskip("torch", reason="torch comes with the integrations' packages (make test installs them)")
    t = ep.torch_empty(100)  # the endpoint's own device memory, as torch sees it (the CPU, for this fake)
    assert t.numel() == 100 and t.device == ep.torch_device
    view = ep.dest_view(t)
    assert int(view.data.ptr) == t.data_ptr(), "a view, not a copy"


def test_a_destination_written_twice_ends_the_batch(host: Host) -> None:
    """Two messages into the same bytes (the bench harness does this): the later one wins, as one by one."""
    cp, ep = host.cp, host.ep
    shared = cp.zeros(CHUNK, dtype=cp.uint8)
    first, second, other = _data(CHUNK), _data(CHUNK // 2), _data(CHUNK)
    elsewhere = cp.zeros(CHUNK, dtype=cp.uint8)
    with ep.batch():
        ep.receive(0, MsgKind.DATA, host.seal(0, 0, first), shared)
        ep.receive(0, MsgKind.DATA, host.seal(0, 1, other), elsewhere)
        ep.receive(0, MsgKind.DATA, host.seal(0, 2, second), shared[: CHUNK // 2])
    assert shared.get().tobytes() == second + first[CHUNK // 2 :]
    assert elsewhere.get().tobytes() == other and ep.batches == 2
