"""The burst bound: the least overhead any encrypting system could show, transfer by transfer.

The whole-run bound (`B / C` against the plain run's time) assumes every byte can be encrypted at any moment
of the run. Real transfers cannot: a byte can be encrypted only once it is *known* and must be ready when
the transfer that carries it is *needed*. This module plays a trace against the device model on a virtual
clock, with an ideal host that

* knows an H2D range at the earliest moment a system like ours could: when it was declared (an intent that
  is still open), when it was swapped out (it can be encrypted once its D2H data has been decrypted), when
  the same read-only range was last transferred (a repeating weight or adapter load: a predictor learns it
  from the previous pass), or else only when the serving loop issues it;
* encrypts and decrypts at exactly `C` bytes per second (the workers' measured aggregate rate), one job at a
  time in order of need (earliest deadline first: the order in which the serving loop will use them; D2H data
  nobody reads again comes last), with no other cost at all;
* blocks the serving loop at an H2D only until the last byte of that commit is encrypted (encryption and DMA
  are pipelined, as in the device model).

`T_burst` is when that ideal run ends (device idle, every D2H byte decrypted) and `T_ideal` the same trace with
encryption free; `burst_bound_pct = 100 x (1 - T_ideal / T_burst)`. Earliest-deadline-first is the best order
for one processor with release times, so no system that encrypts only what it knows, at rate C, does better;
it ignores every cost but encryption, so every real system does worse.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field

from . import workloads as W
from .devicemodel import TESTBED, DeviceModel, Testbed, TimeScale, VirtualClock


@dataclass(eq=False)
class _Job:
    need: float  # when the serving loop needs it, as an op number (earliest first; D2H nobody reads: inf)
    seq: int  # tie-break: creation order
    left: float
    waits: int = 0  # unfinished jobs it depends on (swapped-out data to land)
    released: bool = False
    done_at: float | None = None
    then: list[_Job] = field(default_factory=list)  # jobs waiting for this one


class _Engine:
    """The ideal host's crypto: one fluid processor at `rate` bytes per second, earliest need first."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t = 0.0
        # (need, seq, job); an entry whose need is no longer the job's (it was hurried) is stale and skipped
        self.ready: list[tuple[float, int, _Job]] = []
        self.later: list[tuple[float, int, _Job]] = []  # (release time, seq, job)
        self._seq = 0

    def job(self, nbytes: int, need: float) -> _Job:
        self._seq += 1
        return _Job(need, self._seq, float(nbytes))

    def release(self, job: _Job, at: float) -> None:
        if at <= self.t:
            job.released = True
            heapq.heappush(self.ready, (job.need, job.seq, job))
        else:
            heapq.heappush(self.later, (at, job.seq, job))

    def hurry(self, job: _Job, need: float) -> None:
        """`job` is needed by `need` now (what a swap-in reads back must land first)."""
        if need < job.need and job.done_at is None:
            job.need = need
            if job.released:
                heapq.heappush(self.ready, (need, job.seq, job))  # the old entry goes stale

    def _complete(self, job: _Job) -> None:
        job.left, job.done_at = 0.0, self.t
        for j in job.then:
            j.waits -= 1
            if j.waits == 0:
                self.release(j, self.t)

    def run(self, until: float = math.inf, job: _Job | None = None) -> float:
        """Advance to `until`, or until `job` is done (then: its end); with neither, until all is done."""
        while True:
            if job is not None and job.done_at is not None:
                return job.done_at
            while self.later and self.later[0][0] <= self.t:
                j = heapq.heappop(self.later)[2]
                j.released = True
                heapq.heappush(self.ready, (j.need, j.seq, j))
            while self.ready and (self.ready[0][2].done_at is not None or self.ready[0][0] != self.ready[0][2].need):
                heapq.heappop(self.ready)  # stale: hurried since, or done
            if job is None and self.t >= until:
                return self.t
            nxt = self.later[0][0] if self.later else math.inf
            stop = nxt if job is not None else min(nxt, until)
            if not self.ready:
                if stop == math.inf:
                    if job is not None:
                        raise RuntimeError("waiting for a crypto job that can never run")
                    return self.t
                self.t = max(self.t, stop)
                continue
            top = self.ready[0][2]
            finish = self.t + top.left / self.rate
            if finish <= stop:
                heapq.heappop(self.ready)
                self.t = finish
                self._complete(top)
            else:
                top.left -= (stop - self.t) * self.rate
                self.t = stop


class _Spans:
    """Per region: byte intervals and what they carry (an open intent, swapped-out data)."""

    def __init__(self) -> None:
        self.items: dict[str, list[tuple[int, int, int]]] = {}  # region -> sorted (start, end, op number)

    def add(self, region: str, off: int, end: int, what: int) -> None:
        self.remove(region, off, end)
        bisect.insort(self.items.setdefault(region, []), (off, end, what))

    def covered(self, region: str, off: int, end: int) -> list[int] | None:
        """What lies on [off, end) (its op numbers), or None if some byte of it is not covered."""
        items = self.items.get(region, [])
        i = bisect.bisect_left(items, (off, -1, -1))
        if i and items[i - 1][1] > off:
            i -= 1
        at, got = off, []
        while i < len(items) and items[i][0] < end:
            s, e, w = items[i]
            if s > at:
                return None
            at, i = max(at, e), i + 1
            got.append(w)
        return got if at >= end else None

    def remove(self, region: str, off: int, end: int) -> None:
        items = self.items.get(region)
        if items:
            i = bisect.bisect_left(items, (off, -1, -1))
            if i and items[i - 1][1] > off:
                i -= 1
            j = i
            while j < len(items) and items[j][0] < end:
                j += 1
            if j > i:
                cut = items[i:j]
                keep = [x for x in cut if x[1] <= off or x[0] >= end]
                items[i:j] = keep

    def clear(self) -> None:
        self.items.clear()


@dataclass(frozen=True)
class _Plan:
    """One H2D range: the op at which it becomes known, the D2H ops whose data it reads back."""

    known: int
    deps: tuple[int, ...]


def _plan(trace: W.Trace) -> dict[tuple[int, int], _Plan]:
    """For every H2D range (op number, index in its commit): when an ideal predictor could know it."""
    readonly = {r.name for r in trace.regions if r.readonly}
    declared, swapped = _Spans(), _Spans()
    cyclic: dict[tuple[str, int, int], int] = {}
    last: dict[tuple[str, int, int], int] = {}
    out: dict[tuple[int, int], _Plan] = {}
    for n, op in enumerate(trace.ops(measured=False)):
        if isinstance(op, W.Declare):
            if op.replace:
                declared.clear()
                cyclic.clear()
            for r in op.ranges:
                if op.cyclic:
                    cyclic[(r.region, r.offset, r.length)] = n
                else:
                    declared.add(r.region, r.offset, r.offset + r.length, n)
        elif isinstance(op, W.D2H):
            if op.swap_out:
                swapped.add(op.range.region, op.range.offset, op.range.offset + op.range.length, n)
            else:
                swapped.remove(op.range.region, op.range.offset, op.range.offset + op.range.length)
        elif isinstance(op, W.H2D):
            for k, r in enumerate(op.ranges):
                key, end = (r.region, r.offset, r.length), r.offset + r.length
                known = n
                intents = declared.covered(r.region, r.offset, end)
                if intents is not None:
                    known = min(known, max(intents))
                declared.remove(r.region, r.offset, end)  # an intent is used once
                if key in cyclic:  # a cyclic intent: again from its previous use on
                    known = min(known, max(cyclic[key], last.get(key, -1)))
                if r.region in readonly and key in last:  # a repeating read-only load: learned
                    known = min(known, last[key])
                deps = swapped.covered(r.region, r.offset, end) or []
                if deps:
                    known = min(known, max(deps))  # a swap-out announces its swap-in
                swapped.remove(r.region, r.offset, end)
                out[(n, k)] = _Plan(known, tuple(sorted(set(deps))))
                last[key] = n
    return out


def _simulate(trace: W.Trace, rate: float, testbed: Testbed) -> float:
    """Testbed seconds of the measured steps, an ideal host encrypting at `rate` bytes per testbed second."""
    clock = VirtualClock()
    dev = DeviceModel(TimeScale(1.0, "burst", testbed), clock=clock)
    eng = _Engine(rate) if rate > 0 else None
    plans = _plan(trace) if eng is not None else {}
    by_known: dict[int, list[tuple[int, int]]] = {}
    for where, p in plans.items():
        by_known.setdefault(max(p.known, *p.deps) if p.deps else p.known, []).append(where)
    sizes = {
        (n, k): r.length
        for n, op in enumerate(trace.ops(measured=False))
        if isinstance(op, W.H2D)
        for k, r in enumerate(op.ranges)
    }
    jobs: dict[tuple[int, int], _Job] = {}
    d2h: dict[int, _Job] = {}
    n = -1
    t_start = 0.0
    for i, st in enumerate(trace.steps):
        if i == trace.warmup:
            t = dev.sync()
            if eng is not None:
                eng.run(until=t)
            t_start = t
        for op in st.ops:
            n += 1
            now = dev.now()
            if eng is not None:
                eng.run(until=now)
                if isinstance(op, W.D2H):  # created first: what becomes known here may read it back
                    d2h[n] = eng.job(op.nbytes, math.inf)
                for where in by_known.pop(n, ()):
                    job = jobs[where] = eng.job(sizes[where], where[0] + where[1] / 1e6)
                    for dep in plans[where].deps:
                        dj = d2h[dep]
                        eng.hurry(dj, job.need - 0.5)
                        if dj.done_at is None:
                            dj.then.append(job)
                            job.waits += 1
                    if not job.waits:
                        eng.release(job, now)
            if isinstance(op, W.H2D):
                done = now
                if eng is not None:
                    for k in range(len(op.ranges)):
                        done = max(done, eng.run(job=jobs.pop((n, k))))
                    clock.advance(done - now)
                dev.h2d(op.nbytes, now, dev.now(), label=op.label)
            elif isinstance(op, W.D2H):
                end = dev.d2h(op.nbytes, now, now, after_compute=op.after_compute, label=op.label)
                if eng is not None:
                    eng.release(d2h[n], end)  # on the host once the copy is done
            elif isinstance(op, W.Compute):
                dev.compute(op.seconds, after_copies=op.after_copies, label=op.label)
            elif isinstance(op, W.Sync):
                t = dev.sync()
                if eng is not None:
                    eng.run(until=t)
    t_end = dev.sync()
    if eng is not None:
        t_end = max(t_end, eng.run())
    return t_end - t_start


def burst_seconds(trace: W.Trace, rate_testbed_bps: float, testbed: Testbed = TESTBED) -> tuple[float, float]:
    """(T_ideal, T_burst) in testbed seconds for an ideal host encrypting `rate_testbed_bps` per testbed second."""
    return _simulate(trace, 0.0, testbed), _simulate(trace, rate_testbed_bps, testbed)


def burst_bound_pct(trace: W.Trace, capacity_bps: float, scale: TimeScale) -> float:
    """The burst bound in a regime: the workers' `capacity_bps` (wall) in the trace's testbed time via `scale`."""
    if capacity_bps <= 0:
        return 0.0
    ideal, burst = burst_seconds(trace, capacity_bps / scale.speed, scale.testbed)
    return 100 * (1 - ideal / burst) if burst > 0 else 0.0
