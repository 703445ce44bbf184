"""`pipellmctl status [--json]`: the daemon at a glance; exit 4 when it is unhealthy or draining.

The human form is for an operator at a terminal: mode first (PLAIN is shouted, it means no encryption),
then health, pool, workers, traffic, and one line per session and per channel. `--json` is for scripts:
the whole `Status` with integers as numbers, plus `channels`, a flat list over all sessions.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import Client
from .._gen.pipellm.v1 import pipellm_pb2 as pb
from . import render
from .base import Verb, deadline
from .exitcodes import Exit
from .sessions import session_rows, session_state

PLAIN_WARNING = (
    "!!! PLAIN MODE: NO ENCRYPTION. Bytes cross the shared bounce buffers in the clear; "
    "this is a benchmark baseline, never a deployment. !!!"
)
_MODE_TEXT = {
    pb.MODE_PIPELLM: "pipellm (speculative AES-256-GCM, encrypted ahead)",
    pb.MODE_NAIVE: "naive (AES-256-GCM on demand, one worker: the CUDA driver's baseline)",
    pb.MODE_PLAIN: "PLAIN — NO ENCRYPTION",
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def exit_code(st: pb.Status) -> int:
    return int(Exit.OK if st.healthy and not st.draining else Exit.UNHEALTHY)


def state_text(st: pb.Status) -> str:
    if st.draining:
        return "DRAINING (shutting down: no new sessions or transfers)"
    if not st.healthy:
        return "UNHEALTHY (crypto workers missing; see the daemon log)"
    return "healthy"


def channels_of(st: pb.Status) -> list[dict[str, Any]]:
    """Every channel of every session, each tagged with its session: one list for scripts to filter."""
    out = []
    for s in st.sessions:
        for c in s.channels:
            out.append({"session_id": s.session_id, **render.to_dict(c)})
    return out


def as_json(st: pb.Status) -> dict[str, Any]:
    d = render.to_dict(st)
    d["encrypted"] = st.mode != pb.MODE_PLAIN
    d["channels"] = channels_of(st)
    d["bytes_encrypted"] = st.totals.bytes_ahead + st.totals.bytes_on_demand
    return d


def channel_rows(st: pb.Status) -> list[list[str]]:
    rows = []
    for s in st.sessions:
        for c in s.channels:
            if c.dead:
                state = f"DEAD: {c.dead}"
            elif c.key_rotation_pending:
                state = "key rotation pending"
            else:
                state = "ok"
            rows.append(
                [
                    s.session_id,
                    c.name,
                    str(c.ce),
                    render.enum_name(pb.Direction.DESCRIPTOR, c.direction).upper(),
                    f"v{c.key_version}",
                    str(c.chan_ctr),
                    str(c.msg_ctr),
                    str(c.messages),
                    str(c.key_usage),
                    state,
                ]
            )
    return rows


def human(st: pb.Status, socket: str) -> str:
    t = st.totals
    pool, workers = st.pool, st.workers
    lines: list[str] = []
    if st.mode == pb.MODE_PLAIN:
        lines += [PLAIN_WARNING, ""]
    util = " ".join(render.fmt_percent(u) for u in workers.utilisation) or "-"
    encrypted = t.bytes_ahead + t.bytes_on_demand
    judged = t.hits + t.skips + t.misses + t.late
    kv = [
        ("daemon", f"pipellmd {st.version} at {socket}"),
        ("state", state_text(st)),
        ("uptime", render.fmt_duration(st.uptime_s)),
        ("mode", _MODE_TEXT.get(st.mode, render.enum_name(pb.Mode.DESCRIPTOR, st.mode))),
        (
            "keys",
            "locked in RAM (all memory), excluded from core dumps"
            if st.keys_locked
            else f"NOT fully locked: {st.key_protection or 'mlock refused: raise LimitMEMLOCK / RLIMIT_MEMLOCK'}",
        ),
        ("sessions", str(len(st.sessions))),
        (
            "pool",
            f"{pool.arenas_in_use}/{pool.max_arenas} arenas in use ({pool.arenas_allocated} allocated, "
            f"{render.fmt_bytes(pool.arena_bytes)} each); H2D slots {pool.h2d_slots_in_use}/{pool.h2d_slots_total}",
        ),
        (
            "workers",
            f"{workers.count} {workers.kind or 'crypto'} workers, {workers.jobs} jobs, "
            f"{workers.restarts} restarts, busy {util}",
        ),
        ("chunk", render.fmt_bytes(st.chunk_size)),
        (
            "moved",
            f"H2D {render.fmt_bytes(t.bytes_h2d)}, D2H {render.fmt_bytes(t.bytes_d2h)} "
            f"in {t.commits} commits, {t.d2h_messages} D2H messages",
        ),
        (
            "encrypted",
            f"{render.fmt_bytes(encrypted)} (ahead {render.fmt_bytes(t.bytes_ahead)}, on demand "
            f"{render.fmt_bytes(t.bytes_on_demand)}, wasted {render.fmt_bytes(t.bytes_wasted)})",
        ),
        (
            "hit rate",
            f"{render.fmt_percent(t.hit_rate)} of {judged} predicted chunks "
            f"(hits {t.hits}, skips {t.skips}, misses {t.misses}, late {t.late}, detours {t.detours}; "
            f"{t.staged} hits pre-staged on the device)",
        ),
        (
            "relinquish",
            f"{t.relinquishes} times: {t.nops} NOPs, {t.discards} discards, {t.iv_rotations} IV rotations",
        ),
        ("keys rotated", f"{t.key_rotations}; channel deaths {t.channel_deaths}"),
        ("throughput", f"{render.fmt_rate(st.throughput_bytes_per_s)} (last 10 s)"),
    ]
    width = max(len(k) for k, _ in kv)
    lines += [f"{k.ljust(width)}  {v}" for k, v in kv]
    lines += ["", f"SESSIONS ({len(st.sessions)})"]
    if st.sessions:
        headers, rows, right = session_rows(list(st.sessions))
        lines.append(render.table(headers, rows, right))
    rows = channel_rows(st)
    lines += ["", f"CHANNELS ({len(rows)})"]
    if rows:
        headers = ["SESSION", "CHANNEL", "CE", "DIR", "KEY", "CHAN_CTR", "MSG_CTR", "MESSAGES", "KEY_USAGE", "STATE"]
        lines.append(render.table(headers, rows, right=(2, 5, 6, 7, 8)))
    dead = [s.session_id for s in st.sessions if session_state(s) != "ok"]
    if dead:
        lines += ["", f"dead sessions: {', '.join(dead)} (tag failure or key exhausted; see `pipellmctl watch`)"]
    return "\n".join(lines)


def run(client: Client, args: argparse.Namespace) -> int:
    with deadline(args.timeout):
        st = client.status()
    if args.json:
        if st.mode == pb.MODE_PLAIN:
            print(f"pipellmctl: {PLAIN_WARNING}", file=sys.stderr)
        render.print_json(as_json(st))
    else:
        print(human(st, args.socket), flush=True)
    return exit_code(st)


VERB = Verb("status", "daemon status: mode, health, pool, workers, sessions, channels, traffic", configure, run)
