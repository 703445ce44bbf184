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
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        if cfg.mode == "plain":
            _log.warning(
                "plain_mode",
                msg="NO ENCRYPTION: plain mode moves bytes in the clear; benchmark baseline only",
            )
        workers = WorkerPool(cfg.effective_workers())
        await workers.start()
        events = EventBus()
        manager = SessionManager(
            cfg,
            workers,
            BouncePool(ArenaLayout(cfg.chunk_size, cfg.h2d_slots, cfg.d2h_slots), cfg.pool_bytes),
            events,
        )
        pool = manager.pool
        await asyncio.to_thread(pool.replenish)
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
        status = StatusBuilder(cfg, manager, workers, pool, self.started)
        policy = Policy(cfg.allowed_uids, cfg.allowed_gids, cfg.admin_uids)
        dataplane = DataPlane(cfg.data_socket, cfg.socket_mode, policy, manager)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.so_reuseport", 0)])
        pb_grpc.add_PipeLLMServicer_to_server(PipeLLMServicer(manager, dataplane, status, events), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        bind_control_socket(server, cfg.socket, cfg.socket_mode)
        metrics: Any = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            dataplane.start()
            await server.start()
            for svc in ("", SERVICE):
                await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
            if cfg.metrics_address:
                from .metrics import MetricsServer

                metrics = MetricsServer(cfg.metrics_address, status, events, workers)
                metrics.start()
            loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
            loop.add_signal_handler(signal.SIGINT, self.stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload_log_level)
            interval = systemd.watchdog_interval()
            if interval and cfg.watchdog:
                tasks.append(loop.create_task(self._watchdog(interval, status)))
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
            systemd.notify("READY=1", f"STATUS=serving on {cfg.socket} ({cfg.mode} mode, {workers.count} workers)")
            await self.stopping.wait()
        finally:
            systemd.notify("STOPPING=1", "STATUS=draining")
            manager.draining = True
            _log.info("draining", sessions=len(manager.sessions))
            with contextlib.suppress(Exception):
                await health_servicer.enter_graceful_shutdown()
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(s.drain() for s in list(manager.sessions.values()))), cfg.drain_timeout_s
                )
            except TimeoutError:
                _log.warning("drain_timeout", seconds=cfg.drain_timeout_s)
            for t in tasks:
                t.cancel()
            await server.stop(grace=2.0)
            dataplane.close()
            events.close()
            if metrics is not None:
                metrics.stop()
            await workers.close()
            pool.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.socket)
            _log.info("stopped")
        return 0

    async def _watchdog(self, interval: float, status: StatusBuilder) -> None:
        """Keep-alives only while the loop runs and the workers are there; systemd restarts us otherwise."""
        while True:
            ok, why = status.healthy()
            if ok:
                systemd.notify("WATCHDOG=1")
            else:
                _log.warning("watchdog_withheld", reason=why)
            await asyncio.sleep(interval)
