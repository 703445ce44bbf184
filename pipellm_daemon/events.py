"""A small broadcast bus: every notable event goes to the log and to each `Watch` subscriber.

Each subscriber has a bounded queue (a watcher that never reads loses events, the daemon never grows)
and sees only the events it may see: an admin every event, a tenant those of its own sessions plus the
daemon-wide ones (no session id, e.g. `worker_restart`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
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


class Subscription:
    """One watcher: its queue (at most `backlog` events, plus room for the end-of-stream marker)."""

    def __init__(self, uid: int, sees_all: bool, backlog: int) -> None:
        self.uid = uid  # the watcher's own uid
        self.sees_all = sees_all  # an admin: every session's events
        self.backlog = backlog
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(backlog + 1)
        self.dropped = 0

    async def get(self) -> Event | None:
        return await self.queue.get()


class EventBus:
    def __init__(self, backlog: int = 256) -> None:
        self._subscribers: set[Subscription] = set()
        self._backlog = backlog
        self.counts: dict[str, int] = {}
        # Who owns a session (its uid), or None when unknown (then only admins see its events).
        self.owner_of: Callable[[str], int | None] = lambda _sid: None

    def emit(self, kind: str, session_id: str = "", message: str = "", level: str = "info", **fields: Any) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ev = Event(kind, session_id, message, {k: str(v) for k, v in fields.items()})
        getattr(_log, level)(kind, session=session_id or None, msg=message or None, **fields)
        if not self._subscribers:
            return
        owner = self.owner_of(session_id) if session_id else None
        for sub in list(self._subscribers):
            if session_id and not sub.sees_all and owner != sub.uid:
                continue  # another tenant's session
            if sub.queue.qsize() >= sub.backlog:
                sub.dropped += 1  # a slow watcher loses events rather than growing or slowing the daemon
                continue
            sub.queue.put_nowait(ev)

    def subscribe(self, uid: int, sees_all: bool) -> Subscription:
        """An admin (sees_all) gets every event; a tenant its own sessions' events and the daemon-wide ones."""
        sub = Subscription(uid, sees_all, self._backlog)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def watchers(self, uid: int) -> int:
        """Streams that uid has open, for the per-uid Watch limit."""
        return sum(1 for s in self._subscribers if s.uid == uid)

    def close(self) -> None:
        for sub in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):  # emit always leaves one place for it
                sub.queue.put_nowait(None)
