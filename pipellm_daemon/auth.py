"""Who may talk to the daemon: SO_PEERCRED on the data-plane socket against allowed uids and gids."""

from __future__ import annotations

import os
import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None  # the peer's supplementary groups, from the kernel


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    groups: tuple[int, ...] | None = None
    try:  # SO_PEERGROUPS (Linux 4.13+): the peer's own groups, right even inside a container
        data = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
        groups = struct.unpack(f"{len(data) // 4}I", data[: len(data) - len(data) % 4])
    except OSError:
        pass
    return Peer(pid, uid, gid, groups)


def _groups_of(uid: int, gid: int) -> set[int]:
    try:
        name = pwd.getpwuid(uid).pw_name
        return set(os.getgrouplist(name, gid))
    except KeyError:
        return {gid}


class Policy:
    """Root and the listed uids, or members of the listed gids; with no lists, the daemon's own uid.

    Admins (`admin_uids` plus the daemon's own uid) see every tenant's sessions and events; everyone else
    sees only their own, so one tenant learns nothing about another's clients or traffic.
    """

    def __init__(self, uids: tuple[int, ...], gids: tuple[int, ...], admins: tuple[int, ...] = (0,)) -> None:
        self.uids = set(uids) if uids or gids else {os.getuid()}
        self.gids = set(gids)
        self.admins = {*admins, os.getuid()}

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid in self.admins

    def allows(self, peer: Peer) -> bool:
        if peer.uid == 0 or peer.uid in self.uids:
            return True
        if not self.gids:
            return False
        groups = {peer.gid, *peer.groups} if peer.groups is not None else _groups_of(peer.uid, peer.gid)
        return bool(groups & self.gids)

    def describe(self) -> str:
        return f"uids={sorted(self.uids)} gids={sorted(self.gids)}"
