"""The data plane: a SOCK_SEQPACKET Unix socket, one packet per `Frame`, memfds passed with SCM_RIGHTS.

A commit costs one packet each way and no gRPC machinery: the event loop reads the packet in a reader
callback, the session answers from the same callback or its commit task. Peer credentials are checked
when a connection is accepted; the ticket in `Welcome` is what the gRPC calls then present.

Nothing a client does grows the daemon without bound: connections are limited per uid (and in all)
before the P-384 key of the Welcome is made, key agreements per uid are rate-limited (a connect loop
waits instead of burning the daemon's CPU), and a client that stops reading is disconnected once its
unread frames pass `max_outbox_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Final

import grpc
from google.protobuf.message import DecodeError
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.keys import KeyAgreement, Transcript
from pipellm_client.wire import MAX_FRAME, PROTOCOL_VERSION, ancillary_space, mode_value, received_fds, send_packet

from . import __version__, logs
from . import refusal as R
from .auth import Peer, Policy, peer_of
from .sessions import Session, SessionManager

MAX_FDS: Final = 4
MAX_OFFERS: Final = 64
_TRUNCATED: Final = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
# What one queued frame costs besides its bytes (the tuple, the list, the deque slot), so that many tiny
# frames count against max_outbox_bytes too.
_ENTRY_OVERHEAD: Final = 128
_ACCEPTS_PER_WAKEUP: Final = 8
_ACCEPT_PAUSE_S: Final = 0.1  # out of descriptors: stop accepting this long instead of spinning
_LOG_EVERY_S: Final = 1.0  # refusal warnings per (event, uid), so a connect loop cannot flood the journal
_log = logs.get("pipellmd.dataplane")


class _Bucket:
    """A token bucket: `rate` per second, bursts up to `burst`; a deficit is a wait, never a refusal."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Take one token; returns how long to wait until it is really there (0 = now)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class _Throttle:
    """At most one log line per key per interval; the next one says how many were suppressed."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[tuple[str, int], tuple[float, int]] = {}

    def allow(self, event: str, uid: int) -> int | None:
        """None: suppress this one; else log it, with the count suppressed since the last."""
        now = time.monotonic()
        last, suppressed = self._last.get((event, uid), (0.0, 0))
        if now - last < self.interval:
            self._last[(event, uid)] = (last, suppressed + 1)
            return None
        if len(self._last) > 4096:
            self._last.clear()
        self._last[(event, uid)] = (now, 0)
        return suppressed


class Connection:
    """One client's data-plane connection: the `sessions.Link` of the session it opens, which lives exactly
    as long as the connection (or until CloseSession)."""

    def __init__(
        self,
        sock: socket.socket,
        peer: Peer,
        manager: SessionManager,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[Connection], None],
    ) -> None:
        self.sock = sock
        self._on_close = on_close
        self.peer = peer
        self.manager = manager
        self.loop = loop
        self.ticket = secrets.token_hex(16)
        self._agreement: KeyAgreement | None = KeyAgreement()
        self.daemon_public = self._agreement.public_bytes
        self.session: Session | None = None
        self.offers: dict[int, int] = {}
        self._offer_waiters: dict[int, asyncio.Future[int]] = {}
        self._unsent: deque[tuple[bytes, list[int]]] = deque()
        self._unsent_bytes = 0
        self._unsent_limit = manager.cfg.max_outbox_bytes
        self._overflowed = False
        self._writer_armed = False
        self.closed = False
        self.frames_in = 0
        self.errors_sent = 0

    # -- the session on this connection ------------------------------------------------------------
    @property
    def can_agree(self) -> bool:
        return self._agreement is not None

    def shared_secret(self, endpoint_public: bytes) -> tuple[bytes, Transcript]:
        if self._agreement is None:
            raise R.precondition("this connection's key agreement was already used")
        transcript = Transcript(self.daemon_public, endpoint_public)
        master = self._agreement.master_secret(endpoint_public, transcript)  # checks the point
        self._agreement = None  # a computed shared secret is used once
        return master, transcript

    def open_session(self, req: pb.OpenSessionRequest) -> Session:
        """OpenSession: at most one session per connection, bound to it until either ends."""
        if self.session is not None:
            raise R.precondition("this connection already has a session; open a new connection for another")
        session = self.manager.open(self, req)
        self.session = session  # before its Attach goes out: a send that finds the peer gone closes it
        self.manager.start(session)
        return session

    def session_named(self, session_id: str) -> Session:
        s = self.session
        if s is None or s.id != session_id or s.closed:
            raise R.not_found(f"session {session_id!r} not found on this connection")
        return s

    def end_session(self, session: Session, reason: str) -> None:
        """Close `session` (CloseSession, or this connection's end); the connection itself stays open."""
        if self.session is session:
            self.session = None
        self.manager.close(session, reason)

    # -- sending ---------------------------------------------------------------------------------
    def send(self, frame: pb.Frame, fds: list[int] | None = None) -> None:
        if self.closed or self._overflowed:
            return
        frame.version = PROTOCOL_VERSION
        data = frame.SerializeToString()
        self._unsent.append((data, list(fds or [])))
        self._unsent_bytes += len(data) + _ENTRY_OVERHEAD
        if len(self._unsent) == 1:
            self._drain()
        if self._unsent_bytes > self._unsent_limit and not self.closed:
            self._overflow()

    def _overflow(self) -> None:
        """The client stopped reading: drop what it never read and disconnect it, rather than grow."""
        self._overflowed = True
        _log.warning(
            "outbox_overflow",
            uid=self.peer.uid,
            pid=self.peer.pid,
            session=self.session.id if self.session is not None else None,
            frames=len(self._unsent),
            bytes=self._unsent_bytes,
            limit=self._unsent_limit,
        )
        self._unsent.clear()
        self._unsent_bytes = 0
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        # Not from here: send() runs inside commit callbacks, which must not see their session vanish.
        self.loop.call_soon(self.close, "client not reading: data-plane outbox over max_outbox_bytes")

    def send_error(self, ref: R.Refusal, seq: int = 0) -> None:
        self.errors_sent += 1
        self.send(pb.Frame(error=pb.Error(code=ref.number, message=ref.message, seq=seq)))

    def _drain(self) -> None:
        while self._unsent:
            data, fds = self._unsent[0]
            try:
                send_packet(self.sock, data, fds)
            except BlockingIOError:
                if not self._writer_armed:
                    self._writer_armed = True
                    self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            except OSError:
                self.close("send failed: peer gone")
                return
            self._unsent.popleft()
            self._unsent_bytes -= len(data) + _ENTRY_OVERHEAD

    def _on_writable(self) -> None:
        self._writer_armed = False
        self.loop.remove_writer(self.sock.fileno())
        self._drain()

    # -- receiving -------------------------------------------------------------------------------
    def on_readable(self) -> None:
        for _ in range(64):  # bounded, so one busy client cannot starve the loop
            try:
                data, anc, flags, _addr = self.sock.recvmsg(MAX_FRAME, ancillary_space(MAX_FDS))
            except BlockingIOError:
                return
            except OSError:
                data, anc, flags = b"", [], 0
            if not data:
                self.close("client disconnected")
                return
            fds = received_fds(anc)
            try:
                if flags & _TRUNCATED:
                    raise R.invalid(f"frame larger than {MAX_FRAME} bytes or too many descriptors")
                self._handle(data, fds)
            except R.Refusal as ref:
                self.send_error(ref, _seq_of(data))
            except Exception as exc:  # a malformed frame must never take the daemon down
                self.send_error(R.from_exception(exc), _seq_of(data))
            finally:
                for fd in fds:
                    os.close(fd)
            if self.closed or self._overflowed:
                return

    def _handle(self, data: bytes, fds: list[int]) -> None:
        self.frames_in += 1
        try:
            frame = pb.Frame.FromString(data)
        except DecodeError:
            raise R.invalid("malformed frame: not a pipellm.v1.Frame") from None
        if frame.version != PROTOCOL_VERSION:
            raise R.precondition(
                f"protocol version {frame.version} not supported; this daemon speaks {PROTOCOL_VERSION}"
            )
        body = frame.WhichOneof("body")
        if body == "offer":
            if len(fds) != 1:
                raise R.invalid(f"an offer carries exactly one memfd, got {len(fds)}")
            self._offer(frame.offer.offer_id, fds.pop())
            return
        if fds:
            raise R.invalid(f"a {body} frame carries no descriptors")
        if body == "commit":
            s = self._session()
            if self.manager.draining:
                raise R.unavailable("pipellmd is shutting down; no new transfers")
            s.enqueue_commit(frame.commit.seq, s.validate_commit(frame.commit))
        elif body == "declare":
            self._session().declare_frame(frame.declare)
        elif body == "release":
            self._session().release(list(frame.release.slots), list(frame.release.nop_cells))
        elif body == "landed":
            s = self._session()
            if self.manager.draining:
                raise R.unavailable("pipellmd is shutting down; no new transfers")
            s.landed(frame.landed, s.validate_landed(frame.landed))
        elif body == "error":
            self._client_error(frame.error)
        else:
            raise R.invalid(f"unexpected frame {body or 'without a body'} from a client")

    def _session(self) -> Session:
        if self.session is None:
            raise R.precondition("no session on this connection; call OpenSession first")
        return self.session

    def _client_error(self, err: pb.Error) -> None:
        """The endpoint reports a failure on its side (a tag mismatch kills the channel)."""
        if self.session is not None:
            self.session.kill(f"endpoint reported: {err.message[:200]}")

    def _offer(self, offer_id: int, fd: int) -> None:
        if offer_id in self.offers or len(self.offers) >= MAX_OFFERS:
            os.close(fd)
            raise R.invalid(f"offer {offer_id} is a duplicate or too many offers are pending")
        waiter = self._offer_waiters.pop(offer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(fd)
        else:
            self.offers[offer_id] = fd

    def discard_offer(self, offer_id: int) -> None:
        """A registration refused before it took its memfd: do not keep the descriptor until disconnect."""
        fd = self.offers.pop(offer_id, None)
        if fd is not None:
            os.close(fd)

    async def take_offer(self, offer_id: int, timeout: float) -> int:
        fd = self.offers.pop(offer_id, None)
        if fd is not None:
            return fd
        if len(self._offer_waiters) >= MAX_OFFERS:  # each waiting RegisterRegion holds a future
            raise R.exhausted(f"{MAX_OFFERS} registrations on this connection already wait for their offers")
        fut: asyncio.Future[int] = self.loop.create_future()
        self._offer_waiters[offer_id] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise R.not_found(f"offer {offer_id} never arrived on the data plane") from None
        finally:
            self._offer_waiters.pop(offer_id, None)

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
            if self._writer_armed:
                self.loop.remove_writer(self.sock.fileno())
        if self.session is not None:
            self.end_session(self.session, reason)
        for fd in self.offers.values():
            os.close(fd)
        self.offers.clear()
        self._on_close(self)
        self.sock.close()


def _seq_of(data: bytes) -> int:
    try:
        f = pb.Frame.FromString(data)
    except DecodeError:
        return 0
    body = f.WhichOneof("body")
    if body == "commit":
        return f.commit.seq
    if body == "landed":
        return f.landed.seq
    if body == "declare":
        return f.declare.seq
    return 0


class DataPlane:
    """Listens on the data-plane socket, checks peers and their quotas, and keeps the ticket -> connection map."""

    def __init__(self, path: str, mode: int, policy: Policy, manager: SessionManager) -> None:
        self.path = path
        self.mode = mode
        self.policy = policy
        self.manager = manager
        self.cfg = manager.cfg
        self.by_ticket: dict[str, Connection] = {}
        self.per_uid: dict[int, int] = {}  # connections, greeted or waiting for their key agreement
        self.rejected = 0
        self._buckets: dict[int, _Bucket] = {}
        self._waiting: dict[socket.socket, asyncio.TimerHandle] = {}  # admitted, Welcome not made yet
        self._throttle = _Throttle(_LOG_EVERY_S)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o777 & ~self.mode)  # the socket has its mode from the moment it exists
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        # Bounded per callback, so hang-ups (which free quota) and frames are seen between accepts.
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn_sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                # EMFILE and friends leave the connection queued: the socket stays readable, and retrying
                # at once would spin. Pause instead; the backlog waits in the kernel.
                if self._throttle.allow("accept_failed", -1) is not None:
                    _log.warning("accept_failed", error=str(exc), pause_s=_ACCEPT_PAUSE_S)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(_ACCEPT_PAUSE_S, self._resume_accept)
                return
            conn_sock.setblocking(False)
            try:
                peer = peer_of(conn_sock)
            except OSError:
                conn_sock.close()
                continue
            if not self.policy.allows(peer):
                self.rejected += 1
                suppressed = self._throttle.allow("peer_refused", peer.uid)
                if suppressed is not None:
                    _log.warning(
                        "peer_refused",
                        uid=peer.uid,
                        gid=peer.gid,
                        pid=peer.pid,
                        policy=self.policy.describe(),
                        suppressed=suppressed,
                    )
                _refuse(
                    conn_sock,
                    R.Refusal(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"uid {peer.uid} is not allowed to use pipellmd ({self.policy.describe()})",
                    ),
                )
                continue
            over = self._over_quota(peer)
            if over is not None:  # refused before any key is made: a connect loop costs the daemon little
                self.rejected += 1
                suppressed = self._throttle.allow("connection_refused", peer.uid)
                if suppressed is not None:
                    _log.warning(
                        "connection_refused", uid=peer.uid, pid=peer.pid, reason=over.message, suppressed=suppressed
                    )
                _refuse(conn_sock, over)
                continue
            self.per_uid[peer.uid] = self.per_uid.get(peer.uid, 0) + 1
            wait = self._bucket(peer.uid).take()
            if wait <= 0:
                self._greet(conn_sock, peer)
            else:  # over connect_rate_per_uid: the key agreement (and so the Welcome) comes later
                self._waiting[conn_sock] = self._loop.call_later(wait, self._greet_later, conn_sock, peer)

    def _resume_accept(self) -> None:
        if self._sock is not None and self._loop is not None and self._sock.fileno() >= 0:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _over_quota(self, peer: Peer) -> R.Refusal | None:
        cfg = self.cfg
        total = len(self.by_ticket) + len(self._waiting)
        if total >= cfg.max_connections:
            return R.exhausted(f"pipellmd has {total} data-plane connections open (max_connections)")
        mine = self.per_uid.get(peer.uid, 0)
        if mine >= cfg.max_connections_per_uid:
            return R.exhausted(
                f"uid {peer.uid} already has {mine} data-plane connections open "
                f"(max_connections_per_uid={cfg.max_connections_per_uid}); close some first"
            )
        return None

    def _bucket(self, uid: int) -> _Bucket:
        b = self._buckets.get(uid)
        if b is None:
            cfg = self.cfg
            b = self._buckets[uid] = _Bucket(cfg.connect_rate_per_uid, cfg.max_connections_per_uid)
        return b

    def _greet_later(self, conn_sock: socket.socket, peer: Peer) -> None:
        self._waiting.pop(conn_sock, None)
        try:  # the peer may have given up meanwhile: then make no key for it
            alive = conn_sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive = True
        except OSError:
            alive = False
        if not alive:
            conn_sock.close()
            self._uncount(peer.uid)
            return
        self._greet(conn_sock, peer)

    def _greet(self, conn_sock: socket.socket, peer: Peer) -> None:
        assert self._loop is not None
        conn = Connection(conn_sock, peer, self.manager, self._loop, self._forget)  # makes the P-384 key
        self.by_ticket[conn.ticket] = conn
        self._loop.add_reader(conn_sock.fileno(), conn.on_readable)
        conn.send(
            pb.Frame(
                welcome=pb.Welcome(
                    ticket=conn.ticket,
                    daemon_public_key=conn.daemon_public,
                    daemon_version=__version__,
                    mode=mode_value(self.cfg.mode),
                )
            )
        )

    def _uncount(self, uid: int) -> None:
        n = self.per_uid.get(uid, 0) - 1
        if n > 0:
            self.per_uid[uid] = n
        else:
            self.per_uid.pop(uid, None)

    def _forget(self, conn: Connection) -> None:
        if self.by_ticket.pop(conn.ticket, None) is not None:
            self._uncount(conn.peer.uid)

    def connection(self, ticket: str) -> Connection | None:
        return self.by_ticket.get(ticket)

    def close(self) -> None:
        for conn in list(self.by_ticket.values()):
            conn.close("daemon stopping")
        for conn_sock, handle in list(self._waiting.items()):
            handle.cancel()
            conn_sock.close()
        self._waiting.clear()
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _refuse(conn_sock: socket.socket, ref: R.Refusal) -> None:
    """Tell a connection why it is refused (one Error frame; the SDK raises it as DaemonError) and close it."""
    err = pb.Frame(version=PROTOCOL_VERSION, error=pb.Error(code=ref.number, message=ref.message))
    with contextlib.suppress(OSError):
        conn_sock.send(err.SerializeToString())
    conn_sock.close()
