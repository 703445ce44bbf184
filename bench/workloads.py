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

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from .devicemodel import TESTBED, DeviceModel, Testbed, TimeScale, VirtualClock

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30
PAGE: Final = 4096
BLOCK_TOKENS: Final = 16  # vLLM's default KV block size
MAX_COMMIT_RANGES: Final = 4096  # the daemon's default max_transfers_per_commit (pipellm_daemon/config.py)


# -- trace vocabulary -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionSpec:
    """A host region the workload moves bytes out of or into (read-only: weights, adapters; else KV)."""

    name: str
    nbytes: int
    readonly: bool = True
    adapter: bool = False


@dataclass(frozen=True)
class Range:
    region: str
    offset: int
    length: int


@dataclass(frozen=True)
class H2D:
    """One commit: these ranges, in this order, host to device (one round trip through the SDK)."""

    ranges: tuple[Range, ...]
    label: str = ""

    @property
    def nbytes(self) -> int:
        return sum(r.length for r in self.ranges)


@dataclass(frozen=True)
class D2H:
    """One device-to-host copy into a mutable region; `swap_out`: the block will come back (KV swap)."""

    range: Range
    group: int = 0
    swap_out: bool = True
    after_compute: bool = False  # the data is produced by the compute launched before it
    label: str = ""

    @property
    def nbytes(self) -> int:
        return self.range.length


@dataclass(frozen=True)
class Compute:
    """GPU work of `seconds` on the testbed; `after_copies`: it needs every H2D copy issued before it."""

    seconds: float
    after_copies: bool = True
    label: str = ""


@dataclass(frozen=True)
class Sync:
    """The host waits for the device (end of a layer, of an engine step)."""


@dataclass(frozen=True)
class Declare:
    """Intents a PipeLLM integration of this serving system would declare (replayed in pipellm mode only)."""

    ranges: tuple[Range, ...]
    cyclic: bool = False
    replace: bool = False


Op = H2D | D2H | Compute | Sync | Declare


@dataclass(frozen=True)
class Step:
    """One unit of progress (a token of a FlexGen pass, an engine step); `tokens` it produces."""

    ops: tuple[Op, ...]
    tokens: int = 0


@dataclass
class Trace:
    name: str
    kind: str
    description: str
    regions: tuple[RegionSpec, ...]
    steps: tuple[Step, ...]
    warmup: int  # leading steps that are replayed but not measured (predictors learn, pipelines fill)
    swap_order: str = "fifo"
    unit: str = "tokens"
    scale: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> tuple[Step, ...]:
        return self.steps[self.warmup :]

    def ops(self, measured: bool = True) -> list[Op]:
        return [op for st in (self.measured if measured else self.steps) for op in st.ops]

    def h2d_bytes(self, measured: bool = True) -> int:
        return sum(op.nbytes for op in self.ops(measured) if isinstance(op, H2D))

    def d2h_bytes(self, measured: bool = True) -> int:
        return sum(op.nbytes for op in self.ops(measured) if isinstance(op, D2H))

    def crypto_bytes(self, measured: bool = True) -> int:
        """B: every byte a CC system must encrypt (H2D) or decrypt (D2H) on the host."""
        return self.h2d_bytes(measured) + self.d2h_bytes(measured)

    def tokens(self, measured: bool = True) -> int:
        return sum(st.tokens for st in (self.measured if measured else self.steps))

    def region_bytes(self) -> int:
        return sum(r.nbytes for r in self.regions)

    def max_h2d_op(self) -> int:
        return max((op.nbytes for op in self.ops(False) if isinstance(op, H2D)), default=0)

    def max_h2d_range(self) -> int:
        return max((r.length for op in self.ops(False) if isinstance(op, H2D) for r in op.ranges), default=0)

    def max_d2h_op(self) -> int:
        return max((op.nbytes for op in self.ops(False) if isinstance(op, D2H)), default=0)

    def ideal_seconds(self, testbed: Testbed = TESTBED) -> float:
        """Testbed seconds of the measured steps with zero host cost: what the device model alone dictates."""
        dev = DeviceModel(TimeScale(1.0, "ideal", testbed), clock=VirtualClock())
        for i, st in enumerate(self.steps):
            if i == self.warmup:
                dev.sync()
                dev.reset()
            for op in st.ops:
                if isinstance(op, H2D):
                    dev.h2d(op.nbytes, dev.now(), dev.now())
                elif isinstance(op, D2H):
                    dev.d2h(op.nbytes, dev.now(), dev.now(), after_compute=op.after_compute)
                elif isinstance(op, Compute):
                    dev.compute(op.seconds, after_copies=op.after_copies)
                elif isinstance(op, Sync):
                    dev.sync()
        dev.sync()
        return dev.now()

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "description": self.description,
            "steps": len(self.steps),
            "warmup_steps": self.warmup,
            "unit": self.unit,
            "work": self.tokens(),
            "h2d_bytes": self.h2d_bytes(),
            "d2h_bytes": self.d2h_bytes(),
            "region_bytes": self.region_bytes(),
            "ideal_testbed_s": self.ideal_seconds(),
            "scale": self.scale,
            "params": self.params,
        }


def _pages(n: float) -> int:
    """Round a byte count to whole 4 KiB pages (at least one)."""
    return max(PAGE, round(n / PAGE) * PAGE)


def _lines(n: float, line: int = 64) -> int:
    """Round a byte count to whole 64-byte lines (at least one): for scaled copies far below a page."""
    return max(line, round(n / line) * line)


def sharegpt_lengths(rng: np.random.Generator, n: int, token_scale: float = 1.0) -> list[tuple[int, int]]:
    """(prompt, output) token counts shaped like ShareGPT as vLLM's paper reports it (means 161 and 338).

    Log-normal with sigma 1.0 (a heavy right tail, as in the data set), clipped to [4, 1024] each, then
    multiplied by `token_scale` (at least 1 token).
    """
    sigma = 1.0
    out = []
    for _ in range(n):
        p = rng.lognormal(math.log(161) - sigma**2 / 2, sigma)
        o = rng.lognormal(math.log(338) - sigma**2 / 2, sigma)
        p, o = min(max(p, 4), 1024), min(max(o, 4), 1024)
        out.append((max(1, round(p * token_scale)), max(1, round(o * token_scale))))
    return out


# -- FlexGen weight offloading --------------------------------------------------------------------------
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
    layer_bytes = _pages((1 - gpu_fraction) * full_layer * byte_scale)
    batch = gpu_batch * num_gpu_batches
    flops = 2 * 12 * h * h * batch
    hbm = full_layer * num_gpu_batches
    compute_s = testbed.compute_s(flops, hbm) * byte_scale
    region = RegionSpec("weights", layers * layer_bytes)

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
                "model": model,
                "hidden": h,
                "layers": layers,
                "layer_bytes_full": full_layer,
                "layer_bytes_offloaded": layer_bytes,
                "gpu_fraction": gpu_fraction,
                "batch_tokens": batch,
                "compute_per_layer_testbed_s": compute_s,
                "link_per_layer_testbed_s": testbed.link_s(layer_bytes),
                "seed": seed,
            },
        )

    gpu_batches = num_gpu_batches
    pos_full = gpu_batch * h * 2  # one position of K (or V) of one GPU batch, fp16
    pos_bytes = _lines(pos_full * byte_scale)
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
            "model": model,
            "hidden": h,
            "layers": layers,
            "layer_bytes_full": full_layer,
            "layer_bytes_offloaded": layer_bytes,
            "gpu_fraction": gpu_fraction,
            "batch_tokens": batch,
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


# -- vLLM V0 KV swapping ---------------------------------------------------------------------------------
# layers, bytes of one K (or V) copy of one block at block size 16 fp16, parameters, hidden size
KV_MODELS: Final = {
    "llama-2-7b": (32, 128 * KiB, 6.74e9, 4096),
    "opt-30b": (48, 224 * KiB, 30.0e9, 7168),
    "opt-66b": (64, 288 * KiB, 66.0e9, 9216),
}


def _decode_s(params: float, batch: int, ctx_tokens: int, kv_token_bytes: int, testbed: Testbed) -> float:
    """One decode step of a dense model: weights read once, KV of every running token read once."""
    flops = 2 * params * batch + 2 * ctx_tokens * kv_token_bytes  # attention: ~1 FLOP per KV byte each way
    return testbed.compute_s(flops, params * 2 + ctx_tokens * kv_token_bytes)


def _prefill_s(params: float, tokens: int, testbed: Testbed) -> float:
    return testbed.compute_s(2 * params * tokens, params * 2) if tokens else 0.0


@dataclass
class _Req:
    rid: int
    prompt: int
    output: int
    done: int = 0  # tokens generated
    blocks: int = 0  # GPU blocks held
    cpu: tuple[int, int] | None = None  # (first CPU block, count) while swapped out
    swaps: int = 0

    @property
    def length(self) -> int:
        return self.prompt + self.done

    def need_blocks(self, extra: int = 0) -> int:
        return -(-(self.length + extra) // BLOCK_TOKENS)


class _Extents:
    """First-fit allocation of contiguous runs of CPU blocks (a fresh swap space hands out runs)."""

    def __init__(self, n: int) -> None:
        self.free = [(0, n)]
        self.hwm = 0  # high-water mark: blocks [0, hwm) were ever used

    def take(self, k: int) -> int | None:
        for i, (s, n) in enumerate(self.free):
            if n >= k:
                self.hwm = max(self.hwm, s + k)
                self.free[i] = (s + k, n - k)
                if self.free[i][1] == 0:
                    del self.free[i]
                return s
        return None

    def give(self, s: int, k: int) -> None:
        self.free.append((s, k))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for a, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((a, n))
        self.free = merged


def vllm_v0(
    model: str,
    *,
    requests: int,
    gpu_blocks: int,
    cpu_blocks: int,
    steps: int,
    skip: int = 0,
    busiest: int = 0,
    warmup: int = 2,
    max_running: int = 256,
    token_scale: float = 1.0,
    unpacked: bool = False,
    seed: int = 0,
    testbed: Testbed = TESTBED,
) -> Trace:
    """vLLM V0 continuous batching with swap preemption, as `Scheduler._schedule_default` does it.

    Each step: swapped requests come back first-come-first-served while the blocks for this step's tokens
    remain; only when none is swapped out are waiting requests admitted (prefill, with a watermark); every
    running request that needs a new block gets one, preempting the newest running request (swap out) when
    none is free. (V0 swaps in this way for parallel sampling and beam search, or with
    `preemption_mode="swap"`; the trace assumes the latter.) Copies are issued the way `CacheEngine` does:
    per layer, K then V, for every block of the mapping, swap-ins before swap-outs, then the forward pass.

    A request's CPU blocks are one contiguous run (first fit), so the copies of one request in one layer
    are adjacent; the replay sends each such run as one range (what an integration packing adjacent copies
    does) and each request's swap-out as its own group. Request lengths are ShareGPT-like (seeded).

    `unpacked=True` replays the copies as `swap_blocks` issues them instead (`vllm/worker/cache_engine.py`
    `CacheEngine.swap_in`/`swap_out` call the attention backend's `swap_blocks` once per layer for K, then for
    V; `csrc/cache_kernels.cu` `swap_blocks` issues one `cudaMemcpyAsync` of one block per entry of the block
    mapping): every block of every layer, K and V apart, is its own range of the model's copy size (128 KiB
    for Llama-2-7B at block size 16, fp16). A step's swap-in is one H2D commit with all of them in that order
    (layer-major, K then V, the mapping's blocks request by request), split only where it would pass the
    daemon's limit of `MAX_COMMIT_RANGES` transfers per commit; its swap-out is one D2H per block, in the same
    order. Same scheduling, window and bytes as the packed trace: only the copies' granularity differs.

    The simulation runs `skip` steps first (the ramp-up, not replayed) and emits the next `steps`: a
    prologue step re-creates the part of the swap space that the window reads (the swap-outs, in their
    original order, of the requests that are swapped in inside the window), then `warmup` replayed but
    unmeasured steps, then the rest.
    With `busiest` > 0 the window starts at the step in [skip, skip + busiest) that swaps the most bytes
    in its measured part (net of the prologue it needs): swapping is bursty, and a benchmark of swapping
    should contain some. The swap
    space is then shrunk to the blocks the simulation ever used (first fit allocates the same runs), so
    the host region is no bigger than needed.
    """
    if busiest > 0:
        probe = vllm_v0(
            model,
            requests=requests,
            gpu_blocks=gpu_blocks,
            cpu_blocks=cpu_blocks,
            steps=busiest + steps,
            skip=skip,
            warmup=0,
            max_running=max_running,
            token_scale=token_scale,
            seed=seed,
            testbed=testbed,
        )
        moved = [sum(op.nbytes for op in st.ops if isinstance(op, H2D | D2H)) for st in probe.steps[1:]]
        ranked = sorted(range(busiest), key=lambda i: (-sum(moved[i + warmup : i + steps]), i))

        def window(start: int) -> Trace:
            return vllm_v0(
                model,
                requests=requests,
                gpu_blocks=gpu_blocks,
                cpu_blocks=cpu_blocks,
                steps=steps,
                skip=skip + start,
                warmup=warmup,
                max_running=max_running,
                token_scale=token_scale,
                seed=seed,
                testbed=testbed,
            )

        # Of the five busiest windows, the one that swaps most in its measured part net of its prologue
        # (replaying swap-outs from before the window costs time in every repetition).
        fitted = max(
            (window(i) for i in ranked[:5]),
            key=lambda t: t.crypto_bytes() - sum(op.nbytes for op in t.steps[0].ops if isinstance(op, D2H)),
        )
        return vllm_v0(
            model,
            requests=requests,
            gpu_blocks=gpu_blocks,
            cpu_blocks=max(1, int(fitted.params["swap_hwm_blocks"])),
            steps=steps,
            skip=int(fitted.params["skipped_steps"]),
            warmup=warmup,
            max_running=max_running,
            token_scale=token_scale,
            unpacked=unpacked,  # the window and swap space do not depend on the copies' granularity
            seed=seed,
            testbed=testbed,
        )
    layers, copy, params, hidden = KV_MODELS[model]
    kv_token = layers * 2 * hidden * 2
    rng = np.random.default_rng(seed)
    queue = deque(_Req(i, p, o) for i, (p, o) in enumerate(sharegpt_lengths(rng, requests, token_scale)))
    running: list[_Req] = []
    swapped: list[_Req] = []
    free = gpu_blocks
    extents = _Extents(cpu_blocks)
    group = 0
    out_ops: dict[int, list[D2H]] = {}  # request -> the D2H copies of its current swap-out
    emitted: list[Step] = []
    stats = {"swap_outs": 0, "swap_ins": 0, "recomputes": 0, "swap_out_bytes": 0, "swap_in_bytes": 0}

    def ranges_of(r: _Req, layer: int, kv: int) -> list[Range]:
        """One request's copies in one layer, K (kv=0) or V: its run of blocks, or each block apart."""
        assert r.cpu is not None
        first, n = r.cpu
        at = (layer * 2 + kv) * cpu_blocks + first
        if unpacked:
            return [Range("kv", (at + b) * copy, copy) for b in range(n)]
        return [Range("kv", at * copy, n * copy)]

    window_ins: set[int] = set()
    before: dict[int, list[D2H]] = {}
    for step in range(skip + steps):
        if not (queue or running or swapped):
            break
        if step == skip:
            before = {rid: list(lst) for rid, lst in out_ops.items()}  # the swap space the ramp-up left
        ins: list[_Req] = []
        outs: list[tuple[_Req, int]] = []
        prefill = 0
        growth = sum(max(0, r.need_blocks(1) - r.blocks) for r in running)
        # 1. swap in, FCFS (oldest request first), while the blocks for this step's tokens remain
        swapped.sort(key=lambda r: r.rid)
        while swapped and free - growth >= swapped[0].need_blocks(1) and len(running) < max_running:
            r = swapped.pop(0)
            r.blocks = r.need_blocks(1)
            free -= r.blocks
            ins.append(r)
            running.append(r)
        # 2. admit waiting requests (prefill) only when nothing is swapped out; keep a watermark
        if not swapped and not ins:
            while (
                queue
                and free - growth >= queue[0].need_blocks(1) + max(1, gpu_blocks // 32)
                and len(running) < max_running
            ):
                r = queue.popleft()
                r.blocks = r.need_blocks(1)
                free -= r.blocks
                prefill += r.prompt
                running.append(r)
        running.sort(key=lambda r: r.rid)
        # 3. every running request appends one token; preempt the newest when a block is missing
        i = 0
        while i < len(running):
            r = running[i]
            grow = r.need_blocks(1) - r.blocks
            preempted_self = False
            while grow > free and running:
                victim = running.pop()
                free += victim.blocks
                start = None if victim in ins else extents.take(victim.blocks)
                if start is None:  # swap space full (or just swapped in): vLLM recomputes instead
                    stats["recomputes"] += 1
                    if victim in ins:
                        ins.remove(victim)
                        assert victim.cpu is not None
                        extents.give(*victim.cpu)
                        victim.cpu = None
                    victim.done, victim.blocks = 0, 0
                    queue.appendleft(victim)
                else:
                    group += 1
                    victim.cpu = (start, victim.blocks)
                    outs.append((victim, group))
                    swapped.append(victim)
                    victim.blocks = 0
                if victim is r:
                    preempted_self = True
                    break
            if preempted_self:
                continue  # r was the newest and is gone; the loop ends at the shorter list
            free -= grow
            r.blocks += grow
            i += 1
        ops: list[Op] = []
        if ins:
            ranges = [x for layer in range(layers) for kv in (0, 1) for r in ins for x in ranges_of(r, layer, kv)]
            for at in range(0, len(ranges), MAX_COMMIT_RANGES):
                ops.append(H2D(tuple(ranges[at : at + MAX_COMMIT_RANGES]), label=f"swap-in x{len(ins)}"))
            for r in ins:
                assert r.cpu is not None
                extents.give(*r.cpu)
                r.cpu = None
                out_ops.pop(r.rid, None)
        d2h: list[D2H] = []
        for layer in range(layers):
            for kv in (0, 1):
                for r, g in outs:
                    for x in ranges_of(r, layer, kv):
                        op = D2H(x, group=g, swap_out=True, label=f"swap-out r{r.rid}")
                        d2h.append(op)
                        out_ops.setdefault(r.rid, []).append(op)
        ops += d2h
        batch = len(running)
        ctx = sum(r.length for r in running)
        if batch or prefill:
            secs = _decode_s(params, max(batch, 1), ctx, kv_token, testbed) + _prefill_s(params, prefill, testbed)
            ops.append(Compute(secs, after_copies=True, label=f"step b={batch}"))
        ops.append(Sync())
        finished = []
        for r in running:
            r.done += 1
            if r.done >= r.output:
                finished.append(r)
        for r in finished:
            running.remove(r)
            free += r.blocks
        if step >= skip:
            window_ins.update(r.rid for r in ins)
            stats["swap_ins"] += len(ins)
            stats["swap_outs"] += len(outs)
            stats["swap_in_bytes"] += sum(op.nbytes for op in ops if isinstance(op, H2D))
            stats["swap_out_bytes"] += sum(op.nbytes for op in d2h)
            emitted.append(Step(tuple(ops), tokens=batch))
    # Prologue: the swap-outs from before the window of the requests that come back inside it, in order.
    back = sorted((lst for rid, lst in before.items() if rid in window_ins), key=lambda lst: lst[0].group)
    emitted.insert(0, Step((*(op for lst in back for op in lst), Sync()), tokens=0))
    return Trace(
        name=f"vllm-v0-{'blocks-' if unpacked else ''}{model.replace('-', '').replace('llama2', 'llama2-')}",
        kind="vllm-v0",
        description=(
            f"vLLM V0 {model} swap preemption, ShareGPT-like requests x{token_scale}, {gpu_blocks} GPU blocks"
            + (", one copy per block (swap_blocks)" if unpacked else "")
        ),
        regions=(RegionSpec("kv", layers * 2 * cpu_blocks * copy, readonly=False),),
        steps=tuple(emitted),
        warmup=1 + warmup,
        swap_order="lifo",
        scale={"token_scale": token_scale, "byte_scale": 1.0},
        params={
            "model": model,
            "layers": layers,
            "copy_bytes": copy,
            "unpacked": unpacked,
            "requests": requests,
            "gpu_blocks": gpu_blocks,
            "cpu_blocks": cpu_blocks,
            "skipped_steps": skip,
            "swap_hwm_blocks": extents.hwm,
            "seed": seed,
            **stats,
        },
    )


# -- vLLM V1 CPU offloading ------------------------------------------------------------------------------
def vllm_v1(
    model: str = "llama-2-7b",
    *,
    conversations: int,
    turns: int,
    concurrency: int,
    cpu_blocks: int,
    steps: int,
    skip: int = 0,
    token_scale: float = 1.0,
    warmup: int = 2,
    seed: int = 0,
    testbed: Testbed = TESTBED,
) -> Trace:
    """vLLM V1 with CPU KV offloading over multi-turn chats: store every full block, load prefix hits.

    `concurrency` requests run at once; when one finishes, the next turn (of the conversation that waited
    longest) is admitted. Its prompt is the whole conversation so far plus a new user message; the blocks of
    that history that sit in the CPU cache (LRU over `cpu_blocks`) are loaded (H2D) asynchronously while
    the batch keeps decoding, and the request prefills in the next step. The GPU prefix cache is assumed
    too small to still hold a conversation between turns. Every newly full block is stored (D2H, FIFO)
    unless the CPU cache already has it. The CPU cache holds a block's layers contiguously (one block, one
    transfer; the offloading spec is pluggable), and a PipeLLM integration declares each load as an intent
    when the scheduler finds the prefix hit.

    The simulation runs `skip` steps (the ramp-up, not replayed) and emits the next `steps`; blocks stored
    during the ramp-up are loaded from whatever the region holds (the intents, not the stores, tell the
    daemon what is coming, so the ramp-up need not be replayed).
    """
    layers, copy, params, hidden = KV_MODELS[model]
    block_bytes = layers * 2 * copy
    kv_token = layers * 2 * hidden * 2
    rng = np.random.default_rng(seed)
    convs = []
    for _ in range(conversations):
        convs.append(deque(sharegpt_lengths(rng, turns, token_scale)))
    history = [0] * conversations  # tokens in each conversation so far
    cpu: dict[tuple[int, int], int] = {}  # (conversation, block index) -> CPU slot, insertion = LRU order
    free_slots = deque(range(cpu_blocks))
    waiting = deque(range(conversations))
    running: list[dict[str, int]] = []
    stats = {"loads": 0, "stores": 0, "load_blocks": 0, "evictions": 0}
    emitted: list[Step] = []

    def slot_range(slot: int) -> Range:
        return Range("kv", slot * block_bytes, block_bytes)

    def store(conv: int, idx: int, out: list[Op]) -> None:
        if (conv, idx) in cpu:
            cpu[(conv, idx)] = cpu.pop((conv, idx))  # refresh LRU
            return
        if not free_slots:
            victim = next(iter(cpu))
            free_slots.append(cpu.pop(victim))
            stats["evictions"] += 1
        slot = free_slots.popleft()
        cpu[(conv, idx)] = slot
        stats["stores"] += 1
        out.append(D2H(slot_range(slot), swap_out=False, after_compute=True, label=f"store c{conv}b{idx}"))

    joining: list[dict[str, int]] = []
    for step in range(skip + steps):
        if not (waiting or running or joining):
            break
        if step == skip:
            stats = dict.fromkeys(stats, 0)
        ops: list[Op] = []
        loads: list[Range] = []
        prefill = sum(r["len"] - r["stored"] * BLOCK_TOKENS for r in joining)  # loaded last step, prefill now
        running += joining
        joining = []
        while len(running) + len(joining) < concurrency and waiting:
            conv = waiting.popleft()
            if not convs[conv]:
                continue
            user, reply = convs[conv].popleft()
            cached = 0
            for idx in range(history[conv] // BLOCK_TOKENS):
                if (conv, idx) not in cpu:
                    break
                cached += 1
                loads.append(slot_range(cpu[(conv, idx)]))
                cpu[(conv, idx)] = cpu.pop((conv, idx))  # a hit refreshes the LRU
            history[conv] += user
            joining.append({"conv": conv, "left": reply, "len": history[conv], "stored": cached})
            stats["loads"] += bool(cached)
            stats["load_blocks"] += cached
        if loads:
            ops.append(Declare(tuple(loads)))
            ops.append(H2D(tuple(loads), label=f"load x{len(loads)}"))
        batch = len(running)
        ctx = sum(r["len"] for r in running)
        ops.append(
            Compute(
                _decode_s(params, max(batch, 1), ctx, kv_token, testbed) + _prefill_s(params, prefill, testbed),
                after_copies=False,
                label=f"step b={batch}",
            )
        )
        done = []
        for r in running:
            r["len"] += 1
            r["left"] -= 1
            for idx in range(r["stored"], r["len"] // BLOCK_TOKENS):
                store(r["conv"], idx, ops)
            r["stored"] = max(r["stored"], r["len"] // BLOCK_TOKENS)
            if r["left"] <= 0:
                done.append(r)
        for r in done:
            running.remove(r)
            history[r["conv"]] = r["len"]
            waiting.append(r["conv"])
        ops.append(Sync())
        if step >= skip:
            emitted.append(Step(tuple(ops), tokens=batch))
    return Trace(
        name=f"vllm-v1-{model.replace('-', '').replace('llama2', 'llama2-')}",
        kind="vllm-v1",
        description=f"vLLM V1 CPU offloading, {conversations} chats x {turns} turns, {concurrency} concurrent",
        regions=(RegionSpec("kv", cpu_blocks * block_bytes, readonly=False),),
        steps=tuple(emitted),
        warmup=warmup,
        swap_order="fifo",
        scale={"token_scale": token_scale, "byte_scale": 1.0},
        params={
            "model": model,
            "block_bytes": block_bytes,
            "cpu_blocks": cpu_blocks,
            "conversations": conversations,
            "turns": turns,
            "concurrency": concurrency,
            "skipped_steps": skip,
            "seed": seed,
            **stats,
        },
    )


# -- multi-LoRA ----------------------------------------------------------------------------------------
def zipf_weights(n: int, a: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    w = 1.0 / np.arange(1, n + 1) ** a
    return np.asarray(w / w.sum(), dtype=np.float64)


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
    sizes = [_pages(2 * MiB * r * byte_scale) for r in rank_of]
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
            secs = _decode_s(params, batch, ctx, kv_token, testbed) + testbed.compute_s(lora_flops * batch)
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


# -- accelerate ------------------------------------------------------------------------------------------
def accelerate(
    *,
    byte_scale: float,
    tokens: int = 3,
    warmup: int = 2,
    batch: int = 1,
    context: int = 512,
    declare: bool = True,
    seed: int = 0,
    testbed: Testbed = TESTBED,
) -> Trace:
    """accelerate `cpu_offload` of Llama-2-7B: every layer's weights moved synchronously before it runs.

    The `AlignDevicesHook` moves each offloaded module's weights in forward order, waits, then runs it: no
    prefetch, so plain serving is link-bound. The PipeLLM integration (pipellm_client.integrations.
    accelerate) declares the first forward's order as a cyclic intent; `declare=False` leaves it to the
    cycle predictor.
    """
    layers, _copy, _params, hidden = KV_MODELS["llama-2-7b"]
    per_layer_params = 4 * hidden * hidden + 3 * hidden * 11008
    layer_bytes = _pages(per_layer_params * 2 * byte_scale)
    kv_token = layers * 2 * hidden * 2
    compute = _decode_s(per_layer_params, batch, batch * context, kv_token // layers, testbed) * byte_scale
    ranges = [Range("weights", j * layer_bytes, layer_bytes) for j in range(layers)]
    steps = []
    for t in range(warmup + tokens):
        ops: list[Op] = []
        if t == 0 and declare:
            ops.append(Declare(tuple(ranges), cyclic=True))
        for j in range(layers):
            ops += [H2D((ranges[j],), label=f"w{j}"), Compute(compute, after_copies=True, label=f"L{j}"), Sync()]
        steps.append(Step(tuple(ops), tokens=batch))
    return Trace(
        name="accelerate-llama2-7b",
        kind="accelerate",
        description=f"accelerate cpu_offload Llama-2-7B, batch {batch}, forward-order synchronous loads",
        regions=(RegionSpec("weights", layers * layer_bytes),),
        steps=tuple(steps),
        warmup=warmup,
        scale={"byte_scale": byte_scale},
        params={"layers": layers, "layer_bytes": layer_bytes, "declare": declare, "seed": seed},
    )


# -- adversarial -----------------------------------------------------------------------------------------
def adversarial(
    *,
    region_bytes: int,
    steps: int,
    transfers: int = 4,
    min_bytes: int = 1 * MiB,
    max_bytes: int = 4 * MiB,
    compute_ratio: float = 1.0,
    warmup: int = 2,
    seed: int = 0,
    testbed: Testbed = TESTBED,
) -> Trace:
    """Random page-aligned ranges in random order: no cycle, no swap pattern, no intents.

    Each step commits `transfers` random ranges, then computes for `compute_ratio` x their link time (so
    there is idle time in which a predictor could waste work), then syncs. Whatever PipeLLM speculates
    is wrong; the target is to cost no more than encrypting on demand.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(warmup + steps):
        ranges = []
        for _ in range(transfers):
            n = _pages(float(rng.integers(min_bytes, max_bytes + 1)))
            off = int(rng.integers(0, (region_bytes - n) // PAGE + 1)) * PAGE
            ranges.append(Range("data", off, n))
        nbytes = sum(r.length for r in ranges)
        out.append(
            Step(
                (
                    H2D(tuple(ranges), label="random"),
                    Compute(testbed.link_s(nbytes) * compute_ratio, after_copies=True),
                    Sync(),
                ),
                tokens=1,
            )
        )
    return Trace(
        name="adversarial",
        kind="adversarial",
        description=f"random {min_bytes // MiB}-{max_bytes // MiB} MiB ranges x{transfers} per step, random order",
        regions=(RegionSpec("data", region_bytes),),
        steps=tuple(out),
        warmup=warmup,
        unit="steps",
        scale={"byte_scale": 1.0},
        params={"transfers": transfers, "compute_ratio": compute_ratio, "seed": seed},
    )


# -- suites ----------------------------------------------------------------------------------------------
SIZES: Final = ("quick", "full")


def suite(size: str = "quick", seed: int = 0) -> list[Trace]:
    """Every workload, sized for `make bench-quick` (seconds each) or `make bench` (tens of seconds)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}")
    q = size == "quick"
    return [
        flexgen("opt-30b", byte_scale=1 / 256 if q else 1 / 32, tokens=3 if q else 8, seed=seed),
        flexgen("opt-66b", byte_scale=1 / 512 if q else 1 / 64, tokens=3 if q else 8, seed=seed),
        flexgen("opt-175b", byte_scale=1 / 1024 if q else 1 / 128, tokens=3 if q else 8, seed=seed),
        flexgen("opt-30b", byte_scale=1 / 768 if q else 1 / 96, tokens=3 if q else 8, kv_offload=True, seed=seed),
        vllm_v0(
            "llama-2-7b",
            requests=2000,
            gpu_blocks=384,
            cpu_blocks=1024,
            token_scale=0.5,
            steps=24 if q else 120,
            skip=400,
            busiest=400,
            seed=seed,
        ),
        vllm_v0(
            "llama-2-7b",
            requests=2000,
            gpu_blocks=384,
            cpu_blocks=1024,
            token_scale=0.5,
            steps=24 if q else 120,
            skip=400,
            busiest=400,
            unpacked=True,
            seed=seed,
        ),
        vllm_v0(
            "opt-30b",
            requests=2000,
            gpu_blocks=192 if q else 384,
            cpu_blocks=1024,
            token_scale=0.25 if q else 0.5,
            steps=14 if q else 60,
            skip=400,
            busiest=400,
            seed=seed,
        ),
        vllm_v0(
            "opt-66b",
            requests=2000,
            gpu_blocks=128 if q else 256,
            cpu_blocks=1024,
            token_scale=0.125 if q else 0.5,
            steps=10 if q else 40,
            skip=400,
            busiest=400,
            seed=seed,
        ),
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
