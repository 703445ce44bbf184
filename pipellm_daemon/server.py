"""pipellmd's lifecycle: start workers and sockets, serve, then drain and stop with grace in `finally`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from pipellm_client.arena import ArenaLayout

from . import config as config_mod
from . import logs, systemd
from .auth import Policy
from .config import Config
from .dataplane import DataPlane
from .events import EventBus
from .pool import BouncePool
from .servicer import PipeLLMServicer
from .sessions import SessionManager
from .status import StatusBuilder
from .workers import WorkerPool

SERVICE = pb.DESCRIPTOR.services_by_name["PipeLLM"].full_name
_log = logs.get("pipellmd")


@contextlib.contextmanager
def socket_umask(mode: int) -> Iterator[None]:
    """Sockets bound inside get exactly `mode` (a socket file is created 0777 & ~umask): no window, however
    short, in which users the mode excludes could connect, and no dependence on the inherited umask.
    The umask is process-wide; the daemon binds before it starts anything that creates files."""
    old = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(old)


def bind_control_socket(server: grpc.aio.Server, path: str, mode: int) -> None:
    """Bind the gRPC server to a Unix socket that has `mode` from the moment it exists (gRPC binds here,
    in add_insecure_port, not in start)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with socket_umask(mode):
        server.add_insecure_port("unix:" + path)
    os.chmod(path, mode)  # a no-op after the umask; kept so the mode never depends on how gRPC binds


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None, flags: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.flags = flags or {}  # command-line settings keep precedence when SIGHUP re-reads the rest
        self.stopping = asyncio.Event()
        self.started = time.monotonic()

    def _reload_log_level(self) -> None:
        try:
            level = config_mod.load(self.config_path, **self.flags).log_level
        except config_mod.ConfigError as exc:
            _log.error("reload_failed", error=str(exc))
            return
        logs.set_level(level)
        _log.info("log_level_reloaded", level=level)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT. Every acquisition is paired with its cleanup on one exit stack, so a
        step that fails at start (a busy socket, say) still stops the workers started before it."""
        systemd.claim()  # before the workers start: they must not inherit NOTIFY_SOCKET
        cfg = self.cfg
        if cfg.mode == "plain":
            _log.warning(
                "plain_mode",
                msg="NO ENCRYPTION: plain mode moves bytes in the clear; benchmark baseline only",
            )
        async with contextlib.AsyncExitStack() as stack:
            workers = WorkerPool(cfg.effective_workers())
            stack.push_async_callback(workers.close)
            await workers.start()
            pool = BouncePool(ArenaLayout(cfg.chunk_size, cfg.h2d_slots, cfg.d2h_slots), cfg.pool_bytes)
            stack.callback(pool.close)
            events = EventBus()
            stack.callback(events.close)
            manager = SessionManager(cfg, workers, pool, events)
            await asyncio.to_thread(pool.replenish)
            self._wire(manager, pool, workers, events)
            status = StatusBuilder(cfg, manager, workers, pool, self.started)
            policy = Policy(cfg.allowed_uids, cfg.allowed_gids, cfg.admin_uids)
            dataplane = DataPlane(cfg.data_socket, cfg.socket_mode, policy, manager)
            server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.so_reuseport", 0)])
            pb_grpc.add_PipeLLMServicer_to_server(PipeLLMServicer(manager, dataplane, status, events), server)
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
            stack.callback(_unlink, cfg.socket)
            bind_control_socket(server, cfg.socket, cfg.socket_mode)
            stack.callback(dataplane.close)
            dataplane.start()
            stack.push_async_callback(server.stop, 2.0)
            await server.start()
            for svc in ("", SERVICE):
                await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
            if cfg.metrics_address:
                from .metrics import MetricsServer

                metrics = MetricsServer(cfg.metrics_address, status, events, workers)
                stack.callback(metrics.stop)
                metrics.start()
            self._handle_signals(stack)
            interval = systemd.watchdog_interval()
            if interval and cfg.watchdog:
                stack.callback(asyncio.get_running_loop().create_task(self._watchdog(interval, status)).cancel)
            stack.push_async_callback(self._drain, manager, health_servicer)  # the first thing done on the way out
            _log.info(
                "ready",
                socket=cfg.socket,
                data_socket=cfg.data_socket,
                mode=cfg.mode,
                workers=workers.count,
                worker_pids=workers.pids(),
                pool_arenas=pool.max_arenas,
                pid=os.getpid(),
            )
            systemd.ready(f"serving on {cfg.socket} ({cfg.mode} mode, {workers.count} workers)")
            await self.stopping.wait()
        _log.info("stopped")
        return 0

    @staticmethod
    def _wire(manager: SessionManager, pool: BouncePool, workers: WorkerPool, events: EventBus) -> None:
        """Keep a spare arena ready after every session change, and log every worker restart."""
        refill: set[asyncio.Future[None]] = set()

        def replenish() -> None:
            if not refill:
                fut = asyncio.ensure_future(asyncio.to_thread(pool.replenish))
                refill.add(fut)
                fut.add_done_callback(refill.discard)

        manager.on_change.append(replenish)
        workers.on_worker_lost.append(
            lambda index, jobs: events.emit(
                "worker_restart",
                "",
                f"crypto worker {index} died with {jobs} jobs",
                level="error",
                worker=index,
                jobs=jobs,
            )
        )

    def _handle_signals(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.stopping.set),
            (signal.SIGINT, self.stopping.set),
            (signal.SIGHUP, self._reload_log_level),
        ):
            loop.add_signal_handler(sig, handler)
            stack.callback(loop.remove_signal_handler, sig)

    async def _drain(self, manager: SessionManager, health_servicer: health.aio.HealthServicer) -> None:
        """No new sessions or transfers; in-flight commits finish (at most drain_timeout_s)."""
        systemd.stopping()
        manager.draining = True
        _log.info("draining", sessions=len(manager.sessions))
        with contextlib.suppress(Exception):
            await health_servicer.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(s.drain() for s in list(manager.sessions.values()))), self.cfg.drain_timeout_s
            )
        except TimeoutError:
            _log.warning("drain_timeout", seconds=self.cfg.drain_timeout_s)

    async def _watchdog(self, interval: float, status: StatusBuilder) -> None:
        """Keep-alives only while the loop runs and the workers are there; systemd restarts us otherwise."""
        while True:
            ok, why = status.healthy()
            if ok:
                systemd.watchdog()
            else:
                _log.warning("watchdog_withheld", reason=why)
            await asyncio.sleep(interval)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
