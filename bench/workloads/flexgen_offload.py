"""FlexGen weight offloading of OPT-30B/66B/175B, optionally with the KV cache on the CPU."""

from __future__ import annotations

from typing import Final

from ..devicemodel import TESTBED, Testbed
from .trace import D2H, H2D, PAGE, Compute, Op, Range, RegionSpec, Step, Sync, Trace, lines, pages

OPT: Final = {"opt-30b": (7168, 48), "opt-66b": (9216, 64), "opt-175b": (12288, 96)}


def flexgen(
    model: str,
    *,
    byte_scale: float,
    tokens: int = 4,
    warmup: int = 2,
    gpu_fraction: float = 0.2,
    gpu_batch: int = 48,
    num_gpu_batches: int = 3,
    kv_offload: bool = False,
    prompt_len: int = 512,
    seed: int = 0,
    testbed: Testbed = TESTBED,
) -> Trace:
    """FlexGen decode with weights offloaded: per token, layer (j+1) mod L loads while layer j computes.

    Defaults follow FlexGen's OPT-30B benchmark (`--percent 20 80 ...`, GPU batch 48 x 3 batches). The KV
    cache and activations stay where that setting keeps them (CPU, attention computed there) and are not
    modelled: the trace is the weight stream. Per layer compute is the roofline of the dense matmuls over
    the 144-token batch (weights read once per GPU batch) plus attention over `context` tokens.

    `kv_offload=True`: the KV cache lives on the CPU too but attention runs on the GPU (`--percent 20 80 0
    100 ...` without `--cpu-cache-compute`: `flex_opt.py` `SelfAttention.load_cache` path 0), so the cache crosses the
    link. The loop is `generation_loop_overlap_multi_batch`: for every layer j and GPU batch k, the next
    layer's weights load (at k = 0 only: `load_weight` copies once per layer), the K and V cache of the next
    (layer, GPU batch) load (`load_cache(i, j, k+1)`: one copy each of positions [0, prompt + i), the home is
    laid out (position, batch x heads, head dim), so a prefix is contiguous), batch k computes, and the new
    token's K and V of the previous (layer, GPU batch) are stored (`store_cache(i, j, k-1)`: one position,
    `gpu_batch x hidden x 2` bytes each, fp16), then everything syncs. A stored position is read back by the
    next token's load of the same (layer, GPU batch), inside a larger range: the stores are D2H copies into
    the mutable region "kv" marked as coming back (`swap_out`, one group per (layer, GPU batch)). KV bytes
    scale with `byte_scale` like the weights (to 64-byte lines, not pages: a scaled position is under a
    page); attention compute is the roofline of reading that cache once, scaled alike. The trace starts at
    the first decode token (the prefill that wrote the prompt's cache is not replayed; the region holds it).
    """
    h, layers = OPT[model]
    full_layer = 12 * h * h * 2  # 4h^2 attention + 8h^2 MLP, fp16
    layer_bytes = pages((1 - gpu_fraction) * full_layer * byte_scale)
    batch = gpu_batch * num_gpu_batches
    flops = 2 * 12 * h * h * batch
    hbm = full_layer * num_gpu_batches
    compute_s = testbed.compute_s(flops, hbm) * byte_scale
    region = RegionSpec("weights", layers * layer_bytes)

    shape = {  # what both traces record first about the model and its offloaded weights
        "model": model,
        "hidden": h,
        "layers": layers,
        "layer_bytes_full": full_layer,
        "layer_bytes_offloaded": layer_bytes,
        "gpu_fraction": gpu_fraction,
        "batch_tokens": batch,
    }

    def load(j: int) -> H2D:
        return H2D((Range("weights", j * layer_bytes, layer_bytes),), label=f"w{j}")

    steps = []
    if not kv_offload:
        for t in range(warmup + tokens):
            ops: list[Op] = [load(0), Sync()] if t == 0 else []
            for j in range(layers):
                ops += [load((j + 1) % layers), Compute(compute_s, after_copies=False, label=f"L{j}"), Sync()]
            steps.append(Step(tuple(ops), tokens=batch))
        return Trace(
            name=f"flexgen-{model.replace('-', '')}",
            kind="flexgen",
            description=f"FlexGen {model.upper()} decode, {1 - gpu_fraction:.0%} of weights offloaded, batch {batch}",
            regions=(region,),
            steps=tuple(steps),
            warmup=warmup,
            scale={"byte_scale": byte_scale},
            params={
                **shape,
                "compute_per_layer_testbed_s": compute_s,
                "link_per_layer_testbed_s": testbed.link_s(layer_bytes),
                "seed": seed,
            },
        )

    gpu_batches = num_gpu_batches
    pos_full = gpu_batch * h * 2  # one position of K (or V) of one GPU batch, fp16
    pos_bytes = lines(pos_full * byte_scale)
    # positions [0, prompt + tokens] of one K or V, rounded up to whole pages (never below what is read)
    home = -(-(prompt_len + warmup + tokens + 1) * pos_bytes // PAGE) * PAGE
    subs = [(j, k) for j in range(layers) for k in range(gpu_batches)]

    def home_of(j: int, k: int, kv: int) -> int:
        return ((j * gpu_batches + k) * 2 + kv) * home

    def load_kv(t: int, j: int, k: int) -> H2D:
        ctx = prompt_len + t + 1  # decode token i = t + 1 attends over positions [0, prompt + i)
        ranges = tuple(Range("kv", home_of(j, k, kv), ctx * pos_bytes) for kv in (0, 1))
        return H2D(ranges, label=f"kv{j}b{k}")

    def store_kv(t: int, j: int, k: int) -> list[Op]:
        at = prompt_len + t  # token i = t + 1 writes position prompt + i - 1
        g = 1 + j * gpu_batches + k
        return [
            D2H(Range("kv", home_of(j, k, kv) + at * pos_bytes, pos_bytes), group=g, label=f"store {j}b{k}")
            for kv in (0, 1)
        ]

    def attention_s(ctx: int) -> float:
        kv_read = ctx * gpu_batch * 2 * h * 2
        return testbed.compute_s(2 * kv_read, kv_read) * byte_scale  # ~1 FLOP per KV byte each way

    per_batch_s = compute_s / gpu_batches  # the dense part of one GPU batch: weights read once, 48 tokens
    for t in range(warmup + tokens):
        ops = [load(0), load_kv(0, 0, 0), Sync()] if t == 0 else []
        for n, (j, k) in enumerate(subs):
            if k == 0:
                ops.append(load((j + 1) % layers))
            nt, nn = (t, n + 1) if n + 1 < len(subs) else (t + 1, 0)
            ops.append(load_kv(nt, *subs[nn]))
            secs = per_batch_s + attention_s(prompt_len + t + 1)
            ops.append(Compute(secs, after_copies=False, label=f"L{j}b{k}"))
            if n > 0:
                ops += store_kv(t, *subs[n - 1])
            elif t > 0:
                ops += store_kv(t - 1, *subs[-1])
            ops.append(Sync())
        steps.append(Step(tuple(ops), tokens=batch))
    return Trace(
        name=f"flexgen-kv-{model.replace('-', '')}",
        kind="flexgen",
        description=(
            f"FlexGen {model.upper()} decode, {1 - gpu_fraction:.0%} of weights and the KV cache offloaded "
            f"(attention on the GPU), batch {gpu_batch} x {gpu_batches}, {prompt_len}-token prompts"
        ),
        regions=(region, RegionSpec("kv", layers * gpu_batches * 2 * home, readonly=False)),
        steps=tuple(steps),
        warmup=warmup,
        scale={"byte_scale": byte_scale},
        params={
            **shape,
            "gpu_batch": gpu_batch,
            "num_gpu_batches": gpu_batches,
            "kv_offload": True,
            "prompt_len": prompt_len,
            "kv_position_bytes_full": pos_full,
            "kv_position_bytes": pos_bytes,
            "kv_home_bytes": home,
            "compute_per_layer_testbed_s": compute_s,
            "link_per_layer_testbed_s": testbed.link_s(layer_bytes),
            "kv_link_per_layer_testbed_s": testbed.link_s(gpu_batches * 2 * (prompt_len + 1) * pos_bytes),
            "seed": seed,
        },
    )
