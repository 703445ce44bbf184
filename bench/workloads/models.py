"""The model shapes the workloads share, and what their GPU work costs on the testbed.

Request lengths shaped like ShareGPT, per-model KV block geometry, decode and prefill times of a dense
model (roofline: FLOPs against memory bytes), and Zipf popularity.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from ..devicemodel import Testbed
from .trace import KiB

BLOCK_TOKENS: Final = 16  # vLLM's default KV block size

# layers, bytes of one K (or V) copy of one block at block size 16 fp16, parameters, hidden size
KV_MODELS: Final = {
    "llama-2-7b": (32, 128 * KiB, 6.74e9, 4096),
    "opt-30b": (48, 224 * KiB, 30.0e9, 7168),
    "opt-66b": (64, 288 * KiB, 66.0e9, 9216),
}


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


def decode_s(params: float, batch: int, ctx_tokens: int, kv_token_bytes: int, testbed: Testbed) -> float:
    """One decode step of a dense model: weights read once, KV of every running token read once."""
    flops = 2 * params * batch + 2 * ctx_tokens * kv_token_bytes  # attention: ~1 FLOP per KV byte each way
    return testbed.compute_s(flops, params * 2 + ctx_tokens * kv_token_bytes)


def prefill_s(params: float, tokens: int, testbed: Testbed) -> float:
    return testbed.compute_s(2 * params * tokens, params * 2) if tokens else 0.0


def zipf_weights(n: int, a: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    w = 1.0 / np.arange(1, n + 1) ** a
    return np.asarray(w / w.sum(), dtype=np.float64)
