"""What the engine reads from a Hugging Face model and its config."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["eos_ids", "model_shape", "text_config"]


def text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_shape(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers config."""
    c = text_config(config)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv_heads, head_dim


def eos_ids(model: Any) -> tuple[int, ...]:
    """EOS ids from ``generation_config.eos_token_id`` (int or list); the
    config's only when the model has no generation config."""
    gen = getattr(model, "generation_config", None)
    eos = gen.eos_token_id if gen is not None else getattr(text_config(model.config), "eos_token_id", None)
    if eos is None:
        return ()
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
