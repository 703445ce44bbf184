"""`make bench-engine`: our crypto worker path next to `openssl speed`, in one invocation.

Ours: jobs of region -> bounce slot through the worker pool (processes over shared memory, the same code
the daemon runs), chunk sizes 64 KiB / 1 MiB / 16 MiB, with 1 worker and with all workers; the source
walks a 48 MiB region so it comes from memory, not cache. Theirs: `openssl speed -evp aes-256-gcm` at
the same sizes, 1 process and `-multi N`. Rounds are interleaved (ours, theirs, ours, ...) and medians
reported. Also measured: the same library encrypting in-process (the ceiling of our path), the
endpoint's two ways of never leaving unauthenticated plaintext in a destination, and what the race-proof
decryption (`crypto.open_into`: the host-writable arena copied through private memory, piece by piece)
costs next to decrypting straight from the arena (`--open-only` runs just that part).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pipellm_client import crypto
from pipellm_client.shm import SharedMemory

from pipellm_daemon import jobwire as w
from pipellm_daemon.workers import WorkerPool, default_worker_count

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
SRC_BYTES = 48 << 20
MEASURE_BYTES = 384 << 20


async def _pool_rate(pool: WorkerPool, hs: int, hd: int, kid: int, size: int, slots: int, total: int) -> float:
    """GB/s of jobs through the pool, keeping every worker busy: each completion submits the next job."""
    nonce = os.urandom(12)
    n = max(4, total // size)
    window = min(slots, 4 * pool.count if size >= 1 << 20 else 32 * pool.count)
    stride = size + 4096
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    state = {"next": 0, "done": 0}

    def submit(slot: int) -> None:
        i = state["next"]
        state["next"] += 1
        src = (i * size) % (SRC_BYTES - size + 1)
        fut = pool.submit(w.Kind.SEAL, kid, nonce, (hs, src), size, (hd, slot * stride))
        fut.add_done_callback(lambda _f: on_done(slot))

    def on_done(slot: int) -> None:
        state["done"] += 1
        if state["next"] < n:
            submit(slot)
        elif state["done"] == n and not finished.done():
            finished.set_result(None)

    t0 = time.perf_counter()
    for slot in range(min(window, n)):
        submit(slot)
    await finished
    return n * size / (time.perf_counter() - t0) / 1e9


async def ours(workers: int, rounds_sizes: list[str]) -> dict[str, float]:
    pool = WorkerPool(workers)
    await pool.start()
    src = SharedMemory.create("bench-src", SRC_BYTES)
    src.prefault()
    src.view[:] = os.urandom(SRC_BYTES)
    slots = max(4, 8 * workers)
    dst = SharedMemory.create("bench-arena", slots * ((16 << 20) + 4096))
    dst.prefault()
    hs, hd = pool.new_handle(), pool.new_handle()
    pool.map(hs, src)
    pool.map(hd, dst)
    kid = pool.add_key(os.urandom(32))
    await _pool_rate(pool, hs, hd, kid, 1 << 20, slots, 32 << 20)  # warm up
    out = {}
    for name in rounds_sizes:
        size = SIZES[name]
        out[name] = await _pool_rate(pool, hs, hd, kid, size, min(slots, max(2, (256 << 20) // size)), MEASURE_BYTES)
    await pool.close()
    src.close()
    dst.close()
    return out


def in_process(size: int) -> float:
    """The same library in this process: the ceiling of the worker path."""
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    src = SharedMemory.create("ceiling-src", SRC_BYTES)
    src.view[:] = os.urandom(SRC_BYTES)
    dst = SharedMemory.create("ceiling-dst", size + 16)
    dst.prefault()
    n = max(4, MEASURE_BYTES // size)
    t0 = time.perf_counter()
    for i in range(n):
        off = (i * size) % (SRC_BYTES - size + 1)
        aead.encrypt_into(nonce, src.view[off : off + size], None, dst.view)
    rate = n * size / (time.perf_counter() - t0) / 1e9
    src.close()
    dst.close()
    return rate


def openssl(size: int, multi: int) -> float | None:
    exe = shutil.which("openssl")
    if exe is None:
        return None
    cmd = [exe, "speed", "-evp", "aes-256-gcm", "-bytes", str(size), "-seconds", "1"]
    if multi > 1:
        cmd[2:2] = ["-multi", str(multi)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    m = re.findall(r"^(?:aes-256-gcm|AES-256-GCM|evp)\s+([\d.]+)k", out, re.MULTILINE | re.IGNORECASE)
    return float(m[-1]) * 1000 / 1e9 if m else None


def openssl_version() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        return "not found"
    return subprocess.run([exe, "version"], capture_output=True, text=True, check=False).stdout.strip()


def endpoint_strategies(size: int = 1 << 20, reps: int = 200) -> dict[str, float]:
    """µs per message for the two ways to keep unauthenticated plaintext out of a destination:
    decrypt in place and wipe on failure (ours), or decrypt to private scratch and copy on success."""
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    msg = aead.encrypt(nonce, os.urandom(size), None)
    dst = bytearray(size)
    scratch = bytearray(size)
    bad = bytearray(msg)
    bad[-1] ^= 1

    def time_it(fn: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6

    def in_place() -> None:
        aead.decrypt_into(nonce, msg, None, dst)

    def via_scratch() -> None:
        aead.decrypt_into(nonce, msg, None, scratch)
        dst[:] = scratch

    def failure_wipe() -> None:
        try:
            aead.decrypt_into(nonce, bytes(bad), None, dst)
        except InvalidTag:
            dst[:] = bytes(size)

    return {
        "in_place_us": time_it(in_place),
        "scratch_copy_us": time_it(via_scratch),
        "failure_with_wipe_us": time_it(failure_wipe),
    }


OPEN_PIECES = (32 << 10, 64 << 10, 128 << 10, 256 << 10)


def race_proof_open(size: int = 1 << 20, rounds: int = 15, per_round: int = 96) -> dict[str, Any]:
    """GB/s decrypting `size` messages that lie in a shared mapping (48 MiB of slots, walked so they come
    from memory): `crypto.open_into` at each piece size vs `AESGCM.decrypt_into` straight from the
    mapping (the old, raceable path). One process; variants interleaved in each round, in a rotating
    order; medians. Also µs per NOP (a 4-byte message), the endpoint's cheapest message."""
    key, nonce = os.urandom(32), os.urandom(12)
    unsafe, safe = AESGCM(key), crypto.new_aead(key)
    stride = size + 4096
    slots = SRC_BYTES // stride
    arena = SharedMemory.create("open-arena", slots * stride)
    msg = unsafe.encrypt(nonce, os.urandom(size), None)
    for i in range(slots):
        arena.view[i * stride : i * stride + size + 16] = msg
    dst = memoryview(bytearray(size))

    def unsafe_open(view: memoryview) -> None:
        unsafe.decrypt_into(nonce, view, None, dst)

    def safe_open(piece: int) -> Any:
        return lambda view: crypto.open_into(safe, nonce, view, dst, piece=piece)

    variants: dict[str, Any] = {"unsafe": unsafe_open, **{f"{p >> 10}KiB": safe_open(p) for p in OPEN_PIECES}}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    walk = 0
    for r in range(rounds):
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            fn = variants[name]
            t0 = time.perf_counter()
            for _ in range(per_round):
                off = (walk % slots) * stride
                walk += 7
                fn(arena.view[off : off + size + 16])
            rates[name].append(per_round * size / (time.perf_counter() - t0) / 1e9)
    arena.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    nop = unsafe.encrypt(nonce, b"NOP\0", None)
    nop_out = memoryview(bytearray(4))
    nop_us: dict[str, list[float]] = {"unsafe": [], "open_into": []}
    for _ in range(rounds):
        for name, fn in (
            ("unsafe", lambda: unsafe.decrypt_into(nonce, nop, None, nop_out)),
            ("open_into", lambda: crypto.open_into(safe, nonce, nop, nop_out)),
        ):
            t0 = time.perf_counter()
            for _ in range(2000):
                fn()
            nop_us[name].append((time.perf_counter() - t0) / 2000 * 1e6)
    return {
        "median_gbps": med,
        "ratio": {k: med[k] / med["unsafe"] for k in med if k != "unsafe"},
        "chosen_piece": crypto.OPEN_PIECE,
        "rounds_n": rounds,
        "nop_us": {k: statistics.median(v) for k, v in nop_us.items()},
        "rounds": rates,
    }


def print_race_proof_open(res: dict[str, Any]) -> None:
    med, ratio, rounds = res["median_gbps"], res["ratio"], res["rounds_n"]
    print(f"\nD2H/H2D CPU decryption of 1 MiB from shared memory, GB/s, median of {rounds} interleaved rounds")
    print(f"{'AESGCM.decrypt_into straight from the arena (raceable)':>58}{med['unsafe']:>8.2f}")
    for p in OPEN_PIECES:
        k = f"{p >> 10}KiB"
        mark = "  <- crypto.OPEN_PIECE" if p == res["chosen_piece"] else ""
        print(f"{'crypto.open_into, ' + k + ' private pieces':>58}{med[k]:>8.2f}  ({ratio[k]:.2f} of raceable){mark}")
    nop = res["nop_us"]
    print(f"NOP (4-byte message): decrypt_into {nop['unsafe']:.1f} µs, open_into {nop['open_into']:.1f} µs")
    chosen = f"{res['chosen_piece'] >> 10}KiB"
    print(f"race-proof open: safe/unsafe at 1 MiB = {ratio[chosen]:.2f} (piece {chosen})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="bench/results/engine.json")
    ap.add_argument("--open-only", action="store_true", help="only the race-proof decryption rows (no JSON)")
    args = ap.parse_args(argv)
    if args.open_only:
        print_race_proof_open(race_proof_open())
        return 0
    n = default_worker_count()
    sizes = list(SIZES)
    res: dict[str, dict[str, list[float]]] = {
        k: {s: [] for s in sizes} for k in ("ours_1", "ours_all", "openssl_1", "openssl_multi", "ceiling")
    }
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        one = asyncio.run(ours(1, sizes))
        for s in sizes:
            res["ours_1"][s].append(one[s])
            res["openssl_1"][s].append(openssl(SIZES[s], 1) or float("nan"))
        allw = asyncio.run(ours(n, sizes))
        for s in sizes:
            res["ours_all"][s].append(allw[s])
            res["openssl_multi"][s].append(openssl(SIZES[s], n) or float("nan"))
            res["ceiling"][s].append(in_process(SIZES[s]))
    med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in res.items()}
    print(f"\nAES-256-GCM, GB/s, median of {args.rounds} interleaved rounds; {n} usable cores; {openssl_version()}")
    print(f"{'':>26}" + "".join(f"{s:>10}" for s in sizes))
    labels = {
        "ours_1": "ours, 1 worker",
        "openssl_1": "openssl speed, 1 proc",
        "ours_all": f"ours, {n} workers",
        "openssl_multi": f"openssl speed -multi {n}",
        "ceiling": "library in-process (1 core)",
    }
    for k, label in labels.items():
        print(f"{label:>26}" + "".join(f"{med[k][s]:>10.2f}" for s in sizes))
    ep = endpoint_strategies()
    print(
        f"\nendpoint, 1 MiB message: decrypt in place {ep['in_place_us']:.0f} µs, via scratch + copy "
        f"{ep['scratch_copy_us']:.0f} µs, tag failure + wipe {ep['failure_with_wipe_us']:.0f} µs "
        "(we decrypt in place and wipe on failure)"
    )
    race_open = race_proof_open()
    print_race_proof_open(race_open)
    per_worker = med["ours_1"]["1MiB"] / med["openssl_1"]["1MiB"]
    aggregate = med["ours_all"]["1MiB"] / med["openssl_multi"]["1MiB"]
    ceiling_ratio = med["ours_1"]["1MiB"] / med["ceiling"]["1MiB"]
    print(f"ours(1 worker)/library in-process at 1 MiB: {ceiling_ratio:.2f} (the cost of the worker path itself)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "median_gbps": med,
                "rounds": res,
                "workers": n,
                "openssl": openssl_version(),
                "endpoint_us": ep,
                "race_proof_open": race_open,
            },
            indent=1,
        )
    )
    print(f"engine: per_worker_ratio={per_worker:.2f} aggregate_ratio={aggregate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
