"""What giving up speculative entries costs, so a commit can pick the cheaper way.

Entries before a skipped-to chunk (or a whole queue on a miss) can be burned one by one, each in its place
in the IV stream (a NOP for a fresh IV, the ciphertext itself as DISCARD for an encrypted one), or
abandoned all at once by an IV rotation, after which whatever is kept must be encrypted again under new
IVs. The figures (microseconds) come from the configuration and the endpoint's measured speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import Config
from .streams import Entry, State


class CostModel:
    def __init__(self, cfg: Config, endpoint_bytes_per_us: float, workers: int) -> None:
        self.cfg = cfg
        self.endpoint_bytes_per_us = endpoint_bytes_per_us
        self.workers = max(1, workers)

    def burn_us(self, entries: Sequence[Entry]) -> float:
        """Burning each entry in place; infinite when one's worker died (only a rotation retires that IV)."""
        cost = 0.0
        for e in entries:
            if e.state == State.FAILED:
                return math.inf
            if e.state == State.RESERVED:
                cost += self.cfg.cost_nop_us
            else:
                cost += self.cfg.cost_discard_fixed_us + e.nbytes / self.endpoint_bytes_per_us
        return cost

    def rotate_us(self, kept: Sequence[Entry]) -> float:
        """One IV rotation, plus encrypting again what was already encrypted among the entries kept."""
        redo = sum(e.nbytes for e in kept if e.state != State.RESERVED)
        return self.cfg.cost_rotate_us + redo / (self.cfg.worker_bytes_per_us * self.workers)
