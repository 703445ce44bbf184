"""`pipellmctl sessions [--json]`: who is connected (uid, pid, client name) and how each session fares.

The daemon lists every session only to admins (`admin_uids`); anyone else gets their own uid's.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import Client
from .._gen.pipellm.v1 import pipellm_pb2 as pb
from . import render
from .base import Verb, deadline
from .exitcodes import Exit


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help='print {"sessions": [...]} instead of a table')


def session_state(s: pb.SessionStatus) -> str:
    dead = [c for c in s.channels if c.dead]
    return f"DEAD: {dead[0].name}: {dead[0].dead}" if dead else "ok"


def session_rows(sessions: list[pb.SessionStatus]) -> tuple[list[str], list[list[str]], tuple[int, ...]]:
    headers = [
        "SESSION", "CLIENT", "UID", "PID", "AGE", "ENDPOINT", "STAGING", "REGIONS", "REGION_BYTES",
        "COMMITS", "H2D", "D2H", "HIT_RATE", "DEPTH", "INTENTS", "STATE",
    ]  # fmt: skip
    rows = []
    for s in sessions:
        c = s.counters
        rows.append(
            [
                s.session_id,
                s.client_name or "-",
                str(s.uid),
                str(s.pid),
                render.fmt_duration(s.age_s),
                render.enum_name(pb.EndpointKind.DESCRIPTOR, s.endpoint),
                "device" if s.device_staging else "-",
                str(s.regions),
                render.fmt_bytes(s.region_bytes),
                str(c.commits),
                render.fmt_bytes(c.bytes_h2d),
                render.fmt_bytes(c.bytes_d2h),
                render.fmt_percent(c.hit_rate),
                str(s.depth),
                str(s.intents_pending),
                session_state(s),
            ]
        )
    return headers, rows, (2, 3, 7, 8, 9, 10, 11, 12, 13, 14)


def as_json(sessions: list[pb.SessionStatus]) -> dict[str, Any]:
    return {"sessions": [render.to_dict(s) for s in sessions]}


def run(client: Client, args: argparse.Namespace) -> int:
    with deadline(args.timeout):
        sessions = client.list_sessions()
    if args.json:
        render.print_json(as_json(sessions))
    elif not sessions:
        print("no sessions", flush=True)
    else:
        print(render.table(*session_rows(sessions)), flush=True)
    return int(Exit.OK)


VERB = Verb(
    "sessions",
    "list open sessions (every uid's for admins, else your own): owner uid/pid, client name, regions, traffic, state",
    configure,
    run,
)
