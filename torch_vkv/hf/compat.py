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

from torch_vkv._checks import Described, fail

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


#: Layer types (transformers' ``layer_types``) whose cache is per-token K/V, as ``VirtualKVCache``
#: stores it; ``"dummy"``: a layer without a cache of its own (an MoE/MLP-only layer, or one that
#: reads another layer's KV). Everything else (``"linear_attention"``, ``"conv"``, ``"hybrid"``,
#: ``"indexed_attention"``, ...) keeps a recurrent or compressed state.
KV_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "dummy")


def layer_types(config: Any) -> Optional[list]:
    """Each layer's cache type as transformers' ``DynamicCache`` reads it from ``config``
    (``None`` when the config names none)."""
    tc = text_config(config)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # older 5.x: the config's own list
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        try:
            return list(get_layer_types_and_kwargs(tc)[0])
        except Exception:  # a config it cannot read: fall back to the plain attribute
            pass
    types = getattr(tc, "layer_types", None)
    return list(types) if types is not None else None


def _per_layer_shapes(tc: Any, num_heads: int, hidden: Any) -> Optional[list]:
    """``[(num_kv_heads, head_dim)]`` of each layer of a heterogeneous config (Gemma 4), else ``None``."""
    if not getattr(tc, "is_heterogeneous", False):
        return None
    shapes = []
    for lc in tc.per_layer_config:
        heads = int(getattr(lc, "num_attention_heads", None) or num_heads)
        kv = int(getattr(lc, "num_key_value_heads", None) or heads)
        size = getattr(lc, "hidden_size", None) or hidden
        shapes.append((kv, int(getattr(lc, "head_dim", None) or (size // heads if size else 0))))
    return shapes


def model_shape(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` from a transformers config.

    Raises ``ValueError`` naming them for layers that store no per-token K/V
    (linear attention, convolutions, recurrent blocks: see :data:`KV_LAYER_TYPES`),
    for layers of different K/V shapes (Gemma 4's global layers) and for keys and
    values of other shapes (multi-head latent attention, ``v_head_dim``): one
    ``KVCache`` holds one shape for K and V of every layer."""
    tc = text_config(config)
    try:
        num_layers = int(tc.num_hidden_layers)
        num_heads = int(tc.num_attention_heads)
        hidden = getattr(tc, "hidden_size", None)
    except (AttributeError, TypeError, ValueError):
        fail("config", "a decoder config with num_hidden_layers and num_attention_heads (e.g. model.config)",
             type(config).__name__, TypeError)  # fmt: skip
    types = layer_types(tc)
    if types is not None:
        other = sorted({t for t in types if t not in KV_LAYER_TYPES})
        if other:
            fail("config.layer_types", f"only attention layers ({', '.join(KV_LAYER_TYPES[:3])}): VirtualKVCache stores "
                 "per-token K/V; linear-attention, convolution and recurrent layers are not supported",
                 Described(f"{types} (not supported: {other})"))  # fmt: skip
    shapes = _per_layer_shapes(tc, num_heads, hidden)
    if shapes is not None:
        kept = [s for s, t in zip(shapes, types or [None] * len(shapes)) if t != "dummy"] or shapes
        if len(set(kept)) > 1:
            fail("config", "one num_key_value_heads and head_dim in every layer (VirtualKVCache holds one K/V shape)",
                 Described("(num_key_value_heads, head_dim) per layer " + str(shapes)))  # fmt: skip
        num_kv_heads, head_dim = kept[0]
    else:
        num_kv_heads = int(getattr(tc, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(tc, "head_dim", None) or (hidden // num_heads if hidden else None)
    # Multi-head latent attention (DeepSeek V2/V3, MiniCPM3, Kimi, ...) caches a compressed latent
    # and a rope key of other shapes; MiMo-V2 caches values narrower than its keys.
    lora, v_dim = getattr(tc, "kv_lora_rank", None), getattr(tc, "v_head_dim", None)
    if lora or (v_dim is not None and head_dim and int(v_dim) != int(head_dim)):
        fail("config", "attention whose cache holds K and V of one shape [num_key_value_heads, head_dim] per token",
             Described(f"multi-head latent attention (kv_lora_rank={lora})" if lora else
                       f"keys of head_dim {int(head_dim)}, values of v_head_dim {int(v_dim)}"))  # fmt: skip
    if num_layers < 1 or num_kv_heads < 1 or not head_dim or int(head_dim) < 1:
        fail("config", "num_hidden_layers, num_key_value_heads and head_dim >= 1",
             (num_layers, num_kv_heads, head_dim))  # fmt: skip
    return num_layers, num_kv_heads, int(head_dim)


def check_vkv_support(config: Any, max_len: int, what: str = "max_cache_len", who: str = "") -> None:
    """Refuses, before anything runs, a model whose attention the ``"vkv"`` attention (or ``who``:
    the serving engine's) does not compute: ALiBi biases added to the mask (Falcon ``alibi=True``):
    ``NotImplementedError``; chunked attention (Llama 4 ``attention_chunk_size``) over more than one
    chunk: ``ValueError`` (within one chunk it is plain causal attention). ``max_len``: the most
    tokens a row can reach."""
    tc = text_config(config)
    name, advice = (who, "") if who else ("attn_implementation='vkv'", "; use attn_implementation='eager' or 'sdpa'")
    if getattr(tc, "alibi", False) is True:
        raise NotImplementedError(
            f"{name} does not add ALiBi position biases (this model adds them to the attention mask, which it does "
            f"not read): expected a model without ALiBi (config.alibi=False), got config.alibi=True{advice}"
        )
    chunk = getattr(tc, "attention_chunk_size", None)
    if chunk and max_len > int(chunk):
        types = layer_types(tc)
        if types is None or "chunked_attention" in types:
            fail(what, f"at most attention_chunk_size={int(chunk)} with {name} (it has no chunked attention; within "
                 f"one chunk that is plain causal attention){advice.replace('; use', ': use')} for longer rows",
                 max_len)  # fmt: skip


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


def layer_windows(config: Any, num_layers: int) -> list:
    """Each layer's sliding window in tokens (``None``: global), from a transformers config:
    ``layer_types`` ("sliding_attention" layers take ``sliding_window``; Gemma 2/3, Qwen2/3),
    else ``sliding_window`` for every layer (Mistral; Qwen2 only with ``use_sliding_window``)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return [None] * num_layers
    types = getattr(cfg, "layer_types", None)
    if types is not None and len(types) == num_layers:
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [int(window)] * num_layers
