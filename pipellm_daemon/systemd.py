"""sd_notify without a dependency: one datagram to $NOTIFY_SOCKET, as systemd's protocol defines it.

Intent-named calls (`ready`, `stopping`, `watchdog`) instead of raw fields at the call sites. `claim()`
takes NOTIFY_SOCKET and the watchdog variables out of the environment at start, so the crypto workers
(our children) never inherit them: only the main process may notify (the unit's NotifyAccess=main).
"""

from __future__ import annotations

import os
import socket

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_claimed: dict[str, str] = {}


def claim() -> None:
    """Move systemd's variables from the environment into this module (idempotent)."""
    for name in _ENV:
        value = os.environ.pop(name, None)
        if value is not None:
            _claimed[name] = value


def _get(name: str) -> str | None:
    return _claimed.get(name, os.environ.get(name))


def _notify(*fields: str) -> bool:
    addr = _get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(addr)
            sock.sendall("\n".join(fields).encode())
        except OSError:
            return False
    return True


def ready(status: str) -> bool:
    """Both sockets accept connections; False when not under systemd."""
    return _notify("READY=1", f"STATUS={status}")


def stopping(status: str = "draining") -> bool:
    return _notify("STOPPING=1", f"STATUS={status}")


def watchdog() -> bool:
    """One keep-alive: the loop runs and the workers are there."""
    return _notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Half of WatchdogSec (seconds), when systemd asked this process for keep-alives."""
    usec = _get("WATCHDOG_USEC")
    pid = _get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
