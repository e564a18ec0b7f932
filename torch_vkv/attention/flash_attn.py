"""Backend ``flash_attn``: ``flash_attn_with_kvcache`` from the flash-attn package, when importable.

``cache_batch_idx = slots``; varlen queries are padded to ``[R, max_seqlen_q]``,
right-aligned; paged with ``block_table`` (page size a multiple of 256).
``window_left`` -> ``window_size=(window_left, 0)`` (``-1`` right when not causal),
``softcap`` -> ``softcap`` (flash-attn >= 2.6).
"""

from __future__ import annotations

import torch

from . import deps
from .common import ATTN_SCHEMA, pad_index
from .inputs import cache_bounds, safe_blocks, valid_requests


@torch.library.custom_op("torch_vkv::flash_attn_attention", mutates_args=(), schema=ATTN_SCHEMA)
def flash_attn_attention(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
    window_left=-1, softcap=0.0,
):  # fmt: skip
    fn = deps.flash_attn_fn()
    if fn is None:
        raise RuntimeError("flash_attn backend: expected the flash-attn package to be importable, got ImportError")
    R = cache_seqlens.shape[0]
    # Device metadata is not checked: a bad request attends to no key (length 0, slot 0).
    ok, lens, rows = valid_requests(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table)
    kw = dict(cache_seqlens=lens.to(torch.int32), softmax_scale=scale, causal=causal)
    if window_left >= 0:
        kw["window_size"] = (window_left, 0 if causal else -1)
    if softcap > 0:
        kw["softcap"] = softcap
    if block_table is not None:
        kw["block_table"] = safe_blocks(block_table, cache_bounds(k_cache, block_table)[2]).index_select(0, rows)
    elif slots is not None:
        kw["cache_batch_idx"] = rows.to(torch.int32)
    if cu_seqlens_q is None:
        return fn(q.unsqueeze(1), k_cache, v_cache, **kw).squeeze(1).contiguous()
    # flash_attn_with_kvcache has no varlen queries: pad to [R, max_q] with each request's
    # queries in the last rows; its causal mask is bottom-right aligned, so row j of the
    # padded batch sits at position len - max_q + j, as the packed query it holds.
    T, H, D = q.shape
    req, row = pad_index(cu_seqlens_q, T, max_seqlen_q, right_aligned=True)
    qp = q.new_zeros((R, max_seqlen_q, H, D))
    qp[req, row] = q
    return fn(qp, k_cache, v_cache, **kw)[req, row]


@flash_attn_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
      window_left=-1, softcap=0.0):  # fmt: skip
    return torch.empty_like(q)
