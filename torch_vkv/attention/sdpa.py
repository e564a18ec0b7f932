"""Backend ``sdpa``: ``scaled_dot_product_attention`` with a dense mask, the reference and CPU fallback.

Reads all ``S_max`` rows (or ``max_blocks * page_size``) on CUDA, so on a
virtual cache those rows must be committed; never chosen by ``auto`` on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import ATTN_SCHEMA, pad_index
from .inputs import cache_bounds, safe_blocks, valid_requests


def gather_valid(cache, rows, block_table, lens, W, first=None):
    """``[R, W, H_kv, D]`` copy of each request's first ``W`` positions, reading valid rows only.

    Position ``p >= len`` is read from row ``len - 1`` instead (and masked by the
    caller): on a virtual cache the rows past a length may not be committed at
    all, so they must not even be read. Likewise positions below ``first[r]``
    (behind a sliding window: perhaps decommitted) are read from row ``first[r]``.
    ``rows`` and ``lens`` come from
    :func:`~torch_vkv.attention.inputs.valid_requests` (in range).
    """
    pos = torch.arange(W, device=cache.device)
    safe = torch.minimum(pos[None, :], (lens - 1).clamp(min=0)[:, None])  # [R, W]
    if first is not None:
        safe = torch.maximum(safe, torch.minimum(first, (lens - 1).clamp(min=0))[:, None])
    if block_table is not None:
        page = cache.shape[1]
        bt = safe_blocks(block_table, cache.shape[0])
        blk = bt.index_select(0, rows).long().gather(1, safe // page)
        return cache[blk, safe % page]
    return cache[rows[:, None], safe]


def _softcapped(qp, k, v, mask, scale, softcap):
    """Attention with soft-capped scores (``softcap * tanh(s / softcap)``), which SDPA has no
    argument for: explicit scores in float32. ``qp [R, Q, H, D]``, ``k, v [R, W, H_kv, D]``,
    ``mask [R, Q, W]``; returns ``[R, Q, H, D]`` in q's dtype."""
    group = qp.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    s = torch.einsum("rqhd,rkhd->rhqk", qp.float(), kf) * scale
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query that sees no key: zeros (masked after)
    return torch.einsum("rhqk,rkhd->rqhd", p, vf).to(qp.dtype)


@torch.library.custom_op("torch_vkv::sdpa_attention", mutates_args=(), schema=ATTN_SCHEMA)
def sdpa_attention(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
    window_left=-1, softcap=0.0,
):  # fmt: skip
    # An opaque op, so that the CPU path may size its window from the lengths (free on the host)
    # without a graph break; on CUDA the window is the whole row (no host sync, capturable).
    R = cache_seqlens.shape[0]
    T, H, D = q.shape
    # Device metadata is not checked: a bad request reads no row and gets zeros.
    ok, lens, rows = valid_requests(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table)
    W = cache_bounds(k_cache, block_table)[1]
    if T == 0 or W == 0:  # no query, or rows of no key (S_max == 0): nothing to gather; zeros as flex/triton
        return q.new_zeros(T, H, D)
    if not q.is_cuda and R > 0:
        W = max(1, min(W, int(lens.max())))
    n = torch.ones_like(lens) if cu_seqlens_q is None else (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    # Keys behind every query's window (window_left >= 0) are neither read nor used.
    first = (lens - n - window_left).clamp(min=0) if window_left >= 0 else None
    k = gather_valid(k_cache, rows, block_table, lens, W, first)
    v = gather_valid(v_cache, rows, block_table, lens, W, first)
    kpos = torch.arange(W, device=q.device)
    valid = kpos[None, :] < lens[:, None]  # [R, W]
    if first is not None:
        valid = valid & (kpos[None, :] >= first[:, None])
    # Mask, never multiply: rows past the length are not data (the gather repeated a valid row there).
    k = torch.where(valid[:, :, None, None], k, k.new_zeros(()))
    v = torch.where(valid[:, :, None, None], v, v.new_zeros(()))
    if cu_seqlens_q is None:
        qp = q.unsqueeze(1)  # [R, 1, H, D]
        q_pos = (lens - 1)[:, None]  # [R, 1]
    else:
        req, row = pad_index(cu_seqlens_q, T, max_seqlen_q, right_aligned=False)
        qp = q.new_zeros((R, max_seqlen_q, H, D)).index_put((req, row), q)
        q_pos = (lens - n)[:, None] + torch.arange(max_seqlen_q, device=q.device)[None, :]
    mask = valid[:, None, :]
    if causal:
        mask = mask & (kpos[None, None, :] <= q_pos[:, :, None])
    if window_left >= 0:
        mask = mask & (kpos[None, None, :] >= q_pos[:, :, None] - window_left)
    if softcap > 0:
        o = _softcapped(qp, k, v, mask, scale, softcap)
    else:
        o = F.scaled_dot_product_attention(
            qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale,
            enable_gqa=H != k_cache.shape[2],
        ).transpose(1, 2)  # fmt: skip
    # A query that sees no key (a bad request's, or one before its length) gets 0, not NaN.
    o = torch.where(mask.any(-1)[:, :, None, None], o, o.new_zeros(()))
    if cu_seqlens_q is None:
        return o[:, 0].contiguous()
    return o[req, row]


@sdpa_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
      window_left=-1, softcap=0.0):  # fmt: skip
    return torch.empty_like(q)
