"""The CUDA endpoint and the daemon's speculative DMA on the CPU: an emulated CuPy keeps "device" memory in
host memory and runs the real aesgcm.cu through the emulator. The real daemon pipeline feeds it, so hits,
DISCARDs, NOPs, rotations, tampering, D2H and device staging all run through CudaEndpoint's own code.
What only a GPU can show (real CuPy, CUDA IPC across processes, speed) is test_gpu_endpoint.py's job."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from gpu_emu_runner import cxx_compiler
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.errors import ChannelDead, TagMismatch

from pipellm_daemon.config import Config
from pipellm_daemon.cuda_staging import DeviceStaging
from pipellm_daemon.workers import WorkerPool

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from tests.pipeline_harness import PipelinePair, settle

pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler to build the emulator")

CHUNK = 16 << 10
CFG = Config(
    chunk_size=CHUNK, h2d_slots=8, d2h_slots=4, demand_slots=2, max_depth=4, ahead_bytes=4 * CHUNK,
    small_transfer_threshold=4096, generation_granule=4096, pool_bytes=1 << 30,
)  # fmt: skip


@pytest.fixture(scope="module")
def fake_cp() -> Iterator[Any]:
    import gpu_fake_cupy

    # By name too: the daemon's cuda_staging imports it as `cupy`.
    with gpu_fake_cupy.installed(gpu_fake_cupy.make_module()) as mod:
        yield mod


@pytest.fixture
def env(fake_cp: Any) -> Iterator[tuple[asyncio.AbstractEventLoop, WorkerPool, Any]]:
    loop = asyncio.new_event_loop()
    pool = WorkerPool(1)
    loop.run_until_complete(pool.start())
    yield loop, pool, fake_cp
    loop.run_until_complete(pool.close())
    loop.close()


def test_cuda_endpoint_under_the_real_pipeline(env, monkeypatch) -> None:
    loop, pool, cp = env
    pair = PipelinePair(CFG, pool, endpoint="cuda")
    assert pair.core.endpoint.kind == "cuda" and pair.core.endpoint.pinned.strategy == "registered"
    data = np.random.default_rng(1).integers(0, 256, 8 * CHUNK, dtype=np.uint8)
    ro = pair.region(8 * CHUNK, readonly=True, data=data)
    pair.pipeline.predictors.intents.declare(
        [k for j in (0, 1, 2, 3) for k in pair.keys_of(ro, j * CHUNK, CHUNK)], replace=True, cyclic=False
    )
    pair.pipeline.refill()
    loop.run_until_complete(settle(2, [pair.pipeline]))
    for j in (0, 2, 5):  # hit, skip (burns 1 by DISCARD), miss (relinquishes 3)
        dst = cp.zeros(CHUNK, dtype=cp.uint8)
        loop.run_until_complete(pair.commit([(ro, j * CHUNK, CHUNK, dst, False)]))
        assert (dst.get() == data[j * CHUNK : (j + 1) * CHUNK]).all()
    c = pair.pipeline.counters
    assert (c.hits, c.skips, c.misses) == (1, 1, 1) and c.discards >= 1
    # D2H: the GPU encrypts with its own counter, the daemon decrypts with its prediction.
    kv = pair.region(4 * CHUNK, readonly=False)
    src = cp.asarray(np.arange(3 * CHUNK, dtype=np.uint8))
    loop.run_until_complete(pair.d2h(src, kv, 0, swap_out=True))
    assert (kv.array[: 3 * CHUNK] == src.get()).all()
    loop.run_until_complete(settle(2, [pair.pipeline]))
    back = cp.zeros(3 * CHUNK, dtype=cp.uint8)
    loop.run_until_complete(pair.commit([(kv, 0, 3 * CHUNK, back, False)]))
    assert (back.get() == src.get()).all()
    pair.close()


def test_d2h_without_a_free_slot_is_held_in_device_memory_and_lands_in_order(env) -> None:
    """D2H never waits for bounce slots on the CUDA endpoint either: with 4 slots, 7 chunks return at once;
    the 3 without a slot keep their ciphertext in device memory (not in the arena, not in host memory) and
    move into slots, in encryption order, as the daemon frees them."""
    loop, pool, cp = env
    pair = PipelinePair(CFG, pool, endpoint="cuda")
    kv = pair.region(8 * CHUNK, readonly=False)
    data = np.random.default_rng(9).integers(0, 256, 7 * CHUNK, dtype=np.uint8)
    frames = [f for f, _ in pair.core.landed_frames(cp.asarray(data), kv, 0, swap_out=True, group=0) if f]
    held = [b.held for b in pair.core.d2h_backlog]
    assert len(frames) == 1 and len(frames[0].landed.messages) == 4 and len(held) == 3
    assert all(type(h).__name__ == "_HeldOnDevice" for h in held)
    assert pair.core.d2h_backlog_bytes == 3 * (CHUNK + 16)

    async def land(fs: list[Any]) -> None:
        for f in fs:
            directives = await pair.pipeline.landed(f.landed, pair.regions[kv.id])
            pair.core.landed_done(pb.LandedDone(seq=f.landed.seq, directives=directives))

    loop.run_until_complete(land(frames))
    drained = 0
    while pair.core.d2h_backlog:
        more = pair.core.drain_d2h()
        assert more, "slots were freed but nothing moved"
        drained += len(more)
        loop.run_until_complete(land(more))
    assert drained == 3 and pair.core.d2h_backlog_bytes == 0 and not pair.core.landing
    assert (kv.array[: 7 * CHUNK] == data).all()
    pair.close()


def test_device_staging_makes_hits_decrypt_from_device_memory(env) -> None:
    loop, pool, cp = env
    import gpu_fake_cupy

    pair = PipelinePair(CFG, pool, endpoint="cuda")
    req = pair.core.staging_request()
    assert req is not None
    pair.pipeline.staging = DeviceStaging(
        bytes(req.ipc_handle), req.size, req.stride, CFG.h2d_slots, req.device, pair.arena.shm.view
    )
    data = np.random.default_rng(2).integers(0, 256, 4 * CHUNK, dtype=np.uint8)
    ro = pair.region(4 * CHUNK, readonly=True, data=data)
    pair.pipeline.predictors.intents.declare(
        [k for j in range(4) for k in pair.keys_of(ro, j * CHUNK, CHUNK)], replace=True, cyclic=False
    )
    pair.pipeline.refill()
    loop.run_until_complete(settle(2, [pair.pipeline]))
    before = len(gpu_fake_cupy.MEMCPY_LOG)
    for j in range(4):
        dst = cp.zeros(CHUNK, dtype=cp.uint8)
        loop.run_until_complete(pair.commit([(ro, j * CHUNK, CHUNK, dst, False)]))
        assert (dst.get() == data[j * CHUNK : (j + 1) * CHUNK]).all()
    assert pair.pipeline.counters.staged == 4
    arena = pair.core.arena.view
    base = int(np.frombuffer(arena, np.uint8).ctypes.data)
    # Only the batch tables (control data, from private pinned memory) go host-to-device at commit time.
    assert not gpu_fake_cupy.h2d_copies_from(base, len(arena), before), "staged hits read nothing from the arena"
    assert all(c[3] < 4096 for c in gpu_fake_cupy.MEMCPY_LOG[before:] if c[0] == 1)
    pair.close()


def test_tampering_kills_the_channel_and_leaves_the_destination_untouched(env) -> None:
    loop, pool, cp = env
    pair = PipelinePair(CFG, pool, endpoint="cuda")
    data = np.random.default_rng(3).integers(0, 256, 2 * CHUNK, dtype=np.uint8)
    ro = pair.region(2 * CHUNK, readonly=True, data=data)
    real_apply = pair.core.apply_completion

    def tamper(comp):  # the untrusted host flips a ciphertext bit in the bounce slot
        for d in comp.deliveries:
            if d.kind == 1:
                pair.core.arena.view[pair.core.layout.h2d_slot(d.slot) + 7] ^= 0x20
        return real_apply(comp)

    pair.core.apply_completion = tamper  # type: ignore[method-assign]
    dst = cp.full(CHUNK, 0xEE, dtype=cp.uint8)
    with pytest.raises(ChannelDead):  # TagMismatch, seen through the harness's in-process wiring
        loop.run_until_complete(pair.commit([(ro, 0, CHUNK, dst, False)]))
    assert (dst.get() == 0xEE).all(), "nothing of the failed message reached the destination"
    assert "tag mismatch" in (pair.core.endpoint.dead or "")


def test_pinning_falls_back_to_a_staging_buffer(env, monkeypatch) -> None:
    loop, pool, cp = env
    monkeypatch.setenv("PIPELLM_PIN_STRATEGY", "staging")  # as on a CC-mode GPU that refuses cudaHostRegister
    cfg = dataclasses.replace(CFG, channels=1)
    pair = PipelinePair(cfg, pool, endpoint="cuda")
    assert pair.core.endpoint.pinned.strategy == "staging"
    data = np.random.default_rng(4).integers(0, 256, 3 * CHUNK, dtype=np.uint8)
    ro = pair.region(3 * CHUNK, readonly=True, data=data)
    dst = cp.zeros(3 * CHUNK, dtype=cp.uint8)
    loop.run_until_complete(pair.commit([(ro, 0, 3 * CHUNK, dst, False)]))
    assert (dst.get() == data).all()
    kv = pair.region(CHUNK, readonly=False)
    loop.run_until_complete(pair.d2h(cp.asarray(data[:CHUNK]), kv, 0, swap_out=False))
    assert (kv.array == data[:CHUNK]).all()
    pair.close()


def _batched(pair: PipelinePair, tamper_at: int | None = None) -> list[list[tuple[int, int]]]:
    """Run each completion's deliveries as one endpoint batch, flushed after its last delivery inside
    the SDK's own error handling (what `with endpoint.batch():` around the delivery loop does);
    optionally flip a ciphertext bit of the `tamper_at`-th DATA delivery of the first completion that
    has more than that. Returns each completion's DATA (dst_offset, length)."""
    core = pair.core
    real_apply, real_deliver = core.apply_completion, core._deliver
    seen: list[list[tuple[int, int]]] = []
    state = {"tampered": False, "left": 0}

    def deliver(d, p, release):  # type: ignore[no-untyped-def]
        real_deliver(d, p, release)
        state["left"] -= 1
        if state["left"] == 0:
            core.endpoint.flush()

    def apply(comp):  # type: ignore[no-untyped-def]
        data = [d for d in comp.deliveries if d.kind == 1]
        seen.append([(d.dst_offset, d.length) for d in data])
        if tamper_at is not None and not state["tampered"] and len(data) > tamper_at:
            core.arena.view[core.layout.h2d_slot(data[tamper_at].slot) + 5] ^= 0x08
            data[tamper_at].staged = False
            state["tampered"] = True
        state["left"] = len(comp.deliveries)
        with core.endpoint.batch():
            return real_apply(comp)

    core._deliver = deliver  # type: ignore[method-assign]
    core.apply_completion = apply  # type: ignore[method-assign]
    return seen


def test_a_completions_data_messages_run_as_one_batch(env) -> None:
    loop, pool, cp = env
    pair = PipelinePair(CFG, pool, endpoint="cuda")
    n = 6 * CHUNK - 100  # the last chunk is not a whole number of AES blocks
    data = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)
    ro = pair.region(n, readonly=True, data=data)
    pair.pipeline.predictors.intents.declare(pair.keys_of(ro, 0, n), replace=True, cyclic=False)
    pair.pipeline.refill()
    loop.run_until_complete(settle(2, [pair.pipeline]))
    seen = _batched(pair)
    ep = pair.core.endpoint
    dst = cp.zeros(n, dtype=cp.uint8)
    loop.run_until_complete(pair.commit([(ro, 0, n, dst, False)]))
    assert (dst.get() == data).all()
    assert ep.accepted == 6 and ep.batches == len([c for c in seen if c]) < 6
    assert ep.largest_batch == max(len(c) for c in seen) >= 2
    pair.close()


def test_a_bad_tag_in_the_middle_of_a_completion_leaves_its_whole_batch_untouched(env) -> None:
    loop, pool, cp = env
    pair = PipelinePair(CFG, pool, endpoint="cuda")
    n = 6 * CHUNK
    data = np.random.default_rng(6).integers(0, 256, n, dtype=np.uint8)
    ro = pair.region(n, readonly=True, data=data)
    pair.pipeline.predictors.intents.declare(pair.keys_of(ro, 0, n), replace=True, cyclic=False)
    pair.pipeline.refill()
    loop.run_until_complete(settle(2, [pair.pipeline]))
    seen = _batched(pair, tamper_at=1)
    dst = cp.full(n, 0xD7, dtype=cp.uint8)
    with pytest.raises((ChannelDead, TagMismatch)):
        loop.run_until_complete(pair.commit([(ro, 0, n, dst, False)]))
    batch = next(c for c in seen if len(c) > 1)
    host = dst.get()
    for off, length in batch:  # the message before the bad one authenticated, and is not written either
        assert (host[off : off + length] == 0xD7).all(), (off, batch)
    assert "tag mismatch" in (pair.core.endpoint.dead or "")
