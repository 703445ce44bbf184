"""vLLM-style KV swapping through a real pipellmd: bit-identical caches after preemption and resume, and the
swap-out -> pre-encrypt -> swap-in path shows up as hits.

Block contents are random bit patterns (fp16 NaNs included), compared as integers. Copy sizes: vLLM copies
one block of one layer, K and V separately. At block_size 16 in fp16 that is 128 KiB for a Llama-2-7B
shape (32 KV heads x 128) -- below the daemon's default 256 KiB small-transfer threshold, so such copies
would never be speculated; those tests run the daemon with `small_transfer_threshold=0` (what a deployment
swapping KV blocks should configure). One test uses an OPT-66B shape (72 heads x 128 = 288 KiB per copy),
which the default threshold already speculates.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pipellm_client import Client, InvalidArgument  # noqa: E402
from pipellm_client.integrations.vllm_swap import (  # noqa: E402
    BlockIDs,
    CacheEngine,
    OffloadingHandlers,
    swap_blocks,
)

pytestmark = [pytest.mark.integrations, pytest.mark.integration]

BLOCK = 16
LLAMA2_7B = (BLOCK, 32, 128)  # 128 KiB per block per layer in fp16
OPT_66B = (BLOCK, 72, 128)  # 288 KiB


class Engine:
    """The scheduler's bookkeeping for a toy vLLM: requests own device blocks; preempted ones own CPU blocks."""

    def __init__(self, layers: int, gpu_blocks: int, block_shape: tuple[int, ...], seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = block_shape
        self.caches = [self.random(2, gpu_blocks) for _ in range(layers)]
        self.gpu_free = list(range(gpu_blocks))
        self.cpu_free: list[int] = []
        self.gpu: dict[int, list[int]] = {}
        self.cpu: dict[int, list[int]] = {}
        self.expect: dict[int, list[Any]] = {}

    def random(self, *lead: int) -> Any:
        return torch.randint(-(2**15), 2**15, (*lead, *self.shape), dtype=torch.int16, generator=self.gen).view(
            torch.float16
        )

    def admit(self, req: int, nblocks: int) -> None:
        self.gpu[req] = [self.gpu_free.pop(0) for _ in range(nblocks)]
        for c in self.caches:
            c[:, self.gpu[req]] = self.random(2, nblocks)  # its prefill writes fresh K/V

    def snapshot(self, req: int) -> list[Any]:
        return [c[:, self.gpu[req]].view(torch.int16).clone() for c in self.caches]

    def preempt(self, req: int) -> list[tuple[int, int]]:
        self.expect[req] = self.snapshot(req)
        dst = [self.cpu_free.pop(0) for _ in self.gpu[req]]
        pairs = list(zip(self.gpu.pop(req), dst, strict=True))
        self.cpu[req] = dst
        return pairs

    def release_gpu(self, pairs: list[tuple[int, int]]) -> None:
        blocks = [g for g, _ in pairs]
        self.gpu_free = blocks + self.gpu_free
        for c in self.caches:
            c[:, blocks] = self.random(2, len(blocks))  # another request overwrites the freed blocks

    def resume(self, req: int) -> list[tuple[int, int]]:
        src = self.cpu.pop(req)
        self.gpu[req] = [self.gpu_free.pop() for _ in src]  # different device blocks than before
        self.cpu_free.extend(src)
        return list(zip(src, self.gpu[req], strict=True))

    def check(self, req: int) -> None:
        got = self.snapshot(req)
        for layer, (a, b) in enumerate(zip(self.expect.pop(req), got, strict=True)):
            assert torch.equal(a, b), f"request {req} layer {layer} differs after resume"


def hit_rate(before: Any, after: Any) -> tuple[int, int]:
    hits = after.hits - before.hits
    judged = (after.hits + after.misses + after.skips + after.late) - (
        before.hits + before.misses + before.skips + before.late
    )
    return hits, judged


def v0_round(s: Any, engine: Engine, eng: CacheEngine, reqs: dict[int, int]) -> tuple[int, int]:
    """Admit requests in arrival order, preempt newest first (swap out), resume FCFS (swap in)."""
    for req, n in reqs.items():
        engine.admit(req, n)
    for req in sorted(reqs, reverse=True):  # the scheduler preempts the newest request first
        pairs = engine.preempt(req)
        eng.swap_out(torch.tensor(pairs), group=req)
        engine.release_gpu(pairs)
    s.wait_all()  # the next decode steps run while the daemon decrypts and pre-encrypts
    time.sleep(0.02)
    before = s.status().counters
    for req in sorted(reqs):  # ... and swaps in first-come-first-served
        eng.swap_in(torch.tensor(engine.resume(req)))
        engine.check(req)
    return hit_rate(before, s.status().counters)


@pytest.mark.daemon_settings(small_transfer_threshold=0)
def test_v0_preempt_and_resume_lifo(daemon) -> None:
    engine = Engine(layers=2, gpu_blocks=24, block_shape=LLAMA2_7B, seed=1)
    engine.cpu_free = list(range(24))
    with Client(daemon.socket) as client, client.open_session(name="v0", swap_order="lifo") as s:
        eng = CacheEngine(s, engine.caches, num_cpu_blocks=24)
        total_hits = total = 0
        for round_, reqs in enumerate([{1: 3, 2: 4, 3: 2, 4: 3}, {5: 2, 6: 5, 7: 1}]):
            hits, judged = v0_round(s, engine, eng, reqs)
            assert judged == 2 * 2 * sum(reqs.values()), round_  # per block per layer, K and V
            total_hits += hits
            total += judged
        # The first swap-in of a round misses once: the daemon pre-encrypted the request swapped out first
        # (the last to come back) before it learned of the others.
        assert total_hits / total >= 0.9, (total_hits, total)
        assert s.status().counters.stale == 0
        eng.close()


@pytest.mark.daemon_settings(small_transfer_threshold=0)
def test_v1_fifo_offloading_handlers(daemon) -> None:
    engine = Engine(layers=2, gpu_blocks=20, block_shape=LLAMA2_7B, seed=2)
    with Client(daemon.socket) as client, client.open_session(name="v1", swap_order="fifo") as s:
        handlers = OffloadingHandlers(s, engine.caches, num_cpu_blocks=32)
        store, load = handlers.gpu_to_cpu_handler, handlers.cpu_to_gpu_handler
        reqs = {1: 3, 2: 4, 3: 2, 4: 3}
        for req, n in reqs.items():
            engine.admit(req, n)
        cpu_next = 0
        for job, req in enumerate(reqs):  # every newly full block is stored, FIFO
            engine.expect[req] = engine.snapshot(req)
            dst = list(range(cpu_next, cpu_next + reqs[req]))
            cpu_next += reqs[req]
            engine.cpu[req] = dst
            assert store.transfer_async(job, (BlockIDs.gpu(engine.gpu[req]), BlockIDs.cpu(dst)))
        finished: list[int] = []
        deadline = time.monotonic() + 10
        while len(finished) < len(reqs) and time.monotonic() < deadline:
            results = store.get_finished()
            assert all(r.success and r.transfer_type == ("GPU", "CPU") for r in results)
            finished += [r.job_id for r in results]
        assert finished == list(range(len(reqs))), "stores complete in submission order"
        for req in reqs:  # requests finish; their device blocks are reused
            pairs = [(g, 0) for g in engine.gpu.pop(req)]
            engine.release_gpu(pairs)
        before = s.status().counters
        for job, req in enumerate(reqs, start=100):  # prefix hits load them back, FIFO
            src = engine.cpu.pop(req)
            engine.gpu[req] = [engine.gpu_free.pop() for _ in src]
            assert load.transfer_async(job, (BlockIDs.cpu(src), BlockIDs.gpu(engine.gpu[req])))
            engine.check(req)
        assert [r.job_id for r in load.get_finished()] == [100, 101, 102, 103]
        hits, judged = hit_rate(before, s.status().counters)
        assert judged == 2 * 2 * sum(reqs.values())
        assert hits / judged >= 0.95, (hits, judged)
        with pytest.raises(InvalidArgument, match="moves"):
            store.transfer_async(9, (BlockIDs.cpu([0]), BlockIDs.gpu([0])))
        handlers.shutdown()


def test_v0_swap_blocks_per_layer_default_threshold(daemon) -> None:
    """vLLM's per-layer `swap_blocks`, with OPT-66B-sized copies (288 KiB) under the default threshold."""
    engine = Engine(layers=2, gpu_blocks=8, block_shape=OPT_66B, seed=3)
    engine.cpu_free = list(range(8))
    with Client(daemon.socket) as client, client.open_session(name="v0-layer", swap_order="lifo") as s:
        eng = CacheEngine(s, engine.caches, num_cpu_blocks=8)
        layers = [eng.cpu.layer(i) for i in range(2)]
        reqs = {1: 2, 2: 3}
        for req, n in reqs.items():
            engine.admit(req, n)
        for req in (2, 1):
            pairs = engine.preempt(req)
            for dev, cpu in zip(engine.caches, layers, strict=True):  # vLLM: one swap_blocks per layer
                swap_blocks(dev, cpu, torch.tensor(pairs), group=req)
            engine.release_gpu(pairs)
        s.wait_all()
        before = s.status().counters
        for req in (1, 2):
            pairs = engine.resume(req)
            for dev, cpu in zip(engine.caches, layers, strict=True):
                swap_blocks(cpu, dev, torch.tensor(pairs))
            engine.check(req)
        after = s.status().counters
        hits, judged = hit_rate(before, after)
        assert after.small_transfers == before.small_transfers, "288 KiB copies are speculated by default"
        assert judged == 2 * 2 * 5
        assert hits / judged >= 0.9, (hits, judged)
        with pytest.raises(InvalidArgument, match="one device tensor"):
            swap_blocks(engine.caches[0], engine.caches[1], [(0, 1)])
        with pytest.raises(InvalidArgument, match="pairs"):
            swap_blocks(engine.caches[0], layers[0], [0, 1, 2])
        eng.close()
