"""D2H landing: decrypt, in the crypto workers, what the endpoint encrypted into a session's D2H slots.

Each message is opened with the receiver's predicted nonce straight from its slot into the region; a tag
that fails kills the session's channels (tampered or misordered device data). Reads and swap-ins of the
range wait for the landing (the region's pending writes), and a failed landing leaves zeros, never
unverified bytes. A key whose usage reached its bound is rotated here, and the rotation returned as a
directive for the endpoint.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.errors import TagMismatch

from . import jobwire as w
from .counters import Counters
from .errors import CommitAborted
from .events import EventBus
from .pool import Arena
from .regions import Region
from .streams import D2HStream
from .workers import WorkerLost, WorkerPool

_ATTEMPTS = 3  # decryptions of one message after its worker died: the ciphertext is still in its slot


@dataclass(eq=False, kw_only=True)
class D2HLanding:
    session_id: str
    streams: list[D2HStream]
    workers: WorkerPool
    arena: Arena
    counters: Counters
    events: EventBus
    kill: Callable[[str], None]  # the session's channels, H2D too: a forged D2H message ends them all

    async def land(self, msg: pb.Landed, region: Region) -> list[pb.Delivery]:
        """Decrypt one Landed batch into `region`; returns the D2H key rotations now due."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        region.pending_writes.append((msg.offset, msg.length, fut))
        region.begin_write(msg.offset, msg.length)
        try:
            await self._open_all(msg, region)
        finally:
            region.end_write(msg.offset, msg.length)
            region.pending_writes = [p for p in region.pending_writes if p[2] is not fut]
            fut.set_result(None)
        self.counters.bytes_d2h += msg.length
        self.counters.d2h_messages += len(msg.messages)
        return self._due_rotations()

    async def _open_all(self, msg: pb.Landed, region: Region) -> None:
        pending = list(enumerate(msg.messages))
        offsets = list(itertools.accumulate((m.length for m in msg.messages), initial=msg.offset))
        preds = [self.streams[m.ce].receiver.predict(m.key_version, m.chan_ctr) for m in msg.messages]
        for _attempt in range(_ATTEMPTS):
            jobs = [
                self.workers.submit(
                    w.Kind.OPEN,
                    self.streams[m.ce].key_ids[preds[i].version],
                    preds[i].nonce,
                    (self.arena.handle, self.arena.layout.d2h_slot(m.slot)),
                    m.length,
                    (region.handle, offsets[i]),
                )
                for i, m in pending
            ]
            results = await _outcomes(jobs)
            lost = []
            for (i, m), res in zip(pending, results, strict=True):
                if isinstance(res, TagMismatch):
                    self.kill(f"D2H tag mismatch in ce{m.ce} (tampered or misordered device data)")
                    raise TagMismatch(f"D2H data for region {region.id} failed authentication; session is dead")
                if isinstance(res, WorkerLost):
                    lost.append((i, m))  # the ciphertext is still in its slot: decrypting again is safe
                elif isinstance(res, BaseException):
                    raise res
                else:
                    self.streams[m.ce].receiver.account(m.length)
            pending = lost
            if not pending:
                return
        region.view(msg.offset, msg.length)[:] = bytes(msg.length)  # nothing unverified stays behind
        raise CommitAborted("crypto workers kept dying while decrypting D2H data; swap out again")

    def _due_rotations(self) -> list[pb.Delivery]:
        directives: list[pb.Delivery] = []
        for stream in self.streams:
            if stream.receiver.key_rotation_pending:
                v = stream.rotate_key()
                directives.append(pb.Delivery(ce=stream.ce, kind=pb.MSG_KIND_ROTATE_D2H_KEY, value=v))
                self.counters.key_rotations += 1
                self.events.emit("key_rotation", self.session_id, f"ce{stream.ce} d2h key v{v}", ce=stream.ce)
        return directives


async def _outcomes(jobs: list[asyncio.Future[None]]) -> list[BaseException | None]:
    """Each job's result or exception, in order (`gather(return_exceptions=True)`, without its overhead for
    the common case of one message per landing: one per block when an engine copies block by block)."""
    if len(jobs) == 1:
        try:
            await jobs[0]
        except Exception as exc:  # handed back to the caller, which sorts it
            return [exc]
        return [None]
    return await asyncio.gather(*jobs, return_exceptions=True)
