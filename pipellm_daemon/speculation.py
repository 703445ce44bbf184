"""Copy engine 0's speculation: which chunks stand in its queue, in reserved-IV order, and when their
ciphertext is made.

`refill` brings the queue in line with the predictions (appending fresh IVs, re-aiming fresh ones, or
abandoning the queue by an IV rotation when a better-informed predictor disagrees with the ciphertext at
its head); `dispatch` hands queued entries to the crypto workers as far ahead as the byte budget, the free
bounce slots and the learned depth allow. The commit policy (`pipeline`) consumes the queue from the head
through `pop`, and decides hits, skips and misses; it rewards or penalises the depth through `reward` and
`penalise`. This module reserves IVs but never delivers, burns or publishes anything.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable
from typing import Final

from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb

from . import jobwire as w
from .config import Config
from .counters import Counters
from .logs import get as _get_log
from .pool import Arena
from .predictors import ChunkId, PredictorsByPriority
from .regions import Region
from .relinquish import CostModel
from .streams import Entry, H2DStream, State
from .throttle import SourceThrottle
from .workers import WorkerPool

_log = _get_log("pipellmd.pipeline")
# Sources the serving code declared (its own word): they keep the full depth and may preempt learned ones.
DECLARED = frozenset({"intents", "swap"})
# Reserved-but-unsent IVs at most, in units of max_depth: a queue reordered over and over would otherwise
# reserve IVs without bound (each abandoned one is skipped by a rotation, never reused).
_OUTSTANDING_DEPTHS = 4
# A learned source's ciphertext is kept waiting its turn only while this share of its recent bytes was used.
KEEP_SHARE: Final = 0.9
_MADE: Final = (State.ENCRYPTING, State.READY, State.PUBLISHED)  # entries whose ciphertext exists or is being made


def on_their_way(want: list[ChunkId], published: list[ChunkId]) -> int:
    """How many of `want`'s first chunks the published records carry, in order: records in between that
    are no longer wanted are burned (DISCARD) when a commit passes them, and those after them still serve."""
    n = 0
    for key in published:
        if n < len(want) and want[n] == key:
            n += 1
    return n


def source_unchanged(e: Entry) -> bool:
    """Whether an entry's ciphertext was made from exactly the bytes its region holds now."""
    if e.state not in (State.READY, State.PUBLISHED) or e.snapshot is None:
        return False
    r = e.region
    if r.shm.closed:
        return False
    if not r.unchanged_since(e.snapshot, e.key.offset, e.key.length):
        return False
    return e.fingerprint is None or r.fingerprint(e.key.offset, e.key.length) == e.fingerprint


class Speculation:
    """The speculative queue of one session, the ciphertext bytes it holds ahead, and its learned depth."""

    def __init__(
        self,
        *,
        stream: H2DStream,
        cfg: Config,
        workers: WorkerPool,
        arena: Arena,
        regions: dict[int, Region],
        predictors: PredictorsByPriority,
        costs: CostModel,
        counters: Counters,
        on_ready: Callable[[Entry], None],
        session_id: str,
        detours: bool,
    ) -> None:
        self.stream = stream
        self.detours = detours  # a second channel takes chunks the queue does not hold (its head stays)
        self.cfg = cfg
        self.workers = workers
        self.arena = arena
        self.regions = regions
        self.predictors = predictors
        self.costs = costs
        self.counters = counters
        self.throttle = SourceThrottle(counters)
        self._on_ready = on_ready  # an entry's ciphertext is made (the pipeline stages and publishes it)
        self.session_id = session_id
        self.depth = 2  # how far learned sources speculate: grows with hits, halves with a wrong guess
        self.ahead_bytes = 0  # bytes of queued entries whose encryption has started (the ahead_bytes budget)
        self.waited = 0  # commits that took the second channel while the stream's ciphertext waited its turn

    # -- the depth ------------------------------------------------------------------------------------
    def reward(self) -> None:
        """A guess landed (or nothing was queued): speculate one chunk further."""
        self.depth = min(self.cfg.max_depth, self.depth + 1)
        self.waited = 0  # the stream is being used: ciphertext that waits its turn may wait again

    def penalise(self) -> None:
        """A wrong guess: speculate half as far."""
        self.depth = max(1, self.depth // 2)

    # -- the queue --------------------------------------------------------------------------------------
    def pop(self) -> Entry:
        """Take the head entry off the queue, keeping the count of ciphertext bytes held ahead."""
        e = self.stream.queue.popleft()
        if e.state != State.RESERVED:
            self.ahead_bytes -= e.nbytes
        return e

    def abandon(self) -> None:
        """Drop every queued entry; its slot comes back once no worker can still be writing into it. The
        caller retires their IVs (a rotation)."""
        while self.stream.queue:
            e = self.pop()
            if e.slot < 0:
                continue
            if e.state in (State.READY, State.ENCRYPTING, State.FAILED):
                self.counters.wasted(e.source, e.nbytes)
            if e.fut is not None and not e.fut.done():
                e.fut.add_done_callback(self._release_later(e.slot))
            else:
                self.arena.h2d.release(e.slot)

    def _release_later(self, slot: int) -> Callable[[asyncio.Future[None]], None]:
        def release(_fut: asyncio.Future[None]) -> None:
            self.arena.h2d.release(slot)

        return release

    def detour_keeps(self, entries: list[Entry]) -> bool:
        """A miss at commit time: take the second channel and keep `entries` (the ciphertext in front of
        the stream: what is published, then the queue)? Yes when they are still what the predictors expect
        next (the miss was an extra transfer inside a cycle), or when they wait their turn
        (`waits_its_turn`; counted, so a queue whose turn never comes is given up)."""
        if not self.detours or not entries:
            return False
        want = self.predictors.upcoming(min(len(entries), 4))
        if want and [e.key for e in entries[: len(want)]] == want:
            return True
        if self.waits_its_turn(entries):
            self.waited += 1
            return True
        return False

    def waits_its_turn(self, entries: list[Entry]) -> bool:
        """Whether the ciphertext in front of the stream (`entries`) only waits its turn behind a
        higher-ranked source's chunks, and is worth keeping for it.

        Yes when its head was made, from bytes that are unchanged, for a lower-ranked learned source whose
        recent ciphertext was nearly all used (`KEEP_SHARE`) and which still predicts it, and when that
        source's still-predicted ciphertext comes to more bytes than the chunks predicted first: abandoning
        it by a rotation would make the workers encrypt more again than encrypting those chunks on demand
        costs (a swap-in right after its swap-out, in front of the next pass's weights); the chunks take
        the second channel instead. A declared run at least as big as what is kept (an adapter in front of
        a learned guess), or a source whose guesses are often thrown away, still preempts, so the declared
        chunks are made ahead. Never with one channel (the commit would relinquish the queue anyway), and
        not after `max_depth` such detours without a hit from the stream."""
        if not self.detours or not entries or self.waited >= self.cfg.max_depth:
            return False
        head = entries[0]
        if head.state not in _MADE or (head.state != State.ENCRYPTING and not source_unchanged(head)):
            return False
        first = self.predictors.upcoming(self.cfg.max_depth)
        now = self.predictors.last_source
        if not now or head.source == now or not self.predictors.outranks(now, head.source):
            return False
        if self.throttle.share.get(head.source, 0.0) < KEEP_SHARE:
            return False
        theirs = set(self.predictors.upcoming_of(head.source, self.cfg.max_depth))
        if head.key not in theirs:
            return False
        kept = sum(e.nbytes for e in entries if e.source == head.source and e.state in _MADE and e.key in theirs)
        return sum(k.length for k in first) < kept

    def slot_budget(self) -> int:
        """Bounce slots speculation may still take: the rest are kept for on-demand chunks."""
        return self.arena.h2d.free - self.cfg.demand_slots

    # -- refilling ---------------------------------------------------------------------------------------
    def refill(self, published: list[ChunkId], *, append_only: bool) -> pb.Delivery | None:
        """Bring the queue in line with the predictions and start encrypting what has a slot.

        `published`: chunks already in the delivery ring, not taken yet (they stand first in the prediction
        and are on their way). `append_only` while a commit walks the queue: nothing it may be looking at
        changes. Returns the IV rotation to send when the queue was abandoned (preempted), else None.
        """
        s = self.stream
        if s.sender.key_rotation_pending or s.sender.dead is not None:
            return None
        want = self.predictors.upcoming(self.cfg.max_depth + len(published))
        source = self.predictors.last_source
        want = want[on_their_way(want, published) :]
        if source not in DECLARED:
            # Learned guesses earn depth by hitting, and lose it while what they made is thrown away;
            # declared ones get it all.
            self.throttle.update()
            want = want[: self.throttle.depth(source, self.depth)]
        head = s.queue[0] if s.queue else None
        preempt = False
        if want and head is not None and head.state != State.RESERVED and not append_only:
            if source in DECLARED and not self.predictors.outranks(head.source, source):
                # The declared order changed: abandon the queue when that pays (`_rotation_pays`), unless
                # its ciphertext only waits its turn behind fewer declared bytes than it holds.
                preempt = (
                    want[0] != head.key and self._rotation_pays(want[0]) and not self.waits_its_turn(list(s.queue))
                )
            else:
                preempt = head.key not in want and self.predictors.outranks(source, head.source)
        q = s.queue
        n = min(len(q), len(want))
        if n and [e.key for e in itertools.islice(q, n)] == want[:n]:
            # The steady state: the queue is the prediction's prefix. Only its tail needs extending.
            for key in want[n:]:
                if not self._append(key, source):
                    break
            self.dispatch()
            return None
        rotation = None
        if preempt:
            _log.debug(
                "preempt",
                session=self.session_id,
                head=tuple(head.key) if head else None,
                want=tuple(want[0]),
                source=source,
            )
            # A better-informed predictor disagrees with ciphertext at the head: abandon the queue now,
            # in band before the next commit's deliveries, rather than burning it chunk by chunk.
            self.abandon()
            rotation = pb.Delivery(ce=s.ce, kind=pb.MSG_KIND_ROTATE_IV, value=s.sender.rotate_iv())
            self.counters.iv_rotations += 1
            self.counters.relinquishes += 1
        i = 0
        for key in want:
            if i < len(q) and q[i].key == key:
                i += 1
                continue
            if i < len(q) and append_only:
                break
            if i < len(q) and q[i].state == State.RESERVED:
                region = self.regions.get(key.region)
                if region is None:
                    break
                e = q[i]
                e.key, e.region, e.source = key, region, source  # a fresh IV can carry any chunk
                i += 1
                continue
            if i < len(q):
                later = next((j for j in range(i + 1, len(q)) if q[j].key == key), -1)
                if later < 0:
                    break  # an encrypted entry stands in the way; commits will skip or relinquish it
                i = later + 1
                continue
            if not self._append(key, source):
                break
            i += 1
        self.dispatch()
        return rotation

    def _append(self, key: ChunkId, source: str) -> bool:
        """A fresh IV at the tail for `key`; False when its region is gone or too many IVs are reserved."""
        s = self.stream
        region = self.regions.get(key.region)
        if region is None or s.sender.outstanding >= _OUTSTANDING_DEPTHS * self.cfg.max_depth:
            return False
        s.queue.append(Entry(key, region, s.sender.reserve(), source))
        return True

    def _rotation_pays(self, key: ChunkId) -> bool:
        """The declared order now starts at `key`, not at the queue's head: abandon the queue only when
        burning the entries in front of `key` would cost more than a rotation and encrypting again what is
        kept. Otherwise the commit of `key` burns them and the wanted ciphertext behind them is used: a
        replaced hint costs the encryption it wasted, not the chunks it still names."""
        q = list(self.stream.queue)
        pos = next((i for i, e in enumerate(q) if e.key == key), -1)
        return pos < 0 or self.costs.burn_us(q[:pos]) > self.costs.rotate_us(q[pos:])

    # -- encrypting ahead ------------------------------------------------------------------------------
    def dispatch(self) -> None:
        """Hand queued entries to the workers, in queue order, while the budget and the slots allow."""
        s = self.stream
        for e in s.queue:
            if e.state != State.RESERVED:
                continue
            if s.sender.epoch.usage + e.nbytes // 16 + 1 >= s.sender.policy.lower:
                return  # never speculate into a pending key rotation: it would abandon the work anyway
            if self.ahead_bytes + e.nbytes > self.cfg.ahead_bytes or self.slot_budget() <= 0:
                return
            r = e.region
            if r.shm.closed or r.landings_touching(e.key.offset, e.key.length):
                continue
            snap = r.generations(e.key.offset, e.key.length)
            if snap is None:
                continue
            e.fingerprint = (
                r.fingerprint(e.key.offset, e.key.length) if (self.cfg.fingerprint and not r.readonly) else None
            )
            e.snapshot = snap
            slot = self.arena.h2d.try_acquire()
            if slot is None:
                return
            e.slot = slot
            nonce = s.sender.take(e.iv, e.nbytes)
            e.fut = self.workers.submit(
                w.Kind.SEAL,
                s.key_id(),
                nonce,
                (r.handle, e.key.offset),
                e.nbytes,
                (self.arena.handle, self.arena.layout.h2d_slot(slot)),
            )
            e.state = State.ENCRYPTING
            e.fut.add_done_callback(functools.partial(self._encrypted, e))
            self.ahead_bytes += e.nbytes
            self.counters.ahead(e.source, e.nbytes)

    def _encrypted(self, e: Entry, fut: asyncio.Future[None]) -> None:
        if e.state != State.ENCRYPTING:
            return
        e.state = State.FAILED if fut.cancelled() or fut.exception() is not None else State.READY
        if e.state == State.READY:
            self._on_ready(e)
