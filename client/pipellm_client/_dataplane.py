"""The client end of the data-plane socket: one `Frame` per SOCK_SEQPACKET packet, memfds by SCM_RIGHTS."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import struct

from google.protobuf.message import DecodeError

from ._gen.pipellm.v1 import pipellm_pb2 as pb
from .errors import PipeLLMError
from .wire import (
    DEFAULT_SOCKET,
    MAX_FRAME,
    PROTOCOL_VERSION,
    ancillary_space,
    data_socket_path,
    received_fds,
    send_packet,
)


class DaemonUnavailable(PipeLLMError):
    """pipellmd is not running at that socket, or went away."""


class UntrustedDaemon(PipeLLMError):
    """The process listening at the socket does not run as a uid this client trusts to be pipellmd."""


def default_socket() -> str:
    return os.environ.get("PIPELLM_SOCKET", DEFAULT_SOCKET)


def expected_daemon_uids() -> frozenset[int]:
    """Who may be pipellmd: `PIPELLM_DAEMON_UIDS` (comma-separated) if set; else root, the user "pipellm"
    (the packaged unit's) and this process's own uid (a same-uid process could read our memory anyway)."""
    env = os.environ.get("PIPELLM_DAEMON_UIDS", "").strip()
    if env:
        try:
            return frozenset(int(x) for x in env.split(",") if x.strip())
        except ValueError:
            raise PipeLLMError(f"PIPELLM_DAEMON_UIDS must be comma-separated uids, got {env!r}") from None
    uids = {0, os.getuid()}
    with contextlib.suppress(KeyError):
        uids.add(pwd.getpwnam("pipellm").pw_uid)
    return frozenset(uids)


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class FrameSocket:
    """One data-plane connection. The peer's uid (SO_PEERCRED) is checked before anything is sent: memfds
    of our regions and our key agreement go only to a process running as a uid we expect for pipellmd."""

    def __init__(
        self, control_socket: str, timeout: float | None = 30.0, daemon_uids: frozenset[int] | None = None
    ) -> None:
        path = data_socket_path(control_socket)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)  # connect and the greeting; `greeted()` makes it blocking after
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise DaemonUnavailable(f"pipellmd is not listening at {path} ({exc.strerror})") from None
        except PermissionError:
            self.sock.close()
            raise DaemonUnavailable(f"no permission to open {path}; is this user in the pipellm group?") from None
        except TimeoutError:
            self.sock.close()
            raise DaemonUnavailable(f"pipellmd at {path} did not accept the connection in time") from None
        expected = expected_daemon_uids() if daemon_uids is None else daemon_uids
        uid = peer_uid(self.sock)
        if uid not in expected:
            self.sock.close()
            raise UntrustedDaemon(
                f"the process listening at {path} runs as uid {uid}, not one expected for pipellmd "
                f"({', '.join(map(str, sorted(expected)))}); set PIPELLM_DAEMON_UIDS if that is intended"
            )

    def greeted(self) -> None:
        """After the Welcome: transfers may wait on the daemon as long as they need to."""
        self.sock.settimeout(None)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: pb.Frame, fds: list[int] | None = None) -> None:
        frame.version = PROTOCOL_VERSION
        data = frame.SerializeToString()
        try:
            send_packet(self.sock, data, fds)
        except (BrokenPipeError, ConnectionResetError):
            raise DaemonUnavailable("pipellmd closed the data-plane connection") from None

    def recv(self, *, block: bool = True) -> tuple[pb.Frame, list[int]]:
        """Read one frame; with block=False, BlockingIOError when none is waiting (sends always block)."""
        try:
            flags = 0 if block else socket.MSG_DONTWAIT
            data, anc, _flags, _ = self.sock.recvmsg(MAX_FRAME, ancillary_space(4), flags)
        except ConnectionResetError:
            data, anc = b"", []
        except TimeoutError:
            raise DaemonUnavailable("pipellmd did not answer in time (is it stopped or overloaded?)") from None
        if not data:
            raise DaemonUnavailable("pipellmd closed the data-plane connection")
        fds = received_fds(anc)
        try:
            return pb.Frame.FromString(data), fds
        except DecodeError:
            for fd in fds:
                os.close(fd)
            raise DaemonUnavailable("pipellmd sent a malformed frame") from None

    def close(self) -> None:
        self.sock.close()
