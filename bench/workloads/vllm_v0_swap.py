"""vLLM V0 KV swapping: continuous batching with swap preemption, packed or one copy per block."""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..devicemodel import TESTBED, Testbed
from .models import BLOCK_TOKENS, KV_MODELS, decode_s, prefill_s, sharegpt_lengths
from .trace import D2H, H2D, MAX_COMMIT_RANGES, Compute, Op, Range, RegionSpec, Step, Sync, Trace


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
        # The same simulation, cut at other windows: only the window, warm-up and swap space change.
        sim = functools.partial(
            vllm_v0,
            model,
            requests=requests,
            gpu_blocks=gpu_blocks,
            max_running=max_running,
            token_scale=token_scale,
            seed=seed,
            testbed=testbed,
        )
        probe = sim(cpu_blocks=cpu_blocks, steps=busiest + steps, skip=skip, warmup=0)
        moved = [sum(op.nbytes for op in st.ops if isinstance(op, H2D | D2H)) for st in probe.steps[1:]]
        ranked = sorted(range(busiest), key=lambda i: (-sum(moved[i + warmup : i + steps]), i))
        # Of the five busiest windows, the one that swaps most in its measured part net of its prologue
        # (replaying swap-outs from before the window costs time in every repetition).
        fitted = max(
            (sim(cpu_blocks=cpu_blocks, steps=steps, skip=skip + i, warmup=warmup) for i in ranked[:5]),
            key=lambda t: t.crypto_bytes() - sum(op.nbytes for op in t.steps[0].ops if isinstance(op, D2H)),
        )
        return sim(
            cpu_blocks=max(1, int(fitted.params["swap_hwm_blocks"])),
            steps=steps,
            skip=int(fitted.params["skipped_steps"]),
            warmup=warmup,
            unpacked=unpacked,  # the window and swap space do not depend on the copies' granularity
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
            secs = decode_s(params, max(batch, 1), ctx, kv_token, testbed) + prefill_s(params, prefill, testbed)
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
