"""The Prometheus endpoint tells the same story as `GetStatus`, on loopback, and carries no secrets."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from typing import Any

import numpy as np
import pytest
from pipellm_client import Client
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from .daemon_harness import checked_swap

pytestmark = pytest.mark.integration

# Every integer counter of the contract: the endpoint must export each one, including ones added later.
COUNTERS = tuple(f.name for f in pb.Counters.DESCRIPTOR.fields if f.name != "hit_rate")
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
BASE64_KEY = re.compile(r"[A-Za-z0-9+/]{43}=")
METRICS = pytest.mark.daemon_settings(metrics_address="127.0.0.1:0")


def metrics_address(daemon: Any) -> str:
    """The daemon logs the port it bound (port 0 = the kernel picks a free one)."""
    for line in daemon.log().splitlines():
        if '"metrics_listening"' in line:
            return str(json.loads(line)["address"])
    raise AssertionError(f"no metrics_listening line in the daemon log:\n{daemon.log()}")


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(smp: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return smp[(name, tuple(sorted(labels.items())))]


def workload(client: Client) -> Any:
    """Repeated weight loads (hits once the cycle is learnt), a KV swap out and in, a small transfer."""
    s = client.open_session("metrics")
    n = 5 << 20
    data = np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8)
    w = s.alloc_region(n, readonly=True, name="w", data=data)
    dst = np.zeros(n, np.uint8)
    for _ in range(4):
        for i in range(5):
            s.h2d(w, i << 20, 1 << 20, dst[i << 20 : (i + 1) << 20])
        assert (dst == data).all()
    checked_swap(s, s.alloc_region(4 << 20, name="kv"), 4096, 3 << 20)
    small = np.zeros(100, np.uint8)
    s.h2d(w, 7, 100, small)
    return s


def settled_scrape(address: str, client: Client) -> tuple[str, Any]:
    """Scrape until the endpoint agrees with a fresh `GetStatus` on every counter (bounded).

    The endpoint renders a snapshot refreshed once a second, and speculation may still encrypt ahead
    for a moment after the workload returns, so both sides are read again on each try.
    """
    deadline = time.monotonic() + 10
    while True:
        text = scrape(address)
        st = client.status()
        smp = samples(text)
        if all(value(smp, f"pipellm_{n}_total") == getattr(st.totals, n) for n in COUNTERS):
            return text, st
        if time.monotonic() > deadline:
            return text, st  # the caller's assertions say what differs
        time.sleep(0.2)


def scrape_after_workload(daemon: Any) -> tuple[str, Any]:
    """Run `workload` to its end, then scrape: the text and the `GetStatus` it agrees with."""
    address = metrics_address(daemon)
    with Client(daemon.socket) as client:
        workload(client).close()
        return settled_scrape(address, client)


@METRICS
def test_counters_match_status(daemon):
    address = metrics_address(daemon)
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    with Client(daemon.socket) as client:
        s = workload(client)
        text, st = settled_scrape(address, client)
        smp = samples(text)
        t = st.totals
        # the workload exercised what we compare, so equal values are not just zeros
        for name in ("commits", "hits", "bytes_h2d", "bytes_d2h", "d2h_messages", "small_transfers", "chunks"):
            assert getattr(t, name) > 0, name
        for name in COUNTERS:
            assert value(smp, f"pipellm_{name}_total") == getattr(t, name), name
        assert value(smp, "pipellm_hit_rate") == pytest.approx(t.hit_rate)
        assert value(smp, "pipellm_sessions") == len(st.sessions) == 1
        assert value(smp, "pipellm_healthy") == 1.0 and value(smp, "pipellm_draining") == 0.0
        assert value(smp, "pipellm_pool_arenas_in_use") == st.pool.arenas_in_use == 1
        assert value(smp, "pipellm_pool_arenas_max") == st.pool.max_arenas
        assert value(smp, "pipellm_keys_locked") == (1.0 if st.keys_locked else 0.0)
        assert value(smp, "pipellm_worker_restarts_total") == st.workers.restarts == 0
        assert {k[1] for k in smp if k[0] == "pipellm_worker_utilisation"} == {
            (("worker", "0"),),
            (("worker", "1"),),
        }
        assert value(smp, "pipellm_events_total", kind="session_opened") == 1
        assert value(smp, "process_open_fds") > 0  # the daemon's own process metrics are there too
        s.close()


@METRICS
def test_commit_latency_histogram(daemon):
    text, st = scrape_after_workload(daemon)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    hist = fams["pipellm_commit_latency_seconds"]
    assert hist.type == "histogram"
    by_name: dict[str, list[Any]] = {}
    for smp in hist.samples:
        by_name.setdefault(smp.name, []).append(smp)
    (count,) = by_name["pipellm_commit_latency_seconds_count"]
    assert count.value == st.totals.commits > 0
    buckets = by_name["pipellm_commit_latency_seconds_bucket"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count.value
    values = [b.value for b in buckets]
    assert values == sorted(values), "cumulative buckets must never decrease"
    bounds = [float(b.labels["le"]) for b in buckets]
    assert bounds == sorted(bounds)
    (total,) = by_name["pipellm_commit_latency_seconds_sum"]
    assert 0 < total.value < 60 * count.value


@METRICS
def test_no_key_material_in_metrics(daemon):
    text, _st = scrape_after_workload(daemon)
    assert not HEX64.search(text)
    assert not BASE64_KEY.search(text)  # a 32-byte key in base64 is 43 characters and one "="


def test_metrics_off_by_default(daemon):
    assert "metrics_listening" not in daemon.log()
