"""One session's transfer engine: speculative H2D encryption, on-demand encryption, asynchronous D2H.

The speculative stream (copy engine 0) holds a queue of entries in reserved-IV order. Each entry names
the chunk a predictor expects next; its ciphertext is made ahead by the workers. A commit then is:

* hit  — the chunk is at the head and its source is unchanged: deliver the ready ciphertext;
* skip — it is further down: burn the entries before it, or abandon them all with an IV rotation,
         whichever the cost model says is cheaper;
* miss — it is not queued: when the queue is still what the predictors expect (an extra transfer), the
         chunk takes the second channel and the queue stays; otherwise the queue is relinquished and the
         chunk is encrypted now.

Burning never encrypts twice under one IV: an entry whose IV is still fresh is burned with a NOP; an entry
whose ciphertext exists is burned by delivering that same ciphertext as DISCARD (the endpoint verifies and
drops it); an entry whose worker died mid-job can only be abandoned by an IV rotation.

This module is the commit policy and the delivery ring's producer; the mechanisms are `speculation` (the
queue: what is encrypted ahead, and when), `streams` (queues, senders, receivers), `commit_reply` (a
commit's ordered deliveries), `relinquish` (what burning or rotating costs), `published` (the delivery
ring's records) and `landing` (D2H decryption).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from pipellm_client import chunks
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.channel import ReservedIv
from pipellm_client.crypto import TAG_LEN
from pipellm_client.endpoint import NOP_MESSAGE_LEN, NOP_PLAINTEXT
from pipellm_client.errors import ChannelDead, StaleSource
from pipellm_client.ring import FLAG_STAGED, KIND_DATA, Record, RingView, source_digest
from pipellm_client.wire import FLAG_UNPREDICTED, copy_engine

from . import jobwire as w
from .commit_reply import CommitReply
from .config import Config
from .counters import Counters
from .errors import CommitAborted, ProtocolViolation
from .events import EventBus
from .landing import D2HLanding
from .latency import Latency
from .logs import get as _get_log
from .pool import Arena
from .predictors import ChunkId, PredictorsByPriority
from .published import Published, PublishedRecords
from .regions import Region
from .relinquish import CostModel
from .speculation import DECLARED, Speculation, source_unchanged
from .streams import D2HStream, Entry, H2DStream, State
from .workers import WorkerLost, WorkerPool

_log = _get_log("pipellmd.pipeline")
# Only what the serving code declared or swapped out is published: publishing makes an IV irrevocable
# (consumed or burned by DISCARD), and learned guesses are often replaced by a hint before they are used.
_PUBLISHED_SOURCES = DECLARED
# A long commit sends what is ready every this many deliveries, so the endpoint starts on them meanwhile.
_FLUSH_EVERY = 8


class Pipeline:
    def __init__(
        self,
        *,
        session_id: str,
        cfg: Config,
        workers: WorkerPool,
        arena: Arena,
        regions: dict[int, Region],
        h2d: list[H2DStream],
        d2h: list[D2HStream],
        events: EventBus,
        endpoint_bytes_per_us: float,
        swap_order: str = "fifo",
        latency: Latency | None = None,
        small_threshold: int | None = None,
        ring: RingView | None = None,
    ) -> None:
        self.session_id = session_id
        self.cfg = cfg
        self.mode = cfg.mode
        self.workers = workers
        self.arena = arena
        self.regions = regions
        self.h2d = h2d
        self.d2h = d2h
        self.events = events
        self.small_threshold = cfg.small_transfer_threshold if small_threshold is None else small_threshold
        self.predictors = PredictorsByPriority(swap_order)
        self.latency = latency or Latency()
        self.counters = Counters()
        self.delivered_slots: set[int] = set()
        self.delivered_nops: set[int] = set()
        self.dead: str | None = None
        self._directives: list[pb.Delivery] = []  # in-band rotations decided between commits
        self.staging: Any = None  # cuda_staging.DeviceStaging for CUDA sessions that attached one
        self._committing = False
        self._closed = False
        self._refill_scheduled = False  # a refill is due in the event loop's next turn (see _refill_soon)
        # The delivery ring's records (None without a ring: every hit is a commit round trip).
        self.published = PublishedRecords(ring) if ring is not None else None
        self.costs = CostModel(cfg, endpoint_bytes_per_us, workers.count)
        self.speculation = Speculation(
            stream=h2d[0],
            cfg=cfg,
            workers=workers,
            arena=arena,
            regions=regions,
            predictors=self.predictors,
            costs=self.costs,
            counters=self.counters,
            on_ready=self._entry_ready,
            session_id=session_id,
            detours=len(h2d) > 1,
        )
        self.landing = D2HLanding(
            session_id=session_id,
            streams=d2h,
            workers=workers,
            arena=arena,
            counters=self.counters,
            events=events,
            kill=self.kill,
        )

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def speculative(self) -> H2DStream:
        """Copy engine 0: the stream whose queue is encrypted ahead (copy engine 1 takes what is not)."""
        return self.h2d[0]

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise ChannelDead(f"session channels are dead ({self.dead}); open a new session")

    def kill(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason
            self.counters.channel_deaths += 1
            self.events.emit("channel_dead", self.session_id, reason, level="error")
        for s in self.h2d:
            s.sender.kill(reason)
        for r in self.d2h:
            r.receiver.kill(reason)

    def _route(self, t: pb.Transfer) -> int:
        if self.mode != "pipellm":
            return 0
        unpredicted = bool(t.flags & FLAG_UNPREDICTED)
        return copy_engine(
            t.length, unpredicted=unpredicted, channels=len(self.h2d), small_threshold=self.small_threshold
        )

    # -- commit ----------------------------------------------------------------------------------
    async def commit(
        self, seq: int, transfers: list[tuple[Region, pb.Transfer]], send: Callable[[pb.Completion], None]
    ) -> None:
        self._check_alive()
        start = time.monotonic()
        out = CommitReply(seq, send)
        self.counters.commits += 1
        self._ring_sync()
        if self._directives:
            self._flush_published(out)  # rotations decided between commits come after what is published
        for d in self._directives:
            out.add(d)
        self._directives = []
        self._committing = True
        try:
            for ti, (region, t) in enumerate(transfers):
                for f in region.landings_touching(t.offset, t.length):
                    await asyncio.shield(f)  # a swap-in waits for the swap-out's decryption
                self.counters.bytes_h2d += t.length
                if self.mode == "plain":
                    for c in chunks.split(t.offset, t.length, self.cfg.chunk_size):
                        out.add(
                            pb.Delivery(
                                kind=pb.MSG_KIND_PLAIN,
                                length=c.length,
                                transfer=ti,
                                dst_offset=c.dst_offset,
                                src_offset=c.offset,
                            )
                        )
                    continue
                ce = self._route(t)
                if ce == 1:
                    self.counters.small_transfers += 1
                parts = list(chunks.split(t.offset, t.length, self.cfg.chunk_size))
                for ci, c in enumerate(parts):
                    self.counters.chunks += 1
                    key = ChunkId(region.id, c.offset, c.length)
                    if ce == 0 and self.mode == "pipellm" and self.published:
                        taken = self._from_published(out, region, key, ti, c.dst_offset)
                        if taken == "hit":
                            continue
                        if taken == "detour":
                            await self._maybe_rotate(out)  # copy engine 1's key may be due as well
                            await self._on_demand(out, self.h2d[1], region, key, ti, c.dst_offset)
                            continue
                    await self._maybe_rotate(out)
                    if ce == 0 and self.mode == "pipellm":
                        await self._commit_speculative(out, region, key, ti, c.dst_offset)
                    else:
                        await self._on_demand(out, self.h2d[ce], region, key, ti, c.dst_offset)
                    more = ci + 1 < len(parts) or ti + 1 < len(transfers)
                    if (
                        more
                        and ce == 0
                        and self.mode == "pipellm"
                        and len(self.speculative.queue) <= self.speculation.depth // 2
                    ):
                        self.refill()  # a long commit drains the queue: keep it ahead of this commit's later chunks
                    if len(out) >= _FLUSH_EVERY:
                        await out.flush(wait=False)
            await out.flush(wait=True, final=True)
        except WorkerLost as exc:
            # A worker died under a job this commit needed: abandon its IVs in band, and let the SDK retry.
            await self._abort(out)
            raise CommitAborted(f"a crypto worker died during the commit ({exc}); retry it") from exc
        except BaseException:
            # Whatever went wrong, IVs already taken for unsent messages must never shift the stream.
            await self._abort(out)
            raise
        finally:
            self._committing = False
            self.latency.observe(time.monotonic() - start)
            self.refill()
            self._publish()

    async def _abort(self, out: CommitReply) -> None:
        """Drop what was not sent and abandon every IV it used, in band, so the endpoint stays in step."""
        pending = [f for f in out.pending_futures() if not f.done()]
        if pending:
            await asyncio.wait(pending)  # no worker may still be writing into a slot we hand back
        if self._closed:
            out.drop_unsent()
            return  # the session is gone: its streams, keys and ring with it; nobody is left to tell
        rotations = pb.Completion(seq=out.seq)
        for d in out.drop_unsent():
            if d.ring:
                assert self.published is not None
                self.published.unassign()  # never sent: the record is still the SDK's to take, first in line
            elif d.kind in (pb.MSG_KIND_DATA, pb.MSG_KIND_DISCARD) and d.slot in self.delivered_slots:
                self.delivered_slots.discard(d.slot)
                self.arena.h2d.release(d.slot)
            elif d.kind == pb.MSG_KIND_NOP and d.slot in self.delivered_nops:
                self.delivered_nops.discard(d.slot)
                self.arena.nops.release(d.slot)
            elif d.kind in (pb.MSG_KIND_ROTATE_IV, pb.MSG_KIND_ROTATE_KEY):
                rotations.deliveries.append(d)  # already applied at the sender: the endpoint must follow
        flushed = CommitReply(out.seq, lambda _c: None)
        self._flush_published(flushed)  # published records precede the abandoning rotation in the stream
        rotations.deliveries.extend(flushed.drop_unsent())
        for s in self.h2d:
            if s.sender.dead is None:
                self._abandon(s)
                rotations.deliveries.append(
                    pb.Delivery(ce=s.ce, kind=pb.MSG_KIND_ROTATE_IV, value=s.sender.rotate_iv())
                )
                self.counters.iv_rotations += 1
        if rotations.deliveries:
            out.send_now(list(rotations.deliveries))

    async def _maybe_rotate(self, out: CommitReply) -> None:
        for s in self.h2d:
            if s is self.speculative and (s.sender.key_rotation_pending or s.sender.iv_rotation_due):
                self._flush_published(out)  # what is published was encrypted before the rotation
            if s.sender.key_rotation_pending:
                self._abandon(s)
                version = s.sender.rotate_key()
                s.install_new_key()
                out.add(pb.Delivery(ce=s.ce, kind=pb.MSG_KIND_ROTATE_KEY, value=version))
                self.counters.key_rotations += 1
                self.events.emit("key_rotation", self.session_id, f"ce{s.ce} h2d key v{version}", ce=s.ce)
            elif s.sender.iv_rotation_due:
                self._relinquish_by_rotation(s, out)
                self.events.emit("iv_rotation", self.session_id, f"ce{s.ce} few IVs left", ce=s.ce)

    async def _commit_speculative(self, out: CommitReply, region: Region, key: ChunkId, ti: int, dst_off: int) -> None:
        s = self.speculative
        pos = found = s.find(key)
        if pos >= 0:
            e = s.queue[pos]
            if e.state == State.ENCRYPTING and e.fut is not None:
                self.counters.waited += 1  # predicted right, but the encryption was still running
                await asyncio.wait([e.fut])
            if e.state == State.FAILED or (e.state == State.READY and not source_unchanged(e)):
                self.counters.stale += e.state == State.READY
                pos = -1
        self.predictors.observe(key, region.readonly)
        if pos >= 0:
            if pos > 0:
                _log.debug("skip", session=self.session_id, key=tuple(key), pos=pos)
                before, kept = list(s.queue)[:pos], list(s.queue)[pos:]
                if self.costs.burn_us(before) > self.costs.rotate_us(kept):
                    self._relinquish_by_rotation(s, out)
                    self.counters.skips += 1
                    await self._on_demand(out, s, region, key, ti, dst_off)
                    return
                for _ in range(pos):
                    await self._burn(out, s, self.speculation.pop())
                self.counters.skips += 1
            e = self.speculation.pop()
            if e.state == State.RESERVED:
                # Predicted right, but not encrypted yet (no free slot): its fresh IV serves it now.
                if pos == 0:
                    self.counters.late += 1
                await self._on_demand(out, s, region, key, ti, dst_off, iv=e.iv)
                return
            if pos == 0:
                self.counters.hits += 1
                self.speculation.reward()
            self._deliver_entry(out, e, ti, dst_off)
            return
        # Miss. An extra transfer inside a cycle leaves the queue as the predictors still expect it.
        self.counters.misses += 1
        _log.debug(
            "miss",
            session=self.session_id,
            key=tuple(key),
            head=tuple(s.queue[0].key) if s.queue else None,
            queued=len(s.queue),
            found_stale=found >= 0,
        )
        if not s.queue:
            self.speculation.reward()  # nothing was queued: speculate further ahead
            await self._on_demand(out, s, region, key, ti, dst_off)
            return
        if self.speculation.detour_keeps(list(s.queue)):
            self.counters.detours += 1
            await self._on_demand(out, self.h2d[1], region, key, ti, dst_off)
            return
        self.speculation.penalise()  # a wrong guess: speculate less
        await self._relinquish(out, s)
        await self._on_demand(out, s, region, key, ti, dst_off)

    def _deliver_entry(self, out: CommitReply, e: Entry, ti: int, dst_off: int) -> None:
        self.speculative.sender.submit(e.iv)
        self.delivered_slots.add(e.slot)
        out.add(self._data_delivery(e, ti, dst_off, ring=False), e.fut)

    def _data_delivery(self, e: Entry, ti: int, dst_off: int, *, ring: bool) -> pb.Delivery:
        """DATA for a hit: staged when the daemon's copy into device staging has completed."""
        staged = self.staging is not None and self.staging.ready(e.slot)
        self.counters.staged += staged
        self.counters.used(e.source, e.nbytes)
        return pb.Delivery(
            ce=0,
            kind=pb.MSG_KIND_DATA,
            slot=e.slot,
            length=e.nbytes,
            transfer=ti,
            dst_offset=dst_off,
            staged=staged,
            ring=ring,
        )

    # -- relinquishing ---------------------------------------------------------------------------
    async def _relinquish(self, out: CommitReply, s: H2DStream) -> None:
        entries = list(s.queue)
        self.counters.relinquishes += 1
        if self.costs.burn_us(entries) <= self.costs.rotate_us([]):  # nothing is kept
            while s.queue:
                await self._burn(out, s, self.speculation.pop())
        else:
            self._relinquish_by_rotation(s, out)

    async def _burn(self, out: CommitReply, s: H2DStream, e: Entry) -> None:
        """Retire one reserved IV at its place in the stream without ever encrypting twice under it."""
        if e.state == State.RESERVED:
            cell = await self.arena.nops.acquire()
            if self.dead is not None:
                self.arena.nops.release(cell)
                self._check_alive()
            s.sender.seal_into(e.iv, NOP_PLAINTEXT, self.arena.nop_view(cell, NOP_MESSAGE_LEN))
            s.sender.submit(e.iv)
            self.delivered_nops.add(cell)
            out.add(pb.Delivery(ce=s.ce, kind=pb.MSG_KIND_NOP, slot=cell, length=len(NOP_PLAINTEXT)))
            self.counters.nops += 1
            return
        if e.state == State.ENCRYPTING and e.fut is not None:
            await asyncio.wait([e.fut])
        if e.state == State.FAILED:
            # The worker died while we waited: partial ciphertext under this IV, so it cannot be burned.
            # Only a rotation retires it; the commit's abort does that, in band, and the SDK retries.
            self.counters.wasted(e.source, e.nbytes)
            self.arena.h2d.release(e.slot)  # its job is over: no worker can still write the slot
            raise CommitAborted("a crypto worker died under a speculative entry being relinquished; retry")
        s.sender.submit(e.iv)
        self.delivered_slots.add(e.slot)
        out.add(pb.Delivery(ce=s.ce, kind=pb.MSG_KIND_DISCARD, slot=e.slot, length=e.nbytes), e.fut)
        self.counters.discards += 1
        self.counters.wasted(e.source, e.nbytes)

    def _abandon(self, s: H2DStream) -> None:
        """Drop a stream's queued entries (only copy engine 0 has any); the caller rotates its IV."""
        if s is self.speculative:
            self.speculation.abandon()

    def _relinquish_by_rotation(self, s: H2DStream, out: CommitReply) -> None:
        self._abandon(s)
        chan = s.sender.rotate_iv()
        out.add(pb.Delivery(ce=s.ce, kind=pb.MSG_KIND_ROTATE_IV, value=chan))
        self.counters.iv_rotations += 1

    # -- on-demand encryption ----------------------------------------------------------------------
    async def _on_demand(
        self,
        out: CommitReply,
        s: H2DStream,
        region: Region,
        key: ChunkId,
        ti: int,
        dst_off: int,
        iv: ReservedIv | None = None,
    ) -> None:
        if iv is None:
            # Reserve before any await: speculation may append to the queue meanwhile, after this IV.
            iv = s.sender.reserve()
        slot = self.arena.h2d.try_acquire()
        if slot is None:
            await out.flush(wait=True)  # the endpoint releases slots only after it has what we sent
            slot = await self.arena.h2d.acquire()
        if self.dead is not None:  # closed or killed while we waited for the slot
            self.arena.h2d.release(slot)
            self._check_alive()
        if region.generations(key.offset, key.length) is None:
            self.arena.h2d.release(slot)
            raise StaleSource(f"region {region.id} [{key.offset}, {key.offset + key.length}) is being written")
        nonce = s.sender.take(iv, key.length)
        fut = self.workers.submit(
            w.Kind.SEAL,
            s.key_id(),
            nonce,
            (region.handle, key.offset),
            key.length,
            (self.arena.handle, self.arena.layout.h2d_slot(slot)),
        )
        s.sender.submit(iv)
        self.delivered_slots.add(slot)
        out.add(
            pb.Delivery(ce=s.ce, kind=pb.MSG_KIND_DATA, slot=slot, length=key.length, transfer=ti, dst_offset=dst_off),
            fut,
        )
        self.counters.bytes_on_demand += key.length

    # -- speculation -------------------------------------------------------------------------------
    def refill(self) -> None:
        """Bring the queue in line with the predictions and start encrypting what has a slot."""
        if self.mode != "pipellm" or self.dead is not None:
            return
        with contextlib.suppress(ProtocolViolation):  # a corrupt consumer index kills the session right there
            self.sync_ring()  # what the SDK took from the ring is no longer a prediction: the predictors see it first
        if self.dead is not None:
            return
        # Published records the SDK has not taken yet are predicted chunks the predictors have not seen
        # committed: they stand first in the prediction, and are already on their way.
        published = [e.key for e, _r in self.published.unassigned() if e is not None] if self.published else []
        rotation = self.speculation.refill(published, append_only=self._committing)
        if rotation is not None:
            self._directives.append(rotation)  # in band, before the next commit's deliveries

    def _entry_ready(self, e: Entry) -> None:
        """An entry's ciphertext is made: stage it on the device, and publish it when it heads the queue."""
        if self.staging is not None:
            self.staging.prefetch(e.slot, self.arena.layout.h2d_slot(e.slot), e.nbytes + TAG_LEN)
        if self.speculative.queue and self.speculative.queue[0] is e:
            self._publish()

    # -- the delivery ring ----------------------------------------------------------------------------
    def _publish(self) -> None:
        """Put ready ciphertext at the head of the queue into the ring, in IV order, for the SDK to take.

        Publishing submits the IV: the record can then only be consumed (a hit) or burned by DISCARD, never
        abandoned by a rotation, so no more is published than the learned depth, and only entries the serving
        code declared (intents) or swapped out: learned guesses stay in the revocable queue.
        """
        pub = self.published
        if pub is None or self.mode != "pipellm" or self.dead is not None or self._committing:
            return
        s = self.speculative
        if self._directives:  # in-band rotations decided between commits: next in the stream
            if len(self._directives) > pub.room:
                return
            for d in self._directives:
                pub.write(None, Record(d.kind, d.ce, 0, 0, 0, 0, 0, 0, d.value))
            self._directives = []
        depth = min(pub.room, max(2, self.speculation.depth) - len(pub))
        while s.queue and depth > 0 and not s.sender.key_rotation_pending:
            e = s.queue[0]
            if e.state != State.READY or e.fingerprint is not None or not source_unchanged(e):
                break
            if e.source not in _PUBLISHED_SOURCES:
                break  # a learned guess stays revocable: a better-informed hint may still replace it cheaply
            self.speculation.pop()
            s.sender.submit(e.iv)
            e.state = State.PUBLISHED
            staged = self.staging is not None and self.staging.ready(e.slot)
            k = e.key
            digest = source_digest(e.snapshot or b"")
            pub.write(
                e, Record(KIND_DATA, 0, e.slot, FLAG_STAGED if staged else 0, k.region, k.offset, k.length, digest, 0)
            )
            depth -= 1
        # Ask for a doorbell when we wait on the SDK: records it has not taken block publishing or slots.
        pub.announce(bell_wanted=depth <= 0 or self.speculation.slot_budget() <= 0)

    def _ring_sync(self) -> None:
        """Learn from the consumer index which records the SDK took; their slots are free again."""
        if self.published is None:
            return
        try:
            taken = self.published.take_consumed()
        except ValueError as exc:
            self.kill(str(exc))
            raise ProtocolViolation(f"{exc}: the session's channels are dead") from None
        for e, handed_out in taken:
            if e is None:
                continue
            if not handed_out:
                self.counters.hits += 1  # the SDK's fast path: a hit the daemon hears of only now
                self.counters.ring_hits += 1
                self.counters.chunks += 1
                self.counters.bytes_h2d += e.nbytes
                self.counters.used(e.source, e.nbytes)
                self.speculation.reward()
                self.predictors.observe(e.key, e.region.readonly)
            self.arena.h2d.release(e.slot)

    def sync_ring(self) -> None:
        """Count the hits the SDK took since the last doorbell (for status: it rings only now and then)."""
        if self.published is not None and self.dead is None and not self._committing:
            self._ring_sync()

    def doorbell(self) -> None:
        """The SDK took ring records: free their slots, speculate and publish further."""
        if self.published is None or self.dead is not None or self._committing:
            return  # a running commit syncs the ring itself, and publishes when it ends
        self._ring_sync()
        self.refill()
        self._publish()

    def _from_published(self, out: CommitReply, region: Region, key: ChunkId, ti: int, dst_off: int) -> str:
        """A slow-path chunk while records are published (they come first in the stream): "hit" when one of
        them carries it, "detour" for an extra transfer the second channel takes, "" after burning them all."""
        assert self.published is not None
        avail = self.published.unassigned()
        pos = next((i for i, (e, _r) in enumerate(avail) if e is not None and e.key == key), -1)
        if pos < 0:
            entries = [e for e, _r in avail if e is not None] + list(self.speculative.queue)
            if all(e.key != key for e in entries) and self.speculation.detour_keeps(entries):
                self.counters.misses += 1
                self.counters.detours += 1
                self.predictors.observe(key, region.readonly)  # as on every other path: it was transferred
                return "detour"
            self._flush_published(out)
            return ""
        for item in avail[:pos]:
            self._ring_out(out, item, discard=True)
        e = avail[pos][0]
        assert e is not None
        if not source_unchanged(e):
            self.counters.stale += 1
            self._flush_published(out)  # it and everything published after it: the chunk is made anew
            return ""
        self._ring_out(out, avail[pos], discard=False, ti=ti, dst_off=dst_off)
        # A skip passes over published DATA records (each burned as DISCARD). In-band rotations in front of
        # the record are no wrong guess: the SDK's fast path applies them in place and counts the same
        # record a hit, so this path does too.
        skipped = any(p is not None for p, _r in avail[:pos])
        self.counters.hits += not skipped
        self.counters.skips += skipped
        self.speculation.reward()
        self.predictors.observe(key, region.readonly)
        return "hit"

    def _flush_published(self, out: CommitReply) -> None:
        """Burn every published record not yet handed out: DISCARD (the same ciphertext, never a second
        message under its IV), rotations applied; the stream then continues after them."""
        if self.published is not None:
            for item in self.published.unassigned():
                self._ring_out(out, item, discard=True)

    def _ring_out(self, out: CommitReply, item: Published, *, discard: bool, ti: int = 0, dst_off: int = 0) -> None:
        assert self.published is not None
        e, rec = item
        self.published.assign()
        if e is None:
            out.add(pb.Delivery(ce=rec.ce, kind=rec.kind, value=rec.value, ring=True))  # type: ignore[arg-type]
        elif discard:
            out.add(pb.Delivery(ce=0, kind=pb.MSG_KIND_DISCARD, slot=e.slot, length=e.nbytes, ring=True))
            self.counters.discards += 1
            self.counters.ring_discards += 1
            self.counters.wasted(e.source, e.nbytes)
        else:
            out.add(self._data_delivery(e, ti, dst_off, ring=True))

    # -- releases from the endpoint ----------------------------------------------------------------
    def release(self, slots: list[int], nop_cells: list[int]) -> None:
        for i in slots:
            if i not in self.delivered_slots:
                raise ProtocolViolation(f"release of H2D slot {i}, which was not delivered to this session")
            self.delivered_slots.discard(i)
            self.arena.h2d.release(i)
        for c in nop_cells:
            if c not in self.delivered_nops:
                raise ProtocolViolation(f"release of NOP cell {c}, which was not delivered to this session")
            self.delivered_nops.discard(c)
            self.arena.nops.release(c)
        if self.mode == "pipellm" and self.dead is None:
            self.speculation.dispatch()  # freed slots can take queued entries; the queue changes at commit end
            self._publish()

    # -- D2H -------------------------------------------------------------------------------------
    async def landed(self, msg: pb.Landed, region: Region) -> list[pb.Delivery]:
        """Decrypt (in the workers) what the endpoint encrypted into D2H slots; fatal on a tag failure."""
        self._check_alive()
        if msg.swap_out and self.mode == "pipellm" and (msg.continues or msg.length >= self.small_threshold):
            # Record the swap-out in arrival order, not in decryption-completion order; speculation skips the
            # range until its decryption lands. (Small ones come back on the second channel, unspeculated.)
            keys = [
                ChunkId(region.id, c.offset, c.length)
                for c in chunks.split(msg.offset, msg.length, self.cfg.chunk_size)
            ]
            self.predictors.swap.swapped_out(keys, msg.group, continues=msg.continues)
        directives = await self.landing.land(msg, region)
        if msg.swap_out and self.mode == "pipellm":
            self._refill_soon()  # the swapped-out range can be encrypted ahead now
        return directives

    def _refill_soon(self) -> None:
        """Refill once the landings that completed in this turn of the event loop are all recorded: a
        swap-out of many blocks lands block by block, and one prediction serves them all."""
        if not self._refill_scheduled:
            self._refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_refill)

    def _scheduled_refill(self) -> None:
        self._refill_scheduled = False
        self.refill()

    # -- lifecycle -------------------------------------------------------------------------------
    def forget_region(self, region_id: int) -> None:
        self.predictors.forget_region(region_id)

    def close(self) -> None:
        # A commit still unwinding (woken by the cancelled waiters below, or handed a slot just before) finds
        # the pipeline dead: it neither encrypts, speculates nor publishes with the keys dropped here.
        self._closed = True
        if self.dead is None:
            self.dead = "session closed"
        if self.published is not None:
            self.published.clear()
            self.published = None  # the session unmaps the ring: a commit still unwinding must not publish any more
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        self.arena.h2d.cancel_waiters(ChannelDead("session closed"))
        self.arena.nops.cancel_waiters(ChannelDead("session closed"))
        for s in self.h2d:
            s.queue.clear()
            s.close()
        for r in self.d2h:
            r.close()

    # -- what its session asks of it (so the session never reaches into predictors or streams) --------
    def intents_pending(self) -> int:
        """Declared intent chunks not consumed yet."""
        return self.predictors.intents.pending

    def declare_intents(self, keys: list[ChunkId], *, replace: bool, cyclic: bool) -> None:
        """Hand checked intent chunks to the intent predictor, then encrypt ahead what they allow."""
        self.predictors.intents.declare(keys, replace=replace, cyclic=cyclic)
        self.refill()

    def cancel_intents(self) -> int:
        """Forget every pending intent; returns how many chunks that was."""
        return self.predictors.intents.cancel()

    def add_adapter(self, region_id: int, keys: list[ChunkId]) -> None:
        """A LoRA adapter region: its chunks, for the adapter predictor."""
        self.predictors.lora.add_adapter(region_id, keys)

    def channel_snapshots(self) -> list[tuple[int, bool, dict[str, Any]]]:
        """(copy engine, is D2H, snapshot) for each direction of each channel: every H2D one, then D2H."""
        h2d = [(s.ce, False, s.sender.snapshot()) for s in self.h2d]
        return h2d + [(d.ce, True, d.receiver.snapshot()) for d in self.d2h]

    def ahead(self) -> int:
        """Entries queued or published ahead of the commits right now (the status `depth`)."""
        return len(self.speculative.queue) + (len(self.published) if self.published is not None else 0)
