"""What differs between the transformers versions we support (5.x).

transformers is renaming ``past_key_values``: 5.24 takes ``cache=`` in
``generate()`` (``past_key_values=`` deprecated, removal in 6.0) and in model
``forward()`` (removal in 5.40); older 5.x releases (5.17 on our GPU machine)
know only ``past_key_values=``. :func:`generate_kwargs` and
:func:`forward_kwargs` return the keyword the installed version takes, so the
same code runs on both without a ``FutureWarning``::

    out = model.generate(ids, **generate_kwargs(cache), max_new_tokens=32)
    logits = model(tok, **forward_kwargs(model, cache)).logits
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch

from torch_vkv._checks import fail

__all__ = ["cache_keyword", "eos_ids", "forward_kwargs", "generate_kwargs", "model_shape", "text_config"]


@functools.lru_cache(maxsize=None)
def _generate_keyword() -> str:
    try:
        from transformers.generation import utils
    except ImportError:  # pragma: no cover - transformers without generation
        return "past_key_values"
    # The names generate() holds the cache under; "cache" first since the rename.
    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


@functools.lru_cache(maxsize=None)
def _forward_keyword(forward_owner: type) -> str:
    try:
        params = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model: Any = None) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``model.forward`` takes
    a cache under (``model=None``: the one ``generate()`` takes)."""
    if model is None:
        return _generate_keyword()
    return _forward_keyword(type(model))


def generate_kwargs(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model.generate(...)`` with the installed transformers."""
    return {_generate_keyword(): cache}


def forward_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)`` / ``model.forward(...)``."""
    return {cache_keyword(model): cache}


def text_config(config: Any) -> Any:
    """The decoder's config of a (maybe multimodal) transformers config."""
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:
            return config.get_text_config()
    return config


def model_shape(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` from a transformers config."""
    tc = text_config(config)
    try:
        num_layers = int(tc.num_hidden_layers)
        num_heads = int(tc.num_attention_heads)
        hidden = getattr(tc, "hidden_size", None)
    except (AttributeError, TypeError, ValueError):
        fail("config", "a decoder config with num_hidden_layers and num_attention_heads (e.g. model.config)",
             type(config).__name__, TypeError)  # fmt: skip
    num_kv_heads = int(getattr(tc, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(tc, "head_dim", None) or (hidden // num_heads if hidden else None)
    if num_layers < 1 or num_kv_heads < 1 or not head_dim or int(head_dim) < 1:
        fail("config", "num_hidden_layers, num_key_value_heads and head_dim >= 1",
             (num_layers, num_kv_heads, head_dim))  # fmt: skip
    return num_layers, num_kv_heads, int(head_dim)


def eos_ids(model: Any) -> tuple[int, ...]:
    """EOS ids from ``generation_config.eos_token_id`` (int or list); the
    config's only when the model has no generation config."""
    gen = getattr(model, "generation_config", None)
    eos = gen.eos_token_id if gen is not None else getattr(text_config(model.config), "eos_token_id", None)
    if eos is None:
        return ()
    if hasattr(eos, "tolist"):  # a tensor
        eos = eos.tolist()
    return (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)


def position_limit(model: Any) -> Optional[int]:
    """Positions a model with a learned absolute position table can take, or None where it has none.

    GPT-2's ``wpe``, OPT's ``embed_positions``: an ``nn.Embedding`` other than the input embeddings,
    with at most ``max_position_embeddings`` (+ OPT's offset of 2) rows. A position past the table
    is an ``IndexError`` on the CPU and a device-side assert on CUDA, which ends the process's CUDA
    context. RoPE and ALiBi models have no such table: positions past ``max_position_embeddings``
    are the model's own extrapolation, not an error.
    """
    max_pos = getattr(text_config(model.config), "max_position_embeddings", None)
    if not isinstance(max_pos, int) or max_pos <= 0:
        return None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tables = [m.num_embeddings for m in model.modules()
              if isinstance(m, torch.nn.Embedding) and m is not inputs and m.num_embeddings <= max_pos + 2]  # fmt: skip
    return min([max_pos, *tables]) if tables else None
