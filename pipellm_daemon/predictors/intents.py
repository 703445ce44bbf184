"""Declared intents: the serving code says what it will transfer next. Authoritative while any remain."""

from __future__ import annotations

import itertools
from collections import deque

from .base import ChunkId


class IntentPredictor:
    name = "intents"

    def __init__(self) -> None:
        self._pending: deque[ChunkId] = deque()
        self._counts: dict[ChunkId, int] = {}
        self._cycle: list[ChunkId] = []  # a cyclic declaration repeats until cancelled

    def _push(self, keys: list[ChunkId]) -> None:
        self._pending.extend(keys)
        for k in keys:
            self._counts[k] = self._counts.get(k, 0) + 1

    def _pop(self) -> ChunkId:
        k = self._pending.popleft()
        n = self._counts[k] - 1
        if n:
            self._counts[k] = n
        else:
            del self._counts[k]
        return k

    def declare(self, keys: list[ChunkId], *, replace: bool, cyclic: bool) -> None:
        if replace:
            self.cancel()
        if cyclic:
            self._cycle = list(keys)
        self._push(keys)

    def cancel(self) -> int:
        n = len(self._pending)
        self._pending.clear()
        self._counts.clear()
        self._cycle = []
        return n

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _top_up(self, limit: int) -> None:
        while self._cycle and len(self._pending) < limit:
            self._push(self._cycle)

    def observe(self, key: ChunkId) -> None:
        self._top_up(64)
        # Consume up to and including the committed chunk; intents skipped over are dropped.
        if key in self._counts:
            while self._pending:
                if self._pop() == key:
                    break

    def upcoming(self, limit: int) -> list[ChunkId]:
        self._top_up(limit)
        return list(itertools.islice(self._pending, limit))

    def forget_region(self, region: int) -> None:
        keep = [k for k in self._pending if k.region != region]
        cycle = [k for k in self._cycle if k.region != region]
        self.cancel()
        self._push(keep)
        self._cycle = cycle
