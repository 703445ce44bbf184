"""Predictors on traces shaped like the serving systems they model."""

from __future__ import annotations

import random

from pipellm_daemon.predictors import (
    ChunkId,
    CyclePredictor,
    IntentPredictor,
    LoraPredictor,
    PredictorsByPriority,
    SwapPredictor,
)

MiB = 1 << 20


def chunks_of(region: int, offset: int, length: int, chunk: int = MiB) -> list[ChunkId]:
    return [ChunkId(region, o, min(chunk, offset + length - o)) for o in range(offset, offset + length, chunk)]


def score(pred, trace: list[ChunkId], warmup: int) -> float:
    """Fraction of commits after `warmup` whose chunk was the predictor's first guess."""
    good = total = 0
    for i, key in enumerate(trace):
        guess = pred.upcoming(1)
        if i >= warmup:
            total += 1
            good += guess[:1] == [key]
        pred.observe(key)
    return good / total


def flexgen_trace(layers: int, per_layer: int, tokens: int) -> list[ChunkId]:
    """Each token loads every layer's weights in order (attention then MLP), one region per layer."""
    trace = []
    for _ in range(tokens):
        for j in range(layers):
            trace += chunks_of(100 + j, 0, per_layer * MiB)
    return trace


def test_flexgen_cycle_learned_within_two_periods() -> None:
    layers, per_layer = 48, 3
    trace = flexgen_trace(layers, per_layer, tokens=5)
    period = layers * per_layer
    c = CyclePredictor()
    assert score(c, trace, warmup=2 * period) == 1.0
    c2 = CyclePredictor()
    assert score(c2, trace[: 2 * period], warmup=period + 8) >= 0.95, "learned early in the second period"


def test_accelerate_forward_order_with_occasional_extra_transfers() -> None:
    """accelerate's AlignDevicesHook fetches weights in forward order; sometimes an extra tensor moves."""
    rng = random.Random(3)
    base = [k for j in range(30) for k in chunks_of(7, j * 2 * MiB, 2 * MiB)]
    trace = []
    for step in range(8):
        for i, k in enumerate(base):
            trace.append(k)
            if step in (3, 5) and i == rng.randrange(len(base)):
                trace.append(ChunkId(99, step, 4096))  # an unpredictable one-off
    c = CyclePredictor()
    assert score(c, trace, warmup=2 * len(base)) >= 0.97


def test_random_order_turns_speculation_off() -> None:
    keys = [ChunkId(1, i * MiB, MiB) for i in range(64)]
    rng = random.Random(0)
    c = CyclePredictor()
    trace = [rng.choice(keys) for _ in range(2000)]
    speculated = 0
    for k in trace:
        speculated += len(c.upcoming(8))
        c.observe(k)
    assert c.score < 0.5
    assert speculated / len(trace) < 0.5, "a useless predictor must mostly stay quiet"


def test_vllm_v0_swap_in_is_fcfs_over_requests() -> None:
    """V0 preempts the newest request first and swaps in FCFS, so requests come back newest-swapped-out
    first; its CacheEngine copies layer by layer, K then V, and within each every request of the mapping:
    the swap-in is round after round of one unit per request. The set is learned from the first round.
    (The CPU cache is laid out as vLLM's and `CpuKVCache`'s: per layer, K then V, every CPU block.)"""
    sp = SwapPredictor("lifo")
    unit = 128 * 1024
    cpu_blocks = 16
    per_req: dict[int, list[ChunkId]] = {}
    for group, req in enumerate((3, 2, 1), start=1):  # newest (3) preempted first
        per_req[req] = []
        for layer in range(4):
            for kv in (0, 1):
                k = ChunkId(50, ((layer * 2 + kv) * cpu_blocks + 2 * req) * unit, unit)
                per_req[req].append(k)
                sp.swapped_out([k], group=group)

    def swap_in(reqs: list[int]) -> list[ChunkId]:
        return [per_req[r][i] for i in range(8) for r in reqs]  # layer-major, K then V, requests FCFS

    first = swap_in([1, 2])  # requests 1 and 2 come back (oldest first); 3 stays out
    hits = 0
    for k in first:
        hits += sp.upcoming(1) == [k]
        sp.observe(k)
    assert hits >= len(first) - 1, "at most the set's edge is guessed wrong, then it is learned"
    assert sp.upcoming(8) == per_req[3]
    for k in per_req[3]:
        sp.observe(k)
    assert sp.upcoming(5) == []


def test_vllm_v0_swap_blocks_one_copy_per_block_is_a_run_per_request() -> None:
    """vLLM's own `swap_blocks` copies one block at a time: a request's turn in a round is then the run of
    its blocks in that layer's K (or V), adjacent in the CPU cache. Were each block its own turn, the rounds
    would alternate requests block by block and most swap-in chunks would miss."""
    sp = SwapPredictor("lifo")
    block, cpu_blocks, layers = 128 * 1024, 32, 3
    extent = {1: (0, 3), 2: (3, 2), 3: (5, 4)}  # request -> (first CPU block, blocks): first fit

    def copies(reqs: list[int]) -> list[tuple[int, ChunkId]]:
        return [
            (r, ChunkId(7, ((layer * 2 + kv) * cpu_blocks + extent[r][0] + b) * block, block))
            for layer in range(layers)
            for kv in (0, 1)
            for r in reqs
            for b in range(extent[r][1])
        ]

    for r, k in copies([3, 2, 1]):  # one step preempts 3, 2, then 1 (newest first), swap_blocks order
        sp.swapped_out([k], group=r)
    swap_in = [k for _r, k in copies([1, 2])]  # FCFS: 1 and 2 come back together; 3 stays out
    hits = 0
    for k in swap_in:
        hits += sp.upcoming(1) == [k]
        sp.observe(k)
    assert hits >= len(swap_in) - 1, "only the first guess of the set may be wrong"
    assert sp.upcoming(4 * layers * 2) == [k for _r, k in copies([3])]


def test_packed_runs_of_one_request_are_not_merged_across_layers() -> None:
    """A packed copy (one range per request per layer's K or V) is a run by itself: ranges of one request
    in consecutive layers are not adjacent, so two requests still alternate range by range."""
    sp = SwapPredictor("lifo")
    block, cpu_blocks = 128 * 1024, 32
    ranges = {
        r: [ChunkId(8, ((lk * cpu_blocks) + first) * block, n * block) for lk in range(4)]
        for r, (first, n) in {1: (0, 3), 2: (3, 2)}.items()
    }
    for lk in range(4):
        for r in (2, 1):
            sp.swapped_out([ranges[r][lk]], group=r)
    swap_in = [ranges[r][lk] for lk in range(4) for r in (1, 2)]
    hits = 0
    for k in swap_in:
        hits += sp.upcoming(1) == [k]
        sp.observe(k)
    assert hits >= len(swap_in) - 1


def test_a_d2h_call_that_arrives_in_pieces_is_still_one_swap_unit() -> None:
    """A swap-out larger than the free bounce slots reaches the daemon as several Landed frames (the rest
    `continues` the call). Each call is one unit of the CacheEngine's rounds: were each piece a unit of its
    own, the rounds would interleave requests mid-range and every swap-in chunk would miss."""
    sp = SwapPredictor("lifo")
    ranges: dict[int, list[list[ChunkId]]] = {}
    for group, req in enumerate((2, 1), start=1):
        ranges[req] = []
        for layer in range(3):
            keys = [ChunkId(51, (req * 100 + layer * 4 + c) * MiB, MiB) for c in range(4)]
            ranges[req].append(keys)
            sp.swapped_out(keys[:1], group=group)  # one free slot ...
            for k in keys[1:]:
                sp.swapped_out([k], group=group, continues=True)  # ... the rest from the SDK's backlog
    swap_in = [k for layer in range(3) for req in (1, 2) for k in ranges[req][layer]]
    hits = 0
    for k in swap_in:
        hits += sp.upcoming(1) == [k]
        sp.observe(k)
    assert hits >= len(swap_in) - 4, "only the first range's guess of the set may be wrong"
    # An ungrouped call continued stays one group of its own, not one per piece.
    sp.swapped_out([ChunkId(52, 0, MiB)], group=0)
    sp.swapped_out([ChunkId(52, MiB, MiB)], group=0, continues=True)
    assert sp.upcoming(4) == [ChunkId(52, 0, MiB), ChunkId(52, MiB, MiB)]


def test_a_block_swapped_out_again_in_a_continued_call_moves_once() -> None:
    """The same block in a later piece of a d2h call (a client that swaps a range out twice, or sends a
    continuation it should not): the block is predicted once, at its newest place, and nothing breaks.
    (This used to raise KeyError in the daemon when the block was its group's only one.)"""
    for order in ("lifo", "fifo"):
        for group in (0, 5):
            sp = SwapPredictor(order)
            k = ChunkId(53, 0, MiB)
            sp.swapped_out([k], group=group)
            sp.swapped_out([k], group=group, continues=True)
            assert sp.upcoming(4) == [k] and sp.pending == 1
            sp.swapped_out([ChunkId(53, MiB, MiB), k], group=group, continues=True)
            assert sp.upcoming(4) == [ChunkId(53, MiB, MiB), k] and sp.pending == 2


def test_vllm_v1_offloading_is_fifo() -> None:
    sp = SwapPredictor("fifo")
    stores = [ChunkId(60, i * 2 * MiB, 2 * MiB) for i in range(10)]
    for k in stores:
        sp.swapped_out([k], group=0)
    assert sp.upcoming(10) == stores
    sp.observe(stores[0])
    sp.observe(stores[1])
    assert sp.upcoming(2) == stores[2:4]
    sp.forget_region(60)
    assert sp.upcoming(2) == []


def test_intents_are_authoritative_and_consumed() -> None:
    ip = IntentPredictor()
    ks = [ChunkId(1, i * MiB, MiB) for i in range(6)]
    ip.declare(ks, replace=False, cyclic=False)
    assert ip.upcoming(3) == ks[:3]
    ip.observe(ks[2])  # skipped over 0 and 1: they are dropped
    assert ip.upcoming(10) == ks[3:]
    ip.observe(ChunkId(9, 0, 1))  # something undeclared changes nothing
    assert ip.pending == 3
    ip.declare(ks[:2], replace=False, cyclic=True)
    assert ip.upcoming(10)[:5] == [*ks[3:], *ks[:2]]
    assert ip.cancel() > 0 and ip.upcoming(4) == []


def test_lora_next_adapter_from_popularity_and_hints() -> None:
    lp = LoraPredictor(resident=1)
    adapters = {r: chunks_of(r, 0, 3 * MiB) for r in (10, 11, 12, 13)}
    for r, ks in adapters.items():
        lp.add_adapter(r, ks)
    rng = random.Random(5)
    popular = [10] * 6 + [11] * 3 + [12] * 2 + [13]
    loaded = []
    for _ in range(40):
        r = rng.choice(popular)
        if loaded and loaded[-1] == r:
            continue  # still resident
        for k in adapters[r]:
            lp.observe(k)
        loaded.append(r)
    guess = lp.upcoming(1)[0].region
    assert guess != loaded[-1] and guess in (10, 11)
    # Mid-load, the rest of the adapter is the obvious prediction.
    lp.observe(adapters[13][0])
    assert lp.upcoming(5) == adapters[13][1:]


def test_combined_priority() -> None:
    cb = PredictorsByPriority("fifo")
    cyc = [ChunkId(1, i * MiB, MiB) for i in range(4)]
    for _ in range(4):
        for k in cyc:
            cb.observe(k)
    assert cb.upcoming(2) == cyc[:2] and cb.last_source == "cycle"
    swapped = [ChunkId(2, 0, MiB)]
    cb.swap.swapped_out(swapped, group=0)
    assert cb.upcoming(2) == swapped and cb.last_source == "swap"
    cb.intents.declare([ChunkId(3, 0, MiB)], replace=False, cyclic=False)
    assert cb.upcoming(2) == [ChunkId(3, 0, MiB)] and cb.last_source == "intents"
    assert cb.outranks("intents", "cycle") and not cb.outranks("cycle", "swap")


def test_history_compaction_keeps_the_cycle() -> None:
    c = CyclePredictor(max_history=64)
    cyc = [ChunkId(1, i * MiB, MiB) for i in range(10)]
    trace = cyc * 30
    assert score(c, trace, warmup=40) == 1.0
