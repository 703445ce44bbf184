"""Fast checks of the benchmark's workload generators and device model (no daemon, no sleeping).

The harness's numbers are only as good as the traces it replays: these tests pin down the shapes the
workloads claim (bytes per layer, copy order, swap order, intents before loads) and the device model's
arithmetic (link and compute times, the time scale, the emulation debt).
"""

from __future__ import annotations

import itertools
import math

import pytest

from bench import devicemodel as D
from bench import workloads as W
from bench.devicemodel import GB, TESTBED, DeviceModel, TimeScale, VirtualClock
from bench.workloads import vllm_v0_swap

MiB = 1 << 20


def _ops(trace: W.Trace, kind: type, measured: bool = False) -> list:
    return [op for op in trace.ops(measured) if isinstance(op, kind)]


# -- device model -----------------------------------------------------------------------------------------
def _dev(speed: float = 1.0) -> DeviceModel:
    dev = DeviceModel(TimeScale(speed, "test"), clock=VirtualClock())
    dev.reset()
    return dev


def test_link_time_is_bytes_over_the_scaled_link() -> None:
    dev = _dev(speed=2.0)
    end = dev.h2d(50 * 10**9, issued=0.0, host_done=0.0)
    assert end == pytest.approx(0.5)  # 50 GB over a 50 GB/s testbed link at twice testbed speed


def test_copy_ends_no_earlier_than_the_host_finished_encrypting() -> None:
    dev = _dev()
    assert dev.h2d(10**9, issued=0.0, host_done=0.5) == pytest.approx(0.5)  # encryption-bound
    assert dev.h2d(10**9, issued=0.0, host_done=0.0) == pytest.approx(0.52)  # queued behind the first


def test_compute_waits_for_copies_only_when_asked() -> None:
    dev = _dev()
    dev.h2d(50 * 10**9, issued=0.0, host_done=0.0)  # busy until 1.0
    assert dev.compute(0.25, after_copies=False) == pytest.approx(0.25)
    assert dev.compute(0.25, after_copies=True) == pytest.approx(1.25)


def test_d2h_after_compute_starts_when_the_data_exists() -> None:
    dev = _dev()
    dev.compute(1.0, after_copies=False)
    assert dev.d2h(50 * 10**9, issued=0.0, host_done=0.0, after_compute=True) == pytest.approx(2.0)
    assert dev.d2h(0, issued=0.0, host_done=0.0) == pytest.approx(2.0)  # the D2H engine is in order


def test_sync_sleeps_until_every_stream_is_idle() -> None:
    dev = _dev()
    dev.compute(0.3, after_copies=False)
    dev.h2d(10 * 10**9, issued=0.0, host_done=0.0)  # 0.2 s
    assert dev.sync() == pytest.approx(0.3)
    assert dev.slept == pytest.approx(0.3)


def test_emulation_debt_is_not_model_time() -> None:
    clock = VirtualClock()
    dev = DeviceModel(TimeScale(1.0, "test"), clock=clock, record=True)
    dev.reset()
    clock.advance(0.4)
    dev.emulated(0.1)  # the CPU endpoint spent 0.1 s doing the GPU's decryption
    assert dev.now() == pytest.approx(0.3)
    assert dev.to_model(0.45) == pytest.approx(0.35)


def test_testbed_scale_reproduces_the_published_core_to_link_ratio() -> None:
    one_worker = 6.3 * GB
    sc = D.testbed_scale(one_worker)
    assert one_worker / sc.link_bps == pytest.approx(TESTBED.enc_core_bps / TESTBED.link_bps)
    assert sc.wall(1.0) == pytest.approx(TESTBED.enc_core_bps / one_worker)


def test_capacity_scale_fits_the_demand_and_is_never_faster_than_testbed() -> None:
    tb = D.testbed_scale(6.0 * GB)
    sc = D.capacity_scale(12.0 * GB, demand_testbed_bps=50 * GB, headroom=0.5, testbed=tb)
    assert 50 * GB * sc.speed == pytest.approx(0.5 * 12.0 * GB)
    light = D.capacity_scale(12.0 * GB, demand_testbed_bps=1 * GB, headroom=0.5, testbed=tb)
    assert light.speed == tb.speed


# -- FlexGen -----------------------------------------------------------------------------------------------
def test_flexgen_moves_each_offloaded_layer_once_per_token_in_prefetch_order() -> None:
    t = W.flexgen("opt-30b", byte_scale=1 / 512, tokens=2, warmup=1, gpu_fraction=0.2)
    h, layers = W.OPT["opt-30b"]
    layer = t.params["layer_bytes_offloaded"]
    assert layer == pytest.approx(0.8 * 12 * h * h * 2 / 512, abs=4096)
    assert t.regions[0].nbytes == layers * layer
    for step in t.measured:
        loads = [op for op in step.ops if isinstance(op, W.H2D)]
        assert [op.ranges[0].offset // layer for op in loads] == [(j + 1) % layers for j in range(layers)]
        assert all(op.nbytes == layer for op in loads)
        computes = [op for op in step.ops if isinstance(op, W.Compute)]
        assert len(computes) == layers and not any(c.after_copies for c in computes)
        assert step.tokens == 48 * 3
    assert t.h2d_bytes() == 2 * layers * layer


def test_flexgen_sizes_follow_the_models() -> None:
    sizes = {m: W.flexgen(m, byte_scale=1 / 1024, tokens=1, warmup=0).params for m in W.OPT}
    assert [sizes[m]["layers"] for m in ("opt-30b", "opt-66b", "opt-175b")] == [48, 64, 96]
    assert sizes["opt-175b"]["layer_bytes_full"] == 12 * 12288**2 * 2
    # the GPU-resident fraction stays on the GPU
    resident = W.flexgen("opt-66b", byte_scale=1 / 1024, tokens=1, warmup=0, gpu_fraction=0.5)
    assert resident.params["layer_bytes_offloaded"] == pytest.approx(
        sizes["opt-66b"]["layer_bytes_offloaded"] * 0.5 / 0.8, abs=4096
    )


def test_flexgen_is_link_bound_on_the_testbed() -> None:
    t = W.flexgen("opt-30b", byte_scale=1 / 256, tokens=2, warmup=1)
    assert t.params["link_per_layer_testbed_s"] > t.params["compute_per_layer_testbed_s"]
    per_token = 48 * t.params["link_per_layer_testbed_s"]
    assert t.ideal_seconds() == pytest.approx(2 * per_token, rel=0.01)


@pytest.fixture(scope="module")
def fkv() -> W.Trace:
    return W.flexgen("opt-30b", byte_scale=1 / 768, tokens=2, warmup=1, prompt_len=64, kv_offload=True)


def _kv_home(t: W.Trace, offset: int) -> int:
    return offset // t.params["kv_home_bytes"]  # ((layer * gpu batches + gpu batch) * 2 + (0 K, 1 V))


def test_flexgen_kv_positions_are_2_x_hidden_x_2_bytes_per_sequence_scaled(fkv: W.Trace) -> None:
    h, layers = W.OPT["opt-30b"]
    assert fkv.params["kv_position_bytes_full"] == 48 * h * 2  # K (or V) of one position of a GPU batch, fp16
    assert fkv.params["kv_position_bytes"] == 48 * h * 2 // 768  # 896: scaled like the weights
    kv = next(r for r in fkv.regions if r.name == "kv")
    assert not kv.readonly and kv.nbytes == layers * 3 * 2 * fkv.params["kv_home_bytes"]
    assert fkv.params["kv_home_bytes"] >= (64 + 3 + 1) * 896  # prompt + every decode token + the next load


def test_flexgen_kv_follows_the_multi_batch_overlap_loop(fkv: W.Trace) -> None:
    """Per (layer j, GPU batch k): weights of j+1 at k = 0, cache of the next (j, k), compute, store of the previous."""
    layers, pos, layer = 48, fkv.params["kv_position_bytes"], fkv.params["layer_bytes_offloaded"]
    subs = [(j, k) for j in range(layers) for k in range(3)]
    for t, step in enumerate(fkv.steps):
        segments: list[list[W.Op]] = [[]]
        for op in step.ops:
            if isinstance(op, W.Sync):
                segments.append([])
            else:
                segments[-1].append(op)
        segments = [sg for sg in segments if sg]
        if t == 0:  # prologue: layer 0's weights and the first (layer, batch)'s cache
            assert [type(op) for op in segments.pop(0)] == [W.H2D, W.H2D]
        assert len(segments) == len(subs)
        for n, ((j, k), seg) in enumerate(zip(subs, segments, strict=True)):
            h2d = [op for op in seg if isinstance(op, W.H2D)]
            if k == 0:
                weights = h2d.pop(0)
                assert weights.ranges == (W.Range("weights", (j + 1) % layers * layer, layer),)
            (cache,) = h2d
            nj, nk = subs[(n + 1) % len(subs)]
            ctx = 64 + t + 1 + (n + 1 == len(subs))  # the next token's (0, 0) loads one position more
            homes = [_kv_home(fkv, r.offset) for r in cache.ranges]
            assert homes == [(nj * 3 + nk) * 2, (nj * 3 + nk) * 2 + 1]  # K then V
            assert all(r.offset % fkv.params["kv_home_bytes"] == 0 and r.length == ctx * pos for r in cache.ranges)
            (compute,) = [op for op in seg if isinstance(op, W.Compute)]
            assert not compute.after_copies
            stores = [op for op in seg if isinstance(op, W.D2H)]
            if t == 0 and n == 0:
                assert not stores  # the first decode token's predecessor is the prefill (not replayed)
                continue
            pj, pk = subs[n - 1]
            assert [_kv_home(fkv, op.range.offset) for op in stores] == [(pj * 3 + pk) * 2, (pj * 3 + pk) * 2 + 1]
            at = 64 + t - (n == 0)  # the previous token's last store comes at this token's first sub-step
            for op in stores:
                assert op.range.length == pos and op.range.offset % fkv.params["kv_home_bytes"] == at * pos
                assert op.swap_out and not op.after_compute and op.group == 1 + pj * 3 + pk
        assert step.tokens == 144


def test_flexgen_kv_every_store_is_read_back_by_the_next_load_of_its_home(fkv: W.Trace) -> None:
    stored: dict[int, list[W.Range]] = {}
    checked = 0
    for op in fkv.ops(measured=False):
        if isinstance(op, W.D2H):
            stored.setdefault(_kv_home(fkv, op.range.offset), []).append(op.range)
        elif isinstance(op, W.H2D):
            for r in op.ranges:
                if r.region != "kv":
                    continue
                for s in stored.pop(_kv_home(fkv, r.offset), []):
                    assert r.offset <= s.offset and s.offset + s.length <= r.offset + r.length
                    checked += 1
    assert checked > 0 and all(len(v) <= 1 for v in stored.values())  # only the last token's stores are left


def test_flexgen_kv_moves_weights_and_the_growing_cache(fkv: W.Trace) -> None:
    pos, layer = fkv.params["kv_position_bytes"], fkv.params["layer_bytes_offloaded"]
    weights_only = W.flexgen("opt-30b", byte_scale=1 / 768, tokens=2, warmup=1)
    assert weights_only.params["layer_bytes_offloaded"] == layer
    kv_bytes = 0
    for t in (1, 2):  # measured tokens; the last sub-step loads the next token's first (layer, batch)
        kv_bytes += 48 * 3 * 2 * (64 + t + 1) * pos + 2 * pos
    assert fkv.h2d_bytes() == weights_only.h2d_bytes() + kv_bytes
    assert fkv.d2h_bytes() == 2 * 48 * 3 * 2 * pos
    assert fkv.params["kv_link_per_layer_testbed_s"] > fkv.params["compute_per_layer_testbed_s"]  # link-bound
    assert fkv.ideal_seconds() > weights_only.ideal_seconds()


# -- vLLM V0 -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v0() -> W.Trace:
    return W.vllm_v0("llama-2-7b", requests=400, gpu_blocks=256, cpu_blocks=1024, token_scale=0.5, steps=60, skip=200)


def test_v0_every_swap_in_reads_what_a_swap_out_wrote(v0: W.Trace) -> None:
    written: set[tuple[int, int]] = set()
    ins = 0
    for step in v0.steps:
        for op in step.ops:
            if isinstance(op, W.D2H):
                assert op.swap_out and op.group > 0
                written.add((op.range.offset, op.range.length))
            elif isinstance(op, W.H2D):
                for r in op.ranges:
                    assert (r.offset, r.length) in written  # same ranges, so the daemon's chunk keys match
                    ins += 1
    assert ins > 0


def test_v0_copies_are_layer_major_k_then_v(v0: W.Trace) -> None:
    layers, copy = 32, 128 * 1024
    h2ds = _ops(v0, W.H2D)
    assert h2ds
    cpu_blocks = v0.params["cpu_blocks"]
    for op in h2ds:
        planes = [r.offset // (cpu_blocks * copy) for r in op.ranges]  # plane = layer * 2 + (0 K, 1 V)
        assert planes == sorted(planes)
        assert set(planes) == set(range(2 * layers))
        assert all(r.length % copy == 0 for r in op.ranges)


def test_v0_swaps_in_the_newest_swap_out_group_first(v0: W.Trace) -> None:
    """Newest-out preemption + FCFS swap-in = LIFO over swap-out groups (the daemon's "lifo" order)."""
    group_of: dict[tuple[int, int], int] = {}
    out_order: list[int] = []
    swapped: list[int] = []
    for step in v0.steps:
        for op in step.ops:
            if isinstance(op, W.D2H):
                group_of[(op.range.offset, op.range.length)] = op.group
                if op.group not in out_order:
                    out_order.append(op.group)
                    swapped.append(op.group)
            elif isinstance(op, W.H2D):
                groups = []
                for r in op.ranges:
                    g = group_of[(r.offset, r.length)]
                    if g not in groups:
                        groups.append(g)
                newest_first = sorted(swapped, key=out_order.index, reverse=True)
                assert groups == newest_first[: len(groups)]
                swapped = [g for g in swapped if g not in groups]
    assert v0.swap_order == "lifo"


@pytest.fixture(scope="module")
def v0b() -> W.Trace:
    return W.vllm_v0(
        "llama-2-7b", requests=400, gpu_blocks=256, cpu_blocks=1024, token_scale=0.5, steps=60, skip=200, unpacked=True
    )


def _blocks(r: W.Range, copy: int = 128 * 1024) -> list[tuple[int, int]]:
    return [(r.offset + i * copy, copy) for i in range(r.length // copy)]


def test_v0_blocks_are_one_128k_copy_per_block_per_layer_k_and_v(v0: W.Trace, v0b: W.Trace) -> None:
    """`swap_blocks`: the packed trace's copies, each block apart, in the same order; one D2H per block."""
    copy = 128 * 1024
    assert v0b.name == "vllm-v0-blocks-llama2-7b" and v0b.params["unpacked"] and not v0.params["unpacked"]
    assert v0b.regions == v0.regions and v0b.warmup == v0.warmup and len(v0b.steps) == len(v0.steps)
    for packed, blocks in zip(v0.steps, v0b.steps, strict=True):
        assert blocks.tokens == packed.tokens
        p_h2d = [b for op in packed.ops if isinstance(op, W.H2D) for r in op.ranges for b in _blocks(r)]
        b_h2d = [(r.offset, r.length) for op in blocks.ops if isinstance(op, W.H2D) for r in op.ranges]
        assert b_h2d == p_h2d
        assert sum(isinstance(op, W.H2D) for op in blocks.ops) == sum(isinstance(op, W.H2D) for op in packed.ops)
        p_d2h = [(b, op.group) for op in packed.ops if isinstance(op, W.D2H) for b in _blocks(op.range)]
        b_d2h = [((op.range.offset, op.range.length), op.group) for op in blocks.ops if isinstance(op, W.D2H)]
        assert b_d2h == p_d2h
        assert all(op.range.length == copy and op.swap_out for op in blocks.ops if isinstance(op, W.D2H))
        p_comp = [op for op in packed.ops if isinstance(op, W.Compute)]
        assert [op for op in blocks.ops if isinstance(op, W.Compute)] == p_comp
    assert v0b.crypto_bytes() == v0.crypto_bytes() and v0b.max_h2d_range() == copy
    assert len(_ops(v0b, W.D2H)) == v0b.d2h_bytes(measured=False) // copy


def test_v0_blocks_swap_ins_are_layer_major_k_then_v_block_by_block(v0b: W.Trace) -> None:
    layers, copy, cpu_blocks = 32, 128 * 1024, v0b.params["cpu_blocks"]
    h2ds = _ops(v0b, W.H2D)
    assert h2ds
    for op in h2ds:
        assert len(op.ranges) <= W.MAX_COMMIT_RANGES
        assert all(r.length == copy and r.offset % copy == 0 for r in op.ranges)
        planes = [r.offset // (cpu_blocks * copy) for r in op.ranges]  # plane = layer * 2 + (0 K, 1 V)
        assert planes == sorted(planes) and set(planes) == set(range(2 * layers))
        per_plane = len(op.ranges) // (2 * layers)
        assert all(planes.count(p) == per_plane for p in set(planes))  # the same blocks in every layer, K and V
        first = [r.offset % (cpu_blocks * copy) for r in op.ranges[:per_plane]]
        for p in range(2 * layers):
            mine = op.ranges[p * per_plane : (p + 1) * per_plane]
            assert [r.offset % (cpu_blocks * copy) for r in mine] == first  # the mapping, in the same order


def test_v0_blocks_every_swap_in_reads_what_a_swap_out_wrote(v0b: W.Trace) -> None:
    written: set[tuple[int, int]] = set()
    ins = 0
    for op in v0b.ops(measured=False):
        if isinstance(op, W.D2H):
            written.add((op.range.offset, op.range.length))
        elif isinstance(op, W.H2D):
            for r in op.ranges:
                assert (r.offset, r.length) in written  # the same 128 KiB keys
                ins += 1
    assert ins > 1000


def test_v0_blocks_split_a_swap_in_only_at_the_daemons_commit_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipellm_daemon.config import Config

    assert Config().max_transfers_per_commit == W.MAX_COMMIT_RANGES
    kw = {"requests": 400, "gpu_blocks": 256, "cpu_blocks": 1024, "token_scale": 0.5, "steps": 60, "skip": 200}
    whole = W.vllm_v0("llama-2-7b", unpacked=True, **kw)
    monkeypatch.setattr(vllm_v0_swap, "MAX_COMMIT_RANGES", 100)
    split = W.vllm_v0("llama-2-7b", unpacked=True, **kw)
    for a, b in zip(whole.steps, split.steps, strict=True):
        a_in = [r for op in a.ops if isinstance(op, W.H2D) for r in op.ranges]
        b_ops = [op for op in b.ops if isinstance(op, W.H2D)]
        assert [r for op in b_ops for r in op.ranges] == a_in
        assert all(len(op.ranges) <= 100 for op in b_ops)
        assert len(b_ops) == -(-len(a_in) // 100)
        assert b.ops[len(b_ops) :] == a.ops[1 if a_in else 0 :]  # then the same swap-outs, compute, sync


def test_v0_is_seeded() -> None:
    kw = {"requests": 200, "gpu_blocks": 128, "cpu_blocks": 512, "token_scale": 0.25, "steps": 30, "skip": 50}
    a, b = W.vllm_v0("opt-30b", seed=1, **kw), W.vllm_v0("opt-30b", seed=1, **kw)
    c = W.vllm_v0("opt-30b", seed=2, **kw)
    assert a.steps == b.steps
    assert a.steps != c.steps


def test_v0_copy_sizes_per_model() -> None:
    assert {m: W.KV_MODELS[m][1] // 1024 for m in W.KV_MODELS} == {"llama-2-7b": 128, "opt-30b": 224, "opt-66b": 288}


def test_sharegpt_lengths_look_like_sharegpt() -> None:
    import numpy as np

    lens = W.sharegpt_lengths(np.random.default_rng(0), 20000)
    prompt = sum(p for p, _ in lens) / len(lens)
    output = sum(o for _, o in lens) / len(lens)
    assert 120 < prompt < 180 and 250 < output < 360  # means 161 / 338 before clipping at 1024
    assert all(4 <= p <= 1024 and 4 <= o <= 1024 for p, o in lens)


# -- vLLM V1 -----------------------------------------------------------------------------------------------
def test_v1_stores_full_blocks_and_declares_each_load_first() -> None:
    t = W.vllm_v1(conversations=16, turns=4, concurrency=8, cpu_blocks=256, token_scale=0.25, steps=80, skip=20)
    block = t.params["block_bytes"]
    assert block == 32 * 2 * 128 * 1024
    loads = 0
    for step in t.steps:
        ops = list(step.ops)
        for i, op in enumerate(ops):
            if isinstance(op, W.D2H):
                assert not op.swap_out and op.after_compute and op.nbytes == block
            if isinstance(op, W.H2D):
                loads += 1
                assert isinstance(ops[i - 1], W.Declare) and ops[i - 1].ranges == op.ranges
                assert all(r.length == block and r.offset % block == 0 for r in op.ranges)
    assert loads > 0 and t.params["stores"] > 0


# -- multi-LoRA --------------------------------------------------------------------------------------------
def test_zipf_popularity() -> None:
    w = W.zipf_weights(32, 1.0)
    assert math.isclose(float(w.sum()), 1.0)
    assert all(a > b for a, b in itertools.pairwise(w))


def test_lora_adapters_are_2mib_per_rank_and_prefetched_after_being_declared() -> None:
    t = W.lora(adapters=8, byte_scale=1 / 8, batches=6, decode_steps=4, seed=3)
    for rank, size in zip(t.params["ranks"], t.params["adapter_bytes"], strict=True):
        assert rank in (8, 16, 32, 64)
        assert size == pytest.approx(2 * MiB * rank / 8, abs=4096)
    assert all(r.adapter and r.readonly for r in t.regions)
    declared: list[tuple[W.Range, ...]] = []
    for step in t.steps[t.warmup :]:
        for op in step.ops:
            if isinstance(op, W.Declare):
                declared.append(op.ranges)
            elif isinstance(op, W.H2D):
                assert op.ranges in declared  # the prefetch was announced at the start of the batch
                assert all(r.offset == 0 for r in op.ranges)
            elif isinstance(op, W.Compute):
                assert not op.after_copies  # the prefetch overlaps decoding


def _lora_batches(t: W.Trace) -> list[dict[str, list[int]]]:
    """Per batch: what it declared, what it prefetched mid-batch, what it loaded on demand (adapter ids)."""
    per = t.params["decode_steps_per_batch"]
    out: list[dict[str, list[int]]] = []
    for i, step in enumerate(t.steps):
        if i % per == 0:
            out.append({"declared": [], "prefetched": [], "on_demand": []})
        for op in step.ops:
            ids = [int(r.region.removeprefix("lora")) for r in getattr(op, "ranges", ())]
            if isinstance(op, W.Declare):
                assert op.replace == (t.params["mispredict"] > 0) and not op.cyclic  # a new guess replaces the last
                out[-1]["declared"] = ids
            elif isinstance(op, W.H2D) and i % per == per // 2:
                out[-1]["prefetched"] = ids
            elif isinstance(op, W.H2D) and i > 0:
                assert i % per == 0
                out[-1]["on_demand"] = ids
    return out


@pytest.fixture(scope="module")
def lora_pair() -> tuple[W.Trace, W.Trace]:
    kw = {"adapters": 16, "byte_scale": 1 / 8, "batches": 40, "decode_steps": 4, "seed": 3}
    return W.lora(**kw), W.lora(mispredict=0.2, **kw)


def test_lora_mispredicted_a_fifth_of_the_declared_adapters_go_unused(lora_pair: tuple[W.Trace, W.Trace]) -> None:
    _base, t = lora_pair
    batches = _lora_batches(t)
    declared = sum(len(b["declared"]) for b in batches)
    # Declared for batch b+1 but not loaded for it (neither prefetched in batch b nor on demand at b+1's start).
    unused = 0
    for b, nxt in itertools.zip_longest(batches, batches[1:], fillvalue={"on_demand": []}):
        loaded = set(b["prefetched"]) | set(nxt["on_demand"])
        unused += len(set(b["declared"]) - loaded)
    assert declared == t.params["declared_adapters"] > 50
    assert unused == t.params["mispredicted_adapters"] == round(0.2 * declared)
    assert unused / declared == pytest.approx(0.2, abs=0.5 / declared)
    assert all(b["prefetched"] == [a for a in b["declared"] if a in b["prefetched"]] for b in batches)
    on_demand = sum(len(b["on_demand"]) for b in batches)
    assert 0 < on_demand <= unused  # the replaced ones (the last batch's are never needed: it does not run)


def test_lora_mispredicted_loads_exactly_what_each_batch_needs(lora_pair: tuple[W.Trace, W.Trace]) -> None:
    base, t = lora_pair
    need = [b["prefetched"] for b in _lora_batches(base)]  # the baseline prefetches exactly batch b+1's missing
    got = _lora_batches(t)
    assert base.steps[0].ops[0] == t.steps[0].ops[0]  # the first batch's own adapters, loaded up front
    for b in range(len(got) - 1):
        pre, dem = got[b]["prefetched"], got[b + 1]["on_demand"]
        assert not set(pre) & set(dem)
        assert sorted(pre + dem) == sorted(need[b])
        assert not set(dem) & set(got[b]["declared"])  # loaded on demand: undeclared
    assert t.region_bytes() == base.region_bytes() and t.params["adapter_bytes"] == base.params["adapter_bytes"]


def test_lora_mispredicted_waits_for_on_demand_loads_only(lora_pair: tuple[W.Trace, W.Trace]) -> None:
    _base, t = lora_pair
    per = t.params["decode_steps_per_batch"]
    seen = 0
    for i, step in enumerate(t.steps):
        ops = list(step.ops)
        compute = next(op for op in ops if isinstance(op, W.Compute))
        demand = i > 0 and i % per == 0 and isinstance(ops[0], W.H2D)
        assert compute.after_copies == demand  # a batch cannot start without its adapters; a prefetch overlaps
        if demand:
            seen += 1
            assert isinstance(ops[1], W.Declare)  # then the guess for the next batch
    assert seen > 0


def test_lora_mispredicted_is_seeded() -> None:
    kw = {"adapters": 16, "byte_scale": 1 / 8, "batches": 8, "decode_steps": 4, "mispredict": 0.2}
    assert W.lora(seed=1, **kw).steps == W.lora(seed=1, **kw).steps
    assert W.lora(seed=1, **kw).steps != W.lora(seed=2, **kw).steps
    with pytest.raises(ValueError, match="neither resident"):
        W.lora(adapters=8, gpu_slots=8, mispredict=0.2)


# -- accelerate and adversarial ----------------------------------------------------------------------------
def test_accelerate_loads_synchronously_in_forward_order() -> None:
    t = W.accelerate(byte_scale=1 / 64, tokens=2, warmup=1)
    first = t.steps[0].ops[0]
    assert isinstance(first, W.Declare) and first.cyclic and len(first.ranges) == 32
    for step in t.measured:
        ops = list(step.ops)
        assert [type(o) for o in ops[:3]] == [W.H2D, W.Compute, W.Sync]
        assert all(o.after_copies for o in ops if isinstance(o, W.Compute))
        assert [o.ranges[0].offset for o in ops if isinstance(o, W.H2D)] == [r.offset for r in first.ranges]


def test_adversarial_ranges_are_random_and_inside_the_region() -> None:
    t = W.adversarial(region_bytes=64 * MiB, steps=50, seed=5)
    ranges = [r for op in _ops(t, W.H2D) for r in op.ranges]
    assert all(r.offset >= 0 and r.offset + r.length <= 64 * MiB and r.offset % 4096 == 0 for r in ranges)
    assert len({(r.offset, r.length) for r in ranges}) > 0.95 * len(ranges)
    assert W.adversarial(region_bytes=64 * MiB, steps=50, seed=5).steps == t.steps


# -- suites ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["quick", "full"])
def test_every_range_of_every_workload_lies_inside_its_region(size: str) -> None:
    for tr in W.suite(size):
        sizes = {r.name: r.nbytes for r in tr.regions}
        for op in tr.ops(measured=False):
            if isinstance(op, W.H2D | W.Declare):
                ranges = op.ranges
            elif isinstance(op, W.D2H):
                ranges = (op.range,)
            else:
                continue
            for r in ranges:
                assert r.offset >= 0 and r.length > 0 and r.offset + r.length <= sizes[r.region], (tr.name, r)


def test_quick_suite_has_every_workload_and_fits_this_machine() -> None:
    traces = W.suite("quick")
    kinds = {t.kind for t in traces}
    assert kinds == {"flexgen", "vllm-v0", "vllm-v1", "lora", "accelerate", "adversarial"}
    assert len({t.name for t in traces}) == len(traces)
    names = {t.name for t in traces}
    assert {"flexgen-kv-opt30b", "vllm-v0-blocks-llama2-7b", "lora-mispredicted-llama2-7b"} <= names
    # No name is a prefix of another (the harness's --only selects by prefix).
    assert not [(a, b) for a in names for b in names if a != b and b.startswith(a)]
    for t in traces:
        assert t.region_bytes() < 2 << 30, t.name
        assert 0 < t.warmup < len(t.steps), t.name
        assert t.crypto_bytes() > 0 and t.tokens() > 0, t.name
        assert t.ideal_seconds() < 1.0, t.name
