"""Who may talk to the daemon: SO_PEERCRED on the data-plane socket against allowed uids and gids."""

from __future__ import annotations

import os
import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def _groups_of(uid: int, gid: int) -> set[int]:
    try:
        name = pwd.getpwuid(uid).pw_name
        return set(os.getgrouplist(name, gid))
    except KeyError:
        return {gid}


class Policy:
    """Root and the listed uids, or members of the listed gids; with no lists, the daemon's own uid."""

    def __init__(self, uids: tuple[int, ...], gids: tuple[int, ...]) -> None:
        self.uids = set(uids) if uids or gids else {os.getuid()}
        self.gids = set(gids)

    def allows(self, peer: Peer) -> bool:
        if peer.uid == 0 or peer.uid in self.uids:
            return True
        return bool(self.gids) and bool(_groups_of(peer.uid, peer.gid) & self.gids)

    def describe(self) -> str:
        return f"uids={sorted(self.uids)} gids={sorted(self.gids)}"
