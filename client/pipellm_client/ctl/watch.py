"""`pipellmctl watch [--json]`: print daemon events as they happen until Ctrl-C.

Events are session opens and closes, key and IV rotations, channel deaths, worker restarts, internal
errors: what an operator wants to see scroll by while reproducing a problem. `--json` writes one object
per line (JSON Lines) so `| jq` works on a live stream. Each line is flushed as it comes.
"""

from __future__ import annotations

import argparse
import sys

from .. import Client
from .._gen.pipellm.v1 import pipellm_pb2 as pb
from . import render
from .base import Verb, deadline
from .exitcodes import Exit


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per event and line (JSON Lines)")


def line(ev: pb.Event) -> str:
    fields = " ".join(f"{k}={v}" for k, v in sorted(ev.fields.items()))
    parts = [render.fmt_time(ev.time), ev.kind, ev.session_id or "-", ev.message, fields]
    return "  ".join(p for p in parts if p)


def run(client: Client, args: argparse.Namespace) -> int:
    # Connect (and fail fast with exit 3) before streaming; the stream itself waits as long as it must.
    with deadline(args.timeout):
        st = client.status()
    mode = render.enum_name(pb.Mode.DESCRIPTOR, st.mode)
    print(f"watching pipellmd {st.version} at {args.socket} ({mode} mode); Ctrl-C to stop", file=sys.stderr)
    for ev in client.watch():
        if args.json:
            render.print_json(render.to_dict(ev), pretty=False)
        else:
            print(line(ev), flush=True)
    if client.closed:
        return int(Exit.OK)  # Ctrl-C: main closed the client, which cancelled the stream
    print("pipellmctl: pipellmd ended the event stream (it is stopping)", file=sys.stderr)
    return int(Exit.UNREACHABLE)


VERB = Verb("watch", "stream daemon events (sessions, rotations, deaths, restarts) until Ctrl-C", configure, run)
