"""`pipellmctl health`: grpc.health.v1 Check; exit 0 when SERVING, 4 otherwise, 3 when unreachable.

This is the liveness/readiness probe. It needs no data-plane connection and no ticket (the health
service is exempt), so it works for any user who can open the control socket and costs the daemon
one tiny RPC. The daemon reports NOT_SERVING as soon as it starts draining.
"""

from __future__ import annotations

import argparse

from .. import Client
from . import render
from .base import Verb, deadline
from .exitcodes import Exit


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help='print {"status": "SERVING"} instead of the bare word')
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit status says it all")


def run(client: Client, args: argparse.Namespace) -> int:
    with deadline(args.timeout + 1.0):  # the RPC has its own timeout; this only guards a wedged connect
        serving = client.health()
    if not args.quiet:
        if args.json:
            render.print_json({"status": serving}, pretty=False)
        else:
            print(serving, flush=True)
    return int(Exit.OK if serving == "SERVING" else Exit.UNHEALTHY)


VERB = Verb("health", "gRPC health check (for probes): exit 0 if SERVING, 4 if not, 3 if unreachable", configure, run)
