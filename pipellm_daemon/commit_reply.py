"""The ordered deliveries of one commit, sent to the SDK in Completion frames as their ciphertext is ready."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb

from .errors import CommitAborted

_BATCH: Final = 64  # deliveries per Completion frame


class CommitReply:
    """The ordered deliveries of one commit, sent in batches as their ciphertext becomes ready."""

    def __init__(self, seq: int, send: Callable[[pb.Completion], None]) -> None:
        self.seq = seq
        self._send = send
        self._items: deque[tuple[pb.Delivery, asyncio.Future[None] | None]] = deque()

    def add(self, d: pb.Delivery, fut: asyncio.Future[None] | None = None) -> None:
        self._items.append((d, fut))

    def __len__(self) -> int:
        return len(self._items)

    async def flush(self, *, wait: bool, final: bool = False) -> None:
        """Send every delivery that is ready, in order; with `wait`, wait for all of them."""
        batch: list[pb.Delivery] = []
        while self._items:
            d, fut = self._items[0]
            if fut is not None and not fut.done():
                if not wait:
                    break
                if batch:
                    self._send(pb.Completion(seq=self.seq, deliveries=batch, final=False))
                    batch = []
                await asyncio.wait([fut])  # never raises: a failed job is judged just below
            if fut is not None and (fut.cancelled() or fut.exception() is not None):
                # A worker died under this job: the commit is ABORTED (the SDK retries from plaintext). What
                # precedes it is sent first: a delivery taken off the reply is either sent or left there for
                # `Pipeline._abort`, never dropped (its slot, IV and ring record would be lost to both ends).
                if batch:
                    self._send(pb.Completion(seq=self.seq, deliveries=batch, final=False))
                why = "cancelled" if fut.cancelled() else type(fut.exception()).__name__
                raise CommitAborted(f"encryption of a delivery failed ({why}); IVs abandoned, retry the commit")
            self._items.popleft()
            batch.append(d)
            if len(batch) >= _BATCH:
                self._send(pb.Completion(seq=self.seq, deliveries=batch, final=False))
                batch = []
        if batch or final:
            self._send(pb.Completion(seq=self.seq, deliveries=batch, final=final and not self._items))

    def pending_futures(self) -> list[asyncio.Future[None]]:
        return [f for _d, f in self._items if f is not None]

    def drop_unsent(self) -> list[pb.Delivery]:
        dropped = [d for d, _f in self._items]
        self._items.clear()
        return dropped

    def send_now(self, deliveries: list[pb.Delivery]) -> None:
        self._send(pb.Completion(seq=self.seq, deliveries=deliveries, final=False))
