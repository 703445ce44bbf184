"""A crypto worker that dies under a commit makes it ABORTED (IVs abandoned in band), never INTERNAL.

The pipeline-level tests fail chosen jobs with `WorkerLost` at the moment the commit waits for them, on the
on-demand path (naive mode) and on the speculative path (an entry being burned by a skip), and then retry
the commit as the SDK does. The process-level test kills real workers under a naive-mode daemon and checks
that the SDK retried and that every byte arrived intact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from typing import Any

import grpc
import numpy as np
import pytest
from pipellm_client import Client
from pipellm_client._core import DaemonError

from pipellm_daemon.config import Config
from pipellm_daemon.errors import CommitAborted
from pipellm_daemon.launcher import DaemonProcess
from pipellm_daemon.streams import State
from pipellm_daemon.workers import WorkerLost, WorkerPool

from .daemon_harness import Background, worker_procs
from .pipeline_harness import PipelinePair, settle

CHUNK = 64 << 10
BASE = Config(
    chunk_size=CHUNK, h2d_slots=12, d2h_slots=4, demand_slots=2, max_depth=8, ahead_bytes=8 * CHUNK,
    small_transfer_threshold=4096, generation_granule=4096, pool_bytes=1 << 30,
)  # fmt: skip


class Gate:
    """Wraps `WorkerPool.submit`: while armed, every job's future is held until `fail()` fails it."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.real_submit = pool.submit
        self.armed = False
        self.limit = 1 << 30  # hold at most this many jobs, then pass the rest through
        self.held: list[tuple[asyncio.Future[None], asyncio.Future[None]]] = []
        pool.submit = self.submit  # type: ignore[method-assign]

    def submit(self, *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        real = self.real_submit(*args, **kwargs)
        if not self.armed or self.limit <= 0:
            return real
        self.limit -= 1
        held: asyncio.Future[None] = real.get_loop().create_future()
        self.held.append((real, held))
        return held

    async def fail(self) -> int:
        """Fail every held job as a dead worker would, once its real job is over (no writer left)."""
        n = 0
        for real, held in self.held:
            await asyncio.wait([real])
            if not held.done():
                held.set_exception(WorkerLost("worker 0 died (test)"))
                n += 1
        self.held.clear()
        return n


def commit_with_death(
    loop: asyncio.AbstractEventLoop, pair: PipelinePair, gate: Gate, region: Any, j: int, match: str | None = None
) -> None:
    """Run one commit while the gate kills its jobs; answer it as the session would (ABORTED)."""
    dst = np.zeros(CHUNK, np.uint8)
    frame, pending = pair.core.commit_frame([(region, j * CHUNK, CHUNK, dst, False)])
    daemon_side = [(pair.regions[t.region_id], t) for t in frame.commit.transfers]

    async def run() -> None:
        task = asyncio.ensure_future(pair.pipeline.commit(frame.commit.seq, daemon_side, pair._send))
        failed = 0
        while not task.done():  # every job the commit waits for dies, including ones it starts meanwhile
            await asyncio.sleep(0.002)
            failed += await gate.fail()
        assert failed >= 1
        await task

    with pytest.raises(CommitAborted, match=match):
        loop.run_until_complete(run())
    gate.armed = False
    loop.run_until_complete(gate.fail())  # jobs the commit's final refill started die too
    pair.core.fail_commit(frame.commit.seq, DaemonError(grpc.StatusCode.ABORTED, "retry"))
    assert pending.done and pending.error is not None and pending.error.code == grpc.StatusCode.ABORTED
    assert not dst.any(), "nothing of an aborted commit reaches the destination"


def retry(loop: asyncio.AbstractEventLoop, pair: PipelinePair, region: Any, j: int, data: np.ndarray) -> None:
    dst = np.zeros(CHUNK, np.uint8)
    loop.run_until_complete(pair.commit([(region, j * CHUNK, CHUNK, dst, False)]))
    assert (dst == data[j * CHUNK : (j + 1) * CHUNK]).all()


@pytest.mark.timeout(60)
def test_worker_death_under_on_demand_commit_is_aborted_then_retried(loop_and_pool) -> None:
    loop, pool = loop_and_pool
    pair = PipelinePair(dataclasses.replace(BASE, mode="naive"), pool)
    data = np.random.default_rng(3).integers(0, 256, 8 * CHUNK, dtype=np.uint8)
    ro = pair.region(8 * CHUNK, readonly=True, data=data)
    gate = Gate(pool)
    gate.armed = True
    commit_with_death(loop, pair, gate, ro, 3)
    assert pair.pipeline.counters.iv_rotations >= 1, "the dead job's IV is abandoned in band"
    for j in (3, 4, 3):
        retry(loop, pair, ro, j, data)
    assert pair.pipeline.dead is None and pair.core.endpoint.dead is None
    pair.close()


@pytest.mark.timeout(60)
def test_worker_death_under_a_burned_speculative_entry_is_aborted_then_retried(loop_and_pool) -> None:
    loop, pool = loop_and_pool
    cfg = dataclasses.replace(BASE, cost_rotate_us=1e9)  # a skip burns (DISCARD) rather than rotates
    pair = PipelinePair(cfg, pool)
    data = np.random.default_rng(4).integers(0, 256, 8 * CHUNK, dtype=np.uint8)
    ro = pair.region(8 * CHUNK, readonly=True, data=data)
    gate = Gate(pool)
    gate.armed, gate.limit = True, 1  # chunk 1 stays ENCRYPTING until the gate fails it; 2 and 3 get ready
    pair.pipeline.predictors.intents.declare(
        [k for j in (1, 2, 3) for k in pair.keys_of(ro, j * CHUNK, CHUNK)], replace=True, cyclic=False
    )
    pair.pipeline.refill()
    assert gate.held, "speculation started jobs"

    async def others_ready() -> None:
        while any(e.state != State.READY for e in list(pair.pipeline.speculative.queue)[1:]):
            await asyncio.sleep(0.002)

    loop.run_until_complete(asyncio.wait_for(others_ready(), 10))
    assert pair.pipeline.speculative.queue[0].state == State.ENCRYPTING
    gate.limit = 1 << 30  # the commit's own jobs are held too
    # A skip: chunk 2 is ready, chunk 1 is burned (DISCARD) and its job dies while the burn waits for it.
    commit_with_death(loop, pair, gate, ro, 2, match="being relinquished")
    assert pair.pipeline.counters.iv_rotations >= 1
    loop.run_until_complete(settle(2, [pair.pipeline]))
    for j in (2, 3, 1):
        retry(loop, pair, ro, j, data)
    assert pair.pipeline.dead is None and pair.core.endpoint.dead is None
    queued = sum(e.slot >= 0 for e in pair.pipeline.speculative.queue)
    assert pair.arena.h2d.free + len(pair.pipeline.delivered_slots) + queued == cfg.h2d_slots, "no bounce slot leaked"
    pair.close()


# -- real processes -------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.daemon_settings(mode="naive", workers=1, chunk_size=1 << 20)
def test_sdk_retries_commits_whose_worker_was_killed(daemon: DaemonProcess) -> None:
    """Naive mode: every commit is on-demand encryption; kill the worker until a kill lands mid-commit."""
    n = 8 << 20
    data = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)
    c = Client(daemon.socket)
    s = c.open_session("abort-retry")
    w = s.alloc_region(n, readonly=True, data=data)
    dst = np.zeros(n, np.uint8)

    def step(_: int) -> bool:
        dst[:] = 0
        s.h2d(w, 0, n, dst)
        return bool((dst == data).all())

    with Background(step) as bg:
        bg.wait_for(lambda: bg.rounds >= 2, "the transfer loop")
        kills = 0
        while s.aborted_retries == 0 and kills < 20 and bg.exc is None and bg.wrong is None:
            victims = worker_procs(daemon.pid)
            if victims:
                victims[0].send_signal(signal.SIGKILL)
                kills += 1
            mark = bg.rounds
            bg.wait_for(lambda m=mark: bg.rounds >= m + 1, "transfers after the kill")
    assert bg.exc is None, f"a commit failed instead of being retried: {bg.exc!r}"
    assert bg.wrong is None
    assert s.aborted_retries >= 1, f"no kill landed mid-commit in {kills} kills"
    assert s.deaths == [] and c.status().totals.channel_deaths == 0
    print(f"kills={kills} aborted_retries={s.aborted_retries} commits={bg.rounds}")
    s.close()
    c.close()
