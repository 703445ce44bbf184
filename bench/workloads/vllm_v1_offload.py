"""vLLM V1 CPU offloading: full blocks stored FIFO, loaded on prefix hits, multi-turn conversations."""

from __future__ import annotations

from collections import deque

import numpy as np

from ..devicemodel import TESTBED, Testbed
from .models import BLOCK_TOKENS, KV_MODELS, decode_s, prefill_s, sharegpt_lengths
from .trace import D2H, H2D, Compute, Declare, Op, Range, RegionSpec, Step, Sync, Trace


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
                decode_s(params, max(batch, 1), ctx, kv_token, testbed) + prefill_s(params, prefill, testbed),
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
