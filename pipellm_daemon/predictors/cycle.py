"""Learned cycles: "what followed this chunk last time" (FlexGen and accelerate weights, PEFT adapters).

Each committed chunk is looked up in the history; the chunks that followed its previous occurrence are the
prediction. That recognises a cycle as soon as its second period starts. Chunks seen only once (an
occasional extra transfer) are left out of predictions once a cycle is established, and a shadow score of
the last predictions gates speculation, so a random order stops costing anything.
"""

from __future__ import annotations

from .base import ChunkId

MAX_HISTORY = 1 << 18


class CyclePredictor:
    name = "cycle"

    def __init__(self, max_history: int = MAX_HISTORY) -> None:
        self.max_history = max_history
        self._history: list[ChunkId] = []
        self._last: dict[ChunkId, int] = {}  # key -> position of its latest occurrence
        self._count: dict[ChunkId, int] = {}
        self._anchor = -1  # position of the previous occurrence of the newest anchorable chunk
        self._expected: ChunkId | None = None
        self.score = 0.0  # EWMA of "the first predicted chunk was the next one committed"

    def observe(self, key: ChunkId) -> None:
        expected = self._expected
        # A chunk rarer than the one the cycle expected is an extra transfer: it neither moves the anchor
        # nor counts against the cycle, so the cycle survives it.
        extra = expected is not None and key != expected and self._count.get(key, 0) < self._count.get(expected, 0)
        if expected is not None and not extra:
            self.score = 0.7 * self.score + 0.3 * (1.0 if key == expected else 0.0)
        prev = self._last.get(key)
        pos = len(self._history)
        self._history.append(key)
        self._last[key] = pos
        self._count[key] = self._count.get(key, 0) + 1
        if len(self._history) > self.max_history:
            shift = self._compact()
            prev = prev - shift if prev is not None and prev >= shift else None
        if extra:
            return
        if prev is not None:
            self._anchor = prev
        nxt = self._continuation(1)
        self._expected = nxt[0] if nxt else None

    def _continuation(self, limit: int) -> list[ChunkId]:
        if self._anchor < 0:
            return []
        out: list[ChunkId] = []
        start, end = self._anchor + 1, len(self._history)
        if start >= end:
            return out
        # The span after the anchor up to now is one period; a cycle repeats it, so wrap around. Chunks seen
        # far less often than the anchor were extras and are not predicted.
        anchor_count = self._count.get(self._history[self._anchor], 0)
        i = start
        for _ in range(limit * 2 + (end - start)):
            if len(out) >= limit:
                break
            k = self._history[i]
            if 2 * self._count.get(k, 0) >= anchor_count:
                out.append(k)
            i = i + 1 if i + 1 < end else start
        return out

    def upcoming(self, limit: int) -> list[ChunkId]:
        if self.score < 0.5:
            return []
        # Confidence scales the depth: a shaky cycle speculates one or two chunks, a solid one the full depth.
        depth = limit if self.score >= 0.9 else max(1, limit // 4)
        return self._continuation(depth)

    def _compact(self) -> int:
        keep = self._history[-self.max_history // 2 :]
        shift = len(self._history) - len(keep)
        self._history = keep
        self._last = {}
        for i, k in enumerate(keep):
            self._last[k] = i
        self._count = {k: self._count.get(k, 1) for k in self._last}
        self._anchor = max(-1, self._anchor - shift)
        return shift

    def forget_region(self, region: int) -> None:
        self._history = [k for k in self._history if k.region != region]
        self._last = {k: i for i, k in enumerate(self._history)}
        self._count = {k: v for k, v in self._count.items() if k.region != region}
        self._anchor = -1
        if self._history:
            last = self._history[-1]
            prev = [i for i, k in enumerate(self._history[:-1]) if k == last]
            self._anchor = prev[-1] if prev else -1
