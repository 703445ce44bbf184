"""The pipeline's decisions, one scenario each: hit, skip (NOP / DISCARD), miss (rotation), stale, detour,
swap-in, key rotation, and a worker that dies mid-job."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import numpy as np
import pytest
from pipellm_client.channel import RotationPolicy
from pipellm_client.errors import ChannelDead

from pipellm_daemon.config import Config
from pipellm_daemon.counters import SOURCES
from pipellm_daemon.streams import State

from .pipeline_harness import PipelinePair, settle

CHUNK = 64 << 10
BASE = Config(
    chunk_size=CHUNK, h2d_slots=12, d2h_slots=4, demand_slots=2, max_depth=8, ahead_bytes=8 * CHUNK,
    small_transfer_threshold=4096, generation_granule=4096, pool_bytes=1 << 30,
)  # fmt: skip


def setup(loop_and_pool, cfg: Config = BASE, policy: RotationPolicy | None = None, swap_order: str = "fifo"):
    loop, pool = loop_and_pool
    pair = PipelinePair(cfg, pool, policy, swap_order)
    data = np.random.default_rng(1).integers(0, 256, 16 * CHUNK, dtype=np.uint8)
    ro = pair.region(16 * CHUNK, readonly=True, data=data)
    return loop, pair, ro, data


def fetch(loop, pair, region, j: int, n: int = CHUNK) -> np.ndarray:
    dst = np.zeros(n, np.uint8)
    loop.run_until_complete(pair.commit([(region, j * CHUNK, n, dst, False)]))
    return dst


def declare(loop, pair, region, order: list[int]) -> None:
    pair.pipeline.predictors.intents.declare(
        [k for j in order for k in pair.keys_of(region, j * CHUNK, CHUNK)], replace=True, cyclic=False
    )
    pair.pipeline.refill()
    loop.run_until_complete(settle(2, [pair.pipeline]))


def test_declared_order_is_all_hits(loop_and_pool) -> None:
    loop, pair, ro, data = setup(loop_and_pool)
    declare(loop, pair, ro, [5, 2, 7])
    for j in (5, 2, 7):
        assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
    c = pair.pipeline.counters
    assert (c.hits, c.misses, c.skips) == (3, 0, 0) and c.bytes_on_demand == 0


def test_skip_burns_with_discard_and_nop_when_rotation_costs_more(loop_and_pool) -> None:
    # One chunk of ciphertext ahead only: the rest of the queue keeps fresh IVs (burned by NOPs).
    cfg = dataclasses.replace(BASE, ahead_bytes=CHUNK, cost_rotate_us=1e9)
    loop, pair, ro, data = setup(loop_and_pool, cfg)
    declare(loop, pair, ro, [1, 2, 3, 4])
    q = pair.pipeline.speculative.queue
    assert [e.state for e in q] == [State.READY, State.RESERVED, State.RESERVED, State.RESERVED]
    assert (fetch(loop, pair, ro, 3) == data[3 * CHUNK : 4 * CHUNK]).all()  # skip over 1 (DISCARD) and 2 (NOP)
    c = pair.pipeline.counters
    assert (c.skips, c.discards, c.nops, c.iv_rotations) == (1, 1, 1, 0)
    st = pair.core.stats
    assert (st.discards, st.nops) == (1, 1)
    assert (fetch(loop, pair, ro, 4) == data[4 * CHUNK : 5 * CHUNK]).all()


@pytest.mark.parametrize("ring", [False, True], ids=["queue", "ring"])
def test_a_replaced_intent_costs_only_the_ciphertext_it_wasted(loop_and_pool, ring: bool) -> None:
    """Intents [1, 2, 3] made ahead, then replaced by [2, 3, 4]: chunk 1 is burned (DISCARD), the
    ciphertext of 2 and 3 is delivered as it is, nothing is rotated away or encrypted twice."""
    cfg = dataclasses.replace(BASE, cost_rotate_us=1e9)  # burning is the cheaper way to give up chunk 1
    loop, pool = loop_and_pool
    pair = PipelinePair(cfg, pool, ring=ring)
    data = np.random.default_rng(1).integers(0, 256, 16 * CHUNK, dtype=np.uint8)
    ro = pair.region(16 * CHUNK, readonly=True, data=data)
    declare(loop, pair, ro, [1, 2, 3])
    declare(loop, pair, ro, [2, 3, 4])  # replace=True: the serving code's guess changed
    c = pair.pipeline.counters
    assert c.bytes_ahead == 4 * CHUNK  # chunk 4 only: 2 and 3 were not made again
    for j in (2, 3, 4):
        assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
    assert (c.iv_rotations, c.discards, c.misses, c.bytes_on_demand) == (0, 1, 0, 0)
    assert c.intents_bytes_wasted == CHUNK and c.intents_bytes_used == 3 * CHUNK
    assert pair.core.stats.discards == 1 and pair.core.stats.rotations == 0
    pair.close()


def test_a_record_behind_only_rotations_is_a_hit(loop_and_pool) -> None:
    """A commit sent while the ring was still empty reaches the hinted record with only an in-band rotation
    in front of it (the new hint rotated away an unpublished guess, then its own ciphertext was published):
    no wrong guess is passed over, so it is a hit, as the SDK's fast path counts the same record."""
    cfg = dataclasses.replace(BASE, fingerprint=True)  # a fingerprinted (mutable) entry is never published
    loop, pool = loop_and_pool
    pair = PipelinePair(cfg, pool, ring=True)
    data = np.random.default_rng(1).integers(0, 256, 16 * CHUNK, dtype=np.uint8)
    ro = pair.region(16 * CHUNK, readonly=True, data=data)
    rw = pair.region(16 * CHUNK, readonly=False, data=data)
    declare(loop, pair, rw, [1])  # made ahead, left in the queue
    dst = np.zeros(CHUNK, np.uint8)
    frame, pending = pair.core.commit_frame([(ro, 5 * CHUNK, CHUNK, dst, False)])  # nothing in the ring yet
    assert frame is not None
    declare(loop, pair, ro, [5])  # the hint changed: a rotation, then chunk 5 published behind it
    assert [e is None for e, _r in pair.pipeline.published.unassigned()] == [True, False]
    daemon_side = [(pair.regions[t.region_id], t) for t in frame.commit.transfers]
    loop.run_until_complete(pair.pipeline.commit(frame.commit.seq, daemon_side, pair._send))
    assert pending.done and pending.error is None
    assert (dst == data[5 * CHUNK : 6 * CHUNK]).all()
    c = pair.pipeline.counters
    assert (c.hits, c.skips, c.misses, c.ring_discards, c.iv_rotations) == (1, 0, 0, 0, 1)
    pair.close()


def test_miss_relinquishes_by_rotation_and_restarts(loop_and_pool) -> None:
    loop, pair, ro, data = setup(loop_and_pool)
    declare(loop, pair, ro, [1, 2, 3, 4, 5, 6])
    pair.pipeline.predictors.intents.cancel()  # the serving code changed its mind
    assert (fetch(loop, pair, ro, 9) == data[9 * CHUNK : 10 * CHUNK]).all()
    c = pair.pipeline.counters
    assert c.misses == 1 and c.iv_rotations == 1 and c.relinquishes == 1
    assert c.bytes_wasted == 6 * CHUNK and pair.core.stats.rotations == 1
    assert pair.core.endpoint.h2d[0].chan_ctr == 1


def test_ciphertext_made_ahead_is_accounted_to_the_predictor_that_asked(loop_and_pool) -> None:
    """Per source: what intents made ahead is used on hits and wasted when they are withdrawn; a swap-in's
    ciphertext counts for the swap predictor; the totals are the sums of the sources."""
    loop, pair, ro, data = setup(loop_and_pool)
    declare(loop, pair, ro, [1, 2, 3, 4, 5, 6])
    for j in (1, 2):
        assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
    pair.pipeline.predictors.intents.cancel()  # wrong guesses: 3..6 were made for nothing
    fetch(loop, pair, ro, 9)
    c = pair.pipeline.counters
    assert c.intents_bytes_used == 2 * CHUNK
    assert c.intents_bytes_wasted == 4 * CHUNK
    assert c.intents_bytes_ahead == 6 * CHUNK
    kv = pair.region(4 * CHUNK, readonly=False)
    block = np.random.default_rng(3).integers(0, 256, CHUNK, dtype=np.uint8)
    loop.run_until_complete(pair.d2h(block, kv, 0, swap_out=True))
    loop.run_until_complete(settle(2, [pair.pipeline]))
    assert (fetch(loop, pair, kv, 0) == block).all()
    assert c.swap_bytes_ahead == c.swap_bytes_used == CHUNK and c.swap_bytes_wasted == 0
    assert c.source_summary()["swap"] == {"ahead": CHUNK, "used": CHUNK, "wasted": 0}
    assert c.bytes_ahead == sum(getattr(c, f"{s}_bytes_ahead") for s in SOURCES)
    assert c.bytes_used == sum(getattr(c, f"{s}_bytes_used") for s in SOURCES)
    assert c.bytes_wasted == sum(getattr(c, f"{s}_bytes_wasted") for s in SOURCES)
    assert c.to_proto().intents_bytes_wasted == 4 * CHUNK  # status, metrics and the bench read it there


def test_writes_make_ciphertext_stale(loop_and_pool) -> None:
    loop, pair, _ro, _data = setup(loop_and_pool)
    kv = pair.region(4 * CHUNK, readonly=False)
    kv.write(0, np.ones(4 * CHUNK, np.uint8))
    declare(loop, pair, kv, [0, 1])
    kv.write(10, b"\x07" * 5)  # after the daemon encrypted chunk 0 ahead
    out = fetch(loop, pair, kv, 0)
    assert (out == kv.array[:CHUNK]).all() and out[10] == 7
    assert pair.pipeline.counters.stale == 1


def test_extra_transfer_takes_a_detour_and_keeps_the_queue(loop_and_pool) -> None:
    loop, pair, ro, data = setup(loop_and_pool)
    order = [0, 1, 2, 3, 4, 5]
    for _ in range(4):
        for j in order:
            fetch(loop, pair, ro, j)
        loop.run_until_complete(settle(5))
    before = dataclasses.replace(pair.pipeline.counters)
    fetch(loop, pair, ro, 0)
    fetch(loop, pair, ro, 1)
    assert (fetch(loop, pair, ro, 12) == data[12 * CHUNK : 13 * CHUNK]).all()  # unpredicted, large
    for j in (2, 3, 4):
        fetch(loop, pair, ro, j)
    c = pair.pipeline.counters
    assert c.detours - before.detours == 1 and c.iv_rotations == before.iv_rotations
    assert c.hits - before.hits == 5


@pytest.mark.parametrize("order", ["fifo", "lifo"])
def test_swap_out_is_pre_encrypted_for_swap_in(loop_and_pool, order: str) -> None:
    loop, pair, _ro, _data = setup(loop_and_pool, swap_order=order)
    kv = pair.region(8 * CHUNK, readonly=False)
    blocks = {i: np.random.default_rng(10 + i).integers(0, 256, CHUNK, dtype=np.uint8) for i in range(6)}
    # Block i is request i // 2 + 1's copy in layer i % 2; the region is laid out layer by layer, as vLLM's
    # CPU cache is (a request's copies in two layers are not adjacent, so each is a turn of its own).
    at = {i: (i % 2) * 3 + i // 2 for i in range(6)}
    for i in range(6):  # groups of two blocks: requests 1, 2, 3 swapped out in that order
        loop.run_until_complete(pair.d2h(blocks[i], kv, at[i] * CHUNK, swap_out=True, group=i // 2 + 1))
    loop.run_until_complete(settle(2, [pair.pipeline]))
    # fifo: swap-out order; lifo (vLLM V0): newest request first, one block per request per round
    back = [0, 1, 2, 3, 4, 5] if order == "fifo" else [4, 2, 0, 5, 3, 1]
    for i in back:
        assert (fetch(loop, pair, kv, at[i]) == blocks[i]).all()
    c = pair.pipeline.counters
    assert c.hits == 6 and c.misses == 0 and c.bytes_d2h == 6 * CHUNK


@pytest.mark.parametrize("ring", [False, True])
def test_swap_ins_right_after_their_swap_outs_keep_the_cycles_ciphertext(loop_and_pool, ring: bool) -> None:
    """Declared chunks in front of more still-wanted ciphertext than they come to take the second channel:
    the learned cycle's ciphertext (the next pass's weights) is not abandoned by a rotation for them, at
    refill (the swap-outs) nor at the swap-ins' commits (the second block is still predicted after the
    first), whether the weights' records are published in the delivery ring or still queued."""
    loop, pool = loop_and_pool
    pair = PipelinePair(BASE, pool, ring=ring)
    data = np.random.default_rng(1).integers(0, 256, 16 * CHUNK, dtype=np.uint8)
    ro = pair.region(16 * CHUNK, readonly=True, data=data)
    kv = pair.region(2 * CHUNK, readonly=False)
    p = pair.pipeline
    blocks = [np.random.default_rng(7 + b).integers(0, 256, CHUNK, dtype=np.uint8) for b in range(2)]
    for step in range(5):
        if step == 2:
            before = dataclasses.replace(p.counters)
        for j in range(6):  # the weights, in the same order every pass
            assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
        loop.run_until_complete(settle(2, [p]))
        if step == 2:
            assert p.predictors.last_source == "cycle" and p.ahead() > 1
        for b in range(2):
            loop.run_until_complete(pair.d2h(blocks[b], kv, b * CHUNK, swap_out=True, group=step + 1))
        for b in range(2):  # the swap-ins, at once
            assert (fetch(loop, pair, kv, b) == blocks[b]).all()
    c = p.counters
    assert c.iv_rotations == before.iv_rotations, "the cycle's ciphertext was abandoned for the swap-ins"
    assert c.detours - before.detours == 6 and c.hits - before.hits == 18  # swaps of steps 2-4; weights 2-4
    assert c.cycle_bytes_wasted == before.cycle_bytes_wasted
    pair.close()


def test_with_one_channel_a_swap_in_still_preempts_the_cycle(loop_and_pool) -> None:
    """No second channel to take it: the swap-in is made ahead on the only one, in front of the cycle."""
    loop, pair, ro, data = setup(loop_and_pool, dataclasses.replace(BASE, channels=1))
    kv = pair.region(2 * CHUNK, readonly=False)
    p = pair.pipeline
    block = np.random.default_rng(8).integers(0, 256, CHUNK, dtype=np.uint8)
    for step in range(5):
        if step == 2:
            before = dataclasses.replace(p.counters)
        for j in range(6):
            assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
        loop.run_until_complete(settle(2, [p]))
        loop.run_until_complete(pair.d2h(block, kv, 0, swap_out=True, group=step + 1))
        loop.run_until_complete(settle(2, [p]))
        assert (fetch(loop, pair, kv, 0) == block).all()
    c = p.counters
    assert c.detours == 0 and c.iv_rotations - before.iv_rotations == 3, "the queue gave way to each swap-in"
    assert c.misses == before.misses, "each swap-in was made ahead (a hit), not a miss at its commit"


def test_key_rotations_in_band_both_directions(loop_and_pool) -> None:
    loop, pair, ro, data = setup(loop_and_pool, policy=RotationPolicy(upper=30_000, lower=10_000))
    kv = pair.region(4 * CHUNK, readonly=False)
    for step in range(6):
        for j in range(4):
            assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
        src = np.full(CHUNK, step, np.uint8)
        loop.run_until_complete(pair.d2h(src, kv, 0, swap_out=False))
        assert (kv.array[:CHUNK] == step).all()
    c = pair.pipeline.counters
    h2d_v = pair.pipeline.speculative.sender.epoch.version
    assert h2d_v >= 2 and pair.core.endpoint.h2d[0].epoch.version == h2d_v
    assert pair.core.endpoint.d2h[0].epoch.version == pair.pipeline.d2h[0].receiver.epoch.version >= 1
    assert c.key_rotations >= 3 and pair.pipeline.dead is None


def test_a_killed_worker_never_gets_its_iv_reused(loop_and_pool) -> None:
    loop, pool = loop_and_pool
    cfg = dataclasses.replace(BASE, chunk_size=1 << 20, ahead_bytes=16 << 20, max_depth=16, h2d_slots=20)
    pair = PipelinePair(cfg, pool)
    data = np.random.default_rng(2).integers(0, 256, 16 << 20, dtype=np.uint8)
    ro = pair.region(16 << 20, readonly=True, data=data)
    pair.pipeline.predictors.intents.declare(
        [k for j in range(16) for k in pair.keys_of(ro, j << 20, 1 << 20)], replace=True, cyclic=False
    )
    pair.pipeline.refill()
    os.kill(pool.pids()[0], signal.SIGKILL)  # while it encrypts ahead
    loop.run_until_complete(settle(2, [pair.pipeline]))
    failed = sum(e.state == State.FAILED for e in pair.pipeline.speculative.queue)
    for j in range(16):
        dst = np.zeros(1 << 20, np.uint8)
        loop.run_until_complete(pair.commit([(ro, j << 20, 1 << 20, dst, False)]))
        assert (dst == data[j << 20 : (j + 1) << 20]).all()
    assert pool.restarts == 1
    if failed:  # entries whose worker died can only be retired by an IV rotation
        assert pair.pipeline.counters.iv_rotations >= 1


@pytest.mark.parametrize("slots_back_first", [True, False])
def test_a_session_closed_under_a_running_commit_ends_it_without_touching_its_dropped_keys(
    loop_and_pool, slots_back_first: bool
) -> None:
    """The client goes away while a commit waits for a bounce slot: closing the session drops its keys and
    wakes the waiting commit with ChannelDead. The commit's cleanup (abandon, refill) must not speculate on
    the closed pipeline: that looked up a dropped worker key (KeyError, an internal error in the fuzz run)."""
    loop, pair, ro, _data = setup(loop_and_pool)
    p = pair.pipeline
    p.predictors.intents.declare(pair.keys_of(ro, 0, 8 * CHUNK), replace=True, cyclic=True)
    held = []
    while (slot := p.arena.h2d.try_acquire()) is not None:
        held.append(slot)  # every slot taken: the commit's on-demand encryption must wait for one
    dst = np.zeros(CHUNK, np.uint8)
    frame, _pending = pair.core.commit_frame([(ro, 12 * CHUNK, CHUNK, dst, True)])
    assert frame is not None
    daemon_side = [(pair.regions[t.region_id], t) for t in frame.commit.transfers]

    async def run() -> None:
        task = asyncio.ensure_future(p.commit(frame.commit.seq, daemon_side, lambda _c: None))
        await asyncio.sleep(0.01)
        assert not task.done(), "the commit should be waiting for a slot"
        if slots_back_first:
            for slot in held:
                p.arena.h2d.release(slot)  # the waiting commit is handed one, then the keys go
        p.close()  # (else the waiter is woken by the close itself)
        with pytest.raises(ChannelDead):
            await task

    loop.run_until_complete(run())
    pair.core.close()
