"""gRPC method -> session manager. Validation and status codes live here; lifecycle lives in server.py.

Visibility: a caller sees only its own uid's sessions (ListSessions, GetStatus) and their events (Watch),
unless its uid is an admin (`admin_uids`, and the daemon's own uid); daemon-wide numbers stay visible.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from pipellm_client.wire import TICKET_KEY

from . import refusal as R
from .dataplane import Connection, DataPlane
from .events import EventBus
from .sessions import Session, SessionManager
from .status import StatusBuilder

MAX_INTENTS_PER_CALL = 1 << 16


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Rpc = Callable[["PipeLLMServicer", Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def _statuses(rpc: Rpc[Req, Resp]) -> Rpc[Req, Resp]:
    """The one place exceptions become statuses: a Refusal keeps its code, the rest map by type (refusal.py)."""

    @functools.wraps(rpc)
    async def answer(self: PipeLLMServicer, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await rpc(self, request, context)
        except Exception as exc:
            await self._fail(context, exc)  # aborts the call: raises
            raise

    return answer


class PipeLLMServicer(pb_grpc.PipeLLMServicer):
    def __init__(self, manager: SessionManager, dataplane: DataPlane, status: StatusBuilder, events: EventBus) -> None:
        self.manager = manager
        self.cfg = manager.cfg
        self.dataplane = dataplane
        self.status = status
        self.events = events

    # -- helpers ---------------------------------------------------------------------------------
    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        ref = R.from_exception(exc)
        await context.abort(ref.code, ref.message)

    def _conn(self, context: grpc.aio.ServicerContext) -> Connection:
        tickets = [v for k, v in context.invocation_metadata() or () if k == TICKET_KEY]
        if not tickets:
            raise R.Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing {TICKET_KEY} metadata: connect to the data-plane socket first and use its Welcome ticket",
            )
        conn = self.dataplane.connection(str(tickets[0]))
        if conn is None:
            raise R.Refusal(grpc.StatusCode.PERMISSION_DENIED, f"unknown or expired {TICKET_KEY}")
        return conn

    def _session(self, context: grpc.aio.ServicerContext, session_id: str) -> Session:
        return self._conn(context).session_named(session_id)

    def _sees_all(self, conn: Connection) -> bool:
        return self.dataplane.policy.is_admin(conn.peer)

    def _visible(self, conn: Connection) -> list[Session]:
        if self._sees_all(conn):
            return list(self.manager.sessions.values())
        return self.manager.owned_by(conn.peer.uid)

    def _live(self) -> None:
        if self.manager.draining:
            raise R.unavailable("pipellmd is shutting down")

    # -- RPCs: each a few lines; `_statuses` answers every exception with its status -------------------
    @_statuses
    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        self._live()
        conn = self._conn(context)
        if conn.session is None:  # (a second session on one connection gets its own, precise refusal)
            self.manager.check_session_quota(conn.peer.uid)
        return self.manager.response_for(conn.open_session(request))

    @_statuses
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        conn = self._conn(context)
        s = conn.session_named(request.session_id)
        await s.drain()
        conn.end_session(s, "closed by client")
        return pb.CloseSessionResponse()

    @_statuses
    async def RegisterRegion(
        self, request: pb.RegisterRegionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterRegionResponse:
        self._live()
        s = self._session(context, request.session_id)
        if request.kind not in (pb.REGION_KIND_UNSPECIFIED, pb.REGION_KIND_ADAPTER):
            raise R.invalid(f"unknown region kind {request.kind}")
        region = await s.register_region(request.offer_id, request.size, request.readonly, request.name, request.kind)
        return pb.RegisterRegionResponse(region_id=region.id)

    @_statuses
    async def SealRegion(
        self, request: pb.SealRegionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SealRegionResponse:
        self._session(context, request.session_id).seal_region(request.region_id)
        return pb.SealRegionResponse()

    @_statuses
    async def AttachDeviceStaging(
        self, request: pb.AttachDeviceStagingRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttachDeviceStagingResponse:
        self._live()
        self._session(context, request.session_id).attach_staging(request)
        return pb.AttachDeviceStagingResponse()

    @_statuses
    async def UnregisterRegion(
        self, request: pb.UnregisterRegionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnregisterRegionResponse:
        self._session(context, request.session_id).unregister_region(request.region_id)
        return pb.UnregisterRegionResponse()

    @_statuses
    async def DeclareIntents(
        self, request: pb.DeclareIntentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeclareIntentsResponse:
        self._live()
        s = self._session(context, request.session_id)
        if len(request.intents) > MAX_INTENTS_PER_CALL:
            raise R.exhausted(f"{len(request.intents)} intents in one call; the limit is {MAX_INTENTS_PER_CALL}")
        return pb.DeclareIntentsResponse(pending=s.declare(request))

    @_statuses
    async def CancelIntents(
        self, request: pb.CancelIntentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelIntentsResponse:
        s = self._session(context, request.session_id)
        return pb.CancelIntentsResponse(cancelled=s.cancel_intents())

    @_statuses
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.Status:
        conn = self._conn(context)
        return self.status.build(None if self._sees_all(conn) else conn.peer.uid)

    @_statuses
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        conn = self._conn(context)
        return pb.ListSessionsResponse(sessions=[s.status() for s in self._visible(conn)])

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Event]:
        try:
            conn = self._conn(context)
            uid, limit = conn.peer.uid, self.cfg.max_watches_per_uid
            if self.events.watchers(uid) >= limit:
                raise R.exhausted(f"uid {uid} already has {limit} Watch streams open (max_watches_per_uid)")
        except Exception as exc:
            await self._fail(context, exc)
            raise
        q = self.events.subscribe(uid, self._sees_all(conn))
        try:
            while True:
                ev = await q.get()
                if ev is None:
                    return
                yield pb.Event(
                    time=ev.time, kind=ev.kind, session_id=ev.session_id, message=ev.message, fields=ev.fields
                )
        except asyncio.CancelledError:
            return
        finally:
            self.events.unsubscribe(q)
