"""`pipellmd`: the foreground daemon (systemd runs it as Type=notify)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

import uvloop
from pipellm_client import keymem
from pipellm_client.wire import DEFAULT_SOCKET, MODE_NAMES

from . import __version__, logs
from .config import ConfigError, load
from .server import Daemon


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipellmd", description="PipeLLM encryption sidecar (one per host).")
    p.add_argument("--socket", help=f"control socket path (default {DEFAULT_SOCKET}, or PIPELLM_SOCKET)")
    p.add_argument("--config", help="TOML config file (settings under [pipellmd])")
    p.add_argument("--mode", choices=MODE_NAMES, help="pipellm (default), naive (baseline) or plain (NO ENCRYPTION)")
    p.add_argument("--workers", type=int, help="crypto worker processes (0 = one per core)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--metrics-address", help="serve Prometheus metrics on HOST:PORT (loopback recommended)")
    p.add_argument("--version", action="version", version=f"pipellmd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    flags = {
        "socket": args.socket,
        "mode": args.mode,
        "workers": args.workers,
        "log_level": args.log_level,
        "metrics_address": args.metrics_address,
    }
    try:
        cfg = load(args.config, **flags)
    except ConfigError as exc:
        print(f"pipellmd: {exc}", file=sys.stderr)
        return 2
    logs.configure(cfg.log_level)
    _no_core_dumps()
    if cfg.sched_batch:
        _batch_scheduling()
    if not keymem.lock_all_memory():
        logs.get("pipellmd").warning(
            "memory_not_locked",
            msg="only key pages are locked; OpenSSL key schedules may reach swap: set LimitMEMLOCK=infinity",
        )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Daemon(cfg, args.config, {k: v for k, v in flags.items() if v is not None}).run())


def _batch_scheduling() -> None:
    """SCHED_BATCH for every thread of the daemon (grpc starts some at import); the threads and crypto
    workers they start later inherit it. A batch task never preempts a running one when it wakes (a doorbell
    or declare from the serving process): its turn comes on an idle core or at the next tick. Needs no
    privilege; a sandbox may refuse it."""
    try:
        for _pass in range(5):  # again until none is left over: a thread may start one while we go
            left = 0
            for tid in map(int, os.listdir("/proc/self/task")):
                with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                    if os.sched_getscheduler(tid) != os.SCHED_BATCH:
                        os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
                        left += 1
            if not left:
                return
    except (OSError, AttributeError) as exc:
        logs.get("pipellmd").warning("sched_batch_refused", msg=f"running as SCHED_OTHER: {exc}")


def _no_core_dumps() -> None:
    """The daemon holds keys: no core dumps, no ptrace by same-uid processes (PR_SET_DUMPABLE 0)."""
    import ctypes
    import ctypes.util
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(4, 0, 0, 0, 0)


if __name__ == "__main__":
    sys.exit(main())
