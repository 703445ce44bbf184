"""The asyncio SDK: the same sessions as `pipellm_client.Client`, for serving code that runs an event loop.

    async with AsyncClient() as client:
        s = await client.open_session("server-0")
        w = await s.alloc_region(n, readonly=True, data=weights)
        await s.h2d(w, 0, n, dst)

`AsyncClient`/`AsyncSession` mirror `Client`/`Session` method for method (names, arguments, semantics,
`recover`/`max_rekeys` included); both run the same operations (`_session_common`), this one awaited.
Several commits may be in flight at once; the daemon serves them in order. The data-plane socket is read
by a loop reader callback, so waiting costs no thread. Region methods (`read`, `write`, `seal`) cannot
await: `await session.wait_landed(...)` before touching a landing range, `await session.seal(region)`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._core import DaemonError, Intent, Landing, SessionCore, from_rpc_error
from ._dataplane import DaemonUnavailable, FrameSocket, default_socket
from ._gen.pipellm.v1 import pipellm_pb2 as pb
from ._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from ._session_common import (
    Blocking,
    Call,
    Metadata,
    Poll,
    SessionBase,
    SessionOptions,
    Step,
    Steps,
    Transfer,
    Wait,
    advance,
    connect_steps,
    greet,
    on_frame,
    rpc_failure,
    serving_status,
    stale_ticket,
)
from .errors import ChannelDead, PipeLLMError
from .regions import Region
from .wire import TICKET_KEY

T = TypeVar("T")


class AsyncClient:
    def __init__(
        self, socket: str | None = None, *, timeout: float = 30.0, daemon_uids: Collection[int] | None = None
    ) -> None:
        """`daemon_uids`: the uids pipellmd may run as (checked by SO_PEERCRED before anything is sent);
        default `PIPELLM_DAEMON_UIDS`, else root, the user "pipellm" and our own uid."""
        self.socket = socket or default_socket()
        self.timeout = timeout
        self.daemon_uids = None if daemon_uids is None else frozenset(daemon_uids)
        self._channel = grpc.aio.insecure_channel("unix:" + self.socket)
        self._stub = pb_grpc.PipeLLMStub(self._channel)
        self._ctl: FrameSocket | None = None
        self._ticket = ""
        self._greeting = asyncio.Lock()  # concurrent first calls greet the daemon once
        self.sessions: list[AsyncSession] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once `close()` has run: a stream that ends then was ended by us, not by the daemon."""
        return self._closed

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _metadata(self) -> Metadata:
        if self._ctl is None:
            async with self._greeting:
                if self._ctl is None:
                    self._ctl, self._ticket = await asyncio.to_thread(greet, self)
        return [(TICKET_KEY, self._ticket)]

    async def call(self, method: Callable[..., Any], request: Any, metadata: Metadata | None = None) -> Any:
        md = metadata or await self._metadata()
        try:
            return await method(request, metadata=md, timeout=self.timeout)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if stale_ticket(err, metadata):
                # The daemon restarted: our control connection's ticket died with it. Greet it again, once
                # (unless a concurrent call already has: then its new ticket is the one to use).
                if self._ticket == md[0][1]:
                    self._drop_ctl()
                return await self.call(method, request, [(TICKET_KEY, await self._greet())])
            raise rpc_failure(err, self.socket) from None

    async def _greet(self) -> str:
        await self._metadata()
        return self._ticket

    def _drop_ctl(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None

    async def status(self) -> pb.Status:
        status: pb.Status = await self.call(self._stub.GetStatus, pb.GetStatusRequest())
        return status

    async def list_sessions(self) -> list[pb.SessionStatus]:
        resp: pb.ListSessionsResponse = await self.call(self._stub.ListSessions, pb.ListSessionsRequest())
        return list(resp.sessions)

    async def watch(self) -> AsyncIterator[pb.Event]:
        call = self._stub.Watch(pb.WatchRequest(), metadata=await self._metadata())
        try:
            async for ev in call:
                yield ev
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def health(self) -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise DaemonUnavailable(f"health check failed: {from_rpc_error(exc)}") from None
        return serving_status(resp)

    async def open_session(
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
    ) -> AsyncSession:
        """Open a session: a fresh key agreement, its own channels, arena and regions (as `Client.open_session`).

        With `recover=True`, a transfer that fails because the channel died is retried once on a new session
        with new keys, from the plaintext; every such death stays visible (`AsyncSession.deaths`, `.rekeys`).
        """
        opts = SessionOptions(
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
        fs, md, core = await _drive(connect_steps(self, opts), self)
        try:
            s = AsyncSession(self, fs, md, core, opts)
        except BaseException:
            fs.close()
            core.close()
            raise
        self.sessions.append(s)
        return s

    async def close(self) -> None:
        self._closed = True
        for s in list(self.sessions):
            await s.close()
        self._drop_ctl()
        await self._channel.close()


async def _drive(steps: Steps[T], client: AsyncClient, session: AsyncSession | None = None) -> T:
    """Run a shared operation (`_session_common`) to its end, awaiting each step it takes."""
    reply: Any = None
    failure: BaseException | None = None
    while True:
        step, result = advance(steps, reply, failure)
        if step is None:
            return cast(T, result)
        reply, failure = None, None
        try:
            reply = await _take(step, client, session)
        except BaseException as exc:  # thrown into the operation, which cleans up and usually re-raises it
            failure = exc


async def _take(step: Step, client: AsyncClient, session: AsyncSession | None) -> Any:
    if isinstance(step, Call):
        return await client.call(getattr(client._stub, step.method), step.request, step.metadata)
    if isinstance(step, Blocking):
        return await asyncio.to_thread(step.fn)
    assert session is not None, step
    if isinstance(step, Wait):
        await session._until(step.until)
    elif isinstance(step, Poll):
        session._read_arrived()  # as the loop's reader callback would, a little sooner
    else:
        async with session._rekeying:  # the calls that saw this death wait for one re-key
            if session.core is step.dead:
                await session.rekey()
    return None


class AsyncSession(SessionBase):
    """`Session` for an event loop: the same methods, awaited. Calls may run concurrently (commits are
    served in order); the data-plane socket is read by a loop reader callback, so waiting costs no thread."""

    client: AsyncClient

    def __init__(
        self, client: AsyncClient, fs: FrameSocket, metadata: Metadata, core: SessionCore, options: SessionOptions
    ) -> None:
        super().__init__(client, fs, metadata, core, options)
        self._loop = asyncio.get_running_loop()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._broken: BaseException | None = None  # the connection or its channel failed: every wait raises it
        self._unclaimed: DaemonError | None = None  # an error frame no call waited for: the next wait raises it
        self._rekeying = asyncio.Lock()
        self._loop.add_reader(fs.fileno(), self._on_readable)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- frames --------------------------------------------------------------------------------------
    def _read_arrived(self) -> None:
        if self._broken is None:
            self._on_readable()

    def _on_readable(self) -> None:
        for _ in range(64):
            try:
                frame, fds = self.fs.recv(block=False)
            except BlockingIOError:
                break
            except Exception as exc:
                self._fail(exc)
                return
            try:
                err = on_frame(self.core, self.fs, frame, fds)
            except Exception as exc:  # what the sync client raises from the call reading the frame
                self._fail(exc)
                return
            if err is not None:
                if self.core.dead is not None:
                    self._fail(err)
                    return
                self._raise_once(err)
        self._wake()

    def _wake(self) -> None:
        still = []
        for pred, fut in self._waiters:
            if fut.done():
                continue
            if pred():
                fut.set_result(None)
            else:
                still.append((pred, fut))
        self._waiters = still

    def _raise_once(self, err: DaemonError) -> None:
        """An error frame for no request: the sync client raises it from the call that reads it, so here the
        oldest waiting call raises it, or the next one to wait."""
        for i, (_pred, fut) in enumerate(self._waiters):
            if not fut.done():
                fut.set_exception(err)
                del self._waiters[i]
                return
        self._unclaimed = err

    def _fail(self, exc: BaseException) -> None:
        self._broken = exc
        self._unwatch()
        for _pred, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters = []

    def _unwatch(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.fs.fileno())

    async def _until(self, pred: Callable[[], bool]) -> None:
        if self._broken is not None:
            raise self._broken
        if self._unclaimed is not None:
            err, self._unclaimed = self._unclaimed, None
            raise err
        if pred():
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((pred, fut))
        await fut

    # -- hooks ---------------------------------------------------------------------------------------
    def _region_waits(self, region: Region, offset: int, length: int) -> None:
        # Region methods are synchronous (numpy views): here they may only touch data that already landed.
        if any(not x.done for x in self.core.landings_over(region, offset, length)):
            raise PipeLLMError(f"{region!r}: D2H data is still landing; await session.wait_landed() first")

    def _region_seals(self, region: Region) -> None:
        raise PipeLLMError("use `await session.seal(region)` with the asyncio client")

    def _swap(self, fs: FrameSocket, metadata: Metadata, core: SessionCore) -> None:
        self._unwatch()
        super()._swap(fs, metadata, core)
        self._broken = self._unclaimed = None
        stale, self._waiters = self._waiters, []
        for _pred, fut in stale:  # they waited on the old channels: their calls fail (or recover)
            if not fut.done():
                fut.set_exception(ChannelDead("the session was re-keyed under this call"))
        self._loop.add_reader(fs.fileno(), self._on_readable)

    def _may_say_goodbye(self) -> bool:
        return super()._may_say_goodbye() and self._broken is None

    def _release(self) -> None:
        self._unwatch()
        super()._release()

    async def poll(self) -> None:
        """Act on whatever the daemon has sent so far without waiting (the event loop also does this by
        itself), and raise an error the session saw that no call has raised yet."""
        self._read_arrived()
        await self._until(lambda: True)

    # -- regions -------------------------------------------------------------------------------------
    async def alloc_region(
        self, nbytes: int, *, readonly: bool = False, name: str = "", adapter: bool = False, data: Any = None
    ) -> Region:
        """Shared memory the daemon maps. With `data`, a read-only region is filled and sealed at once."""
        return await _drive(self._alloc_steps(nbytes, readonly, name, adapter, data), self.client, self)

    async def seal(self, region: Region) -> None:
        """Freeze a read-only region once loaded (`region.seal()` cannot await the daemon here)."""
        await _drive(self._seal_steps(region), self.client, self)

    async def wait_landed(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        """Until the D2H data landing in [offset, offset+length) has been decrypted and verified (raises its
        error); `region.read`/`write` refuse a range that is still landing instead of waiting."""
        await _drive(self._landed_steps(region, offset, length), self.client, self)

    async def unregister(self, region: Region) -> None:
        """Free a region, once the D2H data landing in it is in."""
        await _drive(self._unregister_steps(region), self.client, self)

    # -- transfers -----------------------------------------------------------------------------------
    async def h2d(self, region: Region, offset: int, length: int, dst: Any, *, unpredicted: bool = False) -> None:
        """Move region bytes to `dst` through the channel; returns when the endpoint has verified them."""
        if not self._ring_hit(region, offset, length, dst, unpredicted):
            await self.h2d_many([(region, offset, length, dst)], unpredicted=unpredicted)

    async def h2d_many(self, transfers: Sequence[Transfer], *, unpredicted: bool = False) -> None:
        """Several transfers in one commit (one data-plane round trip)."""
        await _drive(self._h2d_steps(transfers, unpredicted), self.client, self)

    async def rekey(self) -> None:
        """Replace the session's channels: a fresh key agreement and arena, the same Region objects (see
        `Session.rekey`). Calls waiting on the old channels fail with ChannelDead, or recover."""
        await _drive(self._rekey_steps(), self.client, self)

    async def d2h(
        self,
        src: Any,
        region: Region,
        offset: int,
        *,
        swap_out: bool = False,
        group: int = 0,
        wait: bool = False,
    ) -> list[Landing]:
        """Encrypt device data at the endpoint and land it in `region`; the daemon decrypts asynchronously
        (see `Session.d2h`). With `wait=True` a session opened with `recover=True` also re-keys and re-sends."""
        return await _drive(self._d2h_steps(src, region, offset, swap_out, group, wait), self.client, self)

    async def wait_all(self) -> None:
        """Until every D2H transfer of this session has landed."""
        await _drive(self._wait_all_steps(), self.client, self)

    # -- intents ------------------------------------------------------------------------------------
    async def declare(self, intents: Sequence[Intent], *, replace: bool = False, cyclic: bool = False) -> int:
        """Tell the daemon what will be transferred next (fire-and-forget on the data plane; a refusal is
        raised at a later call). Returns the number of intents sent."""
        return self._declare(intents, replace, cyclic)

    async def cancel_intents(self) -> None:
        """Drop every pending intent and the declared cycle (fire-and-forget, like `declare`)."""
        self._cancel_intents()

    async def status(self) -> pb.SessionStatus:
        """This session's status at the daemon: channels, counters, pending intents."""
        return await _drive(self._status_steps(), self.client, self)

    async def close(self) -> None:
        """Wait for landings, close the session at the daemon and free its memory (idempotent)."""
        await _drive(self._close_steps(), self.client, self)
