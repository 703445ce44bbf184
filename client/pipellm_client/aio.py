"""The asyncio SDK: the same sessions as `pipellm_client.Client`, for serving code that runs an event loop.

    async with AsyncClient() as client:
        s = await client.open_session("server-0")
        w = await s.alloc_region(n, readonly=True, data=weights)
        await s.h2d(w, 0, n, dst)

Several commits may be in flight at once; the daemon serves them in order. The data-plane socket is read
by a loop reader callback, so waiting costs no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._core import (
    TICKET_KEY,
    DaemonError,
    Handshake,
    Intent,
    Landing,
    SessionCore,
    as_source_view,
    from_rpc_error,
    swap_order_value,
)
from ._dataplane import DaemonUnavailable, FrameSocket, default_socket
from ._gen.pipellm.v1 import pipellm_pb2 as pb
from ._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from .client import _welcome
from .errors import InvalidArgument, PipeLLMError, TagMismatch
from .regions import Region

T = TypeVar("T")
_RETRIES_ON_ABORT = 2


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
        self.sessions: list[AsyncSession] = []

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _metadata(self) -> list[tuple[str, str]]:
        if self._ctl is None:
            fs = FrameSocket(self.socket, self.timeout, self.daemon_uids)
            welcome = await asyncio.to_thread(_welcome, fs)
            self._ctl, self._ticket = fs, welcome.ticket
        return [(TICKET_KEY, self._ticket)]

    async def call(
        self, method: Callable[..., Any], request: Any, metadata: list[tuple[str, str]] | None = None
    ) -> Any:
        try:
            return await method(request, metadata=metadata or await self._metadata(), timeout=self.timeout)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if err.code == grpc.StatusCode.UNAVAILABLE:
                raise DaemonUnavailable(f"pipellmd at {self.socket} is unavailable: {err.details}") from None
            raise err from None

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
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

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
        allow_plain: bool = False,
        allow_unverified: bool = False,
    ) -> AsyncSession:
        fs = FrameSocket(self.socket, self.timeout, self.daemon_uids)
        try:
            welcome = await asyncio.to_thread(_welcome, fs)
            hs = Handshake(welcome.daemon_public_key, channels)
            md = [(TICKET_KEY, welcome.ticket)]
            req = hs.request(
                client_name=name,
                endpoint=endpoint,
                swap_order=swap_order_value(swap_order),
                small_transfer_threshold=small_transfer_threshold,
                allow_plain=allow_plain,
                verify=verify,
                allow_unverified=allow_unverified,
            )
            resp: pb.OpenSessionResponse = await self.call(self._stub.OpenSession, req, md)
            core = SessionCore(
                resp,
                hs.secrets(resp.channels),
                verify,
                endpoint=endpoint,
                device=device,
                allow_plain=allow_plain,
                allow_unverified=allow_unverified,
            )
            s = AsyncSession(self, fs, md, core)
            await s._until(lambda: core.arena is not None)
            staging = core.staging_request() if device_staging else None
            if staging is not None:
                try:
                    await self.call(self._stub.AttachDeviceStaging, staging, md)
                except DaemonError:
                    core.staging_refused()  # no speculative DMA: the endpoint copies from the arena itself
        except BaseException:
            fs.close()
            raise
        self.sessions.append(s)
        return s

    async def close(self) -> None:
        for s in list(self.sessions):
            await s.close()
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        await self._channel.close()


class AsyncSession:
    def __init__(
        self, client: AsyncClient, fs: FrameSocket, metadata: list[tuple[str, str]], core: SessionCore
    ) -> None:
        self.client = client
        self.fs = fs
        self.metadata = metadata
        self.core = core
        self.id = core.id
        self.closed = False
        self.aborted_retries = 0  # commits retried from plaintext after a worker died under them (ABORTED)
        self._loop = asyncio.get_running_loop()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._failure: BaseException | None = None
        self._d2h_lock = asyncio.Lock()  # D2H messages must reach the daemon in the order they were encrypted
        self._loop.add_reader(fs.fileno(), self._on_readable)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- frames --------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        for _ in range(64):
            try:
                frame, fds = self.fs.recv(block=False)
            except BlockingIOError:
                break
            except PipeLLMError as exc:
                self._fail(exc)
                return
            try:
                reply, err = self.core.handle(frame, fds)
            except PipeLLMError as exc:
                with contextlib.suppress(DaemonUnavailable, BlockingIOError):
                    self.fs.send(self.core.endpoint_failure(exc))
                self._fail(exc)
                return
            if reply is not None:
                with contextlib.suppress(DaemonUnavailable):
                    self.fs.send(reply)
            with contextlib.suppress(DaemonUnavailable):
                for landed in self.core.drain_d2h():  # slots the daemon freed take queued D2H ciphertext
                    self.fs.send(landed)
            if err is not None:
                self._fail(err)
                return
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

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.fs.fileno())
        for _pred, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters = []

    async def _until(self, pred: Callable[[], bool]) -> None:
        if self._failure is not None:
            raise self._failure
        if pred():
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((pred, fut))
        await fut

    # -- regions -------------------------------------------------------------------------------------
    async def alloc_region(
        self, nbytes: int, *, readonly: bool = False, name: str = "", adapter: bool = False, data: Any = None
    ) -> Region:
        core = self.core
        shm, offer, req = core.new_region_memory(nbytes, readonly=readonly, name=name, adapter=adapter)
        try:
            self.fs.send(offer, fds=[shm.fd])
            resp: pb.RegisterRegionResponse = await self.client.call(
                self.client._stub.RegisterRegion, req, self.metadata
            )
        except BaseException:
            shm.close()
            raise
        # Region methods that wait are synchronous by nature (numpy views); here they may only wait on
        # data that already landed: use `await session.wait_landed(...)` before touching a landing range.
        region = Region(resp.region_id, name, shm, nbytes, readonly, core.granule, self._check_landed, self._no_seal)
        core.regions[region.id] = region
        if data is not None:
            raw = as_source_view(data)
            if len(raw) > nbytes:
                raise InvalidArgument(f"data of {len(raw)} bytes does not fit a region of {nbytes}")
            if readonly:
                region.array[: len(raw)] = np.frombuffer(raw, np.uint8)
                await self.seal(region)
            else:
                region.write(0, raw)
        return region

    def _check_landed(self, region: Region, offset: int, length: int) -> None:
        pending = [x for x in self.core.landings_over(region, offset, length) if not x.done]
        if pending:
            raise PipeLLMError(f"{region!r}: D2H data is still landing; await session.wait_landed() first")

    @staticmethod
    def _no_seal(region: Region) -> None:
        raise PipeLLMError("use `await session.seal(region)` with the asyncio client")

    async def seal(self, region: Region) -> None:
        if region.sealed:
            return
        region.shm.seal_readonly()
        region.array.flags.writeable = False
        await self.client.call(
            self.client._stub.SealRegion, pb.SealRegionRequest(session_id=self.id, region_id=region.id), self.metadata
        )
        region.sealed = True

    async def wait_landed(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        length = region.size - offset if length is None else length
        landings = self.core.landings_over(region, offset, length)
        await self._until(lambda: all(x.done for x in landings))
        for x in landings:
            if x.error is not None:
                raise x.error

    async def unregister(self, region: Region) -> None:
        await self.wait_landed(region)
        await self.client.call(
            self.client._stub.UnregisterRegion,
            pb.UnregisterRegionRequest(session_id=self.id, region_id=region.id),
            self.metadata,
        )
        self.core.regions.pop(region.id, None)
        region.close()

    # -- transfers -----------------------------------------------------------------------------------
    async def h2d(self, region: Region, offset: int, length: int, dst: Any, *, unpredicted: bool = False) -> None:
        await self.h2d_many([(region, offset, length, dst)], unpredicted=unpredicted)

    async def h2d_many(self, transfers: Sequence[tuple[Region, int, int, Any]], *, unpredicted: bool = False) -> None:
        items = [(r, o, n, d, unpredicted) for (r, o, n, d) in transfers]
        for r, o, n, _d, _u in items:
            await self.wait_landed(r, o, n)
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
            await self._until(lambda p=pending: p.done)  # type: ignore[misc]
            if pending.error is None:
                return
            if pending.error.code != grpc.StatusCode.ABORTED or attempt == _RETRIES_ON_ABORT:
                raise pending.error
            self.aborted_retries += 1

    async def d2h(
        self, src: Any, region: Region, offset: int, *, swap_out: bool = False, group: int = 0, wait: bool = False
    ) -> list[Landing]:
        data = self.core.endpoint.source_view(src)
        if self.core.mode == pb.MODE_PLAIN:
            region.write(offset, self.core.endpoint.to_host(data))  # plain mode (NO ENCRYPTION): a direct copy
            return []
        landings: list[Landing] = []
        async with self._d2h_lock:
            gen = self.core.landed_frames(data, region, offset, swap_out=swap_out, group=group)
            while True:
                # Never waits on a CPU endpoint: without a free slot the ciphertext queues (core.drain_d2h).
                await self._until(lambda: bool(self.core.d2h_free) or self.core.can_queue_d2h())
                try:
                    frame, landing = next(gen)
                except StopIteration:
                    break
                if frame is not None:
                    self.fs.send(frame)
                landings.append(landing)
        if wait:
            await self.wait_landed(region, offset, data.nbytes)
        return landings

    async def wait_all(self) -> None:
        await self._until(lambda: not self.core.landing)

    async def declare(self, intents: Sequence[Intent], *, replace: bool = False, cyclic: bool = False) -> int:
        """Tell the daemon what will be transferred next (fire-and-forget on the data plane; a refusal is
        raised at a later call). Returns the number of intents sent."""
        for frame in self.core.declare_frames(intents, replace=replace, cyclic=cyclic):
            self.fs.send(frame)
        return len(intents)

    async def cancel_intents(self) -> None:
        """Drop every pending intent and the declared cycle (fire-and-forget, like `declare`)."""
        self.fs.send(self.core.cancel_frame())

    async def status(self) -> pb.SessionStatus:
        resp: pb.ListSessionsResponse = await self.client.call(
            self.client._stub.ListSessions, pb.ListSessionsRequest(), self.metadata
        )
        return self.core.own_status(resp)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.core.dead is None and self._failure is None:
                await self.wait_all()
                await self.client.call(
                    self.client._stub.CloseSession, pb.CloseSessionRequest(session_id=self.id), self.metadata
                )
        except (PipeLLMError, grpc.RpcError):
            pass
        finally:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.fs.fileno())
            self.fs.close()
            self.core.close()
            if self in self.client.sessions:
                self.client.sessions.remove(self)
