"""Every exit status pipellmctl uses, in one place, so scripts and probes can rely on them."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1  # the daemon refused the request for a reason not listed below (its message is printed)
    USAGE = 2  # bad command line (argparse's own convention)
    UNREACHABLE = 3  # no daemon at the socket, it went away, or it did not answer in time
    UNHEALTHY = 4  # the daemon answers but says it is not healthy, or it is draining (shutting down)
    DENIED = 5  # the daemon refused this uid/gid (allowed_uids / allowed_gids)


DESCRIPTION = """exit status:
  0  ok
  1  the daemon refused the request (message on stderr)
  2  usage error
  3  daemon unreachable (not running, wrong --socket, no answer within --timeout)
  4  daemon unhealthy or draining
  5  permission denied (this uid/gid is not in allowed_uids / allowed_gids)"""
