"""Sessions: what one client owns (regions, arena, channels, pipeline) and the rules for touching it.

A session lives exactly as long as its data-plane connection. Every id a client names is looked up in its
own session only, so another session's regions are NOT_FOUND, never "not yours".

What a uid may hold is bounded (sessions, regions, region bytes, bytes of commits in flight; see the
`*_per_uid` settings): a refusal is RESOURCE_EXHAUSTED naming the setting, so one tenant cannot starve
the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from pipellm_client import chunks
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.arena import ArenaLayout
from pipellm_client.channel import KeyEpoch, PredictingReceiver, RotationPolicy, Sender
from pipellm_client.crypto import TAG_LEN
from pipellm_client.errors import ChannelDead, InvalidArgument
from pipellm_client.keys import Transcript, channel_label, derive_channel_key, open_masks
from pipellm_client.ring import RingView, ring_bytes
from pipellm_client.shm import SharedMemory
from pipellm_client.wire import TRANSFER_FLAGS, copy_engine, generation_table_bytes, mode_value

from . import refusal as R
from .auth import Peer
from .config import Config
from .counters import Counters
from .events import EventBus
from .latency import Latency
from .pipeline import Pipeline
from .pool import Arena, BouncePool
from .predictors import ChunkId
from .regions import Region
from .streams import D2HStream, H2DStream
from .workers import WorkerPool

MAX_NAME = 64
_INTENT_RECORD = struct.Struct("<QQQQ")  # a data-plane intent: region_id, offset, length, flags
_INTENT_D2H = 1
OFFER_WAIT_S = 2.0
# The relinquish cost model's endpoint decryption rate for a CUDA endpoint (bytes per us): a GPU copy engine
# decrypts far faster than the CPU endpoint's `endpoint_bytes_per_us`, so burning (DISCARD) is cheap there.
CUDA_ENDPOINT_BYTES_PER_US = 50_000.0


class Link(Protocol):
    """What a session and its manager need of the data-plane connection it is bound to, and nothing more
    (`dataplane.Connection` is one; this module never imports it)."""

    @property
    def peer(self) -> Peer: ...

    @property
    def can_agree(self) -> bool:
        """True until an OpenSession has spent the key agreement of the connection's Welcome."""
        ...

    def shared_secret(self, endpoint_public: bytes) -> tuple[bytes, Transcript]:
        """The master secret with the endpoint's public key (which it checks) and the transcript it binds;
        spends the key agreement."""
        ...

    def send(self, frame: pb.Frame, fds: list[int] | None = None) -> None: ...

    def send_error(self, ref: R.Refusal, seq: int = 0) -> None: ...

    async def take_offer(self, offer_id: int, timeout: float) -> int: ...

    def discard_offer(self, offer_id: int) -> None: ...


class Accounts(Protocol):
    """The daemon-wide bookkeeping a session takes part in (`SessionManager` is it): per-uid limits that
    span sessions, and region ids."""

    def check_region_quota(self, uid: int, size: int) -> None: ...

    def inflight_bytes(self, uid: int) -> int: ...

    def next_region_id(self) -> int: ...


class DeliveryRing:
    """One session's delivery ring: trusted shared memory (never the arena) and its doorbell eventfd."""

    def __init__(self, shm: SharedMemory, capacity: int, bell: int) -> None:
        self.shm = shm
        self.capacity = capacity
        self.bell = bell
        self.view = RingView(shm.view, capacity)

    @classmethod
    def create(cls, capacity: int) -> DeliveryRing:
        shm = SharedMemory.create("pipellm-ring", ring_bytes(capacity))
        return cls(shm, capacity, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def close(self) -> None:
        self.view.release()
        self.shm.close()
        os.close(self.bell)


def rotation_policy(cfg: Config) -> RotationPolicy:
    if cfg.key_usage_lower:
        return RotationPolicy(cfg.key_usage_upper, cfg.key_usage_lower, cfg.iv_rotation_remaining)
    return RotationPolicy.with_upper(cfg.key_usage_upper, cfg.iv_rotation_remaining)


class Session:
    def __init__(
        self,
        sid: str,
        link: Link,
        cfg: Config,
        workers: WorkerPool,
        arena: Arena,
        pipeline: Pipeline,
        regions: dict[int, Region],
        channels: int,
        endpoint: int,
        client_name: str,
        *,
        accounts: Accounts,
        events: EventBus,
    ) -> None:
        self.id = sid
        self.link = link
        self.accounts = accounts
        self.events = events
        self.cfg = cfg
        self.workers = workers
        self.arena = arena
        self.pipeline = pipeline
        self.regions = regions
        self.channels = channels
        self.endpoint = endpoint
        self.client_name = client_name
        self.created = time.monotonic()
        self.closed = False
        self.verify_every = 1  # the client's endpoint verifies one DATA message in this many (1 = all)
        self.ring: DeliveryRing | None = None
        self._d2h_busy: set[int] = set()  # D2H slots whose landed data is being decrypted
        self._declaring: list[tuple[int, int, int, bool]] = []  # a Declare split over frames, until the last
        # Bounded: enqueue_commit refuses past max_queued_commits (one place more for the end marker).
        self._commits: asyncio.Queue[tuple[int, list[tuple[Region, pb.Transfer]], int] | None] = asyncio.Queue(
            cfg.max_queued_commits + 1
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self.in_flight = 0
        self.queued_commits = 0  # queued or running
        self.inflight_bytes = 0  # their bytes, counted against max_inflight_bytes_per_uid
        self.region_bytes = 0  # sum of the sizes of self.regions, for max_region_bytes_per_uid
        self._runner = asyncio.get_running_loop().create_task(self._run_commits())

    # -- data plane --------------------------------------------------------------------------------
    @property
    def peer(self) -> Peer:
        return self.link.peer

    @property
    def uid(self) -> int:
        return self.link.peer.uid

    @property
    def small_threshold(self) -> int:
        return self.pipeline.small_threshold

    def enqueue_commit(self, seq: int, transfers: list[tuple[Region, pb.Transfer]]) -> None:
        cfg = self.cfg
        if self.queued_commits >= cfg.max_queued_commits:
            raise R.exhausted(
                f"{self.queued_commits} commits already queued in this session "
                f"(max_queued_commits={cfg.max_queued_commits}); wait for their completions"
            )
        nbytes = sum(t.length for _r, t in transfers)
        limit = cfg.max_inflight_bytes_per_uid
        if nbytes > limit:
            raise R.exhausted(f"a commit of {nbytes} bytes is more than max_inflight_bytes_per_uid={limit}; split it")
        used = self.accounts.inflight_bytes(self.uid)
        if used + nbytes > limit:
            raise R.exhausted(
                f"uid {self.uid} has {used} bytes of commits in flight; {nbytes} more would pass "
                f"max_inflight_bytes_per_uid={limit}"
            )
        self.in_flight += 1
        self.queued_commits += 1
        self.inflight_bytes += nbytes
        self._commits.put_nowait((seq, transfers, nbytes))

    async def _run_commits(self) -> None:
        """Commits run one at a time, in arrival order: the IV stream is one ordered sequence."""
        while True:
            item = await self._commits.get()
            if item is None:
                return
            seq, transfers, nbytes = item
            try:
                await self.pipeline.commit(seq, transfers, lambda c: self.link.send(pb.Frame(completion=c)))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                if isinstance(exc, ChannelDead):
                    self.pipeline.kill(str(exc))  # e.g. key exhausted: recorded like any other death
                ref = R.from_exception(exc)
                if ref.code == grpc.StatusCode.INTERNAL:
                    self.events.emit("internal_error", self.id, type(exc).__name__, level="error")
                self.link.send_error(ref, seq)
            finally:
                self.in_flight -= 1
                self.queued_commits -= 1
                self.inflight_bytes -= nbytes

    def landed(self, msg: pb.Landed, region: Region) -> None:
        slots = [m.slot for m in msg.messages]
        self._d2h_busy.update(slots)
        self.in_flight += 1

        async def run() -> None:
            try:
                directives = await self.pipeline.landed(msg, region)
                self.link.send(pb.Frame(landed_done=pb.LandedDone(seq=msg.seq, directives=directives)))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self.link.send_error(R.from_exception(exc), msg.seq)
            finally:
                self._d2h_busy.difference_update(slots)
                self.in_flight -= 1

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def region(self, region_id: int) -> Region:
        r = self.regions.get(region_id)
        if r is None:
            raise R.not_found(f"region {region_id} not found in this session")
        return r

    def validate_commit(self, commit: pb.Commit) -> list[tuple[Region, pb.Transfer]]:
        if not commit.transfers:
            raise R.invalid("a commit needs at least one transfer")
        if len(commit.transfers) > self.cfg.max_transfers_per_commit:
            raise R.exhausted(
                f"{len(commit.transfers)} transfers in one commit; the limit is {self.cfg.max_transfers_per_commit}"
            )
        out = []
        for i, t in enumerate(commit.transfers):
            r = self.region(t.region_id)
            try:
                r.check_range(t.offset, t.length)
            except InvalidArgument as exc:
                raise R.invalid(f"transfer {i}: {exc}") from None
            if t.flags & ~TRANSFER_FLAGS:
                raise R.invalid(f"transfer {i}: unknown flags {t.flags:#x}")
            if r.readonly and not r.sealed:
                raise R.precondition(f"region {r.id} is read-only but not sealed yet; seal it after loading")
            if not r.landings_touching(t.offset, t.length) and r.generations(t.offset, t.length) is None:
                raise R.precondition(f"transfer {i}: region {r.id} range is being written right now")
            out.append((r, t))
        return out

    def validate_landed(self, msg: pb.Landed) -> Region:
        r = self.region(msg.region_id)
        if r.readonly:
            raise R.precondition(f"region {r.id} is read-only; D2H data cannot land in it")
        try:
            r.check_range(msg.offset, msg.length)
        except InvalidArgument as exc:
            raise R.invalid(str(exc)) from None
        if not msg.messages:
            raise R.invalid("landed data needs at least one message")
        total, seen = 0, set()
        for m in msg.messages:
            if m.ce >= self.channels:
                raise R.invalid(f"copy engine {m.ce} does not exist in this session ({self.channels})")
            if m.slot >= self.arena.layout.d2h_slots:
                raise R.invalid(f"D2H slot {m.slot} out of range 0..{self.arena.layout.d2h_slots - 1}")
            if m.slot in seen or m.slot in self._d2h_busy:
                raise R.invalid(f"D2H slot {m.slot} is already in use")
            if not 0 < m.length <= self.cfg.chunk_size:
                raise R.invalid(f"D2H message of {m.length} bytes; must be 1..{self.cfg.chunk_size}")
            seen.add(m.slot)
            total += m.length
        if total != msg.length:
            raise R.invalid(f"D2H messages carry {total} bytes, the range is {msg.length}")
        if r.overlapping_writes(msg.offset, msg.length):
            raise R.precondition(f"region {r.id}: another D2H transfer to this range is still landing")
        return r

    # -- control plane -----------------------------------------------------------------------------
    async def register_region(self, offer_id: int, size: int, readonly: bool, name: str, kind: int) -> Region:
        try:
            if len(self.regions) >= self.cfg.max_regions:
                raise R.exhausted(f"this session already has {len(self.regions)} regions (max_regions)")
            if not 0 < size <= self.cfg.max_region_bytes:
                raise R.invalid(f"region size must be 1..{self.cfg.max_region_bytes} bytes, got {size}")
            if len(name) > MAX_NAME:
                raise R.invalid(f"region name longer than {MAX_NAME} characters")
            self.accounts.check_region_quota(self.uid, size)
        except R.Refusal:
            self.link.discard_offer(offer_id)  # (its memfd, if it already came, would otherwise stay open)
            raise
        fd = await self.link.take_offer(offer_id, OFFER_WAIT_S)
        try:  # again: other registrations of this uid may have finished while this one waited
            self.accounts.check_region_quota(self.uid, size)
            if len(self.regions) >= self.cfg.max_regions:
                raise R.exhausted(f"this session already has {len(self.regions)} regions (max_regions)")
        except R.Refusal:
            os.close(fd)
            raise
        expected = size if readonly else size + generation_table_bytes(size, self.cfg.generation_granule)
        try:
            shm = SharedMemory.attach(fd, expected, writable=not readonly)
        except InvalidArgument as exc:
            os.close(fd)
            raise R.invalid(f"offer {offer_id}: {exc}") from None
        except OSError as exc:
            os.close(fd)
            raise R.invalid(f"offer {offer_id} cannot be mapped: {exc.strerror}") from None
        handle = self.workers.new_handle()
        region = Region(self.accounts.next_region_id(), name, shm, size, readonly, self.cfg.generation_granule, handle)
        self.workers.map(handle, shm)
        self.regions[region.id] = region
        self.region_bytes += size
        if kind == pb.REGION_KIND_ADAPTER:
            keys = [ChunkId(region.id, c.offset, c.length) for c in chunks.split(0, size, self.cfg.chunk_size)]
            self.pipeline.add_adapter(region.id, keys)
        return region

    def attach_staging(self, req: pb.AttachDeviceStagingRequest) -> None:
        if self.endpoint != pb.ENDPOINT_KIND_CUDA:
            raise R.precondition("device staging is for sessions with a CUDA endpoint")
        if self.pipeline.staging is not None:
            raise R.precondition("this session already has device staging")
        # The daemon copies up to `stride` bytes into slot i at i * stride: a stride or size the session
        # does not need would aim those copies past the client's allocation (into whatever the daemon has
        # mapped next to it). Only what H2D slots of one chunk plus its tag need is accepted.
        layout = self.arena.layout
        least = layout.chunk_size + TAG_LEN
        if not least <= req.stride <= layout.slot_stride:
            raise R.invalid(
                f"staging stride {req.stride} must be {least}..{layout.slot_stride} bytes (one chunk plus its tag)"
            )
        if req.size != req.stride * layout.h2d_slots:
            raise R.invalid(
                f"device staging of {req.size} bytes; this session needs {layout.h2d_slots} slots of "
                f"{req.stride} bytes = {req.stride * layout.h2d_slots}"
            )
        from .cuda_staging import DeviceStaging

        self.pipeline.staging = DeviceStaging(
            bytes(req.ipc_handle), req.size, req.stride, self.arena.layout.h2d_slots, req.device, self.arena.shm.view
        )

    def unregister_region(self, region_id: int) -> None:
        r = self.region(region_id)
        if r.pending_writes:
            raise R.precondition(f"region {region_id} still has D2H data landing")
        del self.regions[region_id]
        self.region_bytes -= r.size
        self.pipeline.forget_region(region_id)
        self._drop(r)

    def _drop(self, r: Region) -> None:
        self.workers.unmap(r.handle)
        r.close()

    def seal_region(self, region_id: int) -> None:
        """SealRegion: the region's bytes are final, so intents declared before may be encrypted ahead now."""
        region = self.region(region_id)
        try:
            region.seal()
        except ValueError as exc:
            raise R.precondition(str(exc)) from None
        self.pipeline.refill()

    def declare(self, req: pb.DeclareIntentsRequest) -> int:
        """The DeclareIntents RPC (the SDK uses the data plane's Declare frames instead)."""
        for i, it in enumerate(req.intents):
            if it.direction not in (pb.DIRECTION_H2D, pb.DIRECTION_D2H):
                raise R.invalid(f"intent {i}: direction must be H2D or D2H")
        intents = [(it.region_id, it.offset, it.length, it.direction == pb.DIRECTION_D2H) for it in req.intents]
        self._declare(intents, replace=req.replace, cyclic=req.cyclic)
        return self.pipeline.intents_pending()

    def declare_frame(self, msg: pb.Declare) -> None:
        """A data-plane Declare: records of four little-endian u64 (region, offset, length, flags)."""
        if msg.cancel:
            if msg.records or msg.more:
                raise R.invalid("a cancelling Declare carries no records")
            self._declaring = []
            self.cancel_intents()
            return
        raw = msg.records
        if len(raw) % _INTENT_RECORD.size:
            raise R.invalid(f"Declare records are {_INTENT_RECORD.size} bytes each; got {len(raw)} bytes")
        records = list(_INTENT_RECORD.iter_unpack(raw))
        for i, (_r, _o, _n, flags) in enumerate(records):
            if flags & ~_INTENT_D2H:
                raise R.invalid(f"intent {i}: unknown flags {flags:#x}")
        self._declaring.extend((r, o, n, bool(f & _INTENT_D2H)) for r, o, n, f in records)
        if len(self._declaring) > self.cfg.max_intents:
            self._declaring = []
            raise R.exhausted(f"a declaration of more than max_intents={self.cfg.max_intents} intents")
        if msg.more:
            return
        intents, self._declaring = self._declaring, []
        self._declare(intents, replace=msg.replace, cyclic=msg.cyclic)

    def _declare(self, intents: list[tuple[int, int, int, bool]], *, replace: bool, cyclic: bool) -> None:
        """Check every intent first (all or nothing), then hand their chunks to the intent predictor."""
        pending = self.pipeline.intents_pending()
        keys: list[ChunkId] = []
        for i, (region_id, offset, length, d2h) in enumerate(intents):
            r = self.region(region_id)
            try:
                r.check_range(offset, length)
            except InvalidArgument as exc:
                raise R.invalid(f"intent {i}: {exc}") from None
            small_threshold = self.pipeline.small_threshold
            if (
                not d2h
                and copy_engine(length, unpredicted=False, channels=self.channels, small_threshold=small_threshold) == 0
            ):
                # (small transfers take the second channel and are never speculated: no intent needed)
                keys.extend(
                    ChunkId(r.id, c.offset, c.length) for c in chunks.split(offset, length, self.cfg.chunk_size)
                )
        total = len(keys) + (0 if replace else pending)
        if total > self.cfg.max_intents:
            raise R.exhausted(f"{total} pending intent chunks would exceed max_intents={self.cfg.max_intents}")
        self.pipeline.declare_intents(keys, replace=replace, cyclic=cyclic)

    def cancel_intents(self) -> int:
        return self.pipeline.cancel_intents()

    def release(self, slots: list[int], nop_cells: list[int]) -> None:
        """The endpoint is done with these H2D slots and NOP cells."""
        self.pipeline.release(slots, nop_cells)

    def kill(self, reason: str) -> None:
        """The channels are dead (the endpoint reported a failure on its side, say): recorded, and final."""
        self.pipeline.kill(reason)

    # -- status and lifecycle ------------------------------------------------------------------------
    def counters(self) -> Counters:
        """This session's counters, including the hits the SDK took from the ring since its last doorbell."""
        with contextlib.suppress(Exception):  # a corrupt consumer index is reported at the next doorbell
            self.pipeline.sync_ring()
        return self.pipeline.counters

    def status(self) -> pb.SessionStatus:
        counters = self.counters()
        chans = [
            _channel_status(snap, ce, pb.DIRECTION_D2H if d2h else pb.DIRECTION_H2D)
            for ce, d2h, snap in self.pipeline.channel_snapshots()
        ]
        return pb.SessionStatus(
            session_id=self.id,
            uid=self.link.peer.uid,
            pid=self.link.peer.pid,
            client_name=self.client_name,
            age_s=time.monotonic() - self.created,
            regions=len(self.regions),
            region_bytes=sum(r.size for r in self.regions.values()),
            channels=chans,
            counters=counters.to_proto(),
            depth=self.pipeline.ahead(),
            intents_pending=self.pipeline.intents_pending(),
            device_staging=self.pipeline.staging is not None,
            endpoint=self.endpoint,  # type: ignore[arg-type]
            verify_every=self.verify_every,
        )

    async def drain(self) -> None:
        while self.in_flight:
            await asyncio.sleep(0.01)

    def close(self, pool: BouncePool) -> None:
        if self.closed:
            return
        self.closed = True
        self._commits.put_nowait(None)
        self._runner.cancel()
        for t in list(self._tasks):
            t.cancel()
        self.pipeline.close()
        if self.ring is not None:
            asyncio.get_running_loop().remove_reader(self.ring.bell)
            self.ring.close()
            self.ring = None
        for r in list(self.regions.values()):
            self._drop(r)
        self.regions.clear()
        self.region_bytes = 0
        self.workers.unmap(self.arena.handle)
        pool.release(self.arena.shm)

    # -- the delivery ring ---------------------------------------------------------------------------
    def send_attach(self) -> None:
        """The Attach frame: this session's arena, and its delivery ring and doorbell if it has them."""
        shm, ring = self.arena.shm, self.ring
        if ring is None:
            self.link.send(pb.Frame(attach=pb.Attach(session_id=self.id, size=shm.size)), fds=[shm.fd])
        else:
            attach = pb.Attach(session_id=self.id, size=shm.size, ring_size=ring.shm.size, ring_capacity=ring.capacity)
            self.link.send(pb.Frame(attach=attach), fds=[shm.fd, ring.shm.fd, ring.bell])

    def attach_ring(self, ring: DeliveryRing) -> None:
        """The SDK rings `ring.bell` after taking records; a bad consumer index ends this session only."""
        self.ring = ring
        asyncio.get_running_loop().add_reader(ring.bell, self._on_doorbell)

    def _on_doorbell(self) -> None:
        if self.ring is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.ring.bell)
        try:
            self.pipeline.doorbell()
        except Exception as exc:
            self.link.send_error(R.from_exception(exc))


def _channel_status(snap: dict[str, Any], ce: int, direction: int) -> pb.ChannelStatus:
    return pb.ChannelStatus(
        name=snap["name"],
        ce=ce,
        direction=direction,  # type: ignore[arg-type]
        key_version=snap["key_version"],
        chan_ctr=snap["chan_ctr"],
        msg_ctr=snap["msg_ctr"],
        messages=snap["messages"],
        key_usage=snap["key_usage"],
        key_rotation_pending=snap["key_rotation_pending"],
        dead=snap["dead"] or "",
    )


class SessionManager:
    """All sessions of the daemon, and the totals that outlive them."""

    def __init__(self, cfg: Config, workers: WorkerPool, pool: BouncePool, events: EventBus) -> None:
        self.cfg = cfg
        self.workers = workers
        self.pool = pool
        self.events = events
        self.sessions: dict[str, Session] = {}
        self.closed_totals = Counters()
        self.draining = False
        self._region_ids = 0
        self.policy = rotation_policy(cfg)
        self.layout = ArenaLayout(cfg.chunk_size, cfg.h2d_slots, cfg.d2h_slots)
        self.on_change: list[Callable[[], None]] = []
        self.latency = Latency()
        events.owner_of = self.owner_of  # so each Watch subscriber sees only the events it may see

    # -- per-uid quotas and visibility (see the *_per_uid settings) ---------------------------------
    def owned_by(self, uid: int) -> list[Session]:
        return [s for s in self.sessions.values() if s.uid == uid]

    def owner_of(self, session_id: str) -> int | None:
        s = self.sessions.get(session_id)
        return s.uid if s is not None else None

    def check_session_quota(self, uid: int) -> None:
        """Before OpenSession: one uid holds at most max_sessions_per_uid of the max_sessions."""
        n = len(self.owned_by(uid))
        if n >= self.cfg.max_sessions_per_uid:
            raise R.exhausted(
                f"uid {uid} already has {n} sessions open (max_sessions_per_uid={self.cfg.max_sessions_per_uid})"
            )

    def check_region_quota(self, uid: int, size: int) -> None:
        mine = self.owned_by(uid)
        count = sum(len(s.regions) for s in mine)
        if count >= self.cfg.max_regions_per_uid:
            raise R.exhausted(
                f"uid {uid} already has {count} regions registered (max_regions_per_uid={self.cfg.max_regions_per_uid})"
            )
        used = sum(s.region_bytes for s in mine)
        if used + size > self.cfg.max_region_bytes_per_uid:
            raise R.exhausted(
                f"uid {uid} has {used} bytes of regions registered; {size} more would pass "
                f"max_region_bytes_per_uid={self.cfg.max_region_bytes_per_uid}"
            )

    def inflight_bytes(self, uid: int) -> int:
        return sum(s.inflight_bytes for s in self.sessions.values() if s.uid == uid)

    def next_region_id(self) -> int:
        self._region_ids += 1
        return self._region_ids

    def totals(self) -> Counters:
        t = Counters()
        t.add(self.closed_totals)
        for s in self.sessions.values():
            t.add(s.counters())  # (with the hits taken from the ring since the last doorbell)
        return t

    def open(self, link: Link, req: pb.OpenSessionRequest) -> Session:
        """A new session for `link` (which holds no session yet), registered but not announced: the caller
        binds it to its connection, then `start`s it."""
        if self.draining:
            raise R.unavailable("pipellmd is shutting down; no new sessions")
        if self.cfg.mode == "plain" and not req.allow_plain:
            raise R.precondition(
                "pipellmd runs in plain mode (NO ENCRYPTION); open the session with allow_plain=True to accept that"
            )
        if not link.can_agree:
            raise R.precondition("this connection's key agreement was already used")
        if len(self.sessions) >= self.cfg.max_sessions:
            raise R.exhausted(f"{len(self.sessions)} sessions open (max_sessions)")
        if len(req.client_name) > MAX_NAME:
            raise R.invalid(f"client_name longer than {MAX_NAME} characters")
        channels = req.channels or self.cfg.channels
        if channels not in (1, 2):
            raise R.invalid(f"channels must be 1 or 2, got {req.channels}")
        channels = min(channels, self.cfg.channels)
        if req.endpoint not in (pb.ENDPOINT_KIND_UNSPECIFIED, pb.ENDPOINT_KIND_CPU, pb.ENDPOINT_KIND_CUDA):
            raise R.invalid(f"unknown endpoint kind {req.endpoint}")
        if req.swap_order not in (pb.SWAP_ORDER_UNSPECIFIED, pb.SWAP_ORDER_FIFO, pb.SWAP_ORDER_LIFO_GROUPS):
            raise R.invalid(f"unknown swap order {req.swap_order}")
        small = self.cfg.small_transfer_threshold
        if req.HasField("small_transfer_threshold"):
            if req.small_transfer_threshold > self.cfg.chunk_size:
                raise R.invalid(f"small_transfer_threshold above the chunk size ({self.cfg.chunk_size}) is pointless")
            small = req.small_transfer_threshold
        # The point is checked, and a computed shared secret is used once, whether the masks open or not.
        master, transcript = link.shared_secret(bytes(req.endpoint_public_key))
        requested = req.channels or 2
        masks = open_masks(master, transcript, bytes(req.sealed_masks), 2 * requested)
        shm = self.pool.acquire()
        arena = Arena(self.layout, shm, self.workers.new_handle())
        self.workers.map(arena.handle, shm)
        ring = DeliveryRing.create(2 * self.cfg.h2d_slots + 8) if self.cfg.delivery_ring else None
        h2d: list[H2DStream] = []
        d2h: list[D2HStream] = []
        for ce in range(channels):
            hl, dl = channel_label(ce, "h2d"), channel_label(ce, "d2h")
            h2d.append(
                H2DStream(
                    ce,
                    Sender(hl, KeyEpoch(hl, 0, derive_channel_key(master, hl), masks[2 * ce]), self.policy),
                    self.workers,
                )
            )
            d2h.append(
                D2HStream(
                    ce,
                    PredictingReceiver(
                        dl, KeyEpoch(dl, 0, derive_channel_key(master, dl), masks[2 * ce + 1]), self.policy
                    ),
                    self.workers,
                )
            )
        del master
        sid = secrets.token_hex(8)
        regions: dict[int, Region] = {}
        cuda = req.endpoint == pb.ENDPOINT_KIND_CUDA
        ep_rate = CUDA_ENDPOINT_BYTES_PER_US if cuda else self.cfg.endpoint_bytes_per_us
        pipeline = Pipeline(
            session_id=sid,
            cfg=self.cfg,
            workers=self.workers,
            arena=arena,
            regions=regions,
            h2d=h2d,
            d2h=d2h,
            events=self.events,
            endpoint_bytes_per_us=ep_rate,
            swap_order="lifo" if req.swap_order == pb.SWAP_ORDER_LIFO_GROUPS else "fifo",
            latency=self.latency,
            small_threshold=small,
            ring=ring.view if ring is not None else None,
        )
        session = Session(
            sid,
            link,
            self.cfg,
            self.workers,
            arena,
            pipeline,
            regions,
            channels,
            req.endpoint,
            req.client_name,
            accounts=self,
            events=self.events,
        )
        session.verify_every = max(1, req.verify_every)
        self.sessions[sid] = session
        if ring is not None:
            session.attach_ring(ring)
        return session

    def start(self, session: Session) -> None:
        """Send a new session its Attach (the arena, and the delivery ring with its doorbell, by SCM_RIGHTS)
        and announce it. Called once its connection is bound to it, so that a send that finds the peer gone
        (which closes the connection there and then) closes the session too."""
        session.send_attach()
        sid, peer = session.id, session.peer
        self.events.emit(
            "session_opened",
            sid,
            f"uid {peer.uid} pid {peer.pid}",
            uid=peer.uid,
            pid=peer.pid,
            channels=session.channels,
            client=session.client_name,
        )
        if self.cfg.mode == "plain":
            self.events.emit("plaintext_session", sid, "plain mode: NO ENCRYPTION for this session", level="warning")
        if session.verify_every > 1:
            self.events.emit(
                "sampled_verification",
                sid,
                f"the endpoint verifies 1 DATA message in {session.verify_every} (benchmark setting)",
                level="warning",
                verify_every=session.verify_every,
            )
        for cb in self.on_change:
            cb()

    def close(self, session: Session, reason: str) -> None:
        """End a session (its connection unbinds it: `dataplane.Connection.end_session`)."""
        if session.closed:
            return
        self.closed_totals.add(session.counters())
        session.close(self.pool)
        self.events.emit("session_closed", session.id, reason)  # while still listed: its owner's watchers see it
        self.sessions.pop(session.id, None)
        for cb in self.on_change:
            cb()

    def response_for(self, s: Session) -> pb.OpenSessionResponse:
        layout = self.layout
        return pb.OpenSessionResponse(
            session_id=s.id,
            mode=mode_value(self.cfg.mode),
            arena=pb.ArenaGeometry(
                size=layout.size,
                chunk_size=layout.chunk_size,
                h2d_slots=layout.h2d_slots,
                d2h_slots=layout.d2h_slots,
                nop_cells=layout.nop_cells,
                slot_stride=layout.slot_stride,
                nop_bytes=layout.nop_bytes,
            ),
            rotation=pb.RotationPolicy(
                key_usage_lower=self.policy.lower,
                key_usage_upper=self.policy.upper,
                iv_rotation_remaining=self.policy.iv_rotation_remaining,
            ),
            small_transfer_threshold=s.small_threshold,
            channels=s.channels,
            generation_granule=self.cfg.generation_granule,
        )
