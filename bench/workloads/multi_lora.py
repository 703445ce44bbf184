"""Multi-LoRA serving: Zipf adapter popularity, an LRU of GPU slots, next-batch prefetch (or a wrong guess)."""

from __future__ import annotations

import numpy as np

from ..devicemodel import TESTBED, Testbed
from .models import KV_MODELS, decode_s, zipf_weights
from .trace import H2D, Compute, Declare, MiB, Op, Range, RegionSpec, Step, Sync, Trace, pages


def lora(
    *,
    adapters: int = 32,
    ranks: tuple[int, ...] = (8, 16, 32, 64),
    zipf_a: float = 1.0,
    batch: int = 32,
    max_loras: int = 4,
    gpu_slots: int = 8,
    batches: int = 12,
    decode_steps: int = 8,
    byte_scale: float = 1.0,
    warmup_batches: int = 1,
    mispredict: float = 0.0,
    seed: int = 0,
    testbed: Testbed = TESTBED,
) -> Trace:
    """Multi-LoRA serving on Llama-2-7B: batches of `batch` requests, Zipf adapter popularity.

    Adapter i has a seeded rank from `ranks` and about 2 MiB x rank of q/k/v/o weights (x `byte_scale`).
    Each batch serves up to `max_loras` distinct adapters; the GPU keeps `gpu_slots` adapters (LRU). While
    batch i decodes, the scheduler knows batch i+1: it declares the adapters that are not resident as
    intents at the start of batch i and loads them in the middle of its decode steps (S-LoRA's prefetch),
    so the loads overlap compute. Base-model compute is scaled with the adapters (same `byte_scale`) so the
    load:compute ratio stays that of the full-size model.

    `mispredict` > 0: the scheduler's guess of the next batch is wrong for that fraction of the adapters it
    declares (S-LoRA prefetches the adapters of the requests it expects to schedule next; requests that
    arrive, finish or are reordered after the guess change the batch). At the start of batch i it declares
    its guess of batch i+1's missing adapters, replacing its previous guess (`Declare(replace=True)`: the
    old guess's unused intents are dropped, as a scheduler re-planning would). By the mid-batch prefetch it
    knows which guessed requests made the batch and loads only those adapters; the adapters that replaced
    the wrong guesses are loaded on demand when batch i+1 starts (undeclared, and its first step waits for
    them). The loads are exactly what each batch needs, the same as with `mispredict=0` (same batches, same
    LRU); only the intents and the loads' timing differ. Which declared adapters are wrong is drawn once
    over the whole trace (its own seeded generator), exactly `round(mispredict x declared)` of them; a
    wrong guess is a non-resident adapter the batch does not use, drawn by popularity.
    """
    if not 0.0 <= mispredict <= 1.0:
        raise ValueError("mispredict is a fraction in [0, 1]")
    if mispredict > 0 and adapters < gpu_slots + max_loras:
        raise ValueError("mispredicting needs adapters that are neither resident nor in the batch")
    rng = np.random.default_rng(seed)
    layers, _copy, params, hidden = KV_MODELS["llama-2-7b"]
    rank_of = [int(rng.choice(ranks)) for _ in range(adapters)]
    sizes = [pages(2 * MiB * r * byte_scale) for r in rank_of]
    popularity = zipf_weights(adapters, zipf_a)
    order = rng.permutation(adapters)  # which adapter is the most popular is itself random
    batch_sets: list[list[int]] = []
    for _ in range(warmup_batches + batches + 1):
        picks = [int(order[k]) for k in rng.choice(adapters, size=batch, p=popularity)]
        distinct: list[int] = []
        for a in picks:
            if a not in distinct and len(distinct) < max_loras:
                distinct.append(a)
        batch_sets.append(distinct)
    resident: list[int] = []  # LRU, most recent last

    def need(adapter_set: list[int], protect: list[int]) -> list[int]:
        missing = [a for a in adapter_set if a not in resident]
        for a in adapter_set:
            if a in resident:
                resident.remove(a)
            resident.append(a)
        while len(resident) > gpu_slots:
            victim = next(a for a in resident if a not in adapter_set and a not in protect)
            resident.remove(victim)
        return missing

    def load(ids: list[int]) -> H2D:
        return H2D(tuple(Range(f"lora{a}", 0, sizes[a]) for a in ids), label="lora " + ",".join(map(str, ids)))

    kv_token = layers * 2 * hidden * 2
    lora_flops = sum(2 * 4 * 2 * hidden * rank_of[a] * layers for a in range(adapters)) / adapters
    steps: list[Step] = []
    first = need(batch_sets[0], [])
    ctx = batch * 400
    nxts: list[list[int]] = []  # batch b+1's missing adapters, as batch b sees them
    outside: list[list[int]] = []  # adapters neither resident nor in batch b+1 then: what a wrong guess can be
    for b in range(warmup_batches + batches):
        nxts.append(need(batch_sets[b + 1], batch_sets[b]))
        outside.append([a for a in range(adapters) if a not in resident])
    guesses = [list(nxt) for nxt in nxts]  # what batch b declares of batch b+1's missing adapters
    mispredicted = 0
    if mispredict > 0:
        wrong_rng = np.random.default_rng([seed, 1])  # apart from `rng`: the batches stay those of mispredict=0
        declared = sum(len(nxt) for nxt in nxts)
        mispredicted = round(mispredict * declared)
        wrong = set(wrong_rng.choice(declared, size=mispredicted, replace=False).tolist())
        weight = np.zeros(adapters)
        weight[order] = popularity  # adapter order[k] has the k-th popularity
        at = 0
        for b, guess in enumerate(guesses):
            for i in range(len(guess)):
                if at in wrong:
                    pool = [a for a in outside[b] if a not in guess]
                    guess[i] = int(wrong_rng.choice(pool, p=weight[pool] / weight[pool].sum()))
                at += 1
    for b in range(warmup_batches + batches):
        nxt, guess = nxts[b], guesses[b]
        prefetch = [a for a in nxt if a in guess]
        on_demand = [a for a in nxts[b - 1] if a not in guesses[b - 1]] if b > 0 else []
        for d in range(decode_steps):
            ops: list[Op] = []
            if b == 0 and d == 0 and first:
                ops += [load(first), Sync()]
            if d == 0 and on_demand:
                ops.append(load(on_demand))  # not prefetched: the batch cannot start without them
            if d == 0 and mispredict > 0:
                ops.append(Declare(load(guess).ranges if guess else (), replace=True))
            elif d == 0 and nxt:
                ops.append(Declare(load(nxt).ranges))
            if d == decode_steps // 2 and prefetch:
                ops.append(load(prefetch))
            secs = decode_s(params, batch, ctx, kv_token, testbed) + testbed.compute_s(lora_flops * batch)
            wait = d == 0 and bool(on_demand)
            ops += [Compute(secs * byte_scale, after_copies=wait, label=f"batch {b} step {d}"), Sync()]
            steps.append(Step(tuple(ops), tokens=batch))
    regions = tuple(RegionSpec(f"lora{a}", sizes[a], readonly=True, adapter=True) for a in range(adapters))
    return Trace(
        name="lora-mispredicted-llama2-7b" if mispredict > 0 else "lora-llama2-7b",
        kind="lora",
        description=f"multi-LoRA Llama-2-7B, {adapters} adapters (Zipf a={zipf_a}), {gpu_slots} GPU slots"
        + (f", {mispredict:.0%} of the declared next-batch adapters mispredicted" if mispredict > 0 else ""),
        regions=regions,
        steps=tuple(steps),
        warmup=warmup_batches * decode_steps,
        scale={"byte_scale": byte_scale},
        params={
            "adapters": adapters,
            "ranks": rank_of,
            "adapter_bytes": sizes,
            "max_loras": max_loras,
            "gpu_slots": gpu_slots,
            "batch": batch,
            "decode_steps_per_batch": decode_steps,
            "mispredict": mispredict,
            "declared_adapters": sum(len(g) for g in guesses),
            "mispredicted_adapters": mispredicted,
            "seed": seed,
        },
    )
