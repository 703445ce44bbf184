"""What `Client`/`Session` and `AsyncClient`/`AsyncSession` share: every session operation, written once.

Each operation is a generator of the I/O it needs (a sans-I/O coroutine): it yields a `Step` (read frames
until a condition holds, make an RPC, do a blocking read, re-key) and gets the step's result back. The
sync client runs the steps blocking, the asyncio client awaits them; only the drivers and the one-line
public methods exist twice. So the two clients keep the same methods, arguments and semantics by
construction.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeAlias, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from ._core import (
    DaemonError,
    Handshake,
    Intent,
    Landing,
    SessionCore,
    as_source_view,
    from_error_frame,
    swap_order_value,
)
from ._dataplane import DaemonUnavailable, FrameSocket
from ._gen.pipellm.v1 import pipellm_pb2 as pb
from .endpoint import Endpoint
from .errors import ChannelDead, InvalidArgument, PipeLLMError, TagMismatch
from .regions import Region
from .wire import TICKET_KEY

T = TypeVar("T")
Metadata: TypeAlias = list[tuple[str, str]]
Transfer: TypeAlias = tuple[Region, int, int, Any]
RETRIES_ON_ABORT: Final = 2  # commits retried from plaintext after a worker died under them (ABORTED)
_log = logging.getLogger("pipellm_client")


# -- steps -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Wait:
    """Read the session's data-plane frames (and act on them) until `until()` holds."""

    until: Callable[[], bool]


@dataclass(frozen=True, slots=True)
class Poll:
    """Act on the frames the daemon has sent so far, without waiting (LandedDone frames free D2H slots)."""


@dataclass(frozen=True, slots=True)
class Call:
    """A control-plane RPC: the stub method's name, its request, the session's ticket; sends back the reply."""

    method: str
    request: Any
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class Blocking:
    """A blocking read on a socket nobody watches yet (a greeting, a new session's Attach); sends back its
    result. The asyncio client runs it in a thread."""

    fn: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class Rekey:
    """Give the session new channels, unless another call already replaced `dead` (asyncio: many calls can
    see one death, and it is re-keyed once)."""

    dead: SessionCore


Step: TypeAlias = Wait | Poll | Call | Blocking | Rekey
Steps: TypeAlias = Generator[Step, Any, T]


def advance(steps: Steps[T], reply: Any, failure: BaseException | None) -> tuple[Step | None, Any]:
    """Resume an operation with its step's reply, or throw the step's failure in (the operation cleans up);
    returns (the next step, None), or (None, the operation's result) once it is done."""
    try:
        return (steps.send(reply) if failure is None else steps.throw(failure)), None
    except StopIteration as done:
        return None, done.value


# -- greeting and errors -----------------------------------------------------------------------------------
class ClientAddress(Protocol):
    """Where a client finds pipellmd, whom it trusts to be pipellmd, and the sessions it has open."""

    socket: str
    timeout: float
    daemon_uids: frozenset[int] | None
    sessions: list[Any]


def welcome(fs: FrameSocket) -> pb.Welcome:
    """The daemon's greeting on a fresh data-plane connection: its ticket and public key, or its refusal."""
    frame, fds = fs.recv()
    fs.greeted()
    for fd in fds:
        os.close(fd)
    if frame.WhichOneof("body") == "error":
        raise from_error_frame(frame.error)
    if frame.WhichOneof("body") != "welcome":
        raise PipeLLMError("pipellmd did not greet this connection")
    return frame.welcome


def greet(client: ClientAddress) -> tuple[FrameSocket, str]:
    """A control connection and its ticket (gRPC calls carry it; it dies with the connection or the daemon)."""
    fs = FrameSocket(client.socket, client.timeout, client.daemon_uids)
    try:
        return fs, welcome(fs).ticket
    except BaseException:
        fs.close()
        raise


def stale_ticket(err: DaemonError, metadata: Metadata | None) -> bool:
    """The daemon restarted: the control connection's ticket died with it, so greet again (once)."""
    return metadata is None and err.code == grpc.StatusCode.PERMISSION_DENIED and "ticket" in err.details


def rpc_failure(err: DaemonError, socket: str) -> PipeLLMError:
    """What a failed RPC raises: DaemonUnavailable when nobody answers, else the daemon's refusal."""
    if err.code == grpc.StatusCode.UNAVAILABLE:
        return DaemonUnavailable(f"pipellmd at {socket} is unavailable: {err.details}")
    return err


def serving_status(resp: health_pb2.HealthCheckResponse) -> str:
    """A health response as its name ("SERVING", ...)."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


# -- opening a session -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionOptions:
    """`open_session`'s arguments, kept so a re-key opens the same kind of session."""

    name: str
    channels: int
    swap_order: str
    verify: str | int
    endpoint: str
    device: int | None
    device_staging: bool
    small_transfer_threshold: int | None
    recover: bool
    max_rekeys: int
    allow_plain: bool
    allow_unverified: bool


def connect_steps(client: ClientAddress, o: SessionOptions) -> Steps[tuple[FrameSocket, Metadata, SessionCore]]:
    """Data-plane connection, key agreement, OpenSession, arena, device staging: a ready SessionCore."""
    fs = FrameSocket(client.socket, client.timeout, client.daemon_uids)
    try:
        hello: pb.Welcome = yield Blocking(lambda: welcome(fs))
        hs = Handshake(hello.daemon_public_key, o.channels)
        md = [(TICKET_KEY, hello.ticket)]
        req = hs.request(
            client_name=o.name,
            endpoint=o.endpoint,
            swap_order=swap_order_value(o.swap_order),
            small_transfer_threshold=o.small_transfer_threshold,
            allow_plain=o.allow_plain,
            verify=o.verify,
            allow_unverified=o.allow_unverified,
        )
        resp: pb.OpenSessionResponse = yield Call("OpenSession", req, md)
        core = SessionCore(
            resp,
            hs.secrets(resp.channels),
            o.verify,
            endpoint=o.endpoint,
            device=o.device,
            allow_plain=o.allow_plain,
            allow_unverified=o.allow_unverified,
        )
        while core.arena is None:
            frame, fds = yield Blocking(fs.recv)
            core.handle(frame, fds)
        staging = core.staging_request() if o.device_staging else None
        if staging is not None:
            try:
                yield Call("AttachDeviceStaging", staging, md)
            except DaemonError:
                core.staging_refused()  # no speculative DMA: the endpoint copies from the arena itself
    except BaseException:
        fs.close()
        raise
    return fs, md, core


def on_frame(core: SessionCore, fs: FrameSocket, frame: pb.Frame, fds: list[int]) -> DaemonError | None:
    """Act on one frame from the daemon; returns an error no request is waiting for (raise it somewhere).

    A message the endpoint refuses is reported to the daemon (the channel is dead on both sides), then raised.
    """
    try:
        reply, err = core.handle(frame, fds)
    except PipeLLMError as exc:
        with contextlib.suppress(DaemonUnavailable):
            fs.send(core.endpoint_failure(exc))
        raise
    if reply is not None:
        # The bytes are already in place; a daemon that went away needs no release.
        with contextlib.suppress(DaemonUnavailable):
            fs.send(reply)
    for landed in core.drain_d2h():  # slots the daemon freed take queued D2H ciphertext
        fs.send(landed)
    return err


def load_bytes(region: Region, data: Any) -> None:
    """Copy `alloc_region(data=...)` into a new region (the caller seals a read-only one)."""
    raw = as_source_view(data)
    if len(raw) > region.size:
        raise InvalidArgument(f"data of {len(raw)} bytes does not fit a region of {region.size}")
    if region.readonly:
        region.array[: len(raw)] = np.frombuffer(raw, np.uint8)
    else:
        region.write(0, raw)


# -- the session -------------------------------------------------------------------------------------------
class SessionBase(abc.ABC):
    """A session's state and operations; subclasses only say how a `Step` is waited for."""

    client: ClientAddress

    def __init__(
        self, client: ClientAddress, fs: FrameSocket, metadata: Metadata, core: SessionCore, options: SessionOptions
    ) -> None:
        self.client = client
        self.fs = fs
        self.metadata = metadata
        self.core = core
        self.options = options
        self.id = core.id
        self.closed = False
        self.rekeys = 0
        self.deaths: list[str] = []  # why each channel died; a recovered death is still recorded here
        self.aborted_retries = 0  # commits retried from plaintext after a worker died under them (ABORTED)
        self._cyclic_intents: list[Intent] = []
        self._mourned: SessionCore | None = None  # the last core whose death is in `deaths` (counted once)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} regions={len(self.core.regions)}>"

    @property
    def small_transfer_threshold(self) -> int:
        """Transfers below this take the second channel and are never speculated (per session)."""
        return self.core.small_threshold

    @property
    def generation_granule(self) -> int:
        """Bytes covered by one write generation of a mutable region: pad KV blocks to it."""
        return self.core.granule

    @property
    def endpoint(self) -> Endpoint:
        """The GPU side of the channel (`kind` "cpu" or "cuda"); a re-key replaces it, so do not keep it."""
        return self.core.endpoint

    @property
    def endpoint_stats(self) -> dict[str, int]:
        st = self.core.stats
        return {
            "verified": st.verified,
            "unverified": st.unverified,
            "nops": st.nops,
            "discards": st.discards,
            "rotations": st.rotations,
            "bytes": st.bytes,
        }

    # -- hooks for the clients -------------------------------------------------------------------------
    @abc.abstractmethod
    def _region_waits(self, region: Region, offset: int, length: int) -> None:
        """What `Region.read`/`write` call before touching a range that D2H data may still be landing in."""

    @abc.abstractmethod
    def _region_seals(self, region: Region) -> None:
        """What `Region.seal` calls to tell the daemon."""

    def _swap(self, fs: FrameSocket, metadata: Metadata, core: SessionCore) -> None:
        """Replace the connection and channels after a re-key (the old ones are dead or superseded)."""
        old_fs, old_core = self.fs, self.core
        old_fs.close()
        old_core.close()
        self.fs, self.metadata, self.core, self.id = fs, metadata, core, core.id

    def _may_say_goodbye(self) -> bool:
        """Whether `close` should wait for landings and close the session at the daemon (not when dead)."""
        return self.core.dead is None

    def _release(self) -> None:
        self.fs.close()
        self.core.close()
        if self in self.client.sessions:
            self.client.sessions.remove(self)

    # -- regions -----------------------------------------------------------------------------------------
    def _alloc_steps(self, nbytes: int, readonly: bool, name: str, adapter: bool, data: Any) -> Steps[Region]:
        core = self.core
        shm, offer, req = core.new_region_memory(nbytes, readonly=readonly, name=name, adapter=adapter)
        try:
            self.fs.send(offer, fds=[shm.fd])
            resp: pb.RegisterRegionResponse = yield Call("RegisterRegion", req, self.metadata)
        except BaseException:
            shm.close()
            raise
        region = Region(
            resp.region_id, name, shm, nbytes, readonly, core.granule, self._region_waits, self._region_seals
        )
        region.adapter = adapter
        core.regions[region.id] = region
        if data is not None:
            load_bytes(region, data)
            if readonly:
                yield from self._seal_steps(region)
        return region

    def _seal_steps(self, region: Region) -> Steps[None]:
        """`Region.seal` as steps: freeze the bytes here (every later write faults), then tell the daemon."""
        if region.freeze():
            yield from self._seal_remote_steps(region)
            region.sealed = True

    def _seal_remote_steps(self, region: Region) -> Steps[None]:
        yield Call("SealRegion", pb.SealRegionRequest(session_id=self.id, region_id=region.id), self.metadata)

    def _landed_steps(self, region: Region, offset: int = 0, length: int | None = None) -> Steps[None]:
        length = region.size - offset if length is None else length
        landings = self.core.landings_over(region, offset, length)
        if not all(x.done for x in landings):
            yield Wait(lambda: all(x.done for x in landings))
        for x in landings:
            if x.error is not None:
                raise x.error

    def _unregister_steps(self, region: Region) -> Steps[None]:
        yield from self._landed_steps(region, 0, region.size)
        req = pb.UnregisterRegionRequest(session_id=self.id, region_id=region.id)
        yield Call("UnregisterRegion", req, self.metadata)
        self.core.regions.pop(region.id, None)
        region.close()

    # -- recovery -----------------------------------------------------------------------------------------
    def _recovering(self, op: Callable[[], Steps[T]]) -> Steps[T]:
        """Run a transfer; if the channel died under it and the session may recover, re-key and retry once."""
        core = self.core
        try:
            return (yield from op())
        except (ChannelDead, DaemonError) as exc:
            if isinstance(exc, DaemonError) and exc.code != grpc.StatusCode.DATA_LOSS:
                raise
            if self.core is core:  # else another call has already re-keyed: just retry on the new channels
                self._mourn(core, exc)
                if not self._may_rekey():
                    raise
                _log.warning(
                    "pipellm session %s: channel died (%s); re-keying and retrying from plaintext", self.id, exc
                )
                yield Rekey(core)
            return (yield from op())

    def _mourn(self, core: SessionCore, exc: Exception) -> None:
        """Record a channel's death once, however many calls meet it."""
        if self._mourned is not core:
            self._mourned = core
            self.deaths.append(str(exc))

    def _may_rekey(self) -> bool:
        return self.options.recover and self.rekeys < self.options.max_rekeys

    def _rekey_steps(self) -> Steps[None]:
        old_core = self.core
        fs, md, core = yield from connect_steps(self.client, self.options)
        try:
            for region in list(old_core.regions.values()):
                offer = next(core.offers)
                fs.send(pb.Frame(offer=pb.Offer(offer_id=offer)), fds=[region.shm.fd])
                req = pb.RegisterRegionRequest(
                    session_id=core.id,
                    offer_id=offer,
                    size=region.size,
                    readonly=region.readonly,
                    name=region.name,
                    kind=pb.REGION_KIND_ADAPTER if region.adapter else pb.REGION_KIND_UNSPECIFIED,
                )
                resp: pb.RegisterRegionResponse = yield Call("RegisterRegion", req, md)
                region.id = resp.region_id
                core.regions[region.id] = region
                if region.sealed:
                    yield Call("SealRegion", pb.SealRegionRequest(session_id=core.id, region_id=region.id), md)
        except BaseException:
            core.regions.clear()
            fs.close()
            core.close()
            raise
        old_core.regions.clear()  # the Region objects live on in the new session
        self._swap(fs, md, core)
        self.rekeys += 1
        if self._cyclic_intents:
            self._declare(self._cyclic_intents, replace=True, cyclic=True)

    # -- transfers ----------------------------------------------------------------------------------------
    def _ring_hit(self, region: Region, offset: int, length: int, dst: Any, unpredicted: bool) -> bool:
        """`h2d`'s fast path: a chunk the delivery ring holds, with no step to wait for. A record the endpoint
        refuses is reported to the daemon as on the general path; the error is raised as it came (TagMismatch
        stays TagMismatch) unless the session may re-key, which the general path then does."""
        core = self.core
        try:
            return core.ring_hit(region, offset, length, dst, unpredicted)
        except ChannelDead as exc:
            if isinstance(exc, TagMismatch):
                with contextlib.suppress(DaemonUnavailable):
                    self.fs.send(core.endpoint_failure(exc))
            if not self._may_rekey():
                self._mourn(core, exc)
                raise
            return False  # the general path meets the dead channel and re-keys

    def _h2d_steps(self, transfers: Sequence[Transfer], unpredicted: bool) -> Steps[None]:
        items = [(r, o, n, d, unpredicted) for (r, o, n, d) in transfers]
        return self._recovering(lambda: self._commit_steps(items))

    def _commit_steps(self, items: list[tuple[Region, int, int, Any, bool]]) -> Steps[None]:
        fs, core = self.fs, self.core
        for r, o, n, _d, _u in items:
            # A swap-in of a range whose swap-out still waits for a D2H slot: the daemon must see it first
            # (it then holds the commit until that decryption has landed).
            if core.queued_over(r, o, n):
                yield Wait(lambda r=r, o=o, n=n: not core.queued_over(r, o, n))  # type: ignore[misc]
        for attempt in range(RETRIES_ON_ABORT + 1):
            try:
                frame, pending = core.commit_frame(items)
            except TagMismatch as exc:  # the endpoint refused a record taken from the ring: tell the daemon
                with contextlib.suppress(DaemonUnavailable):
                    fs.send(core.endpoint_failure(exc))
                raise
            if frame is None:
                return  # every chunk was a hit taken from the delivery ring: no round trip
            fs.send(frame)
            if not pending.done:
                yield Wait(lambda p=pending: p.done)  # type: ignore[misc]
            if pending.error is None:
                return
            # ABORTED: a worker died; the daemon abandoned those IVs. Retry from plaintext, new IVs.
            if pending.error.code != grpc.StatusCode.ABORTED or attempt == RETRIES_ON_ABORT:
                raise pending.error
            self.aborted_retries += 1

    def _d2h_steps(
        self, src: Any, region: Region, offset: int, swap_out: bool, group: int, wait: bool
    ) -> Steps[list[Landing]]:
        if wait:
            return self._recovering(lambda: self._send_d2h_steps(src, region, offset, swap_out, group, True))
        return self._send_d2h_steps(src, region, offset, swap_out, group, False)

    def _send_d2h_steps(
        self, src: Any, region: Region, offset: int, swap_out: bool, group: int, wait: bool
    ) -> Steps[list[Landing]]:
        fs, core = self.fs, self.core
        data = core.endpoint.source_view(src)
        if core.mode == pb.MODE_PLAIN:
            region.write(offset, core.endpoint.to_host(data))  # plain mode (NO ENCRYPTION): a direct copy
            return []
        landings: list[Landing] = []
        if core.d2h_backlog or not core.d2h_free:
            # Slots the daemon freed since (LandedDone frames nobody has read yet): without this a serving loop
            # that only issues D2H would never see one, and every later chunk would queue in private memory.
            yield Poll()
        gen = core.landed_frames(data, region, offset, swap_out=swap_out, group=group)
        while True:
            # Never waits on a CPU endpoint: without a free slot the ciphertext queues (core.drain_d2h). The
            # check is repeated after a wait (asyncio: another call may have taken the slot meanwhile), and
            # nothing runs between it and the encryption, so messages reach the daemon in encryption order.
            while not (core.d2h_free or core.can_queue_d2h()):
                yield Wait(lambda: bool(core.d2h_free) or core.can_queue_d2h())
            try:
                frame, landing = next(gen)
            except StopIteration:
                break
            if frame is not None:
                fs.send(frame)
            landings.append(landing)
        if wait:
            yield from self._landed_steps(region, offset, data.nbytes)
        return landings

    def _wait_all_steps(self) -> Steps[None]:
        if self.core.landing:
            yield Wait(lambda: not self.core.landing)

    # -- intents -----------------------------------------------------------------------------------------
    def _declare(self, intents: Sequence[Intent], replace: bool, cyclic: bool) -> int:
        if cyclic:
            self._cyclic_intents = list(intents)  # declared again after a re-key
        elif replace:
            self._cyclic_intents = []
        for frame in self.core.declare_frames(intents, replace=replace, cyclic=cyclic):
            self.fs.send(frame)
        return len(intents)

    def _cancel_intents(self) -> None:
        frame = self.core.cancel_frame()
        self._cyclic_intents = []  # a cancelled cycle is not declared again by a re-key
        self.fs.send(frame)

    # -- the rest --------------------------------------------------------------------------------------------
    def _status_steps(self) -> Steps[pb.SessionStatus]:
        resp: pb.ListSessionsResponse = yield Call("ListSessions", pb.ListSessionsRequest(), self.metadata)
        return self.core.own_status(resp)

    def _close_steps(self) -> Steps[None]:
        if self.closed:
            return
        self.closed = True
        try:
            if self._may_say_goodbye():
                yield from self._wait_all_steps()
                yield Call("CloseSession", pb.CloseSessionRequest(session_id=self.id), self.metadata)
        except (PipeLLMError, grpc.RpcError):
            pass
        finally:
            self._release()
