"""NIST CAVP AES-256-GCM known answers, run through our nonce framing, sender and strict receiver."""

from __future__ import annotations

import struct

import pytest
from pipellm_client.channel import make_nonce
from pipellm_client.errors import TagMismatch

from .conftest import make_pair
from .vectors import ENCRYPT, MUST_FAIL


def mask_for_first_message(iv: bytes) -> bytes:
    """The mask that makes message 1 of IV epoch 0 use exactly `iv`."""
    raw = struct.pack("<IQ", 1, 0)
    return bytes(a ^ b for a, b in zip(raw, iv, strict=True))


@pytest.mark.parametrize(("key", "iv", "pt", "ct", "tag"), ENCRYPT)
def test_known_answer_through_framing(key: str, iv: str, pt: str, ct: str, tag: str) -> None:
    mask = mask_for_first_message(bytes.fromhex(iv))
    assert make_nonce(mask, 0, 1) == bytes.fromhex(iv)
    tx, rx = make_pair(bytes.fromhex(key), mask)
    plaintext = bytes.fromhex(pt)
    out = bytearray(len(plaintext) + 16)
    reserved = tx.reserve()
    tx.seal_into(reserved, plaintext, memoryview(out))
    assert out.hex() == ct + tag
    got = bytearray(len(plaintext))
    rx.open_next(bytes(out), memoryview(got))
    assert bytes(got) == plaintext


@pytest.mark.parametrize(("key", "iv", "ct", "tag"), MUST_FAIL)
def test_known_failures_are_refused_and_kill(key: str, iv: str, ct: str, tag: str) -> None:
    _tx, rx = make_pair(bytes.fromhex(key), mask_for_first_message(bytes.fromhex(iv)))
    out = bytearray(len(ct) // 2)
    with pytest.raises(TagMismatch):
        rx.open_next(bytes.fromhex(ct + tag), memoryview(out))
    assert out == bytes(len(out)), "no unauthenticated plaintext left in the destination"
    assert rx.dead
