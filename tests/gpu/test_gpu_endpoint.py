"""The CUDA endpoint on a real GPU, through a real pipellmd: every check that needs CUDA itself (real CuPy,
NVRTC, pinned memory, CUDA IPC between the daemon and this process). Skipped without a GPU."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from pipellm_client import Client, Intent
from pipellm_client.errors import ChannelDead
from pipellm_client.gpu import cuda_available

from pipellm_daemon.launcher import DaemonProcess

OK, WHY = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"no CUDA GPU: {WHY}")]

MiB = 1 << 20


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def _weights(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("staging", [True, False])
def test_gpu_endpoint_round_trips_and_hits(cp, staging: bool) -> None:
    with (
        DaemonProcess(workers=4) as d,
        Client(d.socket) as c,
        c.open_session("gpu", endpoint="cuda", device_staging=staging) as s,
    ):
        assert s.core.endpoint.kind == "cuda"
        data = _weights(16 * MiB, 1)
        w = s.alloc_region(16 * MiB, readonly=True, data=data)
        s.declare([Intent(w, j * MiB, MiB) for j in range(16)], cyclic=True)
        dst = cp.zeros(MiB, dtype=cp.uint8)
        for step in range(3):
            for j in range(16):
                s.h2d(w, j * MiB, MiB, dst)
                assert (cp.asnumpy(dst) == data[j * MiB : (j + 1) * MiB]).all(), (step, j)
        st = s.status()
        assert st.counters.hits >= 40
        assert st.device_staging == staging
        if staging:
            assert st.counters.staged > 0
        # big transfers straight into a torch-free cupy buffer, and odd sizes
        big = cp.zeros(16 * MiB - 3, dtype=cp.uint8)
        s.h2d(w, 3, 16 * MiB - 3, big)
        assert (cp.asnumpy(big) == data[3:]).all()
        # D2H: the GPU encrypts with its own counter; the daemon decrypts into the region
        kv = s.alloc_region(8 * MiB, name="kv")
        src = cp.asarray(_weights(5 * MiB + 7, 2))
        s.d2h(src, kv, 100, swap_out=True, wait=True)
        assert (kv.read(100, 5 * MiB + 7) == cp.asnumpy(src)).all()
        back = cp.zeros(5 * MiB + 7, dtype=cp.uint8)
        s.h2d(kv, 100, 5 * MiB + 7, back)
        assert (back == src).all()


def test_gpu_endpoint_equals_cpu_endpoint(cp) -> None:
    with DaemonProcess(workers=2) as d, Client(d.socket) as c:
        data = _weights(6 * MiB + 123, 3)
        outs = {}
        for kind in ("cpu", "cuda"):
            with c.open_session(kind, endpoint=kind) as s:
                w = s.alloc_region(data.size, readonly=True, data=data)
                if kind == "cpu":
                    out = np.zeros(data.size, np.uint8)
                    s.h2d(w, 0, data.size, out)
                    outs[kind] = out
                else:
                    out = cp.zeros(data.size, dtype=cp.uint8)
                    s.h2d(w, 0, data.size, out)
                    outs[kind] = cp.asnumpy(out)
        assert (outs["cpu"] == outs["cuda"]).all() and (outs["cuda"] == data).all()


def test_gpu_tamper_kills_channel_and_leaves_destination_untouched(cp) -> None:
    with DaemonProcess(workers=2) as d, Client(d.socket) as c, c.open_session("tamper", endpoint="cuda") as s:
        w = s.alloc_region(2 * MiB, readonly=True, data=_weights(2 * MiB, 4))
        real = s.core.apply_completion

        def tamper(comp):
            for dl in comp.deliveries:
                if dl.kind == 1:
                    s.core.arena.view[s.core.layout.h2d_slot(dl.slot) + 99] ^= 1
                    dl.staged = False  # force the arena path, where the host can tamper
            return real(comp)

        s.core.apply_completion = tamper
        dst = cp.full(MiB, 0x5A, dtype=cp.uint8)
        with pytest.raises(ChannelDead):
            s.h2d(w, 0, MiB, dst)
        assert (cp.asnumpy(dst) == 0x5A).all()
        assert "tag mismatch" in (s.core.endpoint.dead or "")
        deadline = time.monotonic() + 5
        while c.status().totals.channel_deaths < 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # the endpoint's report reaches the daemon on its own schedule
        assert c.status().totals.channel_deaths == 1


def test_gpu_nops_and_discards(cp) -> None:
    with (
        DaemonProcess(workers=2, ahead_bytes=MiB, cost_rotate_us=1e9) as d,
        Client(d.socket) as c,
        c.open_session("burn", endpoint="cuda") as s,
    ):
        data = _weights(8 * MiB, 5)
        w = s.alloc_region(8 * MiB, readonly=True, data=data)
        s.declare([Intent(w, j * MiB, MiB) for j in range(1, 6)])
        time.sleep(0.3)
        dst = cp.zeros(MiB, dtype=cp.uint8)
        s.h2d(w, 4 * MiB, MiB, dst)  # skips 1 (encrypted: DISCARD), 2 and 3 (fresh IVs: NOPs)
        assert (cp.asnumpy(dst) == data[4 * MiB : 5 * MiB]).all()
        st = s.endpoint_stats
        assert st["nops"] >= 1 and st["discards"] >= 1


def test_pin_fallback_strategy(cp, monkeypatch) -> None:
    monkeypatch.setenv("PIPELLM_PIN_STRATEGY", "staging")
    with DaemonProcess(workers=2) as d, Client(d.socket) as c, c.open_session("pin", endpoint="cuda") as s:
        assert s.core.endpoint.pinned.strategy == "staging"
        data = _weights(3 * MiB, 6)
        w = s.alloc_region(3 * MiB, readonly=True, data=data)
        out = cp.zeros(3 * MiB, dtype=cp.uint8)
        s.h2d(w, 0, 3 * MiB, out)
        assert (cp.asnumpy(out) == data).all()
    assert os.environ["PIPELLM_PIN_STRATEGY"] == "staging"


def test_d2h_waits_for_the_callers_pending_upload(cp) -> None:
    """A source still being filled on the caller's stream must be encrypted only after that work is done."""
    with DaemonProcess(workers=4) as d, Client(d.socket) as c, c.open_session("race", endpoint="cuda") as s:
        kv = s.alloc_region(32 * (512 << 10))
        blocks = [_weights(512 << 10, 100 + i) for i in range(32)]
        for i, b in enumerate(blocks):
            s.d2h(cp.asarray(b), kv, i * (512 << 10), swap_out=True)  # the upload is asynchronous
        for i, b in enumerate(blocks):
            assert (kv.read(i * (512 << 10), 512 << 10) == b).all(), i


def test_gpu_endpoint_batches_a_completion(cp) -> None:
    """A completion's DATA messages as one batch on the real GPU (the SDK's batch hook, wired here)."""
    with DaemonProcess(workers=4) as d, Client(d.socket) as c, c.open_session("batch", endpoint="cuda") as s:
        ep = s.core.endpoint

        def batched(fn):
            def wrapper(*a, **kw):
                with ep.batch():
                    return fn(*a, **kw)

            return wrapper

        s.core.apply_completion = batched(s.core.apply_completion)  # the slow path's completions
        s.core.commit_frame = batched(s.core.commit_frame)  # hits served from a delivery ring, where there is one
        data = _weights(8 * MiB + 5, 7)
        w = s.alloc_region(data.size, readonly=True, data=data)
        s.declare([Intent(w, 0, data.size)])
        time.sleep(0.3)
        out = cp.zeros(data.size, dtype=cp.uint8)
        s.h2d(w, 0, data.size, out)
        assert (cp.asnumpy(out) == data).all()
        assert ep.largest_batch >= 2 and ep.batches < ep.accepted
