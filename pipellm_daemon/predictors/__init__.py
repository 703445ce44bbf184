"""Predictors, combined by priority: declared intents, then swap order, then learned cycles, then LoRA."""

from __future__ import annotations

from .base import ChunkId, Predictor
from .cycle import CyclePredictor
from .intents import IntentPredictor
from .lora import LoraPredictor
from .swap import SwapPredictor


class PredictorsByPriority:
    """Every predictor of a session; `upcoming` takes the first that has an answer (`last_source` says which)."""

    def __init__(self, swap_order: str = "fifo") -> None:
        self.intents = IntentPredictor()
        self.swap = SwapPredictor(swap_order)
        self.cycle = CyclePredictor()
        self.lora = LoraPredictor()
        self.all: list[Predictor] = [self.intents, self.swap, self.cycle, self.lora]
        self.last_source = ""

    def observe(self, key: ChunkId, readonly: bool = True) -> None:
        """Learned cycles and adapter popularity are about read-only data (weights, adapters): a mutable
        region's bytes change between passes, so guessing its chunks again mostly encrypts stale data."""
        for p in self.all:
            if readonly or p.name in ("intents", "swap"):
                p.observe(key)

    def upcoming(self, limit: int) -> list[ChunkId]:
        for p in self.all:
            keys = p.upcoming(limit)
            if keys:
                self.last_source = p.name
                return keys
        self.last_source = ""
        return []

    def upcoming_of(self, source: str, limit: int) -> list[ChunkId]:
        """The next `limit` chunks of the predictor named `source` alone (`last_source` is left as it is)."""
        p = next((p for p in self.all if p.name == source), None)
        return p.upcoming(limit) if p is not None else []

    def outranks(self, a: str, b: str) -> bool:
        """Does predictor `a` come before predictor `b` in priority? (Unknown names rank last.)"""
        order = [p.name for p in self.all]
        return (order.index(a) if a in order else len(order)) < (order.index(b) if b in order else len(order))

    def forget_region(self, region: int) -> None:
        for p in self.all:
            p.forget_region(region)


__all__ = [
    "ChunkId",
    "CyclePredictor",
    "IntentPredictor",
    "LoraPredictor",
    "Predictor",
    "PredictorsByPriority",
    "SwapPredictor",
]
