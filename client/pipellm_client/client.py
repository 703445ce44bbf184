"""The synchronous SDK: `Client` talks to pipellmd, `Session` moves bytes through a confidential channel.

    with Client() as client, client.open_session(name="server-0") as s:
        w = s.alloc_region(n, readonly=True); w.array[:] = weights; w.seal()
        s.h2d(w, 0, n, dst)          # dst: numpy array or CPU tensor; the endpoint decrypts into it

A session is not thread-safe: use one per thread, or the asyncio client.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._core import (
    TICKET_KEY,
    DaemonError,
    Handshake,
    Intent,
    Landing,
    SessionCore,
    from_error_frame,
    from_rpc_error,
    swap_order_value,
)
from ._dataplane import DaemonUnavailable, FrameSocket, default_socket
from ._gen.pipellm.v1 import pipellm_pb2 as pb
from ._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from .errors import ChannelDead, PipeLLMError, TagMismatch
from .regions import Region

T = TypeVar("T")
_log = logging.getLogger("pipellm_client")
_RETRIES_ON_ABORT = 2


def _welcome(fs: FrameSocket) -> pb.Welcome:
    frame, fds = fs.recv()
    fs.greeted()
    for fd in fds:
        os.close(fd)
    if frame.WhichOneof("body") == "error":
        raise from_error_frame(frame.error)
    if frame.WhichOneof("body") != "welcome":
        raise PipeLLMError("pipellmd did not greet this connection")
    return frame.welcome


class Client:
    def __init__(
        self, socket: str | None = None, *, timeout: float = 30.0, daemon_uids: Collection[int] | None = None
    ) -> None:
        """`daemon_uids`: the uids pipellmd may run as (checked by SO_PEERCRED before anything is sent);
        default `PIPELLM_DAEMON_UIDS`, else root, the user "pipellm" and our own uid."""
        self.socket = socket or default_socket()
        self.timeout = timeout
        self.daemon_uids = None if daemon_uids is None else frozenset(daemon_uids)
        self._channel = grpc.insecure_channel("unix:" + self.socket)
        self._stub = pb_grpc.PipeLLMStub(self._channel)
        self._ctl: FrameSocket | None = None
        self._ticket = ""
        self.sessions: list[Session] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> list[tuple[str, str]]:
        if self._ctl is None:
            self._ctl = FrameSocket(self.socket, self.timeout, self.daemon_uids)
            self._ticket = _welcome(self._ctl).ticket
        return [(TICKET_KEY, self._ticket)]

    def call(self, method: Callable[..., T], request: Any, metadata: list[tuple[str, str]] | None = None) -> T:
        try:
            return method(request, metadata=metadata or self._metadata(), timeout=self.timeout)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if metadata is None and err.code == grpc.StatusCode.PERMISSION_DENIED and "ticket" in err.details:
                # The daemon restarted: our control connection's ticket died with it. Greet it again, once.
                self._drop_ctl()
                return self.call(method, request, [(TICKET_KEY, self._greet())])
            if err.code == grpc.StatusCode.UNAVAILABLE:
                raise DaemonUnavailable(f"pipellmd at {self.socket} is unavailable: {err.details}") from None
            raise err from None

    def _greet(self) -> str:
        self._metadata()
        return self._ticket

    def _drop_ctl(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None

    def status(self) -> pb.Status:
        status: pb.Status = self.call(self._stub.GetStatus, pb.GetStatusRequest())
        return status

    def list_sessions(self) -> list[pb.SessionStatus]:
        return list(self.call(self._stub.ListSessions, pb.ListSessionsRequest()).sessions)

    def watch(self) -> Iterator[pb.Event]:
        try:
            yield from self._stub.Watch(pb.WatchRequest(), metadata=self._metadata())
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(exc) from None

    def health(self) -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise DaemonUnavailable(f"health check failed: {from_rpc_error(exc)}") from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def open_session(
        self,
        name: str = "",
        *,
        channels: int = 2,
        swap_order: str = "fifo",
        verify: str | int = "all",
        endpoint: str = "cpu",
        device: int | None = None,
        device_staging: bool = True,
        small_transfer_threshold: int | None = None,
        recover: bool = False,
        max_rekeys: int = 3,
        allow_plain: bool = False,
        allow_unverified: bool = False,
    ) -> Session:
        """Open a session: a fresh key agreement, its own channels, arena and regions.

        With `recover=True`, a transfer that fails because the channel died (a tag failure: tampering, or a
        bug) is retried once on a new session with new keys, from the plaintext (never by resending old
        ciphertext); every such death stays visible (daemon log, counters, `Session.rekeys`).

        Downgrades need an explicit opt-in: `allow_plain=True` accepts a daemon in plain mode (NO
        ENCRYPTION), `allow_unverified=True` lets a benchmark pass `verify=N` (decrypt one DATA message in N).
        """
        opts = _SessionOptions(
            name,
            channels,
            swap_order,
            verify,
            endpoint,
            device,
            device_staging,
            small_transfer_threshold,
            recover,
            max_rekeys,
            allow_plain,
            allow_unverified,
        )
        fs, md, core = self._connect(opts)
        s = Session(self, fs, md, core, opts)
        self.sessions.append(s)
        return s

    def _connect(self, o: _SessionOptions) -> tuple[FrameSocket, list[tuple[str, str]], SessionCore]:
        """Data-plane connection, key agreement, OpenSession, arena, device staging: a ready SessionCore."""
        fs = FrameSocket(self.socket, self.timeout, self.daemon_uids)
        try:
            welcome = _welcome(fs)
            hs = Handshake(welcome.daemon_public_key, o.channels)
            md = [(TICKET_KEY, welcome.ticket)]
            req = hs.request(
                client_name=o.name,
                endpoint=o.endpoint,
                swap_order=swap_order_value(o.swap_order),
                small_transfer_threshold=o.small_transfer_threshold,
                allow_plain=o.allow_plain,
                verify=o.verify,
                allow_unverified=o.allow_unverified,
            )
            resp = self.call(self._stub.OpenSession, req, md)
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
                frame, fds = fs.recv()
                core.handle(frame, fds)
            staging = core.staging_request() if o.device_staging else None
            if staging is not None:
                try:
                    self.call(self._stub.AttachDeviceStaging, staging, md)
                except DaemonError:
                    core.staging_refused()  # no speculative DMA: the endpoint copies from the arena itself
        except BaseException:
            fs.close()
            raise
        return fs, md, core

    def close(self) -> None:
        for s in list(self.sessions):
            s.close()
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        self._channel.close()


@dataclass(frozen=True)
class _SessionOptions:
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


class Session:
    def __init__(
        self,
        client: Client,
        fs: FrameSocket,
        metadata: list[tuple[str, str]],
        core: SessionCore,
        options: _SessionOptions,
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

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session {self.id} regions={len(self.core.regions)}>"

    # -- frames --------------------------------------------------------------------------------------
    def _pump(self, until: Callable[[], bool]) -> None:
        """Read data-plane frames and act on them until `until()` holds."""
        while not until():
            self._act(*self.fs.recv())

    def poll(self) -> None:
        """Act on whatever the daemon has sent so far (landed D2H data, errors) without waiting."""
        while True:
            try:
                frame, fds = self.fs.recv(block=False)
            except BlockingIOError:
                return
            self._act(frame, fds)

    def _act(self, frame: pb.Frame, fds: list[int]) -> None:
        try:
            reply, err = self.core.handle(frame, fds)
        except PipeLLMError as exc:
            with contextlib.suppress(DaemonUnavailable):
                self.fs.send(self.core.endpoint_failure(exc))
            raise
        if reply is not None:
            # The bytes are already in place; a daemon that went away needs no release.
            with contextlib.suppress(DaemonUnavailable):
                self.fs.send(reply)
        for landed in self.core.drain_d2h():  # slots the daemon freed take queued D2H ciphertext
            self.fs.send(landed)
        if err is not None:
            raise err

    @property
    def small_transfer_threshold(self) -> int:
        """Transfers below this take the second channel and are never speculated (per session)."""
        return self.core.small_threshold

    @property
    def generation_granule(self) -> int:
        """Bytes covered by one write generation of a mutable region: pad KV blocks to it."""
        return self.core.granule

    # -- regions -------------------------------------------------------------------------------------
    def alloc_region(
        self, nbytes: int, *, readonly: bool = False, name: str = "", adapter: bool = False, data: Any = None
    ) -> Region:
        """Shared memory the daemon maps. With `data`, a read-only region is filled and sealed at once."""
        core = self.core
        shm, offer, req = core.new_region_memory(nbytes, readonly=readonly, name=name, adapter=adapter)
        try:
            self.fs.send(offer, fds=[shm.fd])
            resp: pb.RegisterRegionResponse = self.client.call(self.client._stub.RegisterRegion, req, self.metadata)
        except BaseException:
            shm.close()
            raise
        region = Region(resp.region_id, name, shm, nbytes, readonly, core.granule, self._wait_landed, self._seal_remote)
        region.adapter = adapter
        core.regions[region.id] = region
        if data is not None:
            core.fill(region, data)
        return region

    def _seal_remote(self, region: Region) -> None:
        self.client.call(
            self.client._stub.SealRegion,
            pb.SealRegionRequest(session_id=self.id, region_id=region.id),
            self.metadata,
        )

    def _wait_landed(self, region: Region, offset: int, length: int) -> None:
        core = self.core
        landings = core.landings_over(region, offset, length)
        self._pump(lambda: all(x.done for x in landings))
        for x in landings:
            if x.error is not None:
                raise x.error

    def unregister(self, region: Region) -> None:
        self._wait_landed(region, 0, region.size)
        self.client.call(
            self.client._stub.UnregisterRegion,
            pb.UnregisterRegionRequest(session_id=self.id, region_id=region.id),
            self.metadata,
        )
        self.core.regions.pop(region.id, None)
        region.close()

    # -- transfers -----------------------------------------------------------------------------------
    def h2d(self, region: Region, offset: int, length: int, dst: Any, *, unpredicted: bool = False) -> None:
        """Move region bytes to `dst` through the channel; returns when the endpoint has verified them."""
        self.h2d_many([(region, offset, length, dst)], unpredicted=unpredicted)

    def h2d_many(self, transfers: Sequence[tuple[Region, int, int, Any]], *, unpredicted: bool = False) -> None:
        """Several transfers in one commit (one data-plane round trip)."""
        items = [(r, o, n, d, unpredicted) for (r, o, n, d) in transfers]
        self._recovering(lambda: self._commit(items))

    def _recovering(self, op: Callable[[], T]) -> T:
        """Run a transfer; if the channel died under it and the session may recover, re-key and retry once."""
        try:
            return op()
        except (ChannelDead, DaemonError) as exc:
            if isinstance(exc, DaemonError) and exc.code != grpc.StatusCode.DATA_LOSS:
                raise
            self.deaths.append(str(exc))
            if not self.options.recover or self.rekeys >= self.options.max_rekeys:
                raise
            _log.warning("pipellm session %s: channel died (%s); re-keying and retrying from plaintext", self.id, exc)
            self.rekey()
            return op()

    def rekey(self) -> None:
        """Replace a dead session's channels: a fresh key agreement and arena, the same Region objects.

        The regions' memory is offered again (new region ids, read-only ones sealed again); cyclic intents
        are declared again. Nothing encrypted under the old keys is ever used again.
        """
        old_fs, old_core = self.fs, self.core
        fs, md, core = self.client._connect(self.options)
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
                resp: pb.RegisterRegionResponse = self.client.call(self.client._stub.RegisterRegion, req, md)
                region.id = resp.region_id
                core.regions[region.id] = region
                if region.sealed:
                    self.client.call(
                        self.client._stub.SealRegion, pb.SealRegionRequest(session_id=core.id, region_id=region.id), md
                    )
        except BaseException:
            core.regions.clear()
            fs.close()
            core.close()
            raise
        old_core.regions.clear()  # the Region objects live on in the new session
        old_fs.close()
        old_core.close()
        self.fs, self.metadata, self.core, self.id = fs, md, core, core.id
        self.rekeys += 1
        if self._cyclic_intents:
            self.declare(self._cyclic_intents, replace=True, cyclic=True)

    def _commit(self, items: list[tuple[Region, int, int, Any, bool]]) -> None:
        for r, o, n, _d, _u in items:
            # A swap-in of a range whose swap-out still waits for a D2H slot: the daemon must see it first
            # (it then holds the commit until that decryption has landed).
            self._pump(lambda r=r, o=o, n=n: not self.core.queued_over(r, o, n))  # type: ignore[misc]
        for attempt in range(_RETRIES_ON_ABORT + 1):
            try:
                frame, pending = self.core.commit_frame(items)
            except TagMismatch as exc:  # the endpoint refused a record taken from the ring: tell the daemon
                with contextlib.suppress(DaemonUnavailable):
                    self.fs.send(self.core.endpoint_failure(exc))
                raise
            if frame is None:
                return  # every chunk was a hit taken from the delivery ring: no round trip
            self.fs.send(frame)
            self._pump(lambda p=pending: p.done)  # type: ignore[misc]
            if pending.error is None:
                return
            # ABORTED: a worker died; the daemon abandoned those IVs. Retry from plaintext, new IVs.
            if pending.error.code != grpc.StatusCode.ABORTED or attempt == _RETRIES_ON_ABORT:
                raise pending.error
            self.aborted_retries += 1

    def d2h(
        self,
        src: Any,
        region: Region,
        offset: int,
        *,
        swap_out: bool = False,
        group: int = 0,
        wait: bool = False,
    ) -> list[Landing]:
        """Encrypt device data at the endpoint and land it in `region`; the daemon decrypts asynchronously.

        A later `region.read`, `region.write` or H2D of the range waits for it. `swap_out=True` tells the
        daemon the block will come back (a KV swap), so it pre-encrypts it for the swap-in. Returns the
        landings (each with `.done` and `.error`; `poll()` updates them without waiting). With `wait=True`
        a session opened with `recover=True` also re-keys and re-sends `src` if the channel dies.
        """
        if wait:
            return self._recovering(lambda: self._d2h(src, region, offset, swap_out, group, True))
        return self._d2h(src, region, offset, swap_out, group, False)

    def _d2h(self, src: Any, region: Region, offset: int, swap_out: bool, group: int, wait: bool) -> list[Landing]:
        data = self.core.endpoint.source_view(src)
        if self.core.mode == pb.MODE_PLAIN:
            region.write(offset, self.core.endpoint.to_host(data))  # plain mode (NO ENCRYPTION): a direct copy
            return []
        landings: list[Landing] = []
        gen = self.core.landed_frames(data, region, offset, swap_out=swap_out, group=group)
        while True:
            # Never waits on a CPU endpoint: without a free slot the ciphertext queues (core.drain_d2h).
            self._pump(lambda: bool(self.core.d2h_free) or self.core.can_queue_d2h())
            try:
                frame, landing = next(gen)
            except StopIteration:
                break
            if frame is not None:
                self.fs.send(frame)
            landings.append(landing)
        if wait:
            self._wait_landed(region, offset, data.nbytes)
        return landings

    def wait_all(self) -> None:
        """Until every D2H transfer of this session has landed."""
        self._pump(lambda: not self.core.landing)

    # -- intents ------------------------------------------------------------------------------------
    def declare(self, intents: Sequence[Intent], *, replace: bool = False, cyclic: bool = False) -> int:
        """Tell the daemon what will be transferred next, so it encrypts it ahead.

        Fire-and-forget: the intents travel as data-plane frames, in order with commits, and the call never
        waits for the daemon; a refusal (an unknown region, a range outside it, too many intents) is raised
        at the session's next call. Returns the number of intents sent.
        """
        if cyclic:
            self._cyclic_intents = list(intents)  # declared again after a re-key
        elif replace:
            self._cyclic_intents = []
        for frame in self.core.declare_frames(intents, replace=replace, cyclic=cyclic):
            self.fs.send(frame)
        return len(intents)

    def cancel_intents(self) -> None:
        """Drop every pending intent and the declared cycle (fire-and-forget, like `declare`)."""
        self.fs.send(self.core.cancel_frame())

    def status(self) -> pb.SessionStatus:
        resp: pb.ListSessionsResponse = self.client.call(
            self.client._stub.ListSessions, pb.ListSessionsRequest(), self.metadata
        )
        return self.core.own_status(resp)

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

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.core.dead is None:
                self.wait_all()
                self.client.call(
                    self.client._stub.CloseSession, pb.CloseSessionRequest(session_id=self.id), self.metadata
                )
        except (PipeLLMError, grpc.RpcError):
            pass
        finally:
            self.fs.close()
            self.core.close()
            if self in self.client.sessions:
                self.client.sessions.remove(self)
