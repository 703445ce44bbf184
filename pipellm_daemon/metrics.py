"""Optional Prometheus endpoint: the same numbers as `pipellmctl status`, scraped from a snapshot.

The HTTP server runs in prometheus-client's thread; it never touches live daemon state. The event loop
refreshes a status snapshot every second and the collector renders that, so a scrape can neither race the
loop nor slow it down. Loopback by default; nothing here carries key material.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from prometheus_client import ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from . import logs
from .events import EventBus
from .status import StatusBuilder
from .workers import WorkerPool

# Every integer counter of pb.Counters, read from the contract itself, so a counter added to the proto
# is exported without anyone remembering to list it here (hit_rate, a ratio, is a gauge below).
_COUNTERS = tuple(f.name for f in pb.Counters.DESCRIPTOR.fields if f.cpp_type != FieldDescriptor.CPPTYPE_DOUBLE)
_log = logs.get("pipellmd.metrics")


class _Snapshot(Collector):
    def __init__(self) -> None:
        self.status: pb.Status | None = None
        self.latency: tuple[list[float], list[int], float, int] | None = None
        self.events: dict[str, int] = {}
        self.lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        with self.lock:
            st, lat, events = self.status, self.latency, dict(self.events)
        if st is None:
            return
        t = st.totals
        for name in _COUNTERS:
            yield CounterMetricFamily(
                f"pipellm_{name}", f"PipeLLM {name.replace('_', ' ')} (all sessions)", value=getattr(t, name)
            )
        yield GaugeMetricFamily("pipellm_hit_rate", "Speculative stream hit rate", value=t.hit_rate)
        yield GaugeMetricFamily("pipellm_sessions", "Open sessions", value=len(st.sessions))
        yield GaugeMetricFamily("pipellm_uptime_seconds", "Daemon uptime", value=st.uptime_s)
        yield GaugeMetricFamily(
            "pipellm_throughput_bytes_per_second", "Bytes moved, last 10 s", value=st.throughput_bytes_per_s
        )
        yield GaugeMetricFamily("pipellm_healthy", "1 when serving", value=1.0 if st.healthy else 0.0)
        yield GaugeMetricFamily("pipellm_draining", "1 while shutting down", value=1.0 if st.draining else 0.0)
        yield GaugeMetricFamily(
            "pipellm_keys_locked",
            "1 when key pages are mlock-ed and not dumpable",
            value=1.0 if st.keys_locked else 0.0,
        )
        yield GaugeMetricFamily("pipellm_pool_arenas_in_use", "Bounce arenas in use", value=st.pool.arenas_in_use)
        yield GaugeMetricFamily("pipellm_pool_arenas_max", "Bounce arenas pool_bytes allows", value=st.pool.max_arenas)
        yield GaugeMetricFamily(
            "pipellm_pool_h2d_slots_in_use", "H2D bounce slots in use", value=st.pool.h2d_slots_in_use
        )
        # Not "..._total": that suffix is reserved for counters, and this is a gauge (open sessions' slots).
        yield GaugeMetricFamily(
            "pipellm_pool_h2d_slots", "H2D bounce slots of the open sessions", value=st.pool.h2d_slots_total
        )
        yield CounterMetricFamily("pipellm_worker_restarts", "Crypto worker restarts", value=st.workers.restarts)
        util = GaugeMetricFamily("pipellm_worker_utilisation", "Busy fraction per crypto worker", labels=["worker"])
        for i, u in enumerate(st.workers.utilisation):
            util.add_metric([str(i)], u)
        yield util
        ev = CounterMetricFamily("pipellm_events", "Events by kind", labels=["kind"])
        for kind, n in sorted(events.items()):
            ev.add_metric([kind], n)
        yield ev
        if lat is not None:
            bounds, counts, total, n = lat
            buckets = []
            acc = 0
            for b, c in zip(bounds, counts, strict=False):
                acc += c
                buckets.append((repr(b), acc))
            buckets.append(("+Inf", n))
            yield HistogramMetricFamily(
                "pipellm_commit_latency_seconds",
                "Commit latency (request to final completion)",
                buckets=buckets,
                sum_value=total,
            )


class MetricsServer:
    def __init__(self, address: str, status: StatusBuilder, events: EventBus, workers: WorkerPool) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"metrics_address must be HOST:PORT, got {address!r}")
        self.host, self.port = host.strip("[]"), int(port)
        self.status = status
        self.events = events
        self.registry = CollectorRegistry()
        self.snapshot = _Snapshot()
        self.registry.register(self.snapshot)
        # process_* (RSS, fds, CPU) of the daemon itself; read from /proc by the HTTP thread, no daemon state.
        ProcessCollector(registry=self.registry)
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> None:
        st = self.status.build()
        lat = self.status.latency.export()
        with self.snapshot.lock:
            self.snapshot.status = st
            self.snapshot.latency = lat
            self.snapshot.events = dict(self.events.counts)

    async def _loop(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(1.0)

    def start(self) -> None:
        self.refresh()
        try:
            self._server, _thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics_address {self.host}:{self.port}: {exc.strerror}") from None
        # With port 0 the kernel picks one: record and log the real one, or nobody can find the endpoint.
        self.port = int(self._server.server_address[1])
        _log.info("metrics_listening", address=f"{self.host}:{self.port}", path="/metrics")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # shutdown() only stops the loop; this closes the listening socket
