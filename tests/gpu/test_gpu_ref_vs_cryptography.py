"""The numpy reference (the GPU algorithm) is bit-for-bit `cryptography`'s AESGCM, both ways."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from pipellm_client.gpu import DEFAULT_PARAMS, GcmParams, RefAesGcm, TagMismatch

KIB = 1024
MIB = 1024 * KIB
TINY = GcmParams(threads_per_block=32, ctr_blocks_per_thread=3, ghash_run0=2, ghash_run=2, enc_group=1)


def _boundary_sizes(p: GcmParams) -> list[int]:
    """Lengths at and around every decomposition boundary of `p` (bytes)."""
    run0 = 16 * p.ghash_run0  # one thread's GHASH run
    span0 = 16 * p.span(0)  # one CUDA block of GHASH level 0
    ctr = 16 * p.threads_per_block * p.ctr_blocks_per_thread  # one CUDA block of the CTR pass
    two_levels = span0 * p.span(1)  # beyond this a third level appears
    sizes = {0, 1, 15, 16, 17, 31, 32, 33}
    for edge in (run0, span0, ctr, 2 * span0, two_levels):
        sizes.update({edge - 16, edge - 1, edge, edge + 1, edge + 15, edge + 16})
    return sorted(s for s in sizes if 0 <= s <= 1100 * KIB)


def _rand(n: int) -> np.ndarray:
    return np.frombuffer(os.urandom(n), dtype=np.uint8)


def _matches_cryptography(key: bytes, nonce: bytes, pt: np.ndarray) -> None:
    """The reference seals `pt` to OpenSSL's exact bytes and opens them back to `pt`."""
    expected = AESGCM(key).encrypt(nonce, pt.tobytes(), None)
    ref = RefAesGcm(key)
    assert ref.encrypt(nonce, pt).tobytes() == expected
    assert ref.decrypt(nonce, np.frombuffer(expected, dtype=np.uint8)).tobytes() == pt.tobytes()


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
def test_boundary_lengths_both_directions(params: GcmParams) -> None:
    key = os.urandom(32)
    ref = RefAesGcm(key, params)
    aead = AESGCM(key)
    for n in _boundary_sizes(params):
        nonce = os.urandom(12)
        pt = _rand(n)
        expected = aead.encrypt(nonce, pt.tobytes(), None)
        assert ref.encrypt(nonce, pt).tobytes() == expected, n
        assert ref.decrypt(nonce, np.frombuffer(expected, dtype=np.uint8)).tobytes() == pt.tobytes(), n


@pytest.mark.parametrize("n", [64 * KIB, MIB - 3, MIB, MIB + 17])
def test_large_messages(n: int) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    _matches_cryptography(key, nonce, _rand(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=0, max_value=80_000), seed=st.binary(min_size=44, max_size=44))
def test_random_lengths_keys_nonces(n: int, seed: bytes) -> None:
    key, nonce = seed[:32], seed[32:]
    _matches_cryptography(key, nonce, _rand(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=0, max_value=5000), data=st.data())
def test_tampering_is_detected(n: int, data: st.DataObject) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    ref = RefAesGcm(key, TINY)
    sealed = bytearray(AESGCM(key).encrypt(nonce, os.urandom(n), None))
    pos = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="byte")
    bit = data.draw(st.integers(min_value=0, max_value=7), label="bit")
    sealed[pos] ^= 1 << bit
    out = np.full(n, 0xEE, dtype=np.uint8)
    assert not ref.decrypt_into(nonce, np.frombuffer(bytes(sealed), dtype=np.uint8), out)
    assert (out == 0xEE).all()  # nothing written on failure
    with pytest.raises(TagMismatch):
        ref.decrypt(nonce, bytes(sealed))


def test_wrong_nonce_or_key_fails() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, b"weights" * 100, None)
    with pytest.raises(TagMismatch):
        RefAesGcm(key).decrypt(os.urandom(12), sealed)
    with pytest.raises(TagMismatch):
        RefAesGcm(os.urandom(32)).decrypt(nonce, sealed)


def test_accepts_bytes_and_multidimensional_arrays() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    pt = _rand(64).reshape(4, 16)
    expected = AESGCM(key).encrypt(nonce, pt.tobytes(), None)
    assert RefAesGcm(key).encrypt(nonce, pt).tobytes() == expected
    assert RefAesGcm(key).decrypt(nonce, expected).tobytes() == pt.tobytes()


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        RefAesGcm(bytes(16))
    with pytest.raises(TypeError, match="key must be bytes"):
        RefAesGcm("k" * 32)  # type: ignore[arg-type]
    ref = RefAesGcm(os.urandom(32))
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        ref.encrypt(bytes(16), b"x")
    with pytest.raises(TypeError, match="nonce must be bytes"):
        ref.encrypt("n" * 12, b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype uint8"):
        ref.encrypt(bytes(12), np.zeros(4, dtype=np.uint32))
    with pytest.raises(ValueError, match="at least the 16-byte tag"):
        ref.decrypt(bytes(12), bytes(15))
    with pytest.raises(ValueError, match="out must have 4 bytes"):
        ref.decrypt_into(bytes(12), bytes(20), np.zeros(5, dtype=np.uint8))


# -- batches: several messages, each with its own nonce and length, in one launch sequence -----------


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=9000), min_size=1, max_size=9),
    params=st.sampled_from([DEFAULT_PARAMS, TINY]),
)
def test_batches_match_cryptography(sizes: list[int], params: GcmParams) -> None:
    key = os.urandom(32)
    ref, aead = RefAesGcm(key, params), AESGCM(key)
    nonces = [os.urandom(12) for _ in sizes]
    pts = [_rand(n) for n in sizes]
    sealed = ref.encrypt_batch(list(zip(nonces, pts, strict=True)))
    assert [s.tobytes() for s in sealed] == [
        aead.encrypt(nc, pt.tobytes(), None) for nc, pt in zip(nonces, pts, strict=True)
    ]
    outs = [np.full(n, 0xC3, np.uint8) for n in sizes]
    assert ref.decrypt_batch_into(list(zip(nonces, sealed, outs, strict=True))) == [True] * len(sizes)
    assert [o.tobytes() for o in outs] == [pt.tobytes() for pt in pts]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=2, max_size=8), data=st.data())
def test_one_bad_tag_leaves_the_whole_batch_untouched(sizes: list[int], data: st.DataObject) -> None:
    key = os.urandom(32)
    ref = RefAesGcm(key, TINY)
    nonces = [os.urandom(12) for _ in sizes]
    sealed = [bytearray(AESGCM(key).encrypt(nc, os.urandom(n), None)) for nc, n in zip(nonces, sizes, strict=True)]
    bad = data.draw(st.integers(min_value=0, max_value=len(sizes) - 1), label="message")
    pos = data.draw(st.integers(min_value=0, max_value=len(sealed[bad]) - 1), label="byte")
    sealed[bad][pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7), label="bit")
    outs = [np.full(n, 0xEE, np.uint8) for n in sizes]
    oks = ref.decrypt_batch_into([(nc, bytes(s), o) for nc, s, o in zip(nonces, sealed, outs, strict=True)])
    assert oks == [i != bad for i in range(len(sizes))]
    assert all((o == 0xEE).all() for o in outs)  # before, at and after the bad one


def test_batch_of_one_mib_chunks_and_verify_only() -> None:
    key = os.urandom(32)
    ref, aead = RefAesGcm(key), AESGCM(key)
    sizes = [MIB, MIB - 5, 17]
    nonces = [os.urandom(12) for _ in sizes]
    pts = [_rand(n) for n in sizes]
    sealed = [np.frombuffer(aead.encrypt(nc, pt.tobytes(), None), np.uint8) for nc, pt in zip(nonces, pts, strict=True)]
    outs: list[np.ndarray | None] = [np.zeros(MIB, np.uint8), None, np.zeros(17, np.uint8)]
    assert ref.decrypt_batch_into(list(zip(nonces, sealed, outs, strict=True))) == [True] * 3
    assert outs[0] is not None and outs[0].tobytes() == pts[0].tobytes()
    assert outs[2] is not None and outs[2].tobytes() == pts[2].tobytes()
