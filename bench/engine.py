"""`make bench-engine`: our crypto worker path next to the same library in-process, in one invocation.

Ours: SEAL jobs of region -> bounce slot through the worker pool (processes fed through shared-memory
rings, the same code the daemon runs), chunk sizes 64 KiB / 1 MiB / 16 MiB, with 1 worker and with all
workers; the source walks a 48 MiB region so it comes from memory, not cache, and the destinations are
the slots the jobs in flight write. The anchor: the same library (`crypto.Aead.encrypt_into`) in this
process doing the same memory walk (same source offsets, same destination slots), and in N forked
processes at once (what N cores give the library here). `openssl speed -evp aes-256-gcm` (the system
OpenSSL, not the library we ship) is an extra row, as is the library writing one reused destination
(the anchor before: that destination stays in L2, which no bounce arena does).

Each round measures every variant at one size back to back, in an order that alternates between rounds;
ratios are taken within a round and the medians reported. The last line is
`engine: per_worker_vs_library=<ours 1 worker / library 1 process> aggregate_vs_library=<ours N workers /
(N x library 1 process)>` at 1 MiB. Also measured: worker startup (spawn to first job done), the
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
STRIDE_SLACK = 4096


def in_flight(size: int, workers: int) -> int:
    """Jobs kept in flight (and destination slots written) by `workers` workers at `size`."""
    return (4 if size >= 1 << 20 else 32) * workers


def _walk(i: int, size: int) -> int:
    return (i * size) % (SRC_BYTES - size + 1)


class Memory:
    """The source region and the bounce slots every variant uses (one slot per job in flight)."""

    def __init__(self, workers: int) -> None:
        self.src = SharedMemory.create("bench-src", SRC_BYTES)
        self.src.prefault()
        self.src.view[:] = os.urandom(SRC_BYTES)
        slot_bytes = max(in_flight(s, workers) * (s + STRIDE_SLACK) for s in SIZES.values())
        self.dst = SharedMemory.create("bench-arena", slot_bytes)
        self.dst.prefault()

    def close(self) -> None:
        self.src.close()
        self.dst.close()


class Ours:
    """A worker pool with the bench memory mapped and a key installed."""

    def __init__(self, workers: int, mem: Memory) -> None:
        self.pool = WorkerPool(workers)
        self.mem = mem
        self.hs = self.hd = self.kid = 0

    async def start(self) -> float:
        """Start the pool; returns ms from spawning the workers to the first job's completion."""
        t0 = time.perf_counter()
        await self.pool.start()
        self.hs, self.hd = self.pool.new_handle(), self.pool.new_handle()
        self.pool.map(self.hs, self.mem.src)
        self.pool.map(self.hd, self.mem.dst)
        self.kid = self.pool.add_key(os.urandom(32))
        await asyncio.gather(
            *(
                self.pool.submit(w.Kind.SEAL, self.kid, os.urandom(12), (self.hs, 0), 4096, (self.hd, i << 12))
                for i in range(self.pool.count)
            )
        )
        startup_ms = (time.perf_counter() - t0) * 1e3
        await self.rate(1 << 20, 32 << 20)  # warm up
        return startup_ms

    async def rate(self, size: int, total: int = MEASURE_BYTES) -> float:
        """GB/s of jobs through the pool, keeping every worker busy: each completion submits the next job."""
        pool = self.pool
        nonce = os.urandom(12)  # a throwaway key: nonce reuse does not matter for a speed test
        n = max(4, total // size)
        window = in_flight(size, pool.count)
        stride = size + STRIDE_SLACK
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        state = {"next": 0, "done": 0}

        def submit(slot: int) -> None:
            i = state["next"]
            state["next"] += 1
            fut = pool.submit(w.Kind.SEAL, self.kid, nonce, (self.hs, _walk(i, size)), size, (self.hd, slot * stride))
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


def library(mem: Memory, size: int, slots: int, first_slot: int = 0, total: int = MEASURE_BYTES) -> float:
    """The same library in this process, the same walk: source offsets as the jobs', `slots` destinations
    written in turn (`slots=1`: one reused destination)."""
    aead = crypto.new_aead(os.urandom(32))
    nonce = os.urandom(12)
    src, dst = mem.src.view, mem.dst.view
    stride = size + STRIDE_SLACK
    n = max(4, total // size)
    t0 = time.perf_counter()
    for i in range(n):
        off = _walk(i, size)
        d = (first_slot + i % slots) * stride
        aead.encrypt_into(nonce, src[off : off + size], dst[d : d + size + 16])
    return n * size / (time.perf_counter() - t0) / 1e9


def library_multi(mem: Memory, size: int, procs: int) -> float:
    """`procs` forked processes running `library` at once, each on its share of the slots; aggregate GB/s
    from the first start to the last end (they start together on a pipe)."""
    per = in_flight(size, procs) // procs
    go_r, go_w = os.pipe()
    children: list[tuple[int, int]] = []
    for k in range(procs):
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait for the start, encrypt, report (start, end) and leave at once
            try:
                os.close(res_r)
                os.read(go_r, 1)
                t0 = time.monotonic()
                library(mem, size, per, k * per)
                os.write(res_w, f"{t0} {time.monotonic()}".encode())
            finally:
                os._exit(0)
        os.close(res_w)
        children.append((pid, res_r))
    os.close(go_r)
    os.write(go_w, b"g" * procs)
    os.close(go_w)
    spans = []
    for pid, res_r in children:
        with os.fdopen(res_r, "rb") as f:
            t0, t1 = map(float, f.read().split())
        os.waitpid(pid, 0)
        spans.append((t0, t1))
    n = max(4, MEASURE_BYTES // size)
    return procs * n * size / (max(t1 for _t0, t1 in spans) - min(t0 for t0, _t1 in spans)) / 1e9


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


async def _round(r: int, n: int, mem: Memory, res: dict[str, dict[str, list[float]]], startup: list[float]) -> None:
    """One round: per size, every variant back to back; ours first in even rounds, the library first in odd."""
    one, allw = Ours(1, mem), Ours(n, mem)
    startup.append(await one.start())
    await allw.start()
    try:
        for name, size in SIZES.items():
            variants: list[tuple[str, Any]] = [
                ("ours_1", lambda s=size: one.rate(s)),
                ("library_1", lambda s=size: library(mem, s, in_flight(s, 1))),
                ("ours_all", lambda s=size: allw.rate(s)),
                ("library_multi", lambda s=size: library_multi(mem, s, n)),
            ]
            if r % 2:
                variants = [variants[1], variants[0], variants[3], variants[2]]
            variants += [
                ("library_hot_dst", lambda s=size: library(mem, s, 1)),
                ("openssl_1", lambda s=size: openssl(s, 1) or float("nan")),
                ("openssl_multi", lambda s=size: openssl(s, n) or float("nan")),
            ]
            for key, fn in variants:
                out = fn()
                res[key][name].append(await out if asyncio.iscoroutine(out) else out)
    finally:
        await one.pool.close()
        await allw.pool.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="bench/results/engine.json")
    ap.add_argument("--open-only", action="store_true", help="only the race-proof decryption rows (no JSON)")
    args = ap.parse_args(argv)
    if args.open_only:
        print_race_proof_open(race_proof_open())
        return 0
    n = default_worker_count()
    sizes = list(SIZES)
    keys = ("ours_1", "library_1", "ours_all", "library_multi", "library_hot_dst", "openssl_1", "openssl_multi")
    res: dict[str, dict[str, list[float]]] = {k: {s: [] for s in sizes} for k in keys}
    startup: list[float] = []
    mem = Memory(n)
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            asyncio.run(_round(r, n, mem, res, startup))
    finally:
        mem.close()
    med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in res.items()}
    per_worker = [a / b for a, b in zip(res["ours_1"]["1MiB"], res["library_1"]["1MiB"], strict=True)]
    aggregate = [a / (n * b) for a, b in zip(res["ours_all"]["1MiB"], res["library_1"]["1MiB"], strict=True)]
    scaling = [a / (n * b) for a, b in zip(res["library_multi"]["1MiB"], res["library_1"]["1MiB"], strict=True)]
    print(f"\nAES-256-GCM, GB/s, median of {args.rounds} interleaved rounds; {n} usable cores")
    print(f"{'':>40}" + "".join(f"{s:>10}" for s in sizes))
    labels = {
        "ours_1": "ours, 1 worker",
        "library_1": "library in-process, 1 process",
        "ours_all": f"ours, {n} workers",
        "library_multi": f"library in-process, {n} processes",
        "library_hot_dst": "library, 1 process, one reused dst",
        "openssl_1": "openssl speed, 1 proc",
        "openssl_multi": f"openssl speed -multi {n}",
    }
    for k, label in labels.items():
        print(f"{label:>40}" + "".join(f"{med[k][s]:>10.2f}" for s in sizes))
    print(f"openssl: {openssl_version()} (the system's, not the library we ship)")
    print(f"worker startup, spawn to first job done: {statistics.median(startup):.0f} ms (median)")
    print(
        f"at 1 MiB, per round: ours 1 worker / library = {' '.join(f'{x:.2f}' for x in per_worker)}; "
        f"ours {n} workers / ({n} x library) = {' '.join(f'{x:.2f}' for x in aggregate)}; "
        f"library {n} processes / ({n} x library) = {' '.join(f'{x:.2f}' for x in scaling)}"
    )
    ep = endpoint_strategies()
    print(
        f"\nendpoint, 1 MiB message: decrypt in place {ep['in_place_us']:.0f} µs, via scratch + copy "
        f"{ep['scratch_copy_us']:.0f} µs, tag failure + wipe {ep['failure_with_wipe_us']:.0f} µs "
        "(we decrypt in place and wipe on failure)"
    )
    race_open = race_proof_open()
    print_race_proof_open(race_open)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "median_gbps": med,
                "rounds": res,
                "workers": n,
                "per_worker_vs_library": per_worker,
                "aggregate_vs_library": aggregate,
                "library_scaling": scaling,
                "startup_ms": startup,
                "openssl": openssl_version(),
                "endpoint_us": ep,
                "race_proof_open": race_open,
            },
            indent=1,
        )
    )
    print(
        f"engine: per_worker_vs_library={statistics.median(per_worker):.2f} "
        f"aggregate_vs_library={statistics.median(aggregate):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
