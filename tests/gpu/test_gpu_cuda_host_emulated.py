"""CudaAesGcm's host code (aesgcm_cuda.py) end to end on the CPU: a fake `cupy` keeps "device"
arrays in host memory and runs the kernels through the emulated aesgcm.cu. What this cannot check
-- real CuPy, NVRTC loading, the GPU itself -- is test_gpu_cuda.py's job."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from gpu_emu_runner import cxx_compiler
from pipellm_client.gpu import CudaAesGcm, GcmParams, cuda_available, decrypt_results_ok

pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler to build the emulator")

TINY = GcmParams(threads_per_block=32, ctr_blocks_per_thread=3, ghash_run0=2, ghash_run=2, enc_group=1)


def _seal(key: bytes, nonce: bytes, n: int) -> tuple[bytes, bytes]:
    pt = os.urandom(n)
    return pt, AESGCM(key).encrypt(nonce, pt, None)


def test_available_and_compiled_once(fake_cp: Any) -> None:
    assert cuda_available() == (True, "Emulated GPU (CPU)")
    before = fake_cp.RawModule.compiled
    a, b = CudaAesGcm(os.urandom(32), params=TINY), CudaAesGcm(os.urandom(32), params=TINY)
    assert a._kernels is b._kernels
    assert fake_cp.RawModule.compiled - before <= 1


@pytest.mark.parametrize("params", [GcmParams(), TINY], ids=["default", "tiny"])
def test_roundtrip_against_cryptography(fake_cp: Any, params: GcmParams) -> None:
    key = os.urandom(32)
    gcm = CudaAesGcm(key, params=params)
    for n in (0, 1, 16, 17, 4099, 70_001):
        nonce = os.urandom(12)
        pt, sealed = _seal(key, nonce, n)
        out = fake_cp.empty(n + 16, dtype=fake_cp.uint8)
        gcm.encrypt_into(nonce, fake_cp.asarray(np.frombuffer(pt, np.uint8)), out)
        assert out.get().tobytes() == sealed, n
        dst = fake_cp.empty(n, dtype=fake_cp.uint8)
        result = gcm.decrypt_into(nonce, fake_cp.asarray(np.frombuffer(sealed, np.uint8)), dst)
        assert result.ok(), n
        assert dst.get().tobytes() == pt, n


def test_tamper_and_batch(fake_cp: Any) -> None:
    key = os.urandom(32)
    gcm = CudaAesGcm(key, params=TINY)
    stream = fake_cp.cuda.Stream(non_blocking=True)
    jobs = []
    for i in range(6):
        nonce = os.urandom(12)
        pt, sealed = _seal(key, nonce, 3000 + i)
        data = bytearray(sealed)
        if i % 2:
            data[-1 - i] ^= 1
        dst = fake_cp.full(len(pt), 0x99, dtype=fake_cp.uint8)
        res = gcm.decrypt_into(nonce, fake_cp.asarray(np.frombuffer(bytes(data), np.uint8)), dst, stream=stream)
        jobs.append((pt, dst, res))
    assert decrypt_results_ok([r for _, _, r in jobs]) == [i % 2 == 0 for i in range(6)]
    assert stream.synchronized >= 1
    for i, (pt, dst, res) in enumerate(jobs):
        assert res.stream is stream
        if i % 2:
            assert (dst.get() == 0x99).all() and not res.ok()
        else:
            assert dst.get().tobytes() == pt and res.ok()


def test_in_place_and_checks(fake_cp: Any) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    gcm = CudaAesGcm(key, params=TINY)
    pt, sealed = _seal(key, nonce, 1000)
    buf = fake_cp.zeros(1016, dtype=fake_cp.uint8)
    buf[:1000] = fake_cp.asarray(np.frombuffer(pt, np.uint8))
    gcm.encrypt_into(nonce, buf[:1000], buf)
    assert buf.get().tobytes() == sealed
    assert gcm.decrypt_into(nonce, buf, buf[:1000]).ok()
    assert buf[:1000].get().tobytes() == pt
    with pytest.raises(ValueError, match="16-byte boundary"):
        gcm.decrypt_into(nonce, buf[1:1001], buf[32:1016][:984])
    with pytest.raises(ValueError, match="overlap"):
        gcm.decrypt_into(nonce, buf[:1016], buf[16:1016])
    with pytest.raises(ValueError, match="C-contiguous"):
        gcm.encrypt_into(nonce, buf[::2][:100], buf[:116])
    with pytest.raises(TypeError, match=r"cupy\.ndarray"):
        gcm.encrypt_into(nonce, np.zeros(4, np.uint8), buf[:20])
    with pytest.raises(ValueError, match="exceeds the maximum"):
        gcm.encrypt_into(
            nonce,
            _FakeHuge(fake_cp, TINY.max_message_bytes + 1),
            _FakeHuge(fake_cp, TINY.max_message_bytes + 17),
        )


class _FakeHuge:
    """A 'device array' that only claims a size (to test the size limit without allocating)."""

    def __new__(cls, fake_cp: Any, n: int) -> Any:
        arr = fake_cp.ndarray(np.zeros(16, np.uint8))
        arr.__class__ = type("Huge", (fake_cp.ndarray,), {"size": property(lambda self: n)})
        return arr


def test_benchmark_script_runs(fake_cp: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """bench/gpu_kernels.py end to end on the fake GPU with tiny sizes (numbers meaningless)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "SIZES", (4096, 20_000))
    monkeypatch.setattr(bench, "BATCHES", (3,))
    monkeypatch.setattr(bench, "CALLS", 2)
    monkeypatch.setattr(bench, "BATCH_BYTES", 8192)
    monkeypatch.setattr(bench, "TARGETS", (("decrypt 8 KiB x3 (batch)", "decrypt (batch)", 3, 8192, 1e-9),))
    monkeypatch.setitem(sys.modules, "cupy", fake_cp)
    out = tmp_path / "bench.json"
    assert bench.main(["--json", str(out), "--reps", "10", "--warmup", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "Emulated GPU (CPU)"
    assert [(r["size_bytes"], r["messages"], r["op"]) for r in report["results"]] == [
        (4096, 1, "decrypt"), (4096, 1, "encrypt"), (20_000, 1, "decrypt"), (20_000, 1, "encrypt"),
        (3 * 8192, 3, "decrypt (batch)"), (3 * 8192, 3, "encrypt (batch)"), (2 * 8192, 2, "decrypt (2 calls)"),
    ]  # fmt: skip
    assert report["targets"]["decrypt 8 KiB x3 (batch)"]["met"] is True
    assert all(r["gbps"] > 0 and r["copy_gbps"] > 0 for r in report["results"])
    assert "verified" in report and "x copy" in capsys.readouterr().out


# -- batches through CudaAesGcm's own host code -----------------------------------------------------


def _dev(fake_cp: Any, data: bytes) -> Any:
    return fake_cp.asarray(np.frombuffer(data, np.uint8))


def test_batch_decrypt_and_encrypt(fake_cp: Any) -> None:
    key = os.urandom(32)
    gcm = CudaAesGcm(key, params=TINY)
    sizes = [0, 1, 17, 4099, 70_001, 512, 31]
    nonces = [os.urandom(12) for _ in sizes]
    sealed = [_seal(key, nc, n) for nc, n in zip(nonces, sizes, strict=True)]
    srcs = [fake_cp.asarray(np.frombuffer(pt, np.uint8)) for pt, _ in sealed]
    outs = [fake_cp.empty(n + 16, dtype=fake_cp.uint8) for n in sizes]
    gcm.encrypt_batch_into(list(zip(nonces, srcs, outs, strict=True)))
    assert [o.get().tobytes() for o in outs] == [ct for _, ct in sealed]
    dsts = [fake_cp.full(n, 0x21, dtype=fake_cp.uint8) if i != 2 else None for i, n in enumerate(sizes)]
    res = gcm.decrypt_batch_into(
        [(nc, _dev(fake_cp, ct), d) for nc, (_, ct), d in zip(nonces, sealed, dsts, strict=True)]
    )
    assert res.n == len(sizes) and res.ok() and res.oks() == [True] * len(sizes)
    for i, ((pt, _), d) in enumerate(zip(sealed, dsts, strict=True)):
        if i != 2:
            assert d is not None and d.get().tobytes() == pt


def test_batch_with_one_bad_tag_writes_nothing(fake_cp: Any) -> None:
    key = os.urandom(32)
    gcm = CudaAesGcm(key, params=TINY)
    sizes = [3000, 17, 40_000, 5, 1024]
    nonces = [os.urandom(12) for _ in sizes]
    sealed = [bytearray(_seal(key, nc, n)[1]) for nc, n in zip(nonces, sizes, strict=True)]
    sealed[2][-3] ^= 0x80  # a tag byte of the middle message
    dsts = [fake_cp.full(n, 0x77, dtype=fake_cp.uint8) for n in sizes]
    res = gcm.decrypt_batch_into(
        [(nc, _dev(fake_cp, bytes(ct)), d) for nc, ct, d in zip(nonces, sealed, dsts, strict=True)]
    )
    assert res.oks() == [True, True, False, True, True] and not res.ok()
    assert all((d.get() == 0x77).all() for d in dsts)
    assert decrypt_results_ok([res, gcm.decrypt_into(nonces[0], _dev(fake_cp, bytes(sealed[0])), dsts[0])]) == [
        False,
        True,
    ]


def test_batch_overlaps_are_refused(fake_cp: Any) -> None:
    gcm = CudaAesGcm(os.urandom(32), params=TINY)
    buf = fake_cp.zeros(8192, dtype=fake_cp.uint8)
    a, b = buf[:1016], buf[1024:2040]
    with pytest.raises(ValueError, match=r"message 1 overlaps the source of message 0|message 0 overlaps the dest"):
        gcm.decrypt_batch_into([(bytes(12), a, None), (bytes(12), b, buf[0:1000])])
    with pytest.raises(ValueError, match="overlaps the destination of message 0"):
        gcm.decrypt_batch_into([(bytes(12), a, buf[4096:5096]), (bytes(12), b, buf[4096:5096])])
    with pytest.raises(ValueError, match="overlap"):  # within one message, not in place
        gcm.encrypt_batch_into([(bytes(12), buf[:1000], buf[16:1032])])
    # Sources may overlap each other; a destination may coincide with its own source (in place).
    gcm.decrypt_batch_into([(bytes(12), a, None), (bytes(12), a, None), (bytes(12), b, b[:1000])])
    with pytest.raises(ValueError, match="at least one message"):
        gcm.decrypt_batch_into([])


def test_many_queued_batches_reuse_the_pinned_tables(fake_cp: Any) -> None:
    """More batches in flight than pinned table buffers: each waits for its buffer's last copy."""
    key = os.urandom(32)
    gcm = CudaAesGcm(key, params=TINY)
    jobs = []
    for i in range(20):
        nonce = os.urandom(12)
        pt, ct = _seal(key, nonce, 100 + i)
        dst = fake_cp.zeros(len(pt), dtype=fake_cp.uint8)
        jobs.append((pt, dst, gcm.decrypt_into(nonce, _dev(fake_cp, ct), dst)))
    assert decrypt_results_ok([r for _, _, r in jobs]) == [True] * 20
    assert all(d.get().tobytes() == pt for pt, d, _ in jobs)
