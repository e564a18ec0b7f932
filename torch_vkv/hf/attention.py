"""The ``"vkv"`` attention implementation and its mask function.

Both only read. :func:`vkv_attention_forward` reads the virtual cache through
:func:`torch_vkv.attention` with per-row lengths, nothing past them; what a
step writes (the new K/V, the lengths, the squeeze of left padding, commits)
was done by the cache's ``update`` before. :func:`vkv_mask` hands the cache
the padding of the new tokens (the cache's step plan needs it) and returns a
``[batch, q_length]`` mask whose shape does not grow, so compiled steps see
static shapes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import torch_vkv
from torch_vkv._checks import Described, fail
from torch_vkv.attention.inputs import window_from_module_kwargs
from torch_vkv.hf.compat import check_vkv_support, layer_windows, text_config

__all__ = ["ATTN_NAME", "register", "vkv_attention_forward", "vkv_mask"]

ATTN_NAME = "vkv"


def _attend(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, scale, max_seqlen_q, window_left=None, softcap=None):
    """Packed varlen attention over the virtual cache (``q``: ``[total_q, H, D]``).

    Every backend of :func:`torch_vkv.attention` reads only rows below
    ``cache_seqlens`` and, with ``window_left``, none behind the window (on the
    CPU the ``sdpa`` backend gathers valid rows)."""
    return torch_vkv.attention(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, causal=True, scale=scale,
        max_seqlen_q=max_seqlen_q, window_left=window_left, softcap=softcap,
    )  # fmt: skip


def _cache_of(q_offset: Any) -> Any:
    ref = getattr(q_offset, "_vkv_cache", None)
    return ref() if ref is not None else None


def vkv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> Optional[torch.Tensor]:
    """Mask function of ``"vkv"`` (registered with ``AttentionMaskInterface``).

    With a :class:`VirtualKVCache` (its ``get_query_offset`` names it) the
    cache masks by its lengths and the attention only needs to know which
    *new* tokens are padding: this returns the last ``q_length`` columns of the
    2-D padding mask, ``[batch, q_length]`` bool, and, for an eager multi-token
    step, hands them to the cache, whose first layer squeezes the padding out.
    With another cache it returns the 2-D mask over all ``kv_length`` keys
    (for the plain fallback), or ``None``.
    """
    # Traced code never looks for the cache (the padding plan is for eager steps).
    compiling = torch.compiler.is_compiling()
    cache = None if compiling else _cache_of(q_offset)
    if not compiling:
        _check_mask_function(mask_function)
        static = isinstance(q_offset, torch.Tensor) or (
            isinstance(kv_length, int) and isinstance(q_offset, int) and kv_length > q_offset + q_length)
        if cache is None and static:
            # StaticCache (and the like): full-capacity keys whose empty rows the fallback would read.
            raise TypeError(
                "attn_implementation='vkv' reads a VirtualKVCache (or falls back to plain attention with "
                "DynamicCache or no cache): expected one of those, got a cache of more key slots than tokens "
                f"(kv_length {kv_length} for {q_length} new tokens at offset {q_offset}: transformers' StaticCache "
                "or the like, whose full-capacity keys it cannot mask); use "
                "torch_vkv.hf.VirtualKVCache (compiled steps work with it), or StaticCache with "
                "attn_implementation='sdpa' or 'eager'"
            )
    config = kwargs.get("config")
    if config is not None and not compiling:
        if cache is not None:
            check_vkv_support(config, cache.max_cache_len)
        elif isinstance(q_offset, int):  # another cache's or none: the positions this step reaches
            check_vkv_support(config, q_offset + q_length, "positions of this step (no VirtualKVCache)")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    m = attention_mask.to(torch.bool)
    if cache is not None:
        new = m[:, -q_length:]
        if q_length > 1:
            cache._set_padding(new)
        return new
    if isinstance(q_offset, torch.Tensor):  # traced VirtualKVCache steps (StaticCache is refused above)
        return m[:, -q_length:]
    return m[:, -kv_length:] if isinstance(kv_length, int) and 0 < kv_length <= m.shape[1] else m


#: Parts of transformers' mask functions (``masking_utils``) that the "vkv" attention computes
#: itself: causal, sliding window (``sliding_window`` of the layer) and chunks (refused past one chunk
#: by ``check_vkv_support``); ``and_masks`` / ``or_masks`` are looked into.
_PLAIN_MASK_PARTS = (
    "causal_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "chunked_overlay.<locals>.inner_mask",
    "padding_mask_function.<locals>.inner_mask",
    # the same as one closure (other transformers releases)
    "sliding_window_causal_mask_function.<locals>.inner_mask",
    "chunked_causal_mask_function.<locals>.inner_mask",
)
_COMPOSED_MASKS = ("and_masks.<locals>.and_mask", "or_masks.<locals>.or_mask")


def _closure_value(fn: Any, name: str) -> Any:
    try:
        return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def _extra_mask_parts(fn: Any) -> list[str]:
    """The parts of a transformers mask function that the "vkv" attention would not compute."""
    if fn is None:
        return []
    name = getattr(fn, "__qualname__", type(fn).__name__)
    if name in _COMPOSED_MASKS:
        parts = _closure_value(fn, "mask_functions")
        if parts is None:
            return [name]
        return [p for f in parts for p in _extra_mask_parts(f)]
    if name in _PLAIN_MASK_PARTS:
        return []
    if name == "blockwise_overlay.<locals>.inner_mask":  # Gemma 3's image-token blocks
        ids = _closure_value(fn, "block_sequence_ids")
        if isinstance(ids, torch.Tensor) and not bool((ids >= 0).any()):
            return []  # no block in this step: plain causal
        return ["bidirectional blocks of image tokens (blockwise_overlay)"]
    return [name]


def _check_mask_function(mask_function: Any) -> None:
    """Refuses, before anything is stored, a mask that the "vkv" attention does not compute: it
    reads causal (sliding-window) attention by lengths and ignores transformers' mask function, so
    an ``or_mask_function`` / ``and_mask_function`` (Gemma 3's bidirectional image tokens,
    ``use_bidirectional_attention``) or packed sequences would be dropped silently."""
    extra = _extra_mask_parts(mask_function)
    if extra:
        raise NotImplementedError(
            "attn_implementation='vkv' computes causal (and sliding-window) attention only: expected a plain "
            f"causal mask, got a mask function with {', '.join(sorted(set(extra)))} (e.g. Gemma 3 image tokens "
            "attending to each other, bidirectional attention, packed sequences); use attn_implementation='eager' "
            "or 'sdpa'"
        )


def _config_window(module: Any) -> Optional[int]:
    """The sliding window the config gives the calling layer (``layer_windows``), or ``None``:
    for models that apply it only through the mask (PhiMoE passes no ``sliding_window``)."""
    config, idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    if config is None or not isinstance(idx, int):
        return None
    try:
        n = int(text_config(config).num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        return None
    return layer_windows(config, n)[idx] if 0 <= idx < n else None


def _fallback_sdpa(query, key, value, attention_mask, scaling, window_left=None, softcap=None):
    """vkv attention with another cache (DynamicCache, none): plain SDPA with a
    bottom-right causal mask, the layer's sliding window (``window_left``: a query
    sees itself and the ``window_left`` keys before it) and the 2-D padding mask
    over all keys; with a ``softcap``, the same in plain torch (SDPA has no soft cap).
    The keys are the last ``Sk`` tokens (a ``DynamicCache`` sliding layer returns its
    last ``W - 1`` plus the new ones), so key distances are token distances."""
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] < Sk:
        raise ValueError(
            f"attn_implementation='vkv' with a cache other than VirtualKVCache: expected a padding mask over all "
            f"{Sk} keys, got {tuple(attention_mask.shape)}"
        )
    q_pos = torch.arange(Sk - Sq, Sk, device=query.device)[:, None]
    k_pos = torch.arange(Sk, device=query.device)[None, :]
    mask = k_pos <= q_pos
    if window_left is not None:
        mask = mask & (k_pos >= q_pos - window_left)
    mask = mask[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -Sk:].bool()
    if softcap is None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=Hq != key.shape[1]
        )
    else:
        rep = Hq // key.shape[1]
        k, v = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
        scores = torch.matmul(query, k.transpose(-1, -2)).float() * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    # A query with no visible key (a padding query) gives NaN; its output is never
    # used, but NaN must not spread through later layers' arithmetic.
    out = torch.nan_to_num(out, nan=0.0)
    return out.transpose(1, 2).contiguous(), None


def vkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"vkv"`` attention implementation: reads the cache, writes nothing to it.

    Args:
        module: the attention layer calling (named in errors; the cache layer is the one
            ``key`` came from).
        query: ``[B, num_heads, S_q, head_dim]``.
        key, value: what :meth:`VirtualKVLayer.update` returned in vkv mode, the
            full-capacity views ``[max_batch_size, num_kv_heads, max_cache_len, head_dim]``.
        attention_mask: ``[B, S_q]`` bool from :func:`vkv_mask` (False = left
            padding among the new tokens) or ``None``. The cache's step plan,
            built from the same mask, says where the real queries are.
        dropout: must be 0 (inference only: ``NotImplementedError`` otherwise).
        scaling: the softmax scale (default ``head_dim ** -0.5``).
        is_causal: ignored: new tokens always see the cache and the earlier new tokens.
        kwargs: the model's extras: a sliding window and a soft cap reach the kernel
            (``window_from_module_kwargs``); attention sinks (``s_aux``, ``sinks``) raise
            ``NotImplementedError``.

    Returns ``(out [B, S_q, num_heads, head_dim], None)``; padding queries get
    zeros. No mask is built and nothing past the cache's lengths is read.
    """
    if dropout:
        raise NotImplementedError("attn_implementation='vkv' is for inference: dropout must be 0")
    for name in ("s_aux", "sinks"):  # gpt-oss, GraniteSWA, MiMo: a learned sink logit per head
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation='vkv' does not compute attention sinks: expected no {name!r}, got a tensor of "
                f"shape {tuple(kwargs[name].shape)} from {type(module).__name__}; use attn_implementation='eager'"
            )
    if attention_mask is not None and attention_mask.dim() != 2:
        # A 4-D mask (a custom one, or a bias added to the mask) would be ignored: different tokens.
        fail("attention_mask", "None or the 2-D padding mask of the 'vkv' mask function (attn_implementation='vkv' "
             "takes no 4-D or custom masks)", Described(f"a {attention_mask.dim()}-D {attention_mask.dtype} tensor "
             f"of shape {tuple(attention_mask.shape)}"))  # fmt: skip
    win = window_from_module_kwargs(kwargs)  # sliding window / soft cap of this layer, if any
    layer = getattr(key, "_vkv_layer", None)
    if layer is None:
        if "window_left" not in win:
            w = _config_window(module)
            if w is not None:
                win["window_left"] = w - 1
        return _fallback_sdpa(query, key, value, attention_mask, scaling, **win)
    cache = layer._parent
    if "window_left" not in win and cache._layer_windows[layer.layer_idx] is not None:
        # A window the model applies only through its mask (PhiMoE): the config's, as the cache trims.
        win["window_left"] = cache._layer_windows[layer.layer_idx] - 1
    compiling = torch.compiler.is_compiling()
    B, Hq, Sq, D = query.shape
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    # The whole buffers (layer.buffers()), never slices made earlier: request r reads row r.
    k_cache, v_cache = layer.buffers()
    seqlens = cache.lengths.cache_seqlens[:B]
    q = query.transpose(1, 2).reshape(B * Sq, Hq, D)
    if Sq == 1:
        return _attend(q, k_cache, v_cache, seqlens, None, scale, 1, **win).view(B, 1, Hq, D), None
    step = None if compiling else cache._step
    if step is not None and step.cache_seqlens is not None and step.batch == B:
        # The same lengths with host copies (StepPlan): a host-planned backend needs no sync.
        seqlens = step.cache_seqlens
        if step.real_index is not None:  # left padding: real queries only
            out_real = _attend(q[step.real_index], k_cache, v_cache, seqlens, step.cu_seqlens_q, scale,
                               step.max_seqlen_q, **win)  # fmt: skip
            out = q.new_zeros(B * Sq, Hq, D)
            out[step.real_index] = out_real
            return out.view(B, Sq, Hq, D), None
        if step.num_tokens == Sq:
            return _attend(q, k_cache, v_cache, seqlens, step.cu_seqlens_q, scale, Sq, **win).view(B, Sq, Hq, D), None
    cu = torch.arange(B + 1, dtype=torch.int32, device=q.device) * Sq
    return _attend(q, k_cache, v_cache, seqlens, cu, scale, Sq, **win).view(B, Sq, Hq, D), None


_REGISTERED = False


def register() -> None:
    """Registers ``"vkv"`` with transformers' ``AttentionInterface`` (and its mask
    function with ``AttentionMaskInterface``). Idempotent; runs on import."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover
        AttentionMaskInterface = None
    AttentionInterface.register(ATTN_NAME, vkv_attention_forward)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(ATTN_NAME, vkv_mask)
    _REGISTERED = True
