"""The data plane: a SOCK_SEQPACKET Unix socket, one packet per `Frame`, memfds passed with SCM_RIGHTS.

A commit costs one packet each way and no gRPC machinery: the event loop reads the packet in a reader
callback, the session answers from the same callback or its commit task. Peer credentials are checked
when a connection is accepted; the ticket in `Welcome` is what the gRPC calls then present.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from google.protobuf.message import DecodeError
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.keys import KeyAgreement

from . import __version__, logs
from . import refusal as R
from .auth import Peer, Policy, peer_of

if TYPE_CHECKING:
    from .sessions import Session, SessionManager

PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 1 << 16
MAX_FDS: Final = 4
MAX_OFFERS: Final = 64
_TRUNCATED: Final = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_log = logs.get("pipellmd.dataplane")


class Connection:
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
        self.agreement: KeyAgreement | None = KeyAgreement()
        self.daemon_public = self.agreement.public_bytes
        self.session: Session | None = None
        self.offers: dict[int, int] = {}
        self._offer_waiters: dict[int, asyncio.Future[int]] = {}
        self._outbox: deque[tuple[bytes, list[int]]] = deque()
        self._writer_armed = False
        self.closed = False
        self.frames_in = 0
        self.errors_sent = 0

    # -- sending ---------------------------------------------------------------------------------
    def send(self, frame: pb.Frame, fds: list[int] | None = None) -> None:
        if self.closed:
            return
        frame.version = PROTOCOL_VERSION
        self._outbox.append((frame.SerializeToString(), list(fds or [])))
        if len(self._outbox) == 1:
            self._drain()

    def send_error(self, ref: R.Refusal, seq: int = 0) -> None:
        self.errors_sent += 1
        self.send(pb.Frame(error=pb.Error(code=ref.number, message=ref.message, seq=seq)))

    def _drain(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            try:
                if fds:
                    anc = [
                        (
                            socket.SOL_SOCKET,
                            socket.SCM_RIGHTS,
                            b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds),
                        )
                    ]
                    self.sock.sendmsg([data], anc)
                else:
                    self.sock.send(data)
            except BlockingIOError:
                if not self._writer_armed:
                    self._writer_armed = True
                    self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            except OSError:
                self.close("send failed: peer gone")
                return
            self._outbox.popleft()

    def _on_writable(self) -> None:
        self._writer_armed = False
        self.loop.remove_writer(self.sock.fileno())
        self._drain()

    # -- receiving -------------------------------------------------------------------------------
    def on_readable(self) -> None:
        for _ in range(64):  # bounded, so one busy client cannot starve the loop
            try:
                data, anc, flags, _addr = self.sock.recvmsg(MAX_FRAME, socket.CMSG_SPACE(MAX_FDS * 4))
            except BlockingIOError:
                return
            except OSError:
                data, anc, flags = b"", [], 0
            if not data:
                self.close("client disconnected")
                return
            fds: list[int] = []
            for level, typ, raw in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    usable = len(raw) - len(raw) % 4
                    fds.extend(int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, usable, 4))
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
            if self.closed:
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
        elif body == "release":
            self._session().pipeline.release(list(frame.release.slots), list(frame.release.nop_cells))
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
            self.session.pipeline.kill(f"endpoint reported: {err.message[:200]}")

    def _offer(self, offer_id: int, fd: int) -> None:
        if offer_id in self.offers or len(self.offers) >= MAX_OFFERS:
            os.close(fd)
            raise R.invalid(f"offer {offer_id} is a duplicate or too many offers are pending")
        waiter = self._offer_waiters.pop(offer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(fd)
        else:
            self.offers[offer_id] = fd

    async def take_offer(self, offer_id: int, timeout: float) -> int:
        fd = self.offers.pop(offer_id, None)
        if fd is not None:
            return fd
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
            self.manager.close(self.session, reason)
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
    return 0


class DataPlane:
    """Listens on the data-plane socket, checks peers, and keeps the ticket -> connection map."""

    def __init__(self, path: str, mode: int, policy: Policy, manager: SessionManager) -> None:
        self.path = path
        self.mode = mode
        self.policy = policy
        self.manager = manager
        self.by_ticket: dict[str, Connection] = {}
        self.rejected = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o777 & ~self.mode)
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
        while True:
            try:
                conn_sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                _log.warning("accept_failed", error=str(exc))
                return
            conn_sock.setblocking(False)
            peer = peer_of(conn_sock)
            if not self.policy.allows(peer):
                self.rejected += 1
                _log.warning("peer_refused", uid=peer.uid, gid=peer.gid, pid=peer.pid, policy=self.policy.describe())
                err = pb.Frame(
                    version=PROTOCOL_VERSION,
                    error=pb.Error(
                        code=7,
                        message=f"uid {peer.uid} is not allowed to use pipellmd ({self.policy.describe()})",
                    ),
                )
                with contextlib.suppress(OSError):
                    conn_sock.send(err.SerializeToString())
                conn_sock.close()
                continue
            conn = Connection(conn_sock, peer, self.manager, self._loop, self._forget)
            self.by_ticket[conn.ticket] = conn
            self._loop.add_reader(conn_sock.fileno(), conn.on_readable)
            conn.send(
                pb.Frame(
                    welcome=pb.Welcome(
                        ticket=conn.ticket,
                        daemon_public_key=conn.daemon_public,
                        daemon_version=__version__,
                        mode={"pipellm": pb.MODE_PIPELLM, "naive": pb.MODE_NAIVE, "plain": pb.MODE_PLAIN}[
                            self.manager.cfg.mode
                        ],  # type: ignore[arg-type]
                    )
                )
            )

    def _forget(self, conn: Connection) -> None:
        self.by_ticket.pop(conn.ticket, None)

    def connection(self, ticket: str) -> Connection | None:
        return self.by_ticket.get(ticket)

    def close(self) -> None:
        for conn in list(self.by_ticket.values()):
            conn.close("daemon stopping")
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
