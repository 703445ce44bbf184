"""Protocol facts both ends must agree on, spelled once: the daemon imports them from here.

Pure: constants and small functions, the standard library only (the generated protobuf module is loaded
by `mode_value` when first asked, so a crypto worker, which needs only the descriptor packing, never pays
for protobuf).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._gen.pipellm.v1 import pipellm_pb2 as pb

# -- frames on the data-plane socket --------------------------------------------------------------------
PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 1 << 16  # one SOCK_SEQPACKET packet, one `Frame`, at most this many bytes
TICKET_KEY: Final = "pipellm-ticket"  # the gRPC metadata key carrying the data-plane Welcome's ticket

# -- where the daemon listens ---------------------------------------------------------------------------
DEFAULT_SOCKET: Final = "/run/pipellm/pipellmd.sock"
DATA_SUFFIX: Final = ".data"


def data_socket_path(control_socket: str) -> str:
    """The data-plane socket that sits next to the gRPC (control) socket."""
    return control_socket + DATA_SUFFIX


# -- modes ----------------------------------------------------------------------------------------------
MODE_NAMES: Final = ("pipellm", "naive", "plain")  # the config's names, each the proto's MODE_<NAME>


def mode_value(name: str) -> pb.Mode:
    """The `pb.Mode` a config mode name stands for ("pipellm" -> MODE_PIPELLM)."""
    from ._gen.pipellm.v1 import pipellm_pb2 as pb

    if name not in MODE_NAMES:
        raise ValueError(f"unknown mode {name!r}; one of {', '.join(MODE_NAMES)}")
    mode: pb.Mode = getattr(pb, f"MODE_{name.upper()}")
    return mode


# -- transfers ------------------------------------------------------------------------------------------
FLAG_UNPREDICTED: Final = 1  # `Transfer.flags`: the serving code says no predictor could have known it
TRANSFER_FLAGS: Final = FLAG_UNPREDICTED  # every flag a Transfer may carry


def copy_engine(length: int, *, unpredicted: bool, channels: int, small_threshold: int) -> int:
    """Which copy engine a transfer takes: 1 (on demand, never speculated) for a small or unpredicted one
    when the session has a second channel, else 0 (the speculative stream)."""
    return 1 if channels > 1 and (unpredicted or length < small_threshold) else 0


def generation_table_bytes(size: int, granule: int) -> int:
    """The write-generation table after a mutable region's data: one uint64 per granule."""
    return -(-size // granule) * 8


# -- descriptors by SCM_RIGHTS --------------------------------------------------------------------------
_FD_BYTES: Final = 4  # a C int


def ancillary_space(max_fds: int) -> int:
    """The ancillary buffer `recvmsg` needs for up to `max_fds` descriptors."""
    return socket.CMSG_SPACE(max_fds * _FD_BYTES)


def scm_rights(fds: Iterable[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes `fds` with `sendmsg`."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(_FD_BYTES, sys.byteorder) for fd in fds))]


def send_packet(sock: socket.socket, data: bytes, fds: Sequence[int] | None = None) -> None:
    """One SOCK_SEQPACKET packet, with `fds` by SCM_RIGHTS when there are any."""
    if fds:
        sock.sendmsg([data], scm_rights(fds))
    else:
        sock.send(data)


def received_fds(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in what `recvmsg` returned as ancillary data (a truncated trailing int is dropped)."""
    fds: list[int] = []
    for level, typ, raw in ancillary:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            usable = len(raw) - len(raw) % _FD_BYTES
            fds.extend(int.from_bytes(raw[i : i + _FD_BYTES], sys.byteorder) for i in range(0, usable, _FD_BYTES))
    return fds


__all__ = [
    "DATA_SUFFIX",
    "DEFAULT_SOCKET",
    "FLAG_UNPREDICTED",
    "MAX_FRAME",
    "MODE_NAMES",
    "PROTOCOL_VERSION",
    "TICKET_KEY",
    "TRANSFER_FLAGS",
    "ancillary_space",
    "copy_engine",
    "data_socket_path",
    "generation_table_bytes",
    "mode_value",
    "received_fds",
    "scm_rights",
    "send_packet",
]
