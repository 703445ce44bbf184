"""Seeded serving workloads, replayed as traces of transfers and device work.

A `Trace` is what a serving system does to the CPU-GPU link, step by step: H2D copies out of host regions
(weights, adapters, swapped KV blocks), D2H copies into them (KV swap-outs, offloaded blocks), GPU compute
and synchronisation, and the intents a PipeLLM integration of that system would declare. The harness
replays a trace through the real daemon and SDK against the device model (bench/devicemodel.py); the same
trace runs in every mode, so the modes differ only in how the bytes are protected.

The shapes come from the systems' own code (sources in docs/design.md, figures we build on):

* **FlexGen** weight offloading of OPT-30B/66B/175B: per layer 4h^2 attention + 8h^2 MLP fp16 weights, a
  GPU-resident fraction stays on the GPU, the rest crosses once per token; layer j+1 loads while layer j
  computes (`flex_opt.py` `generation_loop_overlap_single_batch`); with the KV cache on the CPU and attention
  on the GPU, each (layer, GPU batch)'s cache prefix loads and its new position is stored back
  (`generation_loop_overlap_multi_batch`, `SelfAttention.load_cache`/`store_cache`).
* **vLLM V0** KV swapping: newest request preempted first, swapped back first-come-first-served, one copy
  per block per layer for K and for V (`scheduler.py`, `cache_engine.py`), ShareGPT-like request lengths;
  a request's adjacent blocks packed into one range, or each block its own copy as `swap_blocks` issues it.
* **vLLM V1** CPU offloading: every newly full block stored (FIFO), blocks loaded on prefix hits when a
  request is admitted (`vllm/v1/kv_offload/`), multi-turn conversations.
* **multi-LoRA**: Zipf adapter popularity, ranks 8-64 at about 2 MiB x rank (q/k/v/o of a 7B model), an
  LRU of GPU adapter slots, next-batch prefetch in the middle of the current batch's decode (S-LoRA); or
  with the next batch mispredicted: part of the declared guess unused, the rest loaded on demand.
* **accelerate** `cpu_offload`: every layer's weights moved synchronously in forward order, no prefetch.
* **adversarial**: random ranges in random order; prediction cannot help.

Host RAM here is 24 GiB, so model weights and adapters are scaled by a `byte_scale` factor (the device
time of a scaled layer, compute and link alike, shrinks by the same factor, so a layer keeps its shape:
layers x per-layer bytes, compute:link ratio unchanged). KV copies keep their real per-block sizes; the
KV workloads are scaled by a `token_scale` on request lengths instead (FlexGen's KV cache, which moves with
the weights layer by layer, takes their `byte_scale`). Every trace records its scales.
"""

from __future__ import annotations

import functools
from typing import Final

from .accelerate_offload import accelerate
from .flexgen_offload import OPT, flexgen
from .models import BLOCK_TOKENS, KV_MODELS, sharegpt_lengths, zipf_weights
from .multi_lora import lora
from .random_ranges import adversarial
from .trace import (
    D2H,
    H2D,
    MAX_COMMIT_RANGES,
    Compute,
    Declare,
    MiB,
    Op,
    Range,
    RegionSpec,
    Step,
    Sync,
    Trace,
)
from .vllm_v0_swap import vllm_v0
from .vllm_v1_offload import vllm_v1

SIZES: Final = ("quick", "full")


def suite(size: str = "quick", seed: int = 0) -> list[Trace]:
    """Every workload, sized for `make bench-quick` (seconds each) or `make bench` (tens of seconds)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}")
    q = size == "quick"
    # vLLM V0: the same request stream and swap space, a window from the busiest 400 steps after the ramp-up
    v0 = functools.partial(vllm_v0, requests=2000, cpu_blocks=1024, skip=400, busiest=400, seed=seed)
    return [
        flexgen("opt-30b", byte_scale=1 / 256 if q else 1 / 32, tokens=3 if q else 8, seed=seed),
        flexgen("opt-66b", byte_scale=1 / 512 if q else 1 / 64, tokens=3 if q else 8, seed=seed),
        flexgen("opt-175b", byte_scale=1 / 1024 if q else 1 / 128, tokens=3 if q else 8, seed=seed),
        flexgen("opt-30b", byte_scale=1 / 768 if q else 1 / 96, tokens=3 if q else 8, kv_offload=True, seed=seed),
        v0("llama-2-7b", gpu_blocks=384, token_scale=0.5, steps=24 if q else 120),
        v0("llama-2-7b", gpu_blocks=384, token_scale=0.5, steps=24 if q else 120, unpacked=True),
        v0("opt-30b", gpu_blocks=192 if q else 384, token_scale=0.25 if q else 0.5, steps=14 if q else 60),
        v0("opt-66b", gpu_blocks=128 if q else 256, token_scale=0.125 if q else 0.5, steps=10 if q else 40),
        vllm_v1(
            "llama-2-7b",
            conversations=32,
            turns=6,
            concurrency=16,
            cpu_blocks=192 if q else 256,
            token_scale=0.25,
            steps=24 if q else 120,
            skip=100,
            seed=seed,
        ),
        lora(adapters=16 if q else 32, byte_scale=1 / 4 if q else 1 / 2, batches=6 if q else 24, seed=seed),
        lora(
            adapters=16 if q else 32,
            byte_scale=1 / 4 if q else 1 / 2,
            batches=6 if q else 24,
            mispredict=0.2,
            seed=seed,
        ),
        accelerate(byte_scale=1 / 64 if q else 1 / 8, tokens=3 if q else 8, seed=seed),
        adversarial(region_bytes=(256 if q else 1024) * MiB, steps=24 if q else 160, seed=seed),
    ]


__all__ = [
    "BLOCK_TOKENS",
    "D2H",
    "H2D",
    "KV_MODELS",
    "MAX_COMMIT_RANGES",
    "OPT",
    "Compute",
    "Declare",
    "Op",
    "Range",
    "RegionSpec",
    "Step",
    "Sync",
    "Trace",
    "accelerate",
    "adversarial",
    "flexgen",
    "lora",
    "sharegpt_lengths",
    "suite",
    "vllm_v0",
    "vllm_v1",
    "zipf_weights",
]
