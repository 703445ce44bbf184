"""Opt-in adapters that route real serving libraries' host<->device copies through PipeLLM.

Each submodule imports its library (torch, accelerate, peft) lazily, so `import pipellm_client` never needs
them. See docs/integrations.md for what each one covers and costs.

- `accelerate`: CPU-offloaded weights (`cpu_offload` / `dispatch_model`) fetched through the channel.
- `vllm_swap`: vLLM-style KV block swapping (V0 `swap_blocks`, V1 FIFO offloading handlers).
- `peft`: LoRA adapters loaded and hot-swapped through the channel.
"""
