"""Commit latency, recorded by the pipeline and exported by status and metrics."""

from __future__ import annotations


class Latency:
    """A fixed-bucket histogram of commit latencies (seconds), cheap enough for every commit."""

    BOUNDS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BOUNDS)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.n += 1
        self.total += seconds
        for i, b in enumerate(self.BOUNDS):
            if seconds <= b:
                self.counts[i] += 1
                return

    def export(self) -> tuple[list[float], list[int], float, int]:
        return list(self.BOUNDS), list(self.counts), self.total, self.n
