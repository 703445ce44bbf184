"""The synchronous SDK: `Client` talks to pipellmd, `Session` moves bytes through a confidential channel.

    with Client() as client, client.open_session(name="server-0") as s:
        w = s.alloc_region(n, readonly=True); w.array[:] = weights; w.seal()
        s.h2d(w, 0, n, dst)          # dst: numpy array or CPU tensor; the endpoint decrypts into it

A session is not thread-safe: use one per thread, or the asyncio client.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._core import Intent, Landing, from_rpc_error
from ._dataplane import DaemonUnavailable, FrameSocket, default_socket
from ._gen.pipellm.v1 import pipellm_pb2 as pb
from ._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from ._session_common import (
    Blocking,
    Call,
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
from ._session_common import welcome as _welcome  # noqa: F401 - tests/test_quotas.py imports it from here
from .regions import Region
from .wire import TICKET_KEY

T = TypeVar("T")


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
        self._closed = False
        self.sessions: list[Session] = []

    @property
    def closed(self) -> bool:
        """True once `close()` has run: a stream that ends then was ended by us, not by the daemon."""
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> list[tuple[str, str]]:
        if self._ctl is None:
            self._ctl, self._ticket = greet(self)
        return [(TICKET_KEY, self._ticket)]

    def call(self, method: Callable[..., T], request: Any, metadata: list[tuple[str, str]] | None = None) -> T:
        try:
            return method(request, metadata=metadata or self._metadata(), timeout=self.timeout)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if stale_ticket(err, metadata):
                # The daemon restarted: our control connection's ticket died with it. Greet it again, once.
                self._drop_ctl()
                return self.call(method, request, [(TICKET_KEY, self._greet())])
            raise rpc_failure(err, self.socket) from None

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
        return serving_status(resp)

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
        fs, md, core = _drive(connect_steps(self, opts), self)
        s = Session(self, fs, md, core, opts)
        self.sessions.append(s)
        return s

    def close(self) -> None:
        self._closed = True
        for s in list(self.sessions):
            s.close()
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        self._channel.close()


def _drive(steps: Steps[T], client: Client, session: Session | None = None) -> T:
    """Run a shared operation (`_session_common`) to its end, blocking on each step it takes."""
    reply: Any = None
    failure: BaseException | None = None
    while True:
        step, result = advance(steps, reply, failure)
        if step is None:
            return cast(T, result)
        reply, failure = None, None
        try:
            reply = _take(step, client, session)
        except BaseException as exc:  # thrown into the operation, which cleans up and usually re-raises it
            failure = exc


def _take(step: Step, client: Client, session: Session | None) -> Any:
    if isinstance(step, Call):
        return client.call(getattr(client._stub, step.method), step.request, step.metadata)
    if isinstance(step, Blocking):
        return step.fn()
    assert session is not None, step
    if isinstance(step, Wait):
        session._pump(step.until)
    elif isinstance(step, Poll):
        session.poll()
    elif session.core is step.dead:
        session.rekey()
    return None


class Session(SessionBase):
    """One confidential session: its own key agreement, channels, arena and regions. Not thread-safe."""

    client: Client

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        err = on_frame(self.core, self.fs, frame, fds)
        if err is not None:
            raise err

    def _region_waits(self, region: Region, offset: int, length: int) -> None:
        self.wait_landed(region, offset, length)

    def _region_seals(self, region: Region) -> None:
        _drive(self._seal_remote_steps(region), self.client, self)

    # -- regions -------------------------------------------------------------------------------------
    def alloc_region(
        self, nbytes: int, *, readonly: bool = False, name: str = "", adapter: bool = False, data: Any = None
    ) -> Region:
        """Shared memory the daemon maps. With `data`, a read-only region is filled and sealed at once."""
        return _drive(self._alloc_steps(nbytes, readonly, name, adapter, data), self.client, self)

    def seal(self, region: Region) -> None:
        """Freeze a read-only region once loaded (what `region.seal()` does): every later write faults."""
        _drive(self._seal_steps(region), self.client, self)

    def wait_landed(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        """Until the D2H data landing in [offset, offset+length) has been decrypted and verified (raises its
        error). `region.read`/`write` and H2D of the range wait by themselves; this is for other readers."""
        _drive(self._landed_steps(region, offset, length), self.client, self)

    def unregister(self, region: Region) -> None:
        """Free a region, once the D2H data landing in it is in."""
        _drive(self._unregister_steps(region), self.client, self)

    # -- transfers -----------------------------------------------------------------------------------
    def h2d(self, region: Region, offset: int, length: int, dst: Any, *, unpredicted: bool = False) -> None:
        """Move region bytes to `dst` through the channel; returns when the endpoint has verified them."""
        if not self._ring_hit(region, offset, length, dst, unpredicted):
            self.h2d_many([(region, offset, length, dst)], unpredicted=unpredicted)

    def h2d_many(self, transfers: Sequence[Transfer], *, unpredicted: bool = False) -> None:
        """Several transfers in one commit (one data-plane round trip)."""
        _drive(self._h2d_steps(transfers, unpredicted), self.client, self)

    def rekey(self) -> None:
        """Replace a dead session's channels: a fresh key agreement and arena, the same Region objects.

        The regions' memory is offered again (new region ids, read-only ones sealed again); cyclic intents
        are declared again. Nothing encrypted under the old keys is ever used again.
        """
        _drive(self._rekey_steps(), self.client, self)

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
        return _drive(self._d2h_steps(src, region, offset, swap_out, group, wait), self.client, self)

    def wait_all(self) -> None:
        """Until every D2H transfer of this session has landed."""
        _drive(self._wait_all_steps(), self.client, self)

    # -- intents ------------------------------------------------------------------------------------
    def declare(self, intents: Sequence[Intent], *, replace: bool = False, cyclic: bool = False) -> int:
        """Tell the daemon what will be transferred next, so it encrypts it ahead.

        Fire-and-forget: the intents travel as data-plane frames, in order with commits, and the call never
        waits for the daemon; a refusal (an unknown region, a range outside it, too many intents) is raised
        at the session's next call. Returns the number of intents sent.
        """
        return self._declare(intents, replace, cyclic)

    def cancel_intents(self) -> None:
        """Drop every pending intent and the declared cycle (fire-and-forget, like `declare`)."""
        self._cancel_intents()

    def status(self) -> pb.SessionStatus:
        """This session's status at the daemon: channels, counters, pending intents."""
        return _drive(self._status_steps(), self.client, self)

    def close(self) -> None:
        """Wait for landings, close the session at the daemon and free its memory (idempotent)."""
        _drive(self._close_steps(), self.client, self)
