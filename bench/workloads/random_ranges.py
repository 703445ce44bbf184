"""Random ranges in random order: nothing to predict; PipeLLM must cost no more than encrypting on demand."""

from __future__ import annotations

import numpy as np

from ..devicemodel import TESTBED, Testbed
from .trace import H2D, PAGE, Compute, MiB, Range, RegionSpec, Step, Sync, Trace, pages


def adversarial(
    *,
    region_bytes: int,
    steps: int,
    transfers: int = 4,
    min_bytes: int = 1 * MiB,
    max_bytes: int = 4 * MiB,
    compute_ratio: float = 1.0,
    warmup: int = 2,
    seed: int = 0,
    testbed: Testbed = TESTBED,
) -> Trace:
    """Random page-aligned ranges in random order: no cycle, no swap pattern, no intents.

    Each step commits `transfers` random ranges, then computes for `compute_ratio` x their link time (so
    there is idle time in which a predictor could waste work), then syncs. Whatever PipeLLM speculates
    is wrong; the target is to cost no more than encrypting on demand.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(warmup + steps):
        ranges = []
        for _ in range(transfers):
            n = pages(float(rng.integers(min_bytes, max_bytes + 1)))
            off = int(rng.integers(0, (region_bytes - n) // PAGE + 1)) * PAGE
            ranges.append(Range("data", off, n))
        nbytes = sum(r.length for r in ranges)
        out.append(
            Step(
                (
                    H2D(tuple(ranges), label="random"),
                    Compute(testbed.link_s(nbytes) * compute_ratio, after_copies=True),
                    Sync(),
                ),
                tokens=1,
            )
        )
    return Trace(
        name="adversarial",
        kind="adversarial",
        description=f"random {min_bytes // MiB}-{max_bytes // MiB} MiB ranges x{transfers} per step, random order",
        regions=(RegionSpec("data", region_bytes),),
        steps=tuple(out),
        warmup=warmup,
        unit="steps",
        scale={"byte_scale": 1.0},
        params={"transfers": transfers, "compute_ratio": compute_ratio, "seed": seed},
    )
