"""GPU AES-256-GCM kernel throughput next to a device-to-device copy, measured in the same run.

    python bench/gpu_kernels.py --json PATH

For 1, 16 and 64 MiB messages it times CudaAesGcm.decrypt_into (GHASH + tag check + CTR) and
encrypt_into (fused CTR + GHASH + tag), plus a batch of 64 back-to-back 1 MiB decrypts (the
project's default chunk size), and cudaMemcpyAsync device-to-device of the same size. GB/s is
message bytes / time (1e9 bytes); "x copy" is that rate over the copy's. Timing: CUDA events
around the GPU work only -- before each timed run a spin kernel holds the stream (~1 ms; ~20 ms
for the batch) so the host finishes queueing first -- median of --reps runs after --warmup runs.
The host's own time to queue one call is reported separately (host_us). Each size is verified
once (decrypt of a `cryptography` ciphertext, and `cryptography` decrypting the GPU's
ciphertext); the output says so.

Without a usable GPU it prints "skipped: <reason>" and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import pipellm_client.gpu  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pipellm_client.gpu import DEFAULT_PARAMS, CudaAesGcm, cuda_available

MIB = 1 << 20
SIZES = (1 * MIB, 16 * MIB, 64 * MIB)
BATCH = 64  # messages in the batched row
BATCH_BYTES = MIB  # the project's default chunk
SPIN_SOURCE = r"""
extern "C" __global__ void plm_bench_spin(long long cycles)
{
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
"""


def _label(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes % MIB == 0 else f"{nbytes} B"


def _median_gpu_ms(
    cp: Any,
    stream: Any,
    spin: Callable[[int], None],
    fn: Callable[[], None],
    *,
    reps: int,
    warmup: int,
    hold_ms: int = 1,
) -> float:
    """Median GPU time of fn() on `stream` in milliseconds. A spin kernel holds the stream for
    `hold_ms` first, so the host has queued all of fn() before the start event fires."""
    for _ in range(warmup):
        fn()
    stream.synchronize()
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        spin(hold_ms)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(float(cp.cuda.get_elapsed_time(start, end)))
    return statistics.median(times)


def _median_host_us(stream: Any, fn: Callable[[], None], reps: int) -> float:
    """Median wall time for the host to queue fn() (no waiting for the GPU), microseconds."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        stream.synchronize()
    return statistics.median(times)


def run(reps: int, warmup: int) -> dict[str, Any]:
    cp: Any = importlib.import_module("cupy")
    _, device_name = cuda_available()
    stream = cp.cuda.Stream(non_blocking=True)
    spin_kernel = cp.RawKernel(SPIN_SOURCE, "plm_bench_spin")

    def spin(ms: int) -> None:
        with stream:  # ~2e6 cycles per ms at Hopper clocks (1.6-2 GHz); only a lower bound matters
            spin_kernel((1,), (1,), (np.int64(2_000_000 * ms),))

    key = os.urandom(32)
    t_compile = time.perf_counter()
    gcm = CudaAesGcm(key)
    compile_s = time.perf_counter() - t_compile
    aead = AESGCM(key)
    results: list[dict[str, Any]] = []
    verified: list[str] = []

    def row(label: str, op: str, nbytes: int, *, gpu_ms: float, copy_ms: float, host_us: float) -> None:
        gbps = nbytes / (gpu_ms * 1e-3) / 1e9
        copy_gbps = nbytes / (copy_ms * 1e-3) / 1e9
        results.append(
            {
                "size": label,
                "size_bytes": nbytes,
                "op": op,
                "median_gpu_us": round(gpu_ms * 1e3, 2),
                "gbps": round(gbps, 2),
                "copy_gbps": round(copy_gbps, 2),
                "ratio_to_copy": round(gbps / copy_gbps, 4),
                "host_us": round(host_us, 1),
            }
        )

    for size in SIZES:
        nonce = os.urandom(12)
        pt_host = np.frombuffer(os.urandom(size), dtype=np.uint8)
        sealed_host = aead.encrypt(nonce, pt_host.tobytes(), None)
        with stream:
            pt = cp.asarray(pt_host)
            sealed = cp.asarray(np.frombuffer(sealed_host, dtype=np.uint8))
            dec_out = cp.empty(size, dtype=cp.uint8)
            enc_out = cp.empty(size + 16, dtype=cp.uint8)
            copy_dst = cp.empty(size, dtype=cp.uint8)
        stream.synchronize()

        # Verify one message each way before timing.
        assert gcm.decrypt_into(nonce, sealed, dec_out, stream=stream).ok(), "GPU rejected a valid tag"
        assert bool((dec_out == pt).all()), "GPU plaintext differs"
        gcm.encrypt_into(nonce, pt, enc_out, stream=stream)
        stream.synchronize()
        assert aead.decrypt(nonce, enc_out.get().tobytes(), None) == pt_host.tobytes()
        verified.append(_label(size))

        nonces = iter([os.urandom(12) for _ in range(4 * (reps + warmup) + 8)])

        def decrypt(sealed: Any = sealed, out: Any = dec_out, nonce: bytes = nonce) -> None:
            gcm.decrypt_into(nonce, sealed, out, stream=stream)  # same message: fine to repeat

        def encrypt(pt: Any = pt, out: Any = enc_out, nonces: Any = nonces) -> None:
            gcm.encrypt_into(next(nonces), pt, out, stream=stream)  # a fresh nonce per encryption

        def copy(src: Any = pt, dst: Any = copy_dst, n: int = size) -> None:
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, n, cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)

        copy_ms = _median_gpu_ms(cp, stream, spin, copy, reps=reps, warmup=warmup)
        for op, fn in (("decrypt", decrypt), ("encrypt", encrypt)):
            gpu_ms = _median_gpu_ms(cp, stream, spin, fn, reps=reps, warmup=warmup)
            host_us = _median_host_us(stream, fn, max(5, reps // 2))
            row(_label(size), op, size, gpu_ms=gpu_ms, copy_ms=copy_ms, host_us=host_us)

    # The project's unit of transfer: 1 MiB chunks, many in flight on one stream.
    pairs = []
    for _ in range(BATCH):
        nonce = os.urandom(12)
        sealed_host = aead.encrypt(nonce, os.urandom(BATCH_BYTES), None)
        with stream:
            sealed_dev = cp.asarray(np.frombuffer(sealed_host, dtype=np.uint8))
            pairs.append((nonce, sealed_dev, cp.empty(BATCH_BYTES, dtype=cp.uint8)))
    with stream:
        copy_src = cp.empty(BATCH_BYTES, dtype=cp.uint8)
        copy_dsts = [cp.empty(BATCH_BYTES, dtype=cp.uint8) for _ in range(BATCH)]
    stream.synchronize()
    assert all(gcm.decrypt_into(n, s, o, stream=stream).ok() for n, s, o in pairs[:2])

    def batch_decrypt() -> None:
        for nonce, sealed, out in pairs:
            gcm.decrypt_into(nonce, sealed, out, stream=stream)

    def batch_copy() -> None:
        for dst in copy_dsts:
            cp.cuda.runtime.memcpyAsync(
                dst.data.ptr, copy_src.data.ptr, BATCH_BYTES, cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr
            )

    batch_reps = max(10, reps // 2)
    copy_ms = _median_gpu_ms(cp, stream, spin, batch_copy, reps=batch_reps, warmup=2, hold_ms=20)
    # Queueing 64 decrypts takes a few ms of host time: hold the stream long enough to cover it.
    gpu_ms = _median_gpu_ms(cp, stream, spin, batch_decrypt, reps=batch_reps, warmup=2, hold_ms=20)
    host_us = _median_host_us(stream, batch_decrypt, 5) / BATCH
    label = _label(BATCH_BYTES) + f" x{BATCH}"
    row(label, "decrypt (batched)", BATCH * BATCH_BYTES, gpu_ms=gpu_ms, copy_ms=copy_ms, host_us=host_us)

    return {
        "device": device_name,
        "cupy": cp.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "params": dataclasses.asdict(DEFAULT_PARAMS),
        "compile_or_cache_load_s": round(compile_s, 2),
        "timing": (
            "CUDA events around GPU work only (stream pre-blocked by a spin kernel: ~1 ms, batched row "
            f"~20 ms), median of {reps} runs after {warmup} warm-up (batched row: {batch_reps} runs); "
            "host_us: time to queue one call (batched row: per message)"
        ),
        "gbps_definition": ("message bytes / median GPU time / 1e9; copy = cudaMemcpyAsync D2D of the same bytes"),
        "verified": "one message per size each way (GPU decrypt of cryptography output, cryptography "
        "decrypt of GPU output): " + ", ".join(verified),
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"device: {report['device']}  (cupy {report['cupy']}, CUDA runtime {report['cuda_runtime']})")
    print(f"kernel compile / cache load: {report['compile_or_cache_load_s']} s")
    print(f"timing: {report['timing']}")
    print(f"verified: {report['verified']}")
    header = f"{'size':>12} {'op':>18} {'GPU us':>10} {'GB/s':>9} {'copy GB/s':>10} {'x copy':>8} {'host us':>8}"
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        print(
            f"{r['size']:>12} {r['op']:>18} {r['median_gpu_us']:>10.1f} {r['gbps']:>9.1f} "
            f"{r['copy_gbps']:>10.1f} {r['ratio_to_copy']:>8.3f} {r['host_us']:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement (>= 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    args = parser.parse_args(argv)
    if args.reps < 10:
        parser.error("--reps must be at least 10")
    ok, reason = cuda_available()
    if not ok:
        print(f"skipped: {reason}")
        if args.json:
            args.json.write_text(json.dumps({"skipped": reason}, indent=2) + "\n")
        return 0
    report = run(args.reps, args.warmup)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
