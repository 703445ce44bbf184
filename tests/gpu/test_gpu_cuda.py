"""CudaAesGcm on a real GPU: known answers, bit-equality with `cryptography` and the numpy
reference, tamper handling (destination never receives plaintext), batching, streams, in place,
argument checks. Skipped, with cuda_available()'s reason, where there is no usable GPU."""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from gpu_vectors import DECRYPT_VECTORS, ENCRYPT_VECTORS
from pipellm_client.gpu import (
    DEFAULT_PARAMS,
    CudaAesGcm,
    GcmParams,
    RefAesGcm,
    cuda_available,
    decrypt_results_ok,
)
from pipellm_client.gpu.params import FLAG_OK

AVAILABLE, REASON = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=f"no CUDA: {REASON}")]

KIB = 1024
MIB = 1024 * KIB
TINY = GcmParams(threads_per_block=32, ctr_blocks_per_thread=3, ghash_run0=2, ghash_run=2, enc_group=1)


@pytest.fixture(scope="module")
def cp() -> Any:
    return importlib.import_module("cupy")


def _host(n: int) -> np.ndarray:
    return np.frombuffer(os.urandom(n), dtype=np.uint8)


def _dev(cp: Any, data: bytes | np.ndarray) -> Any:
    arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    return cp.asarray(arr)


def _gpu_encrypt(cp: Any, gcm: CudaAesGcm, nonce: bytes, pt: np.ndarray) -> bytes:
    src = _dev(cp, pt)
    out = cp.empty(pt.size + 16, dtype=cp.uint8)
    gcm.encrypt_into(nonce, src, out)
    return bytes(out.get().tobytes())


def _gpu_decrypt(cp: Any, gcm: CudaAesGcm, nonce: bytes, sealed: bytes, fill: int = 0xAB) -> tuple[bool, bytes]:
    src = _dev(cp, sealed)
    out = cp.full(len(sealed) - 16, fill, dtype=cp.uint8)
    ok = gcm.decrypt_into(nonce, src, out).ok()
    return ok, bytes(out.get().tobytes())


def test_cuda_available_names_the_device() -> None:
    ok, name = cuda_available()
    assert ok and name


def test_nist_vectors(cp: Any) -> None:
    for vec in ENCRYPT_VECTORS:
        gcm = CudaAesGcm(bytes.fromhex(vec.key))
        pt = np.frombuffer(bytes.fromhex(vec.pt), dtype=np.uint8)
        assert _gpu_encrypt(cp, gcm, bytes.fromhex(vec.iv), pt).hex() == vec.ct + vec.tag, vec.name
        ok, out = _gpu_decrypt(cp, gcm, bytes.fromhex(vec.iv), bytes.fromhex(vec.ct + vec.tag))
        assert ok and out.hex() == vec.pt, vec.name
    for vec in DECRYPT_VECTORS:
        gcm = CudaAesGcm(bytes.fromhex(vec.key))
        ok, out = _gpu_decrypt(cp, gcm, bytes.fromhex(vec.iv), bytes.fromhex(vec.ct + vec.tag), fill=0x3C)
        assert ok == vec.valid, vec.name
        if vec.valid:
            assert out.hex() == vec.pt, vec.name
        else:
            assert out == bytes([0x3C]) * len(out), vec.name


SIZES = [0, 1, 15, 16, 17, 127, 128, 129, 16 * KIB - 1, 16 * KIB, 16 * KIB + 1, 32 * KIB - 1,
         32 * KIB, 32 * KIB + 1, MIB - 1, MIB, MIB + 17, 16 * MIB + 5, 32 * MIB, 32 * MIB + 1,
         64 * MIB + 3]  # fmt: skip


@pytest.mark.parametrize("n", SIZES)
def test_matches_cryptography_both_directions(cp: Any, n: int) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    gcm = CudaAesGcm(key)
    pt = _host(n)
    expected = AESGCM(key).encrypt(nonce, pt.tobytes(), None)
    assert _gpu_encrypt(cp, gcm, nonce, pt) == expected
    ok, out = _gpu_decrypt(cp, gcm, nonce, expected)
    assert ok
    assert out == pt.tobytes()


def test_256_mib_three_levels(cp: Any) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    n = 256 * MIB + 7
    pt = _host(n)
    expected = AESGCM(key).encrypt(nonce, pt.tobytes(), None)
    gcm = CudaAesGcm(key)
    assert _gpu_encrypt(cp, gcm, nonce, pt) == expected
    ok, out = _gpu_decrypt(cp, gcm, nonce, expected)
    assert ok and out == pt.tobytes()


def test_matches_reference_random_sizes(cp: Any) -> None:
    rng = np.random.default_rng(1234)
    sizes = [int(s) for s in rng.integers(0, 8 * MIB, size=6)] + [int(s) for s in rng.integers(0, 70_000, size=10)]
    key = os.urandom(32)
    gcm, ref = CudaAesGcm(key), RefAesGcm(key)
    for n in sizes:
        nonce, pt = os.urandom(12), _host(n)
        sealed = _gpu_encrypt(cp, gcm, nonce, pt)
        assert sealed == ref.encrypt(nonce, pt).tobytes(), n
        ok, out = _gpu_decrypt(cp, gcm, nonce, sealed)
        assert ok and out == pt.tobytes(), n


def test_tiny_params_on_gpu(cp: Any) -> None:
    """A second compiled variant with a deep GHASH tree on small inputs."""
    key = os.urandom(32)
    gcm = CudaAesGcm(key, params=TINY)
    aead = AESGCM(key)
    for n in (0, 17, 1000, 64 * KIB + 1, 300_000):
        nonce, pt = os.urandom(12), _host(n)
        expected = aead.encrypt(nonce, pt.tobytes(), None)
        assert _gpu_encrypt(cp, gcm, nonce, pt) == expected, n
        ok, out = _gpu_decrypt(cp, gcm, nonce, expected)
        assert ok and out == pt.tobytes(), n


@pytest.mark.parametrize("n", [0, 1, 100, MIB + 3])
@pytest.mark.parametrize("where", ["ct_first", "ct_last", "tag_first", "tag_last"])
def test_tamper_leaves_destination_untouched(cp: Any, n: int, where: str) -> None:
    if n == 0 and where.startswith("ct"):
        pytest.skip("no ciphertext byte to flip")
    key, nonce = os.urandom(32), os.urandom(12)
    sealed = bytearray(AESGCM(key).encrypt(nonce, os.urandom(n), None))
    pos = {"ct_first": 0, "ct_last": n - 1, "tag_first": n, "tag_last": n + 15}[where]
    sealed[pos] ^= 0x40
    ok, out = _gpu_decrypt(cp, CudaAesGcm(key), nonce, bytes(sealed), fill=0x5A)
    assert not ok
    assert out == bytes([0x5A]) * n


def test_wrong_nonce_fails(cp: Any) -> None:
    key = os.urandom(32)
    sealed = AESGCM(key).encrypt(bytes(12), os.urandom(4096), None)
    ok, out = _gpu_decrypt(cp, CudaAesGcm(key), b"\x00" * 11 + b"\x01", sealed, fill=0)
    assert not ok and out == bytes(4096)


@pytest.mark.parametrize("n", [0, 33, 5 * MIB + 1])
def test_encrypt_then_cryptography_decrypts(cp: Any, n: int) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    pt = _host(n)
    sealed = _gpu_encrypt(cp, CudaAesGcm(key), nonce, pt)
    assert AESGCM(key).decrypt(nonce, sealed, None) == pt.tobytes()


def test_batch_of_decrypts_one_sync(cp: Any) -> None:
    key = os.urandom(32)
    gcm, aead = CudaAesGcm(key), AESGCM(key)
    stream = cp.cuda.Stream(non_blocking=True)
    bad = {3, 7, 12}
    jobs = []
    with stream:
        for i in range(16):
            nonce, pt = os.urandom(12), _host(MIB + i)
            sealed = bytearray(aead.encrypt(nonce, pt.tobytes(), None))
            if i in bad:
                sealed[i] ^= 1
            src = _dev(cp, bytes(sealed))
            out = cp.zeros(pt.size, dtype=cp.uint8)
            jobs.append((pt, out, gcm.decrypt_into(nonce, src, out, stream=stream)))
    oks = decrypt_results_ok([r for _, _, r in jobs])
    assert oks == [i not in bad for i in range(16)]
    for i, (pt, out, result) in enumerate(jobs):
        host = out.get()
        if i in bad:
            assert not host.any()
            assert int(result.flag.get()[0]) != FLAG_OK
        else:
            assert host.tobytes() == pt.tobytes()
            assert result.ok()


def test_several_streams(cp: Any) -> None:
    key = os.urandom(32)
    gcm, aead = CudaAesGcm(key), AESGCM(key)
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(3)]
    jobs = []
    for i in range(9):
        stream = streams[i % 3]
        nonce, pt = os.urandom(12), _host(3 * MIB + i)
        with stream:
            src = _dev(cp, aead.encrypt(nonce, pt.tobytes(), None))
            out = cp.empty(pt.size, dtype=cp.uint8)
        jobs.append((pt, out, gcm.decrypt_into(nonce, src, out, stream=stream)))
    assert decrypt_results_ok([r for _, _, r in jobs]) == [True] * 9
    for pt, out, _ in jobs:
        assert out.get().tobytes() == pt.tobytes()


def test_in_place(cp: Any) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    n = 2 * MIB + 9
    pt = _host(n)
    gcm = CudaAesGcm(key)
    buf = cp.zeros(n + 16, dtype=cp.uint8)
    buf[:n] = cp.asarray(pt)
    gcm.encrypt_into(nonce, buf[:n], buf)
    assert buf.get().tobytes() == AESGCM(key).encrypt(nonce, pt.tobytes(), None)
    assert gcm.decrypt_into(nonce, buf, buf[:n]).ok()
    assert buf[:n].get().tobytes() == pt.tobytes()


def test_argument_errors(cp: Any) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CudaAesGcm(bytes(16))
    with pytest.raises(TypeError, match="key must be bytes"):
        CudaAesGcm("k" * 32)  # type: ignore[arg-type]
    gcm = CudaAesGcm(os.urandom(32))
    buf = cp.zeros(4096, dtype=cp.uint8)
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        gcm.encrypt_into(bytes(8), buf[:64], buf[:80])
    with pytest.raises(TypeError, match=r"cupy\.ndarray"):
        gcm.encrypt_into(bytes(12), np.zeros(64, np.uint8), buf[:80])
    with pytest.raises(TypeError, match="dtype uint8"):
        gcm.encrypt_into(bytes(12), cp.zeros(16, dtype=cp.uint32), buf[:80])
    with pytest.raises(ValueError, match="C-contiguous"):
        gcm.encrypt_into(bytes(12), buf[::2][:64], buf[:80])
    with pytest.raises(ValueError, match="16-byte boundary"):
        gcm.encrypt_into(bytes(12), buf[1:65], buf[1024:1104])
    with pytest.raises(ValueError, match="len\\(data\\) \\+ 16"):
        gcm.encrypt_into(bytes(12), buf[:64], buf[1024:1100])
    with pytest.raises(ValueError, match="at least the 16-byte tag"):
        gcm.decrypt_into(bytes(12), buf[:15], buf[1024:1024])
    with pytest.raises(ValueError, match="len\\(data\\) - 16"):
        gcm.decrypt_into(bytes(12), buf[:64], buf[1024:1088])
    with pytest.raises(ValueError, match="overlap"):
        gcm.decrypt_into(bytes(12), buf[:1024], buf[16:1024])


def test_compiled_once_per_process(cp: Any) -> None:
    from pipellm_client.gpu import aesgcm_cuda

    a = CudaAesGcm(os.urandom(32))
    b = CudaAesGcm(os.urandom(32))
    assert a._kernels is b._kernels
    assert (cp.cuda.Device().id, DEFAULT_PARAMS) in aesgcm_cuda._modules


# -- batches: many messages, one launch sequence -------------------------------------------------------


def test_batch_of_one_mib_chunks_and_odd_sizes(cp: Any) -> None:
    key = os.urandom(32)
    gcm, aead = CudaAesGcm(key), AESGCM(key)
    sizes = [MIB] * 16 + [0, 1, 17, MIB - 3, 16 * KIB + 1, 5 * MIB + 7]
    nonces = [os.urandom(12) for _ in sizes]
    pts = [_host(n) for n in sizes]
    srcs = [_dev(cp, pt) for pt in pts]
    outs = [cp.empty(n + 16, dtype=cp.uint8) for n in sizes]
    gcm.encrypt_batch_into(list(zip(nonces, srcs, outs, strict=True)))
    sealed = [aead.encrypt(nc, pt.tobytes(), None) for nc, pt in zip(nonces, pts, strict=True)]
    assert [bytes(o.get().tobytes()) for o in outs] == sealed
    dsts = [cp.full(n, 0x3C, dtype=cp.uint8) for n in sizes]
    verify_only = {3, 17}
    items = [
        (nc, _dev(cp, ct), None if i in verify_only else d)
        for i, (nc, ct, d) in enumerate(zip(nonces, sealed, dsts, strict=True))
    ]
    result = gcm.decrypt_batch_into(items)
    assert result.oks() == [True] * len(sizes)
    for i, (d, pt) in enumerate(zip(dsts, pts, strict=True)):
        host = d.get()
        assert (host == 0x3C).all() if i in verify_only else host.tobytes() == pt.tobytes(), i


@pytest.mark.parametrize("bad", [0, 7, 15])
def test_batch_tag_failure_writes_no_destination(cp: Any, bad: int) -> None:
    key = os.urandom(32)
    gcm, aead = CudaAesGcm(key), AESGCM(key)
    nonces = [os.urandom(12) for _ in range(16)]
    sealed = [bytearray(aead.encrypt(nc, os.urandom(MIB), None)) for nc in nonces]
    sealed[bad][MIB // 2] ^= 0x01
    dsts = [cp.full(MIB, 0x6D, dtype=cp.uint8) for _ in range(16)]
    result = gcm.decrypt_batch_into(
        [(nc, _dev(cp, bytes(ct)), d) for nc, ct, d in zip(nonces, sealed, dsts, strict=True)]
    )
    assert result.oks() == [i != bad for i in range(16)] and not result.ok()
    assert all(not (d.get() != 0x6D).any() for d in dsts)


def test_batch_matches_reference_and_in_place(cp: Any) -> None:
    key = os.urandom(32)
    gcm, ref = CudaAesGcm(key), RefAesGcm(key)
    sizes = [70_001, 0, 33, 4096, 129]
    nonces = [os.urandom(12) for _ in sizes]
    pts = [_host(n) for n in sizes]
    want = ref.encrypt_batch(list(zip(nonces, pts, strict=True)))
    bufs = [cp.zeros(n + 16, dtype=cp.uint8) for n in sizes]
    for b, pt in zip(bufs, pts, strict=True):
        b[: pt.size] = cp.asarray(pt)
    gcm.encrypt_batch_into([(nc, b[: pt.size], b) for nc, b, pt in zip(nonces, bufs, pts, strict=True)])
    assert [b.get().tobytes() for b in bufs] == [w.tobytes() for w in want]
    assert gcm.decrypt_batch_into([(nc, b, b[: pt.size]) for nc, b, pt in zip(nonces, bufs, pts, strict=True)]).ok()
    assert [b[: pt.size].get().tobytes() for b, pt in zip(bufs, pts, strict=True)] == [pt.tobytes() for pt in pts]


def test_two_64_mib_messages_in_one_batch(cp: Any) -> None:
    key = os.urandom(32)
    gcm, aead = CudaAesGcm(key), AESGCM(key)
    nonces = [os.urandom(12) for _ in range(2)]
    pts = [_host(64 * MIB), _host(64 * MIB + 5)]
    sealed = [aead.encrypt(nc, pt.tobytes(), None) for nc, pt in zip(nonces, pts, strict=True)]
    dsts = [cp.empty(pt.size, dtype=cp.uint8) for pt in pts]
    assert gcm.decrypt_batch_into([(nc, _dev(cp, ct), d) for nc, ct, d in zip(nonces, sealed, dsts, strict=True)]).ok()
    assert all(d.get().tobytes() == pt.tobytes() for d, pt in zip(dsts, pts, strict=True))
