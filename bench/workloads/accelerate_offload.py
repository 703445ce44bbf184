"""accelerate `cpu_offload`: every layer's weights moved synchronously in forward order, no prefetch."""

from __future__ import annotations

from ..devicemodel import TESTBED, Testbed
from .models import KV_MODELS, decode_s
from .trace import H2D, Compute, Declare, Op, Range, RegionSpec, Step, Sync, Trace, pages


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
    layer_bytes = pages(per_layer_params * 2 * byte_scale)
    kv_token = layers * 2 * hidden * 2
    compute = decode_s(per_layer_params, batch, batch * context, kv_token // layers, testbed) * byte_scale
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
