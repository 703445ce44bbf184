"""`make bench` / `make bench-quick`: plain vs naive CC vs PipeLLM on replayed serving workloads.

One invocation starts three real daemons (plain: no encryption; naive: encrypt each transfer on demand in
the critical path with one worker, as the CUDA driver does; pipellm), measures the workers' encryption
capacity, and replays every workload of bench/workloads/ through the real SDK in each mode, interleaved
(plain, naive, pipellm, plain, naive, pipellm, ...) so that drift on a shared machine hits all modes alike.
The device (GPU compute and PCIe link) is bench/devicemodel.py: waits in model time; everything on the
host, encryption included, is real.

Per workload and regime it reports throughput per mode, the overhead against plain (throughput drop,
median of the per-repetition ratios), the hit rate and relinquish counters, CPU seconds, and the physical
bound: with B the bytes that must be encrypted or decrypted on the host and C the workers' aggregate
encryption rate measured in this invocation, no scheme can finish before `T_bound = max(T_plain, B / C)`,
so `bound_pct = 100 x (1 - T_plain / T_bound)` is the least overhead any encrypting system could show here.
Next to it the burst bound (`burst_bound_pct`, bench/burst.py): the same least overhead transfer by transfer,
each byte encrypted no earlier than it could be known (declared, swapped out, learned from the previous
pass, or issued) and ready when it is needed. The target is judged against the larger (tighter) of the two.

Regimes: "testbed" scales the device so that one worker here vs the link is the published per-core vs
link ratio (naive CC should show the paper's large drops); "capacity" slows the device until the ideal
demand is `--headroom` x the aggregate capacity (PipeLLM should be within 5% of plain). JSON goes to
bench/results/<timestamp>.json and bench/results/latest.json (workload keys are "NAME@REGIME"), PNG plots
next to it, a table to stdout; the last line is `bench: NAME@REGIME=<pipellm %>/<naive %> ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from pipellm_client import Client, Intent, Session

from pipellm_daemon.counters import SOURCE_KINDS, SOURCES
from pipellm_daemon.launcher import DaemonProcess

from . import workloads as W
from .burst import burst_bound_pct
from .devicemodel import (
    GB,
    TESTBED,
    DeviceModel,
    TimeScale,
    calibrate_sleep,
    capacity_scale,
    testbed_scale,
    tighten_timer_slack,
)

MODES: Final = ("plain", "naive", "pipellm")
REGIMES: Final = ("testbed", "capacity")
RESULTS: Final = Path(__file__).resolve().parent / "results"
MiB: Final = 1 << 20


# -- small utilities ---------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr (tqdm is not a dependency)."""

    def __init__(self, total: int, width: int = 28) -> None:
        self.total = max(1, total)
        self.done = 0
        self.width = width
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        frac = self.done / self.total
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"[{bar}] {self.done}/{self.total} {time.monotonic() - self.t0:5.0f}s {label[:48]:<48}"
        if self.tty:
            sys.stderr.write("\r" + line)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of `pid`, from /proc/<pid>/task/*/schedstat (ns resolution)."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (the daemon's crypto workers)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return sorted(set(out))


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        flags = " ".join(f for f in ("vaes", "avx512f", "avx2", "aes") if f" {f} " in text or f" {f}\n" in text)
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    import subprocess

    import cryptography

    def git(*a: str) -> str:
        try:
            r = subprocess.run(["git", *a], capture_output=True, text=True, timeout=5, check=False, cwd=RESULTS.parent)
        except OSError:
            return ""
        return r.stdout.strip()

    return {
        "code": git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else ""),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": len(os.sched_getaffinity(0)),
        "ram_bytes": mem,
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "kernel": platform.release(),
    }


# -- the workers' encryption capacity --------------------------------------------------------------------
async def _capacity(workers: int, chunk: int, seconds: float, trials: int) -> float:
    """Best aggregate SEAL rate of `workers` worker processes over `trials` windows of `seconds` (bytes/s)."""
    from pipellm_client.shm import SharedMemory

    from pipellm_daemon import jobwire as w
    from pipellm_daemon.workers import WorkerPool

    pool = WorkerPool(workers)
    await pool.start()
    src_n = 64 * MiB
    window = 4 * workers
    slot = chunk + 4096
    src = SharedMemory.create("bench-cap-src", src_n)
    dst = SharedMemory.create("bench-cap-dst", window * slot)
    try:
        src.prefault()
        dst.prefault()
        src.view[:] = os.urandom(src_n)
        hs, hd = pool.new_handle(), pool.new_handle()
        pool.map(hs, src)
        pool.map(hd, dst)
        kid = pool.add_key(os.urandom(32))
        nonce = os.urandom(12)  # a throwaway key: nonce reuse does not matter for a speed test
        for i in range(2 * window):  # warm up
            await pool.submit(w.Kind.SEAL, kid, nonce, (hs, 0), chunk, (hd, (i % window) * slot))
        best = 0.0
        i = 0
        for _ in range(trials):
            done = 0
            futs: set[asyncio.Future[None]] = set()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                while len(futs) < window:
                    off = (i * chunk) % (src_n - chunk)
                    futs.add(pool.submit(w.Kind.SEAL, kid, nonce, (hs, off), chunk, (hd, (i % window) * slot)))
                    i += 1
                finished, futs = await asyncio.wait(futs, return_when=asyncio.FIRST_COMPLETED)
                done += len(finished)
            if futs:
                await asyncio.wait(futs)
                done += len(futs)
            best = max(best, done * chunk / (time.perf_counter() - t0))
        return best
    finally:
        await pool.close()
        src.close()
        dst.close()


def measure_capacity(workers: int, chunk: int, seconds: float = 0.25, trials: int = 3) -> dict[str, float]:
    """C1 (one worker) and C (all workers), the way the daemon encrypts: worker processes, one chunk a job.

    Each figure is the best of `trials` windows of `seconds`: on a shared machine a slow window is
    someone else's load, and the bound should use what the workers can do.
    """
    one = asyncio.run(_capacity(1, chunk, seconds, trials))
    agg = asyncio.run(_capacity(workers, chunk, seconds, trials)) if workers > 1 else one
    return {"one_worker_bps": one, "aggregate_bps": agg}


# -- replaying a trace through a session -----------------------------------------------------------------
@dataclass
class RunResult:
    mode: str
    seconds: float  # model time of the measured steps
    work: int
    counters: dict[str, float]
    endpoint: dict[str, int]
    cpu: dict[str, float]
    emulation_s: float
    slept_s: float
    host: dict[str, float]
    wall_s: float
    spans: list[Any] = field(default_factory=list)
    samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.work / self.seconds if self.seconds > 0 else 0.0


HOST_FIELDS: Final = ("h2d", "h2d_calls", "d2h", "d2h_wait", "declare")
COUNTER_FIELDS: Final = (
    "commits",
    "chunks",
    "hits",
    "misses",
    "skips",
    "late",
    "detours",
    "nops",
    "discards",
    "iv_rotations",
    "relinquishes",
    "stale",
    "small_transfers",
    "bytes_h2d",
    "bytes_d2h",
    "bytes_ahead",
    "bytes_wasted",
    "bytes_on_demand",
    "bytes_used",
    *(f"{src}_bytes_{kind}" for src in SOURCES for kind in SOURCE_KINDS),
)


def _fill(region_array: np.ndarray[Any, np.dtype[np.uint8]], seed: int) -> None:
    """Fill a region with a seeded pattern cheaply (one random MiB, tiled; content is irrelevant to AES)."""
    blk = np.random.default_rng(seed).integers(0, 256, MiB, dtype=np.uint8)
    n = region_array.size
    for off in range(0, n, MiB):
        m = min(MiB, n - off)
        region_array[off : off + m] = blk[:m]


def _running(pid: int) -> bool:
    """Is `pid` on a CPU right now (state R in /proc/<pid>/stat)? Exact to the instant it is read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 : stat.rindex(")") + 3] == "R"


class WorkerSampler(threading.Thread):
    """Samples how many crypto workers are running, every `interval` s, for the timeline plot only.

    It reads each worker's scheduler state, which is exact at the instant of the read (CPU-time counters in
    /proc only advance at scheduler ticks for a running task, too coarse for a millisecond step).
    """

    def __init__(self, pids: list[int], interval: float = 0.0001) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter(), float(sum(_running(p) for p in self.pids))))
            time.sleep(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join()
        return self.samples


class Replayer:
    """One mode's session for one trace: regions allocated once, then `run` as often as needed."""

    def __init__(
        self,
        client: Client,
        daemon: DaemonProcess,
        mode: str,
        trace: W.Trace,
        verify: int,
        overshoot: float,
        endpoint: str = "cpu",
    ) -> None:
        self.mode = mode
        self.endpoint = endpoint
        self.overshoot = overshoot
        self.trace = trace
        self.daemon = daemon
        self.s: Session = client.open_session(
            f"bench-{trace.name}",
            swap_order=trace.swap_order,
            verify=verify,
            allow_plain=mode == "plain",
            allow_unverified=verify != 1,
            endpoint=endpoint,
        )
        self.regions = {}
        for i, spec in enumerate(trace.regions):
            if spec.readonly:
                r = self.s.alloc_region(spec.nbytes, readonly=True, name=spec.name, adapter=spec.adapter)
                _fill(r.array, i)
                r.seal()
            else:
                r = self.s.alloc_region(spec.nbytes, name=spec.name)
                r.prefault()  # first-touch page faults would otherwise land in whichever rep comes first
            self.regions[spec.name] = r
        # "Device memory": one buffer the size of the largest range; every transfer of a commit lands in it
        # (what arrives is not used, and only sampled messages are decrypted into it anyway).
        self.dst: Any = np.empty(max(1, trace.max_h2d_range()), np.uint8)
        self.dst.fill(0)  # touched once, here
        self.src: Any = np.random.default_rng(1).integers(0, 256, max(1, trace.max_d2h_op()), dtype=np.uint8)
        if endpoint == "cuda":  # GPU memory: real DMA, the GPU decrypts and encrypts
            import cupy

            # Each range of an op gets its own bytes (256-aligned), so a commit's messages can run as one
            # GPU batch (messages into the same bytes must run one after another).
            widest = max(
                (sum(-(-r.length // 256) * 256 for r in op.ranges) for st in trace.steps for op in st.ops
                 if isinstance(op, W.H2D)),
                default=1,
            )  # fmt: skip
            self.dst, self.src = cupy.zeros(max(1, widest), dtype=cupy.uint8), cupy.asarray(self.src)
        self.dev: DeviceModel | None = None
        self.d2h_pending = False
        self.host: dict[str, float] = dict.fromkeys(HOST_FIELDS, 0.0)
        self._meter()

    def _meter(self) -> None:
        """Charge the CPU endpoint's work (the GPU's part of the channel) to the device model's debt.

        A CUDA endpoint's work is real device work: nothing is charged, and each completion, each
        commit (its ring hits) and each D2H frame's messages run as one endpoint batch."""
        core = self.s.core
        if self.endpoint == "cuda":
            batch = core.endpoint.batch  # type: ignore[attr-defined]

            def batched(fn: Callable[..., Any]) -> Callable[..., Any]:
                def wrapper(*a: Any, **kw: Any) -> Any:
                    with batch():
                        return fn(*a, **kw)

                return wrapper

            def batched_frames(fn: Callable[..., Any]) -> Callable[..., Any]:
                def wrapper(*a: Any, **kw: Any) -> Any:
                    frames = fn(*a, **kw)
                    while True:
                        with batch():  # ends (runs the queued sends) before the frame leaves
                            item = next(frames, None)
                        if item is None:
                            return
                        yield item

                return wrapper

            core.apply_completion = batched(core.apply_completion)  # type: ignore[method-assign]
            core.commit_frame = batched(core.commit_frame)  # type: ignore[method-assign]
            core.landed_frames = batched_frames(core.landed_frames)  # type: ignore[method-assign]
            return

        def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    if self.dev is not None:
                        self.dev.emulated(time.perf_counter() - t0)

            return wrapper

        core.apply_completion = timed(core.apply_completion)  # type: ignore[method-assign]
        core.endpoint.send = timed(core.endpoint.send)  # type: ignore[method-assign]

    def close(self) -> None:
        """Close the session and drop every view of its regions, so their shared memory is really freed.

        A region's mapping lives as long as any numpy view of it (pipellm_client.shm.SharedMemory.close),
        and the endpoint meter ties this object into a cycle with the session, so without this the
        regions of every workload would stay resident until the cyclic GC happened to run.
        """
        with contextlib.suppress(Exception):
            self.s.close()
        self.regions.clear()
        self.dst = self.src = np.empty(0, np.uint8)
        core = self.s.core
        for name in ("apply_completion", "commit_frame", "landed_frames"):
            core.__dict__.pop(name, None)
        core.endpoint.__dict__.pop("send", None)
        gc.collect()

    # -- ops -----------------------------------------------------------------------------------------
    def _op(self, op: W.Op, dev: DeviceModel) -> None:
        s = self.s
        if isinstance(op, W.H2D):
            if self.endpoint == "cuda":
                transfers, at = [], 0
                for r in op.ranges:
                    transfers.append((self.regions[r.region], r.offset, r.length, self.dst[at : at + r.length]))
                    at += -(-r.length // 256) * 256
            else:
                transfers = [(self.regions[r.region], r.offset, r.length, self.dst[: r.length]) for r in op.ranges]
            issued = dev.now()
            s.h2d_many(transfers)
            done = dev.now()
            self.host["h2d"] += done - issued
            self.host["h2d_calls"] += 1
            dev.h2d(op.nbytes, issued, done, label=op.label)
        elif isinstance(op, W.D2H):
            r = op.range
            issued = dev.now()
            if self.mode == "plain" and self.endpoint == "cpu":  # the endpoint writes host memory: that is the DMA
                t0 = time.perf_counter()
                s.d2h(self.src[: r.length], self.regions[r.region], r.offset, swap_out=op.swap_out, group=op.group)
                dev.emulated(time.perf_counter() - t0)
            else:
                s.d2h(self.src[: r.length], self.regions[r.region], r.offset, swap_out=op.swap_out, group=op.group)
                self.d2h_pending = True
            done = dev.now()
            self.host["d2h"] += done - issued
            dev.d2h(op.nbytes, issued, done, after_compute=op.after_compute, label=op.label)
        elif isinstance(op, W.Compute):
            dev.compute(op.seconds, after_copies=op.after_copies, label=op.label)
        elif isinstance(op, W.Sync):
            self._sync(dev)
        elif isinstance(op, W.Declare) and self.mode == "pipellm":  # only a PipeLLM integration declares
            t0 = dev.now()
            s.declare(
                [Intent(self.regions[r.region], r.offset, r.length) for r in op.ranges],
                cyclic=op.cyclic,
                replace=op.replace,
            )
            self.host["declare"] += dev.now() - t0

    def _sync(self, dev: DeviceModel) -> None:
        if self.mode == "naive" and self.d2h_pending:
            # The CUDA driver's D2H copy is complete only when the CPU has decrypted it: in the critical path.
            t0 = dev.now()
            self.s.wait_all()
            self.host["d2h_wait"] += dev.now() - t0
            dev.d2h_free = max(dev.d2h_free, dev.now())
        self.d2h_pending = False
        dev.sync()

    def _counters(self) -> dict[str, float]:
        c = self.s.status().counters
        return {f: float(getattr(c, f)) for f in COUNTER_FIELDS}

    def _cpu(self) -> dict[str, float]:
        workers = children(self.daemon.pid)
        return {
            "daemon": proc_cpu_s(self.daemon.pid),
            "workers": sum(proc_cpu_s(p) for p in workers),
            "client": time.process_time(),
        }

    def run(self, scale: TimeScale, *, record: bool = False, sample_workers: bool = False) -> RunResult:
        trace = self.trace
        dev = DeviceModel(scale, record=record, overshoot=self.overshoot)
        self.dev = dev
        dev.reset()
        for st in trace.steps[: trace.warmup]:
            for op in st.ops:
                self._op(op, dev)
        self._sync(dev)
        if self.mode != "plain":
            self.s.wait_all()
        c0, cpu0 = self._counters(), self._cpu()
        ep0 = dict(self.s.endpoint_stats)
        sampler = WorkerSampler(children(self.daemon.pid)) if sample_workers else None
        self.host = dict.fromkeys(HOST_FIELDS, 0.0)
        dev.reset()
        wall0 = time.perf_counter()
        if sampler is not None:
            sampler.start()
        for st in trace.measured:
            for op in st.ops:
                self._op(op, dev)
        self._sync(dev)
        seconds = dev.now()
        wall = time.perf_counter() - wall0
        samples = sampler.stop() if sampler is not None else []
        if self.mode != "plain":
            self.s.wait_all()
        cpu1, c1 = self._cpu(), self._counters()
        ep1 = self.s.endpoint_stats
        self.dev = None
        counters = {k: c1[k] - c0[k] for k in c1}
        judged = counters["hits"] + counters["misses"] + counters["skips"] + counters["late"]
        counters["hit_rate"] = counters["hits"] / judged if judged else 0.0
        return RunResult(
            mode=self.mode,
            seconds=seconds,
            work=trace.tokens(),
            counters=counters,
            endpoint={k: ep1[k] - ep0.get(k, 0) for k in ep1},
            cpu={k: cpu1[k] - cpu0[k] for k in cpu1},
            emulation_s=dev.debt,
            slept_s=dev.slept,
            host=dict(self.host),
            wall_s=wall,
            spans=dev.spans,
            samples=[(dev.to_model(t - dev.origin), c) for t, c in samples],
        )


# -- aggregation -----------------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def summarize(
    trace: W.Trace, regime: str, scale: TimeScale, runs: dict[str, list[RunResult]], cap: dict[str, float]
) -> dict[str, Any]:
    """Medians per mode, overheads (median of per-repetition ratios), the physical bound, the target."""
    reps = min(len(v) for v in runs.values())
    b = trace.crypto_bytes()
    c = cap["aggregate_bps"]
    out: dict[str, Any] = {"workload": trace.name, "regime": regime, "scale": scale.speed}
    for mode, rs in runs.items():
        m: dict[str, Any] = {
            "seconds": _median([r.seconds for r in rs]),
            "throughput": _median([r.throughput for r in rs]),
            "unit": f"{trace.unit}/s",
            "wall_s": _median([r.wall_s for r in rs]),
            "emulation_s": _median([r.emulation_s for r in rs]),
            "slept_s": _median([r.slept_s for r in rs]),
            "host_s": {k: _median([r.host[k] for r in rs]) for k in rs[0].host},
            "cpu_s": {k: _median([r.cpu[k] for r in rs]) for k in rs[0].cpu},
            "reps": [round(r.seconds, 6) for r in rs],
        }
        m["counters"] = {k: _median([r.counters[k] for r in rs]) for k in rs[0].counters}
        moved_mib = (m["counters"]["bytes_h2d"] + m["counters"]["bytes_d2h"]) / MiB
        # The daemon's own CPU per MiB moved: its per-commit/per-chunk cost, next to plain's.
        m["daemon_cpu_us_per_mib"] = round(1e6 * m["cpu_s"]["daemon"] / moved_mib, 1) if moved_mib else 0.0
        if mode != "plain":
            m["hit_rate"] = m["counters"]["hit_rate"]
            m["endpoint"] = {k: _median([float(r.endpoint[k]) for r in rs]) for k in rs[0].endpoint}
        out[mode] = m
    t_plain = out["plain"]["seconds"]
    overhead = {}
    for mode in ("naive", "pipellm"):
        per_rep = [100 * (1 - runs["plain"][i].seconds / runs[mode][i].seconds) for i in range(reps)]
        overhead[mode] = round(_median(per_rep), 2)
        out[mode]["overhead_reps"] = [round(x, 2) for x in per_rep]
    cores = len(os.sched_getaffinity(0))
    for mode in MODES:
        m = out[mode]
        m["cpu_util_pct"] = round(100 * sum(m["cpu_s"].values()) / (cores * m["wall_s"]), 1) if m["wall_s"] else 0.0
    plain_h2d = out["plain"]["host_s"]["h2d"]
    out["pipellm"]["h2d_host_vs_plain"] = round(out["pipellm"]["host_s"]["h2d"] / plain_h2d, 2) if plain_h2d else 0.0
    t_bound = max(t_plain, b / c) if c > 0 else t_plain
    bound_pct = 100 * (1 - t_plain / t_bound) if t_bound > 0 else 0.0
    burst_pct = burst_bound_pct(trace, c, scale)
    tighter = max(bound_pct, burst_pct)  # both are lower bounds: the larger one is the tighter
    ideal = scale.wall(trace.ideal_seconds(scale.testbed))
    target = max(5.0, tighter + 3) if trace.kind != "adversarial" else overhead["naive"] + 5
    out.update(
        {
            "overhead_pct": overhead,
            "bound_pct": round(bound_pct, 2),
            "burst_bound_pct": round(burst_pct, 2),
            "crypto_bytes": b,
            "demand_gbps": round(b / t_plain / GB, 3) if t_plain > 0 else 0.0,
            "capacity_gbps": round(c / GB, 3),
            "ideal_s": ideal,
            "plain_vs_ideal": round(t_plain / ideal, 3) if ideal > 0 else 0.0,
            "target_pct": round(target, 2),
            "met": overhead["pipellm"] <= target,
        }
    )
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'workload@regime':30s} {'plain':>9s} {'naive':>9s} {'pipellm':>9s} {'naive%':>7s} {'pllm%':>7s} "
        f"{'bound%':>7s} {'burst%':>7s} {'target':>7s} {'hit':>6s} {'nops':>6s} {'rot':>4s} {'dmd/cap GB/s':>13s} "
        f"{'h2d/pl':>6s} {'cpu%':>5s} {'plain/ideal':>11s}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        x = r["pipellm"]
        lines.append(
            f"{name:30s} {r['plain']['throughput']:9.0f} {r['naive']['throughput']:9.0f} "
            f"{x['throughput']:9.0f} {r['overhead_pct']['naive']:7.1f} {r['overhead_pct']['pipellm']:7.1f} "
            f"{r['bound_pct']:7.1f} {r['burst_bound_pct']:7.1f} {r['target_pct']:6.1f}{'' if r['met'] else '!'} "
            f"{x['hit_rate']:6.2f} "
            f"{x['counters']['nops']:6.0f} {x['counters']['iv_rotations']:4.0f} "
            f"{r['demand_gbps']:6.2f}/{r['capacity_gbps']:<6.2f} {x['h2d_host_vs_plain']:6.1f} "
            f"{x['cpu_util_pct']:5.0f} {r['plain_vs_ideal']:11.2f}"
        )
    return "\n".join(lines)


def source_table(results: dict[str, dict[str, Any]]) -> str:
    """PipeLLM's ciphertext made ahead, by the predictor that asked for it: how much of it was used (delivered
    as DATA) and how much thrown away, per workload (medians of the reps)."""
    lines = []
    for name, r in results.items():
        c = r["pipellm"]["counters"]
        parts = []
        for src in SOURCES:
            ahead = c.get(f"{src}_bytes_ahead", 0.0)
            if ahead:
                used, wasted = c[f"{src}_bytes_used"], c[f"{src}_bytes_wasted"]
                parts.append(f"{src} {ahead / MiB:.0f} MiB, used {used / ahead:.2f}, wasted {wasted / ahead:.2f}")
        lines.append(f"{name:30s} " + ("; ".join(parts) if parts else "nothing made ahead"))
    return "\n".join(lines)


# -- orchestration ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def daemons(workers: int, settings: dict[str, Any], log_level: str) -> Iterator[dict[str, DaemonProcess]]:
    with contextlib.ExitStack() as stack:
        ds = {}
        for mode in MODES:
            kw = dict(settings)
            if mode != "naive" and workers:
                kw["workers"] = workers
            ds[mode] = stack.enter_context(
                DaemonProcess(os.environ.get("PIPELLM_BENCH_DIR_" + mode.upper()), mode=mode, log_level=log_level, **kw)
            )
        yield ds


def parse_settings(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        k, _, v = it.partition("=")
        if not k or not v:
            raise SystemExit(f"--set wants NAME=VALUE, got {it!r}")
        out[k.strip()] = v.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick", help="all workloads, small")
    size.add_argument("--full", action="store_const", dest="size", const="full", help="bigger workloads")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per mode (default 2 quick, 4 full)")
    ap.add_argument("--only", default="", help="comma-separated workload names (prefix match)")
    ap.add_argument("--regimes", default=",".join(REGIMES))
    ap.add_argument("--verify", type=int, default=16, help="endpoint verifies 1 DATA message in N (1 = all)")
    ap.add_argument(
        "--endpoint",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: destinations and D2H sources in GPU memory, the endpoint decrypts/encrypts on the GPU (real work,"
        " not emulation debt)",
    )
    ap.add_argument("--headroom", type=float, default=0.5, help="capacity regime: ideal demand / capacity")
    ap.add_argument("--workers", type=int, default=0, help="pipellm (and plain) workers; 0 = one per core")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="daemon setting, all modes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--log-level", default="info", help="daemon log level (the launcher needs the info 'ready' line)")
    args = ap.parse_args(argv)
    size_name = args.size or "quick"
    reps = args.reps or (2 if size_name == "quick" else 4)
    regimes = [r for r in args.regimes.split(",") if r]
    settings = parse_settings(args.set)
    t_start = time.monotonic()
    slack = tighten_timer_slack()
    overshoot = calibrate_sleep()
    traces = W.suite(size_name, seed=args.seed)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        traces = [t for t in traces if any(t.name.startswith(w) for w in wanted)]
    from pipellm_daemon.workers import default_worker_count

    n_workers = args.workers or default_worker_count()
    chunk = int(str(settings.get("chunk_size", 1 << 20)), 0)
    cap_before = measure_capacity(n_workers, chunk)
    tb = testbed_scale(cap_before["one_worker_bps"], TESTBED)
    verify_note = (
        "endpoint decrypts and checks every H2D DATA message"
        if args.verify == 1
        else f"endpoint decrypts and checks 1 H2D DATA message in {args.verify} (the rest advance its counter); "
        "every NOP/DISCARD checked; every D2H message encrypted by the endpoint and decrypted+checked by the daemon"
    )
    print(
        f"PipeLLM bench ({size_name}): {len(traces)} workloads x {len(regimes)} regimes x {len(MODES)} modes x "
        f"{reps} reps, interleaved; {machine()['cores']} cores; {n_workers} pipellm workers, naive 1 worker; "
        f"{args.endpoint} endpoint; {verify_note}",
        flush=True,
    )
    print(
        f"capacity: one worker {cap_before['one_worker_bps'] / GB:.2f} GB/s, {n_workers} workers "
        f"{cap_before['aggregate_bps'] / GB:.2f} GB/s ({chunk >> 10} KiB jobs, worker processes, in this run); "
        f"sleep overshoot {overshoot * 1e6:.0f} us (timer slack 1 ns: {slack})",
        flush=True,
    )
    print(f"scale: {tb.describe()}", flush=True)
    plan: list[tuple[W.Trace, str, TimeScale]] = []
    for trace in traces:
        demand = trace.crypto_bytes() / trace.ideal_seconds()
        for regime in regimes:
            if regime == "testbed":
                plan.append((trace, regime, tb))
                continue
            sc = capacity_scale(cap_before["aggregate_bps"], demand, args.headroom, tb)
            if "testbed" in regimes and sc.speed >= tb.speed * 0.99:
                continue  # the demand already fits at testbed speed: the regimes coincide (reported as such)
            plan.append((trace, regime, sc))
    bar = Progress(len(plan) * reps * len(MODES))
    collected: dict[str, tuple[W.Trace, str, TimeScale, dict[str, list[RunResult]]]] = {}
    elapsed: dict[str, float] = {}
    timeline: dict[str, Any] = {}
    with daemons(args.workers, settings, args.log_level) as ds:
        clients = {m: Client(d.socket) for m, d in ds.items()}
        try:
            for trace in traces:
                t_wl = time.monotonic()
                reps_of = {
                    m: Replayer(clients[m], ds[m], m, trace, args.verify, overshoot, args.endpoint) for m in MODES
                }
                try:
                    for tr, regime, sc in plan:
                        if tr is not trace:
                            continue
                        runs: dict[str, list[RunResult]] = {m: [] for m in MODES}
                        for rep in range(reps):
                            for m in MODES:
                                runs[m].append(reps_of[m].run(sc))
                                bar.step(f"{trace.name}@{regime} {m} {rep + 1}/{reps}")
                        collected[f"{trace.name}@{regime}"] = (trace, regime, sc, runs)
                    if trace.kind == "flexgen" and not timeline and not args.no_plots:
                        regime, sc = next((r, s) for t, r, s in reversed(plan) if t is trace)
                        for m in MODES:
                            res = reps_of[m].run(sc, record=True, sample_workers=True)
                            timeline[m] = {"spans": res.spans, "samples": res.samples, "regime": regime}
                finally:
                    for r in reps_of.values():
                        r.close()
                elapsed[trace.name] = round(time.monotonic() - t_wl, 2)
        finally:
            for c in clients.values():
                c.close()
    bar.close()
    cap_after = measure_capacity(n_workers, chunk)
    cap = {k: max(cap_before[k], cap_after[k]) for k in cap_before}
    results: dict[str, dict[str, Any]] = {}
    scales: dict[str, dict[str, Any]] = {}
    for key, (trace, regime, sc, runs) in collected.items():
        results[key] = summarize(trace, regime, sc, runs, cap)
        scales[key] = {"speed": sc.speed, "link_gbps_wall": sc.link_bps / GB, "why": sc.why}
    coincide = [
        f"{t.name}@capacity"
        for t in traces
        if "capacity" in regimes and f"{t.name}@capacity" not in results and f"{t.name}@testbed" in results
    ]
    report = {
        "machine": {**machine(), "timer_slack_1ns": slack, "sleep_overshoot_us": round(overshoot * 1e6, 1)},
        "size": size_name,
        "reps": reps,
        "verify": verify_note,
        "endpoint": args.endpoint,
        "workers": {"pipellm": n_workers, "naive": 1},
        "settings": settings,
        "capacity": {
            "method": "pipellm_daemon.workers.WorkerPool, SEAL jobs of one chunk from shared memory into shared "
            f"memory, {4 * n_workers} in flight, best of 3 windows of 0.25 s, before and after the runs; the bound "
            "uses the larger",
            "before": cap_before,
            "after": cap_after,
            "used": cap,
        },
        "scale": {
            "testbed": {"speed": tb.speed, "link_gbps_wall": tb.link_bps / GB, "why": tb.why},
            "testbed_figures": {
                "enc_core_gbps": TESTBED.enc_core_bps / GB,
                "link_gbps": TESTBED.link_bps / GB,
                "gpu_tflops": TESTBED.gpu_flops / 1e12,
                "hbm_tbps": TESTBED.hbm_bps / 1e12,
            },
            "per_workload": scales,
            "workload_scales": {t.name: t.scale for t in traces},
            "headroom": args.headroom,
            "capacity_same_as_testbed": coincide,
        },
        "workloads": results,
        "traces": {t.name: t.summary() for t in traces},
        "elapsed_s": {"total": round(time.monotonic() - t_start, 1), **elapsed},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(report, indent=1, default=float)
    (out / f"{stamp}.json").write_text(text)
    (out / "latest.json").write_text(text)
    print()
    print(table(results))
    print("\nmade ahead, by source (PipeLLM):")
    print(source_table(results))
    print(
        f"\noverhead = throughput drop vs plain (median of {reps} interleaved reps); bound = 1 - T_plain/max(T_plain,"
        f" B/C) with C = {cap['aggregate_bps'] / GB:.2f} GB/s ({n_workers} workers, measured before/after: "
        f"{cap_before['aggregate_bps'] / GB:.2f}/{cap_after['aggregate_bps'] / GB:.2f}); burst = the same, per "
        f"transfer, from when each byte could be known to when it is needed (bench/burst.py); target = "
        f"max(5, max(bound, burst) + 3); '!' = target missed; "
        f"plain/ideal = plain time over the device model alone; h2d/pl = PipeLLM's host time in H2D calls over "
        f"plain's (1 = every hit was ready); cpu% = PipeLLM run's client+daemon+workers CPU over all cores. "
        f"Throughput in tokens/s (adversarial: steps/s), model time. Testbed scale {tb.speed:.2f}x "
        f"(link {tb.link_bps / GB:.0f} GB/s wall); {verify_note}."
        + (f" Capacity regime = testbed regime (demand fits) for: {', '.join(coincide)}." if coincide else "")
    )
    if not args.no_plots and results:
        from . import plots

        paths = plots.render(report, timeline, out, stamp)
        print("plots: " + ", ".join(str(p) for p in paths))
    print(f"results: {out / f'{stamp}.json'} ({time.monotonic() - t_start:.0f} s)")
    last = " ".join(
        f"{k}={v['overhead_pct']['pipellm']:.1f}/{v['overhead_pct']['naive']:.1f}" for k, v in results.items()
    )
    print("bench: " + last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
