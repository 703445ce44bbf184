"""What the sync and asyncio clients share: the handshake, the endpoint side of a session, and the rules
for turning deliveries into bytes in destinations. No I/O happens here; the clients do the reading/writing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from . import chunks, keys
from ._gen.pipellm.v1 import pipellm_pb2 as pb
from .arena import ArenaLayout
from .channel import RotationPolicy
from .crypto import TAG_LEN
from .endpoint import NOP_MESSAGE_LEN, ChannelSecrets, CpuEndpoint, Endpoint, HeldMessage, MsgKind, host_source_view
from .errors import ChannelDead, InvalidArgument, PipeLLMError, TagMismatch
from .regions import Region
from .ring import BELL_EVERY, FLAG_STAGED, KIND_DATA, KIND_ROTATE_IV, KIND_ROTATE_KEY, Record, RingView, source_digest
from .shm import SharedMemory
from .wire import FLAG_UNPREDICTED, copy_engine, generation_table_bytes

_KIND = {
    pb.MSG_KIND_DATA: MsgKind.DATA,
    pb.MSG_KIND_NOP: MsgKind.NOP,
    pb.MSG_KIND_DISCARD: MsgKind.DISCARD,
}


class DaemonError(PipeLLMError):
    """The daemon refused a request; `code` is the gRPC status code, `details` its explanation."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def status_code(number: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == number:
            return c
    return grpc.StatusCode.UNKNOWN


def from_rpc_error(exc: grpc.RpcError) -> DaemonError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return DaemonError(code, details or "")


def from_error_frame(err: pb.Error) -> DaemonError:
    return DaemonError(status_code(err.code), err.message)


@dataclass(frozen=True)
class Intent:
    """One future transfer the serving code knows about (region, offset, length; H2D unless d2h=True)."""

    region: Region
    offset: int
    length: int
    d2h: bool = False
    destination: int = 0


DECLARE_RECORDS_PER_FRAME: Final = 1024  # 32 bytes each: a Declare frame stays well under MAX_FRAME


class Handshake:
    """The endpoint's half of the key agreement: it chooses the IV masks, as the GPU does."""

    def __init__(self, daemon_public: bytes, channels: int) -> None:
        self.agreement = keys.KeyAgreement()
        self.transcript = keys.Transcript(daemon_public, self.agreement.public_bytes)
        self.master = self.agreement.master_secret(daemon_public, self.transcript)
        self.channels = channels
        self.masks = [keys.new_mask() for _ in range(2 * channels)]

    def request(
        self,
        *,
        client_name: str,
        endpoint: str,
        swap_order: int,
        small_transfer_threshold: int | None = None,
        allow_plain: bool = False,
        verify: str | int = "all",
        allow_unverified: bool = False,
    ) -> pb.OpenSessionRequest:
        """The OpenSession request; refuses `verify=N` without `allow_unverified` before anything is sent."""
        req = pb.OpenSessionRequest(
            endpoint_public_key=self.agreement.public_bytes,
            sealed_masks=keys.seal_masks(self.master, self.transcript, self.masks),
            channels=self.channels,
            endpoint=pb.ENDPOINT_KIND_CUDA if endpoint == "cuda" else pb.ENDPOINT_KIND_CPU,
            client_name=client_name,
            swap_order=swap_order,  # type: ignore[arg-type]
            allow_plain=allow_plain,
            verify_every=min(verify_every(verify, allow_unverified), 0xFFFFFFFF),  # for status; uint32 on the wire
        )
        if small_transfer_threshold is not None:
            req.small_transfer_threshold = small_transfer_threshold
        return req

    def secrets(self, channels: int) -> list[ChannelSecrets]:
        out = []
        for ce in range(channels):
            out.append(
                ChannelSecrets(
                    ce,
                    keys.derive_channel_key(self.master, keys.channel_label(ce, "h2d")),
                    self.masks[2 * ce],
                    keys.derive_channel_key(self.master, keys.channel_label(ce, "d2h")),
                    self.masks[2 * ce + 1],
                )
            )
        self.master = b""
        return out


def swap_order_value(order: str) -> int:
    orders = {"fifo": pb.SWAP_ORDER_FIFO, "lifo": pb.SWAP_ORDER_LIFO_GROUPS}
    if order not in orders:
        raise InvalidArgument(f"swap_order must be 'fifo' (vLLM V1) or 'lifo' (vLLM V0), got {order!r}")
    return orders[order]


@dataclass
class Pending:
    """An H2D commit the endpoint is receiving."""

    seq: int
    targets: list[tuple[Region, memoryview]]
    expected: int = 0  # bytes the commit asked for; the final completion must account for all of them
    delivered: int = 0
    done: bool = False
    error: DaemonError | None = None


@dataclass
class Landing:
    """A D2H transfer whose ciphertext the daemon is decrypting into a region."""

    seq: int
    region: Region
    offset: int
    length: int
    slots: list[int]
    done: bool = False
    error: DaemonError | None = None


@dataclass
class _Backlogged:
    """One D2H message encrypted while no bounce slot was free, held by the endpoint until one is."""

    landing: Landing
    message: pb.D2HMessage  # slot still to be chosen
    held: HeldMessage
    swap_out: bool
    group: int
    continues: bool  # not the first frame of its d2h call


D2H_BACKLOG_MAX: Final = 1 << 30  # past this much queued ciphertext, `d2h` waits for slots after all


@dataclass
class EndpointStats:
    messages: int = 0
    verified: int = 0
    unverified: int = 0
    nops: int = 0
    discards: int = 0
    rotations: int = 0
    bytes: int = 0


as_source_view = host_source_view


def verify_every(verify: str | int, allow_unverified: bool = False) -> int:
    """`verify` as "one DATA message in N is decrypted" (1 = all); N > 1 only with the benchmark opt-in."""
    if verify == "all":
        return 1
    if not isinstance(verify, int) or isinstance(verify, bool) or verify < 1:
        raise InvalidArgument("verify must be 'all' or a positive int N (verify one DATA message in N)")
    if verify > 1 and not allow_unverified:
        raise InvalidArgument(
            f"verify={verify!r} skips decrypting most DATA messages: a benchmark setting that needs "
            "allow_unverified=True"
        )
    return verify


class SessionCore:
    """One session's client-side state: its endpoint (the "GPU"), arena, regions, and pending transfers.

    `verify` is "all" (default: every message decrypted and checked) or an int N: a benchmark setting
    in which only every N-th DATA message is decrypted, the rest only advance the endpoint's counter; N > 1
    needs `allow_unverified=True`. A daemon in plain mode (no encryption) is accepted only with
    `allow_plain=True`: neither may ever happen to a client that did not ask for it.
    """

    def __init__(
        self,
        resp: pb.OpenSessionResponse,
        secrets: list[ChannelSecrets],
        verify: str | int = "all",
        endpoint: str = "cpu",
        device: int | None = None,
        *,
        allow_plain: bool = False,
        allow_unverified: bool = False,
    ) -> None:
        self.verify_every = verify_every(verify, allow_unverified)
        if resp.mode == pb.MODE_PLAIN and not allow_plain:
            raise PipeLLMError("the daemon runs in plain mode (NO ENCRYPTION); open the session with allow_plain=True")
        self.id = resp.session_id
        self.mode = resp.mode
        self.channels = resp.channels
        g = resp.arena
        self.layout = ArenaLayout(g.chunk_size, g.h2d_slots, g.d2h_slots, g.nop_cells)
        if self.layout.size != g.size or self.layout.slot_stride != g.slot_stride:
            raise PipeLLMError("arena geometry from the daemon does not match this SDK's layout")
        self.chunk_size = g.chunk_size
        self.granule = resp.generation_granule
        self.small_threshold = resp.small_transfer_threshold
        policy = RotationPolicy(
            resp.rotation.key_usage_upper, resp.rotation.key_usage_lower, resp.rotation.iv_rotation_remaining
        )
        self.endpoint: Endpoint
        if endpoint == "cuda":
            from .gpu.endpoint import CudaEndpoint

            self.endpoint = CudaEndpoint(secrets[: self.channels], policy, self.layout, device=device)
        elif endpoint == "cpu":
            self.endpoint = CpuEndpoint(secrets[: self.channels], policy)
        else:
            raise InvalidArgument(f"endpoint must be 'cpu' or 'cuda', got {endpoint!r}")
        self.arena: SharedMemory | None = None
        self.regions: dict[int, Region] = {}
        self.seq = itertools.count(1)
        self.offers = itertools.count(1)
        self.pending: dict[int, Pending] = {}
        self.landing: dict[int, Landing] = {}
        self.d2h_free: deque[int] = deque(range(self.layout.d2h_slots))
        # D2H ciphertext made while every bounce slot was taken: it waits here (on a GPU it would wait in
        # device memory) and moves into slots, in encryption order, as the daemon frees them.
        self.d2h_backlog: deque[_Backlogged] = deque()
        self.d2h_backlog_bytes = 0
        # The delivery ring (ring.py), when the daemon offers one: hits without a round trip.
        self.ring: RingView | None = None
        self.ring_shm: SharedMemory | None = None
        self.bell = -1
        self.ring_hits = 0
        self._rung = 0  # the consumer index at the last doorbell
        self.dead: str | None = None
        self.pid = os.getpid()  # a forked child must not use it: its D2H nonces would repeat the parent's
        self.deferred: DaemonError | None = None  # a refused fire-and-forget request, raised at the next call
        self.stats = EndpointStats()
        self._data_seen = 0

    # -- arena -------------------------------------------------------------------------------------
    def attach(self, frame: pb.Attach, fds: list[int]) -> None:
        want = 3 if frame.ring_capacity else 1
        if len(fds) != want or frame.session_id != self.id:
            for fd in fds:
                os.close(fd)
            raise PipeLLMError("bad Attach frame from the daemon")
        self.arena = SharedMemory.attach(fds[0], frame.size, writable=True)
        self.endpoint.attach_arena(self.arena)
        if frame.ring_capacity:
            self.ring_shm = SharedMemory.attach(fds[1], frame.ring_size, writable=True)
            self.ring = RingView(self.ring_shm.view, frame.ring_capacity)
            self.bell = fds[2]

    def _arena_view(self, off: int, n: int) -> memoryview:
        assert self.arena is not None
        return self.arena.view[off : off + n]

    # -- H2D ---------------------------------------------------------------------------------------
    def route_ce(self, length: int, unpredicted: bool) -> int:
        return copy_engine(
            length, unpredicted=unpredicted, channels=self.channels, small_threshold=self.small_threshold
        )

    def commit_frame(self, transfers: list[tuple[Region, int, int, Any, bool]]) -> tuple[pb.Frame | None, Pending]:
        """The Commit frame for what the delivery ring cannot serve (None when it served everything)."""
        self.check_alive()
        if not transfers:
            raise InvalidArgument("nothing to transfer")
        seq = next(self.seq)
        commit = pb.Commit(seq=seq)
        targets = []
        checked = []
        regions, dest_view = self.regions, self.endpoint.dest_view
        for region, offset, length, dst, unpredicted in transfers:
            if regions.get(region.id) is not region:
                raise InvalidArgument(f"{region!r} does not belong to this session")
            region.check_range(offset, length)
            view = dest_view(dst)
            if view.nbytes < length:
                raise InvalidArgument(f"destination holds {view.nbytes} bytes, the transfer is {length}")
            checked.append((region, offset, length, view, unpredicted))
        rest = self._from_ring(checked) if self.ring is not None and not self.pending else checked
        if not rest:
            return None, Pending(seq, [], expected=0, done=True)
        for region, offset, length, view, unpredicted in rest:
            targets.append((region, view))
            commit.transfers.append(
                pb.Transfer(
                    region_id=region.id,
                    offset=offset,
                    length=length,
                    flags=FLAG_UNPREDICTED if unpredicted else 0,
                )
            )
        p = Pending(seq, targets, expected=sum(t.length for t in commit.transfers))
        self.pending[seq] = p
        return pb.Frame(commit=commit), p

    def apply_completion(self, comp: pb.Completion) -> pb.Frame | None:
        """Feed the endpoint, in order; returns the Release frame for the slots it consumed."""
        p = self.pending.get(comp.seq)
        if p is None:
            raise PipeLLMError(f"completion for unknown commit {comp.seq}")
        release = pb.Release()
        ep = self.endpoint
        try:
            with ep.batch():
                for d in comp.deliveries:
                    self._deliver(d, p, release)
            if any(d.ring for d in comp.deliveries):
                self._ring_bell()  # the records' slots are free: tell the daemon
        except (TagMismatch, ChannelDead) as exc:
            self.dead = str(exc)
            p.error = DaemonError(grpc.StatusCode.DATA_LOSS, f"endpoint refused a message: {exc}")
            p.done = True
            raise
        if comp.final:
            p.done = True
            del self.pending[comp.seq]
            if p.delivered != p.expected:
                self.dead = f"commit {p.seq} delivered {p.delivered} of {p.expected} bytes"
                raise ChannelDead(f"endpoint: {self.dead} (a message was dropped)")
        self.stats.messages = ep.accepted
        return pb.Frame(release=release) if (release.slots or release.nop_cells) else None

    # -- the delivery ring -----------------------------------------------------------------------------
    def ring_hit(self, region: Region, offset: int, length: int, dst: Any, unpredicted: bool) -> bool:
        """The serving loop's common case, taken without building a commit: one chunk whose record stands
        at the head of the ring. True when it was delivered; False (nothing consumed) when the general path
        must take the transfer: a record that is not this chunk, a rotation first, a commit in flight.
        The checks are the general path's; a record that fails at the endpoint kills the channel as there."""
        ring = self.ring
        if (
            ring is None
            or self.pending
            or self.dead is not None
            or self.deferred is not None
            or length > self.chunk_size
            or self.mode != pb.MODE_PIPELLM
            or self.route_ce(length, unpredicted) != 0
            or os.getpid() != self.pid
        ):
            return False
        cons, prod = ring.consumed, ring.produced
        if cons >= prod or self.regions.get(region.id) is not region:
            return False
        region.check_range(offset, length)
        rec = ring.record(cons)
        if not self._record_carries(rec, region, offset, length) or self._landing_into(region, offset, length):
            return False
        view = self.endpoint.dest_view(dst)
        if view.nbytes < length:
            raise InvalidArgument(f"destination holds {view.nbytes} bytes, the transfer is {length}")
        try:
            with self.endpoint.batch():
                self._take_data(rec.ce, rec.slot, rec.length, bool(rec.flags & FLAG_STAGED), view)
        except ChannelDead as exc:  # TagMismatch included
            self.dead = str(exc)  # the record stays unconsumed, as on the general path
            raise
        self.ring_hits += 1
        self._consume_to(ring, cons + 1, prod)
        return True

    def _from_ring(
        self, transfers: list[tuple[Region, int, int, Any, bool]]
    ) -> list[tuple[Region, int, int, Any, bool]]:
        """Serve what the ring's records carry, in order; returns what is left for the slow path."""
        ring = self.ring
        assert ring is not None
        cons, prod = ring.consumed, ring.produced
        start = cons
        rest: list[tuple[Region, int, int, Any, bool]] = []
        try:
            with self.endpoint.batch():
                cons = self._take_from_ring(ring, transfers, cons, prod, rest)
        except (TagMismatch, ChannelDead) as exc:
            self.dead = str(exc)  # the clients tell the daemon (endpoint_failure), as for a slow-path message
            ring.consumed = cons
            raise
        if cons != start:
            self._consume_to(ring, cons, prod, slow_path_follows=bool(rest))
        return rest

    def _consume_to(self, ring: RingView, cons: int, prod: int, *, slow_path_follows: bool = False) -> None:
        """Advance the consumer index; wake the daemon only when it waits on us and the ring runs low, every
        BELL_EVERY records, or when a commit follows (it should free those slots first)."""
        ring.consumed = cons
        low = prod - cons <= BELL_EVERY
        if (ring.bell_wanted and low) or cons - self._rung >= BELL_EVERY or slow_path_follows:
            self._ring_bell()

    def _take_from_ring(
        self,
        ring: RingView,
        transfers: list[tuple[Region, int, int, Any, bool]],
        cons: int,
        prod: int,
        rest: list[tuple[Region, int, int, Any, bool]],
    ) -> int:
        # Hoisted out of the per-chunk loop (a batch is 64 chunks and more): the mode, the chunk size, and
        # whether a D2H landing exists at all.
        speculative = self.mode == pb.MODE_PIPELLM
        size, landing, take = self.chunk_size, bool(self.landing), self._take_data
        hits = 0
        try:
            for region, offset, length, view, unpredicted in transfers:
                if (
                    rest
                    or not speculative
                    or self.route_ce(length, unpredicted) != 0
                    or (landing and self._landing_into(region, offset, length))
                ):
                    rest.append((region, offset, length, view, unpredicted))
                    continue
                done = 0
                pieces = (
                    chunks.split(offset, length, size)
                    if length > size
                    else ((offset, length, 0),)  # one chunk: the common case, no generator
                )
                for c_offset, c_length, c_dst in pieces:
                    rec = ring.record(cons) if cons < prod else None
                    while rec is not None and rec.kind in (KIND_ROTATE_IV, KIND_ROTATE_KEY):
                        # In-band rotations published between chunks: apply them in place.
                        if rec.kind == KIND_ROTATE_IV:
                            self.endpoint.rotate_iv(rec.ce, rec.value)
                        else:
                            self.endpoint.rotate_key(rec.ce, rec.value)
                        self.stats.rotations += 1
                        cons += 1
                        rec = ring.record(cons) if cons < prod else None
                    if rec is None or not self._record_carries(rec, region, c_offset, c_length):
                        break
                    take(rec.ce, rec.slot, rec.length, bool(rec.flags & FLAG_STAGED), view[c_dst:] if c_dst else view)
                    cons += 1
                    hits += 1
                    done += c_length
                if done < length:
                    rest.append((region, offset + done, length - done, view[done:], unpredicted))
        finally:
            self.ring_hits += hits
        return cons

    def _landing_into(self, region: Region, offset: int, length: int) -> bool:
        """A D2H write is on its way into the range: only the daemon can order a read after it."""
        if not self.landing:  # the common case on the hot path (a queued D2H message has a landing too)
            return False
        return bool(self.landings_over(region, offset, length)) or self.queued_over(region, offset, length)

    @staticmethod
    def _record_carries(rec: Record, region: Region, offset: int, length: int) -> bool:
        """A DATA record for exactly this chunk, made from the bytes the region holds now."""
        if rec.kind != KIND_DATA or (rec.region, rec.offset, rec.length) != (region.id, offset, length):
            return False
        gens = region.generations(offset, length)
        return gens is not None and source_digest(gens) == rec.digest

    def _ring_bell(self) -> None:
        assert self.ring is not None
        self._rung = self.ring.consumed
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_write(self.bell, 1)

    def _take_ring_record(self, d: pb.Delivery) -> None:
        """A slow-path delivery consumes the next ring record: it must be that record."""
        ring = self.ring
        if ring is None:
            raise ChannelDead("the daemon delivered a ring record, but this session has no ring")
        cons = ring.consumed
        if cons >= ring.produced:
            raise ChannelDead("the daemon delivered a ring record that was never published")
        rec = ring.record(cons)
        if d.kind in (pb.MSG_KIND_DATA, pb.MSG_KIND_DISCARD):
            same = rec.kind == KIND_DATA and rec.slot == d.slot and rec.length == d.length and rec.ce == d.ce
        else:
            same = rec.kind == d.kind and rec.value == d.value and rec.ce == d.ce
        if not same:
            raise ChannelDead(f"delivery ring out of step at record {cons}")
        ring.consumed = cons + 1

    def _take_data(self, ce: int, slot: int, length: int, staged: bool, out: Any) -> None:
        ep, st, layout = self.endpoint, self.stats, self.layout
        layout.check_message(length)
        at = layout.h2d_slot(slot)
        self._data_seen += 1
        if staged:
            ep.next_staged = slot
        if self._data_seen % self.verify_every == 0:
            ep.receive(ce, MsgKind.DATA, self._arena_view(at, length + TAG_LEN), out[:length])
            st.verified += 1
        else:
            ep.next_staged = None
            ep.h2d[ce].account_unverified(length)
            st.unverified += 1
        st.bytes += length

    def _deliver(self, d: pb.Delivery, p: Pending, release: pb.Release) -> None:
        ep, st = self.endpoint, self.stats
        if d.ring:
            self._take_ring_record(d)
            release = pb.Release()  # a ring record's slot is released by the consumer index, not a Release
        if d.kind == pb.MSG_KIND_DATA:
            _region, dst = p.targets[d.transfer]
            self._take_data(d.ce, d.slot, d.length, d.staged, dst[d.dst_offset : d.dst_offset + d.length])
            p.delivered += d.length
            release.slots.append(d.slot)
        elif d.kind == pb.MSG_KIND_DISCARD:
            self.layout.check_message(d.length)
            ep.receive(d.ce, MsgKind.DISCARD, self._arena_view(self.layout.h2d_slot(d.slot), d.length + TAG_LEN))
            st.discards += 1
            release.slots.append(d.slot)
        elif d.kind == pb.MSG_KIND_NOP:
            ep.receive(d.ce, MsgKind.NOP, self._arena_view(self.layout.nop_cell(d.slot), NOP_MESSAGE_LEN))
            st.nops += 1
            release.nop_cells.append(d.slot)
        elif d.kind == pb.MSG_KIND_ROTATE_IV:
            ep.rotate_iv(d.ce, d.value)
            st.rotations += 1
        elif d.kind == pb.MSG_KIND_ROTATE_KEY:
            ep.rotate_key(d.ce, d.value)
            st.rotations += 1
        elif d.kind == pb.MSG_KIND_PLAIN:
            region, dst = p.targets[d.transfer]
            ep.copy_plain(
                region.array[d.src_offset : d.src_offset + d.length].data, dst[d.dst_offset : d.dst_offset + d.length]
            )
            st.bytes += d.length
            p.delivered += d.length
        else:
            raise PipeLLMError(f"unknown delivery kind {d.kind}")

    def fail_commit(self, seq: int, err: DaemonError) -> None:
        p = self.pending.pop(seq, None)
        if p is not None:
            p.error = err
            p.done = True

    # -- D2H ---------------------------------------------------------------------------------------
    def landed_frames(
        self, src: Any, region: Region, offset: int, *, swap_out: bool, group: int
    ) -> Iterator[tuple[pb.Frame | None, Landing]]:
        """Encrypt device data into D2H slots (the endpoint's own counter) and describe it for the daemon.

        Yields (frame, landing) whenever the free slots are used up or the data ends; the caller sends the
        frame. A chunk that finds no free slot (or finds others already waiting) is encrypted now into
        memory the endpoint holds (this process's, or the GPU's) and queued: it yields (None, landing), and
        `drain_d2h` sends it once a slot frees, so the serving loop never waits for the daemon. Only when
        `can_queue_d2h()` is false (D2H_BACKLOG_MAX queued) must the caller read frames until a slot frees.
        """
        self.check_alive()
        if region.readonly:
            raise InvalidArgument(f"{region!r} is read-only; D2H needs a mutable region")
        data = self.endpoint.source_view(src)
        region.check_range(offset, data.nbytes)
        ce = self.route_ce(data.nbytes, False)
        msgs: list[pb.D2HMessage] = []
        start = 0
        slots: list[int] = []
        for c in chunks.split(0, data.nbytes, self.chunk_size):
            if self.d2h_backlog or not self.d2h_free:
                if msgs:  # what already has slots goes first: the daemon sees messages in encryption order
                    self.endpoint.flush()
                    seq = next(self.seq)
                    n = sum(m.length for m in msgs)
                    landing = Landing(seq, region, offset + start, n, slots)
                    self.landing[seq] = landing
                    yield self._landed(seq, region, offset + start, n, msgs, swap_out, group, start > 0), landing
                    start += n
                    msgs, slots = [], []
                if not self.can_queue_d2h():
                    raise PipeLLMError("no free D2H slot: the caller must wait for LandedDone first")
                yield (
                    None,
                    self._queue_d2h(
                        ce,
                        data[c.offset : c.offset + c.length],
                        region,
                        offset + c.offset,
                        swap_out,
                        group,
                        continues=c.offset > 0,
                    ),
                )
                start += c.length
                continue
            slot = self.d2h_free.popleft()
            view = self._arena_view(self.layout.d2h_slot(slot), c.length + TAG_LEN)
            version, chan = self.endpoint.send(ce, data[c.offset : c.offset + c.length], view)
            msgs.append(pb.D2HMessage(ce=ce, slot=slot, length=c.length, key_version=version, chan_ctr=chan))
            slots.append(slot)
            if not self.d2h_free or c.offset + c.length == data.nbytes:
                seq = next(self.seq)
                n = sum(m.length for m in msgs)
                landing = Landing(seq, region, offset + start, n, slots)
                self.landing[seq] = landing
                self.endpoint.flush()  # (a batching endpoint) the ciphertext is in its slots before the frame goes
                yield self._landed(seq, region, offset + start, n, msgs, swap_out, group, start > 0), landing
                start += n
                msgs, slots = [], []

    @staticmethod
    def _landed(
        seq: int,
        region: Region,
        offset: int,
        n: int,
        msgs: list[pb.D2HMessage],
        swap_out: bool,
        group: int,
        continues: bool,
    ) -> pb.Frame:
        """One Landed frame; `continues`: a later part of the same d2h call (one swap unit for the daemon)."""
        return pb.Frame(
            landed=pb.Landed(
                seq=seq,
                region_id=region.id,
                offset=offset,
                length=n,
                messages=msgs,
                swap_out=swap_out,
                group=group,
                continues=continues,
            )
        )

    def can_queue_d2h(self) -> bool:
        """Whether a D2H chunk without a free slot may wait in the endpoint's memory (under the cap)."""
        return self.d2h_backlog_bytes < D2H_BACKLOG_MAX

    def _queue_d2h(
        self, ce: int, src: Any, region: Region, offset: int, swap_out: bool, group: int, *, continues: bool
    ) -> Landing:
        held, version, chan = self.endpoint.hold(ce, src)
        n = held.nbytes - TAG_LEN
        seq = next(self.seq)
        landing = Landing(seq, region, offset, n, [])
        self.landing[seq] = landing  # a read or swap-in of the range waits for it like for any landing
        msg = pb.D2HMessage(ce=ce, length=n, key_version=version, chan_ctr=chan)
        self.d2h_backlog.append(_Backlogged(landing, msg, held, swap_out, group, continues))
        self.d2h_backlog_bytes += held.nbytes
        return landing

    def queued_over(self, region: Region, offset: int, length: int) -> bool:
        """Whether D2H data for this range still waits for a slot (the daemon does not know of it yet)."""
        if not self.d2h_backlog:
            return False
        end = offset + length
        return any(
            b.landing.region is region and b.landing.offset < end and offset < b.landing.offset + b.landing.length
            for b in self.d2h_backlog
        )

    def drain_d2h(self) -> list[pb.Frame]:
        """Move queued D2H ciphertext into the slots the daemon has freed, in order; frames to send."""
        frames: list[pb.Frame] = []
        while self.d2h_backlog and self.d2h_free:
            b = self.d2h_backlog.popleft()
            self.d2h_backlog_bytes -= b.held.nbytes
            if b.landing.seq not in self.landing:  # failed meanwhile (the session died): nothing to send
                continue
            slot = self.d2h_free.popleft()
            b.held.move_to(self._arena_view(self.layout.d2h_slot(slot), b.held.nbytes))
            b.landing.slots = [slot]
            b.message.slot = slot
            x = b.landing
            frames.append(
                self._landed(x.seq, x.region, x.offset, x.length, [b.message], b.swap_out, b.group, b.continues)
            )
        return frames

    def landed_done(self, done: pb.LandedDone) -> None:
        landing = self.landing.pop(done.seq, None)
        if landing is None:
            raise PipeLLMError(f"LandedDone for unknown seq {done.seq}")
        for d in done.directives:
            if d.kind == pb.MSG_KIND_ROTATE_D2H_KEY:
                v = self.endpoint.rotate_d2h_key(d.ce)
                if v != d.value:
                    raise ChannelDead(f"D2H key rotation to v{d.value}, endpoint is at v{v}")
            elif d.kind == pb.MSG_KIND_ROTATE_D2H_IV:
                self.endpoint.rotate_d2h_iv(d.ce)
        landing.done = True
        self.d2h_free.extend(landing.slots)

    def fail_landing(self, seq: int, err: DaemonError) -> None:
        landing = self.landing.pop(seq, None)
        if landing is not None:
            landing.error = err
            landing.done = True
            self.d2h_free.extend(landing.slots)

    def landings_over(self, region: Region, offset: int, length: int) -> list[Landing]:
        end = offset + length
        return [
            x for x in self.landing.values() if x.region is region and x.offset < end and offset < x.offset + x.length
        ]

    # -- frames from the daemon ----------------------------------------------------------------------
    def handle(self, frame: pb.Frame, fds: list[int]) -> tuple[pb.Frame | None, DaemonError | None]:
        """Act on one frame. Returns (a frame to send back, an error not tied to any request)."""
        body = frame.WhichOneof("body")
        if body == "attach":
            self.attach(frame.attach, fds)
            return None, None
        for fd in fds:
            os.close(fd)
        if body == "completion":
            return self.apply_completion(frame.completion), None
        if body == "landed_done":
            self.landed_done(frame.landed_done)
            return None, None
        if body == "error":
            err = self.on_error(frame.error)
            return None, (err if frame.error.seq == 0 else None)
        raise PipeLLMError(f"unexpected {body} frame from pipellmd")

    @staticmethod
    def endpoint_failure(exc: BaseException) -> pb.Frame:
        """What the endpoint tells the daemon when it refuses a message: the channel is dead on both sides."""
        return pb.Frame(error=pb.Error(code=grpc.StatusCode.DATA_LOSS.value[0], message=f"endpoint: {exc}"))

    # -- regions -----------------------------------------------------------------------------------
    def new_region_memory(
        self, nbytes: int, *, readonly: bool, name: str, adapter: bool
    ) -> tuple[SharedMemory, pb.Frame, pb.RegisterRegionRequest]:
        """The memfd, the Offer frame that carries it, and the RegisterRegion request that names it."""
        if nbytes <= 0:
            raise InvalidArgument(f"region size must be > 0, got {nbytes}")
        total = nbytes if readonly else nbytes + generation_table_bytes(nbytes, self.granule)
        shm = SharedMemory.create(name or "pipellm-region", total)
        offer = next(self.offers)
        req = pb.RegisterRegionRequest(
            session_id=self.id,
            offer_id=offer,
            size=nbytes,
            readonly=readonly,
            name=name,
            kind=pb.REGION_KIND_ADAPTER if adapter else pb.REGION_KIND_UNSPECIFIED,
        )
        return shm, pb.Frame(offer=pb.Offer(offer_id=offer)), req

    def declare_frames(self, intents: Sequence[Intent], *, replace: bool, cyclic: bool) -> list[pb.Frame]:
        """Intents as data-plane Declare frames (fire-and-forget; a refusal is raised at a later call).

        Records are packed by `struct` rather than as protobuf messages: 64 intents cost microseconds.
        """
        self.check_alive()
        seq = next(self.seq)
        frames: list[pb.Frame] = []
        for start in range(0, max(1, len(intents)), DECLARE_RECORDS_PER_FRAME):
            part = intents[start : start + DECLARE_RECORDS_PER_FRAME]
            flat: list[int] = []
            for it in part:
                flat += (it.region.id, it.offset, it.length, 1 if it.d2h else 0)
            frames.append(
                pb.Frame(
                    declare=pb.Declare(
                        seq=seq,
                        records=struct.pack(f"<{len(flat)}Q", *flat),
                        replace=replace,
                        cyclic=cyclic,
                        more=start + DECLARE_RECORDS_PER_FRAME < len(intents),
                    )
                )
            )
        return frames

    def cancel_frame(self) -> pb.Frame:
        self.check_alive()
        return pb.Frame(declare=pb.Declare(seq=next(self.seq), cancel=True))

    def own_status(self, resp: pb.ListSessionsResponse) -> pb.SessionStatus:
        for s in resp.sessions:
            if s.session_id == self.id:
                return s
        raise DaemonError(grpc.StatusCode.NOT_FOUND, f"session {self.id} is gone")

    def staging_request(self) -> pb.AttachDeviceStagingRequest | None:
        """For a CUDA endpoint in PipeLLM mode: export device staging so the daemon can DMA ahead."""
        if self.endpoint.kind != "cuda" or self.mode != pb.MODE_PIPELLM:
            return None
        staging = self.endpoint.enable_device_staging()  # type: ignore[attr-defined]
        return pb.AttachDeviceStagingRequest(
            session_id=self.id,
            ipc_handle=staging.ipc_handle(),
            size=int(staging.buf.size),
            stride=staging.stride,
            device=staging.device_id,
        )

    def staging_refused(self) -> None:
        self.endpoint.staging = None  # type: ignore[attr-defined]

    # -- errors ------------------------------------------------------------------------------------
    def on_error(self, err: pb.Error) -> DaemonError:
        e = from_error_frame(err)
        if err.seq in self.pending:
            self.fail_commit(err.seq, e)
        elif err.seq in self.landing:
            self.fail_landing(err.seq, e)
        elif err.seq and self.deferred is None:
            self.deferred = e  # a fire-and-forget request (a Declare) was refused: raised at the next call
        if e.code == grpc.StatusCode.DATA_LOSS:
            self.dead = e.details
            for queued in self.d2h_backlog:  # never sent: they fail with the session
                self.fail_landing(queued.landing.seq, e)
        return e

    def check_alive(self) -> None:
        if os.getpid() != self.pid:
            raise PipeLLMError(
                f"this session belongs to process {self.pid}; a forked child must open its own session "
                "(sharing one would encrypt D2H messages under nonces the parent also uses)"
            )
        if self.dead is not None:
            raise ChannelDead(f"session is dead ({self.dead}); open a new session")
        if self.deferred is not None:
            err, self.deferred = self.deferred, None
            raise err

    def close(self) -> None:
        for r in self.regions.values():
            r.close()
        self.regions.clear()
        if self.arena is not None:
            self.arena.close()
        if self.ring_shm is not None:
            if self.ring is not None:
                self.ring.release()
            self.ring = None
            self.ring_shm.close()
            self.ring_shm = None
            os.close(self.bell)
            self.bell = -1
        self.endpoint.close()
