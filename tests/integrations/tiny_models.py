"""Tiny causal LMs for the integration tests, built from configs with seeded random weights (nothing is
downloaded). Dimensions are small, but the linear layers' blocks are >= 256 KiB, the daemon's default
small-transfer threshold, so their fetches take the speculative channel as a real model's would.

Import it after `pytest.importorskip("torch")` and `("transformers")`, as the test modules do.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

VOCAB = 512
# What the two families share: the vocabulary, the width, the depth, the heads and the context.
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}


def _build(seed: int, config_cls: Any, model_cls: Any, **config: Any) -> Any:
    """`model_cls` in eval mode, from a `config_cls` of the common dimensions and `config`."""
    torch.manual_seed(seed)
    model: Any = model_cls(config_cls(**_COMMON, **config))
    return model.eval()


def tiny_opt(seed: int) -> Any:
    return _build(seed, transformers.OPTConfig, transformers.OPTForCausalLM, word_embed_proj_dim=256, ffn_dim=1024)


def tiny_llama(seed: int, *, tied: bool = False) -> Any:
    config = {"intermediate_size": 512, "num_key_value_heads": 2, "tie_word_embeddings": tied}
    return _build(seed, transformers.LlamaConfig, transformers.LlamaForCausalLM, **config)
