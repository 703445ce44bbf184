"""`make loadtest`: N concurrent sessions x mixed workloads against one pipellmd, for a fixed time, loopback only.

Each session runs in its own process (as serving processes do) and cycles through four workloads:

* cyclic weight loads — the layers of a read-only region, in the same order every step (FlexGen-style);
* KV swap-out / swap-in — D2H of fresh blocks with `swap_out=True`, then H2D of the same blocks back;
* small transfers — random sub-chunk ranges, some flagged unpredicted (copy engine 1);
* batched commits — several random ranges in one commit.

The endpoint decrypts and verifies every message ("all"), and every delivered byte is compared with what
was sent. Reported: transfers/s, client-side commit latency p50/p99/p999, daemon RSS and CPU (the daemon
process plus its crypto workers), and errors, which must be 0 (the exit status says so). The final line is

    load: sessions=<n> transfers_per_s=<t> gbps=<g> p99_ms=<p> errors=<e> rss_mb=<m>

gbps is the bytes moved in both directions during the window, over its wall time, in GB/s.

rss_mb is the peak, during the measured window, of the daemon's RSS plus its workers' USS (the bounce
arenas are shared with the workers; counting their RSS too would count the arenas twice).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np
import psutil

from pipellm_daemon.launcher import DaemonProcess

START_TIMEOUT_S = 120.0  # all sessions open and loaded (16 process starts on a busy 2-core box)
GRACE_S = 60.0  # after the window: time for every session to finish its current step and report
# Memory is sampled once a second: each sample walks the workers' smaps (every session's arena), which at
# four samples a second took about 7% of one core of a 2-vCPU host (perf), from the sessions it measures.
SAMPLE_EVERY_S = 1.0


@dataclass
class Shape:
    """Sizes of one session's workload."""

    chunk: int
    layers: int = 8
    kv_blocks: int = 16
    swap_blocks: int = 2  # blocks swapped out and back per step
    small_max: int = 64 << 10
    batch: int = 4

    @property
    def layer(self) -> int:
        return self.chunk

    @property
    def block(self) -> int:
        return self.chunk // 2


@dataclass
class SessionReport:
    """Per operation: (end time on CLOCK_MONOTONIC, which every process shares, latency s, transfers, bytes)."""

    index: int
    commits: list[tuple[float, float, int, int]] = field(default_factory=list)
    d2h: list[tuple[float, float, int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    hit_rate: float = 0.0


# -- one session (runs in its own process) ------------------------------------------------------------------
def run_session(index: int, socket: str, shape: Shape, ready: Any, start: Event, stop: Event, results: Any) -> None:
    report = SessionReport(index)
    try:
        _session_loop(index, socket, shape, ready, start, stop, report)
    except BaseException as exc:  # a session that cannot go on still reports what it saw
        report.errors.append(f"session {index}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
    finally:
        ready.put(index)  # never leave the parent waiting for a session that failed before it was ready
        results.put(report)


def _session_loop(
    index: int, socket: str, shape: Shape, ready: Any, start: Event, stop: Event, report: SessionReport
) -> None:
    from pipellm_client import Client

    rng = np.random.default_rng(index)
    with Client(socket) as client, client.open_session(f"load-{index}", swap_order="fifo") as s:
        weights = rng.integers(0, 256, shape.layers * shape.layer, dtype=np.uint8)
        w = s.alloc_region(len(weights), readonly=True, name="weights", data=weights)
        kv_size = shape.kv_blocks * shape.block
        kv = s.alloc_region(kv_size, name="kv")
        kv_expected = np.zeros(kv_size, np.uint8)
        dst = np.empty(shape.layer, np.uint8)
        ready.put(index)
        start.wait()

        def commit(
            items: list[tuple[Any, int, int, np.ndarray]], expected: list[np.ndarray], op: str, **kw: Any
        ) -> None:
            t0 = time.monotonic()
            if len(items) == 1:
                s.h2d(*items[0], **kw)
            else:
                s.h2d_many(items, **kw)
            t1 = time.monotonic()
            report.commits.append((t1, t1 - t0, len(items), sum(n for _r, _o, n, _d in items)))
            report.ops[op] = report.ops.get(op, 0) + 1
            for (_r, _o, n, out), want in zip(items, expected, strict=True):
                if not np.array_equal(out[:n], want):
                    report.errors.append(f"session {index}: {op} delivered wrong bytes")

        step = 0
        while not stop.is_set():
            # 1. cyclic weight loads: every layer, same order every step
            for j in range(shape.layers):
                off = j * shape.layer
                commit([(w, off, shape.layer, dst)], [weights[off : off + shape.layer]], "weights")
            # 2. KV swap-out of fresh blocks, then swap-in of the same blocks (FIFO)
            blocks = [(step * shape.swap_blocks + b) % shape.kv_blocks for b in range(shape.swap_blocks)]
            for b in blocks:
                data = rng.integers(0, 256, shape.block, dtype=np.uint8)
                t0 = time.monotonic()
                s.d2h(data, kv, b * shape.block, swap_out=True, group=step + 1)
                t1 = time.monotonic()
                report.d2h.append((t1, t1 - t0, 1, shape.block))
                kv_expected[b * shape.block : (b + 1) * shape.block] = data
            for b in blocks:
                off = b * shape.block
                back = np.empty(shape.block, np.uint8)
                commit([(kv, off, shape.block, back)], [kv_expected[off : off + shape.block]], "swap_in")
            # 3. small transfers, some unpredicted
            for k in range(4):
                n = int(rng.integers(1, shape.small_max + 1))
                off = int(rng.integers(0, len(weights) - n + 1))
                out = np.empty(n, np.uint8)
                commit([(w, off, n, out)], [weights[off : off + n]], "small", unpredicted=bool(k % 2))
            # 4. one batched commit of random ranges, weights and KV mixed
            items: list[tuple[Any, int, int, np.ndarray]] = []
            expected: list[np.ndarray] = []
            for k in range(shape.batch):
                region, src = (w, weights) if k % 2 == 0 else (kv, kv_expected)
                n = int(rng.integers(1, shape.chunk + 1))
                off = int(rng.integers(0, len(src) - n + 1))
                items.append((region, off, n, np.empty(n, np.uint8)))
                expected.append(src[off : off + n])
            commit(items, expected, "batched")
            step += 1
        s.wait_all()
        if (kv.read() != kv_expected).any():
            report.errors.append(f"session {index}: KV region differs from what was swapped out")
        counters = s.status().counters
        if counters.channel_deaths:
            report.errors.append(f"session {index}: {counters.channel_deaths} channel deaths")
        report.hit_rate = counters.hit_rate


# -- the daemon, observed ---------------------------------------------------------------------------------------
class DaemonProbe:
    """CPU seconds and memory of pipellmd and its crypto workers."""

    def __init__(self, pid: int) -> None:
        self.main = psutil.Process(pid)
        self.peak_mb = 0.0
        self.peak_main_rss_mb = 0.0
        self.peak_workers_rss_mb = 0.0
        self._cpu0 = 0.0
        self._seen: dict[int, psutil.Process] = {}

    def procs(self) -> list[psutil.Process]:
        out = [self.main]
        with contextlib.suppress(psutil.Error):
            for p in self.main.children(recursive=True):
                out.append(self._seen.setdefault(p.pid, p))
        return out

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.procs():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def begin(self) -> None:
        self._cpu0 = self.cpu_s()

    def cpu_since_begin(self) -> float:
        return self.cpu_s() - self._cpu0

    def sample(self) -> None:
        procs = self.procs()
        main_rss = workers_uss = workers_rss = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if p.pid == self.main.pid:
                    main_rss = p.memory_info().rss / 2**20
                    continue
                workers_rss += p.memory_info().rss / 2**20
                try:
                    workers_uss += p.memory_full_info().uss / 2**20
                except psutil.AccessDenied:
                    workers_uss += p.memory_info().rss / 2**20
        self.peak_mb = max(self.peak_mb, main_rss + workers_uss)
        self.peak_main_rss_mb = max(self.peak_main_rss_mb, main_rss)
        self.peak_workers_rss_mb = max(self.peak_workers_rss_mb, workers_rss)


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q) * 1e3) if values else float("nan")


# -- the run --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=16, help="concurrent sessions, one process each")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the measured window")
    ap.add_argument("--workers", type=int, default=0, help="daemon crypto workers (0 = one per core)")
    ap.add_argument("--chunk-size", type=int, default=1 << 20, help="daemon chunk size (= one weight layer)")
    ap.add_argument("--h2d-slots", type=int, default=32)
    ap.add_argument("--d2h-slots", type=int, default=16)
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0:
        ap.error("--sessions must be >= 1 and --seconds > 0")

    shape = Shape(chunk=args.chunk_size)
    settings: dict[str, Any] = {
        "workers": args.workers,
        "chunk_size": args.chunk_size,
        "h2d_slots": args.h2d_slots,
        "d2h_slots": args.d2h_slots,
        "max_sessions": max(64, args.sessions),
        "max_sessions_per_uid": max(64, args.sessions),  # every session of the load test is one uid
        "max_connections_per_uid": max(64, 2 * args.sessions + 8),
        "pool_bytes": 64 << 30,  # a bound, not an allocation: arenas exist only for open sessions
    }
    ctx = mp.get_context("spawn")  # each session is a fresh process, as a serving process would be
    ready, results = ctx.Queue(), ctx.Queue()
    start, stop = ctx.Event(), ctx.Event()
    errors: list[str] = []
    reports: list[SessionReport] = []
    with DaemonProcess(**settings) as d:
        probe = DaemonProbe(d.pid)
        procs = [
            ctx.Process(target=run_session, args=(i, d.socket, shape, ready, start, stop, results), daemon=True)
            for i in range(args.sessions)
        ]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            for i in range(args.sessions):
                try:
                    ready.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    errors.append(f"only {i} of {args.sessions} sessions started in {START_TIMEOUT_S:.0f} s")
                    break
            probe.begin()
            t0 = time.monotonic()
            start.set()
            while time.monotonic() - t0 < args.seconds:
                probe.sample()
                time.sleep(min(SAMPLE_EVERY_S, max(0.0, args.seconds - (time.monotonic() - t0))))
            t1 = time.monotonic()
            stop.set()
            wall = t1 - t0
            cpu = probe.cpu_since_begin()
            probe.sample()
            deadline = time.monotonic() + GRACE_S
            while len(reports) < args.sessions and time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    reports.append(results.get(timeout=1.0))
        finally:
            stop.set()
            start.set()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    errors.append(f"session process {p.pid} did not finish")
        if len(reports) < args.sessions:
            errors.append(f"{args.sessions - len(reports)} sessions never reported (hung or crashed)")
        from pipellm_client import Client

        with Client(d.socket) as c:
            st = c.status()
        if st.totals.channel_deaths:
            errors.append(f"daemon counted {st.totals.channel_deaths} channel deaths")
        if st.workers.restarts:
            errors.append(f"{st.workers.restarts} crypto worker restarts")
        if d.proc is None or d.proc.poll() is not None:
            errors.append("pipellmd exited during the load test")
        internal = d.log().count('"event": "internal_error"')
        if internal:
            errors.append(f"{internal} internal errors in the daemon log")

    for r in reports:
        errors.extend(r.errors)
    # Only what ended inside the window counts (every byte, in or out of it, was verified).
    commits = [c for r in reports for c in r.commits if t0 <= c[0] <= t1]
    d2hs = [c for r in reports for c in r.d2h if t0 <= c[0] <= t1]
    transfers = sum(c[2] for c in commits) + len(d2hs)
    moved = sum(c[3] for c in commits) + sum(c[3] for c in d2hs)
    commit_s = [c[1] for c in commits]
    d2h_s = [c[1] for c in d2hs]
    ops: dict[str, int] = {}
    for r in reports:
        for k, v in r.ops.items():
            ops[k] = ops.get(k, 0) + v
    tps = transfers / wall
    p50, p99, p999 = (percentile_ms(commit_s, q) for q in (50, 99, 99.9))
    print(f"loadtest: {args.sessions} sessions x {wall:.1f} s, loopback, endpoint verifies every message and")
    print("          every delivered byte is compared with what was sent")
    print(f"  commits {len(commit_s)} in the window; all runs: {', '.join(f'{k} {v}' for k, v in sorted(ops.items()))}")
    print(f"  D2H calls {len(d2h_s)} in the window")
    print(f"  transfers/s {tps:.1f}   MB/s {moved / wall / 1e6:.1f}")
    print(f"  commit latency ms: p50 {p50:.2f}  p99 {p99:.2f}  p999 {p999:.2f}  max {percentile_ms(commit_s, 100):.2f}")
    if d2h_s:
        print(f"  d2h call latency ms: p50 {percentile_ms(d2h_s, 50):.2f}  p99 {percentile_ms(d2h_s, 99):.2f}")
    print(
        f"  daemon: cpu {100 * cpu / wall:.0f}% of one core (daemon + {st.workers.count} workers, "
        f"{os.cpu_count()} cores), rss peak {probe.peak_main_rss_mb:.0f} MB (+ workers rss "
        f"{probe.peak_workers_rss_mb:.0f} MB, shared arenas included)"
    )
    lo_hit = min((r.hit_rate for r in reports), default=0.0)
    hi_hit = max((r.hit_rate for r in reports), default=0.0)
    print(
        f"  daemon totals: hits {st.totals.hits} misses {st.totals.misses} late {st.totals.late} "
        f"hit_rate {st.totals.hit_rate:.2f} nops {st.totals.nops} iv_rotations {st.totals.iv_rotations}; "
        f"session hit rates {lo_hit:.2f}..{hi_hit:.2f}"
    )
    for e in errors[:20]:
        print(f"  ERROR {e}", file=sys.stderr)
    print(
        f"load: sessions={args.sessions} transfers_per_s={tps:.1f} gbps={moved / wall / 1e9:.2f} p99_ms={p99:.2f} "
        f"errors={len(errors)} rss_mb={probe.peak_mb:.0f}"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
