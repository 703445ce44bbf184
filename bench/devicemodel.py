"""The device model: the GPU's compute and PCIe link played out as waits; host work and encryption stay real.

No CC-mode GPU is available, so a benchmark replays a serving workload against a *model* of the device:

* **compute** time of a step comes from its FLOPs and the bytes it reads from HBM at H100-class rates (a
  roofline: whichever takes longer);
* **link** time of a copy is its bytes over the PCIe rate;
* both are **played out as waits** (`time.sleep`), so they cost no CPU, and the encryption, the daemon, the
  SDK and every other piece of host-side work that a real CC system pays run for real, concurrently.

The copy engines and the compute engine are three independent streams (H2D, D2H, compute), as on a GPU.
A copy is *issued* when the host calls the SDK and *finishes* no earlier than both the link time after it
could start and the moment the host has produced its last ciphertext (`max(start + bytes/link,
host_done)`): encryption and DMA are pipelined chunk by chunk, so a copy runs at the slower of the two.
Compute is issued asynchronously; `sync()` sleeps until every stream is idle.

**Emulation debt.** The CPU endpoint that stands in for the GPU (decrypting H2D messages, encrypting D2H
data, or in plain mode copying the bytes, i.e. doing the DMA) burns real CPU time that on real hardware is
spent by the copy engine, not by the host. The harness measures that time and hands it to `emulated()`;
the model clock runs that much behind the wall clock, so the emulation does not count as host time. What
remains on the timeline is the serving process's own work, the daemon's round trips and encryption.

**Time scale.** This machine encrypts at a different speed than the published testbed, so the device is
sped up or slowed down by one factor, `speed`: one testbed second of compute or link time becomes
`1/speed` wall seconds. The *testbed* regime picks `speed` so that one worker's measured encryption rate
here over the scaled link rate equals the published per-core rate over the link (4.5 GB/s vs 50 GB/s);
the *capacity* regime slows the device until the demand fits the workers' aggregate capacity.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

GB: Final = 1e9
PR_SET_TIMERSLACK: Final = 29


@dataclass(frozen=True)
class Testbed:
    """The published testbed the model reproduces (sources in docs/design.md and docs/benchmarks.md).

    `enc_core_bps`: AES-256-GCM per encrypting CPU core, 4-5 GB/s (CC bounce path about 4.9 GiB/s);
    `link_bps`: PCIe Gen5 x16 without CC, 35-53 GB/s measured (we take 50);
    `gpu_flops`: H100 SXM dense FP16/BF16, 989 TFLOP/s peak at a 60% achievable fraction;
    `hbm_bps`: H100 SXM HBM3, 3.35 TB/s at a 90% achievable fraction.
    """

    enc_core_bps: float = 4.5 * GB
    link_bps: float = 50.0 * GB
    gpu_flops: float = 989e12 * 0.6
    hbm_bps: float = 3.35e12 * 0.9

    def compute_s(self, flops: float, hbm_bytes: float = 0.0) -> float:
        """Roofline time of one kernel sequence on the testbed GPU: compute- or memory-bound."""
        return max(flops / self.gpu_flops, hbm_bytes / self.hbm_bps)

    def link_s(self, nbytes: float) -> float:
        return nbytes / self.link_bps


TESTBED: Final = Testbed()


@dataclass(frozen=True)
class TimeScale:
    """How testbed seconds map to wall seconds: `wall = testbed / speed` (speed > 1: the device runs faster)."""

    speed: float
    regime: str
    testbed: Testbed = TESTBED
    why: str = ""

    def wall(self, testbed_s: float) -> float:
        return testbed_s / self.speed

    @property
    def link_bps(self) -> float:
        """The link rate in wall-clock terms."""
        return self.testbed.link_bps * self.speed

    def link_wall_s(self, nbytes: float) -> float:
        return nbytes / self.link_bps

    def describe(self) -> str:
        return (
            f"{self.regime}: 1 testbed s = {1 / self.speed:.3g} wall s; link {self.link_bps / GB:.1f} GB/s wall "
            f"({self.testbed.link_bps / GB:.0f} GB/s testbed){'; ' + self.why if self.why else ''}"
        )


def testbed_scale(one_worker_bps: float, testbed: Testbed = TESTBED) -> TimeScale:
    """One encrypting core here vs the scaled link = one encrypting core there vs the real link."""
    speed = one_worker_bps / testbed.enc_core_bps
    why = (
        f"one worker encrypts {one_worker_bps / GB:.2f} GB/s here vs {testbed.enc_core_bps / GB:.1f} GB/s per "
        f"testbed core, so the device runs {speed:.2f}x testbed speed"
    )
    return TimeScale(speed, "testbed", testbed, why)


def capacity_scale(aggregate_bps: float, demand_testbed_bps: float, headroom: float, testbed: TimeScale) -> TimeScale:
    """Slow the device until the workload's encryption demand is `headroom` x the workers' aggregate rate.

    `demand_testbed_bps` is the bytes per testbed second the workload must encrypt when nothing but the
    device limits it (its ideal, plain-mode rate). Never faster than the testbed regime.
    """
    if demand_testbed_bps <= 0:
        return TimeScale(testbed.speed, "capacity", testbed.testbed, "the workload encrypts nothing")
    speed = min(testbed.speed, headroom * aggregate_bps / demand_testbed_bps)
    why = (
        f"ideal demand {demand_testbed_bps * speed / GB:.2f} GB/s wall = {headroom:.0%} of the workers' "
        f"{aggregate_bps / GB:.2f} GB/s"
    )
    return TimeScale(speed, "capacity", testbed.testbed, why)


def tighten_timer_slack() -> bool:
    """Ask Linux for 1 ns timer slack so `time.sleep` of a few hundred µs overshoots by µs, not 50+ µs."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0)
    return False


def calibrate_sleep(samples: int = 60, wait: float = 0.001) -> float:
    """Median oversleep of `time.sleep(wait)` on this machine (after `tighten_timer_slack`), in seconds."""
    over = []
    for _ in range(samples):
        t0 = time.perf_counter()
        time.sleep(wait)
        over.append(time.perf_counter() - t0 - wait)
    over.sort()
    return max(0.0, over[len(over) // 2])


@dataclass
class Span:
    """One interval on the timeline (model seconds since the device was reset)."""

    lane: str
    start: float
    end: float
    label: str = ""


@dataclass
class Clock:
    """Wall time and sleeping; swapped for `VirtualClock` in tests and dry runs."""

    now: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep


class VirtualClock(Clock):
    """A clock that only moves when slept on, or when `advance` is called (host work in a dry run)."""

    def __init__(self) -> None:
        self.t = 0.0
        super().__init__(now=lambda: self.t, sleep=self.advance)

    def advance(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


@dataclass
class DeviceModel:
    """Three GPU streams (H2D copy, D2H copy, compute) in model time, played out as waits."""

    scale: TimeScale
    clock: Clock = field(default_factory=Clock)
    record: bool = False
    debt: float = 0.0
    origin: float = 0.0
    h2d_free: float = 0.0
    d2h_free: float = 0.0
    compute_free: float = 0.0
    slept: float = 0.0
    spans: list[Span] = field(default_factory=list)
    debt_log: list[tuple[float, float]] = field(default_factory=list)  # (wall since reset, debt), if record
    overshoot: float = 0.0  # typical oversleep of `clock.sleep`, subtracted from each wait (see calibrate_sleep)

    def reset(self) -> None:
        """Start a new timeline at model time 0 (now)."""
        self.debt = 0.0
        self.origin = self.clock.now()
        self.h2d_free = self.d2h_free = self.compute_free = 0.0
        self.slept = 0.0
        self.spans = []
        self.debt_log = []

    def now(self) -> float:
        """Model time: wall time since `reset`, less the emulation debt."""
        return self.clock.now() - self.origin - self.debt

    def emulated(self, seconds: float) -> None:
        """The CPU spent `seconds` doing what the GPU would do (endpoint crypto, plain-mode DMA copy)."""
        self.debt += max(0.0, seconds)
        if self.record:
            self.debt_log.append((self.clock.now() - self.origin, self.debt))

    def to_model(self, wall_since_reset: float) -> float:
        """Model time of a wall-clock instant (seconds since `reset`), using the recorded debt (record=True)."""
        i = bisect.bisect_right(self.debt_log, (wall_since_reset, math.inf))
        return wall_since_reset - (self.debt_log[i - 1][1] if i else 0.0)

    def _span(self, lane: str, start: float, end: float, label: str) -> None:
        if self.record:
            self.spans.append(Span(lane, start, end, label))

    def h2d(self, nbytes: int, issued: float, host_done: float, label: str = "") -> float:
        """A host-to-device copy issued at `issued` whose ciphertext was complete at `host_done`; returns its end."""
        start = max(issued, self.h2d_free)
        end = max(start + self.scale.link_wall_s(nbytes), host_done)
        self.h2d_free = end
        self._span("host", issued, host_done, label)
        self._span("link H2D", start, end, label)
        return end

    def d2h(
        self, nbytes: int, issued: float, host_done: float, *, after_compute: bool = False, label: str = ""
    ) -> float:
        """A device-to-host copy (the GPU encrypts at link speed; the host's part ends at `host_done`).

        With `after_compute` it starts only when the compute issued before it has produced the data.
        """
        start = max(issued, self.d2h_free, self.compute_free if after_compute else 0.0)
        end = max(start + self.scale.link_wall_s(nbytes), host_done)
        self.d2h_free = end
        self._span("host", issued, host_done, label)
        self._span("link D2H", start, end, label)
        return end

    def compute(self, testbed_s: float, *, after_copies: bool, label: str = "") -> float:
        """Launch a kernel sequence now; with `after_copies` it waits for every H2D copy issued so far."""
        start = max(self.now(), self.compute_free, self.h2d_free if after_copies else 0.0)
        end = start + self.scale.wall(testbed_s)
        self.compute_free = end
        self._span("compute", start, end, label)
        return end

    def busy_until(self) -> float:
        return max(self.h2d_free, self.d2h_free, self.compute_free)

    def sync(self) -> float:
        """Wait (sleeping, no CPU) until every stream is idle; returns the model time afterwards."""
        target = self.busy_until()
        wait = target - self.now()
        if wait > 0:
            t0 = self.now()
            if wait > self.overshoot:
                self.clock.sleep(wait - self.overshoot)
            self.slept += wait
            self._span("sleep", t0, target, "")
        return self.now()


__all__ = [
    "GB",
    "TESTBED",
    "Clock",
    "DeviceModel",
    "Span",
    "Testbed",
    "TimeScale",
    "VirtualClock",
    "calibrate_sleep",
    "capacity_scale",
    "testbed_scale",
    "tighten_timer_slack",
]
