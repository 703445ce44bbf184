"""Opt-in adapters that route real serving libraries' host<->device copies through PipeLLM.

Each submodule imports its library (torch, accelerate, peft) lazily, so `import pipellm_client` never needs
them. See docs/integrations.md for what each one covers and costs.

- `accelerate`: CPU-offloaded weights (`cpu_offload` / `dispatch_model`) fetched through the channel.
- `vllm`: `PipeLLMOffloadingSpec`, a KV-offloading backend for vLLM >= 0.32 (`OffloadingConnector`).
- `vllm_swap`: V0-style KV block swapping (`swap_blocks`, `CacheEngine`) and the older V1 handler API.
- `peft`: LoRA adapters loaded and hot-swapped through the channel.
"""
