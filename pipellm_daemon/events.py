"""A small broadcast bus: every notable event goes to the log and to each `Watch` subscriber."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from . import logs

_log = logs.get("pipellmd.events")


@dataclass(frozen=True)
class Event:
    kind: str
    session_id: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class EventBus:
    def __init__(self, backlog: int = 256) -> None:
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._backlog = backlog
        self.counts: dict[str, int] = {}

    def emit(self, kind: str, session_id: str = "", message: str = "", level: str = "info", **fields: Any) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ev = Event(kind, session_id, message, {k: str(v) for k, v in fields.items()})
        getattr(_log, level)(kind, session=session_id or None, msg=message or None, **fields)
        for q in list(self._subscribers):
            if q.qsize() >= self._backlog:
                continue  # a slow watcher loses events rather than slowing the daemon
            q.put_nowait(ev)

    def subscribe(self) -> asyncio.Queue[Event | None]:
        q: asyncio.Queue[Event | None] = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event | None]) -> None:
        self._subscribers.discard(q)

    def close(self) -> None:
        for q in self._subscribers:
            q.put_nowait(None)
