"""LoRA adapters: next-batch hints arrive as intents; without them, guess from recency and popularity.

An adapter is a region registered with kind "adapter". The most recently loaded adapters are assumed
resident on the GPU; the next load is predicted to be the most popular adapter (recency-weighted count)
among the rest, one adapter deep. Serving engines that know the next batch should declare intents.
"""

from __future__ import annotations

from .base import ChunkId


class LoraPredictor:
    name = "lora"

    def __init__(self, resident: int = 1) -> None:
        self.resident = resident
        self._adapters: dict[int, list[ChunkId]] = {}  # region -> chunks of one full load
        self._score: dict[int, float] = {}
        self._recent: list[int] = []
        self._loading: list[ChunkId] = []

    def add_adapter(self, region: int, chunks: list[ChunkId]) -> None:
        self._adapters[region] = chunks

    def observe(self, key: ChunkId) -> None:
        chunks = self._adapters.get(key.region)
        if chunks is None:
            return
        if chunks and key == chunks[0]:
            for r in self._score:
                self._score[r] *= 0.9
            self._score[key.region] = self._score.get(key.region, 0.0) + 1.0
            if key.region in self._recent:
                self._recent.remove(key.region)
            self._recent.append(key.region)
            self._loading = list(chunks[1:])
        elif self._loading and key == self._loading[0]:
            self._loading.pop(0)

    def upcoming(self, limit: int) -> list[ChunkId]:
        if self._loading:
            return self._loading[:limit]
        resident = set(self._recent[-self.resident :])
        ranked = sorted((r for r in self._score if r not in resident), key=lambda r: -self._score[r])
        return self._adapters[ranked[0]][:limit] if ranked else []

    def forget_region(self, region: int) -> None:
        self._adapters.pop(region, None)
        self._score.pop(region, None)
        if region in self._recent:
            self._recent.remove(region)
        self._loading = [k for k in self._loading if k.region != region]
