"""The trace vocabulary: what a serving system does to the CPU-GPU link, step by step.

A `Trace` is H2D copies out of host regions (weights, adapters, swapped KV blocks), D2H copies into them
(KV swap-outs, offloaded blocks), GPU compute and synchronisation, and the intents a PipeLLM integration of
that system would declare. Every workload module builds one; the harness replays it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ..devicemodel import TESTBED, DeviceModel, Testbed, TimeScale, VirtualClock

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30
PAGE: Final = 4096
MAX_COMMIT_RANGES: Final = 4096  # the daemon's default max_transfers_per_commit (pipellm_daemon/config.py)


@dataclass(frozen=True)
class RegionSpec:
    """A host region the workload moves bytes out of or into (read-only: weights, adapters; else KV)."""

    name: str
    nbytes: int
    readonly: bool = True
    adapter: bool = False


@dataclass(frozen=True)
class Range:
    region: str
    offset: int
    length: int


@dataclass(frozen=True)
class H2D:
    """One commit: these ranges, in this order, host to device (one round trip through the SDK)."""

    ranges: tuple[Range, ...]
    label: str = ""

    @property
    def nbytes(self) -> int:
        return sum(r.length for r in self.ranges)


@dataclass(frozen=True)
class D2H:
    """One device-to-host copy into a mutable region; `swap_out`: the block will come back (KV swap)."""

    range: Range
    group: int = 0
    swap_out: bool = True
    after_compute: bool = False  # the data is produced by the compute launched before it
    label: str = ""

    @property
    def nbytes(self) -> int:
        return self.range.length


@dataclass(frozen=True)
class Compute:
    """GPU work of `seconds` on the testbed; `after_copies`: it needs every H2D copy issued before it."""

    seconds: float
    after_copies: bool = True
    label: str = ""


@dataclass(frozen=True)
class Sync:
    """The host waits for the device (end of a layer, of an engine step)."""


@dataclass(frozen=True)
class Declare:
    """Intents a PipeLLM integration of this serving system would declare (replayed in pipellm mode only)."""

    ranges: tuple[Range, ...]
    cyclic: bool = False
    replace: bool = False


Op = H2D | D2H | Compute | Sync | Declare


@dataclass(frozen=True)
class Step:
    """One unit of progress (a token of a FlexGen pass, an engine step); `tokens` it produces."""

    ops: tuple[Op, ...]
    tokens: int = 0


@dataclass
class Trace:
    name: str
    kind: str
    description: str
    regions: tuple[RegionSpec, ...]
    steps: tuple[Step, ...]
    warmup: int  # leading steps that are replayed but not measured (predictors learn, pipelines fill)
    swap_order: str = "fifo"
    unit: str = "tokens"
    scale: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> tuple[Step, ...]:
        return self.steps[self.warmup :]

    def ops(self, measured: bool = True) -> list[Op]:
        return [op for st in (self.measured if measured else self.steps) for op in st.ops]

    def h2d_bytes(self, measured: bool = True) -> int:
        return sum(op.nbytes for op in self.ops(measured) if isinstance(op, H2D))

    def d2h_bytes(self, measured: bool = True) -> int:
        return sum(op.nbytes for op in self.ops(measured) if isinstance(op, D2H))

    def crypto_bytes(self, measured: bool = True) -> int:
        """B: every byte a CC system must encrypt (H2D) or decrypt (D2H) on the host."""
        return self.h2d_bytes(measured) + self.d2h_bytes(measured)

    def tokens(self, measured: bool = True) -> int:
        return sum(st.tokens for st in (self.measured if measured else self.steps))

    def region_bytes(self) -> int:
        return sum(r.nbytes for r in self.regions)

    def max_h2d_op(self) -> int:
        return max((op.nbytes for op in self.ops(False) if isinstance(op, H2D)), default=0)

    def max_h2d_range(self) -> int:
        return max((r.length for op in self.ops(False) if isinstance(op, H2D) for r in op.ranges), default=0)

    def max_d2h_op(self) -> int:
        return max((op.nbytes for op in self.ops(False) if isinstance(op, D2H)), default=0)

    def ideal_seconds(self, testbed: Testbed = TESTBED) -> float:
        """Testbed seconds of the measured steps with zero host cost: what the device model alone dictates."""
        dev = DeviceModel(TimeScale(1.0, "ideal", testbed), clock=VirtualClock())
        for i, st in enumerate(self.steps):
            if i == self.warmup:
                dev.sync()
                dev.reset()
            for op in st.ops:
                if isinstance(op, H2D):
                    dev.h2d(op.nbytes, dev.now(), dev.now())
                elif isinstance(op, D2H):
                    dev.d2h(op.nbytes, dev.now(), dev.now(), after_compute=op.after_compute)
                elif isinstance(op, Compute):
                    dev.compute(op.seconds, after_copies=op.after_copies)
                elif isinstance(op, Sync):
                    dev.sync()
        dev.sync()
        return dev.now()

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "description": self.description,
            "steps": len(self.steps),
            "warmup_steps": self.warmup,
            "unit": self.unit,
            "work": self.tokens(),
            "h2d_bytes": self.h2d_bytes(),
            "d2h_bytes": self.d2h_bytes(),
            "region_bytes": self.region_bytes(),
            "ideal_testbed_s": self.ideal_seconds(),
            "scale": self.scale,
            "params": self.params,
        }


def pages(n: float) -> int:
    """Round a byte count to whole 4 KiB pages (at least one)."""
    return max(PAGE, round(n / PAGE) * PAGE)


def lines(n: float, line: int = 64) -> int:
    """Round a byte count to whole 64-byte lines (at least one): for scaled copies far below a page."""
    return max(line, round(n / line) * line)
