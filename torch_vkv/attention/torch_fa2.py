"""Backend ``torch_fa2``: PyTorch's built-in FlashAttention-2, varlen path with ``seqused_k``.

The cache is flattened to ``[B*S_pad, H, D]`` rows (``cum_seq_k = slots * S_pad``)
and used unchanged. CUDA, fp16/bf16, ``stride(0) % stride(1) == 0``. Sliding windows
through ``window_size_left``; PyTorch's FA2 has no soft cap (``attention`` raises
for ``softcap`` with this backend, and ``auto`` picks another).
"""

from __future__ import annotations

import torch

from . import deps
from .common import ATTN_SCHEMA, flat_rows, flatten
from .inputs import valid_requests


@torch.library.custom_op("torch_vkv::fa2_attention", mutates_args=(), schema=ATTN_SCHEMA)
def fa2_attention(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
    window_left=-1, softcap=0.0,
):  # fmt: skip
    R = cache_seqlens.shape[0]
    s_pad = flat_rows(k_cache)
    if s_pad is None or flat_rows(v_cache) != s_pad or block_table is not None:
        raise ValueError("torch_fa2: expected a cache whose stride(0) is a multiple of stride(1), got "
                         f"{k_cache.stride()} / {v_cache.stride()}")  # fmt: skip
    # Device metadata is not checked: a bad request attends to no key (length 0, slot 0).
    ok, lens, idx = valid_requests(k_cache, cache_seqlens, cu_seqlens_q, slots, None)
    idx = idx.to(torch.int32)
    # Request r's keys start at row slots[r] * S_pad of the flattened cache; seqused_k gives their
    # count, so cum_seq_k[r + 1] is never read as an end and need not be monotonic.
    cum_k = torch.cat([idx * s_pad, idx.new_full((1,), (k_cache.shape[0] - 1) * s_pad + k_cache.shape[1])])
    if cu_seqlens_q is None:
        cu_q = torch.arange(R + 1, device=q.device, dtype=torch.int32)
        max_q = 1
    else:
        # Offsets clamped into [0, total_q] and made non-decreasing: no query row outside q.
        cu_q, max_q = torch.cummax(cu_seqlens_q.clamp(0, q.shape[0]), 0).values, max_seqlen_q
    out = torch.ops.aten._flash_attention_forward(
        q, flatten(k_cache, s_pad), flatten(v_cache, s_pad), cu_q, cum_k, max_q, k_cache.shape[1],
        0.0, causal, False, scale=scale, seqused_k=lens.to(torch.int32),
        **_window_kwargs(window_left, causal),
    )[0]  # fmt: skip
    return out


@fa2_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
      window_left=-1, softcap=0.0):  # fmt: skip
    return torch.empty_like(q)


def _window_kwargs(window_left: int, causal: bool) -> dict:
    """FA2's ``window_size_left/right`` for a sliding window (right 0 when causal, else unlimited)."""
    if window_left < 0:
        return {}
    return {"window_size_left": window_left, "window_size_right": 0 if causal else -1}


def fa2_supported(q, k_cache, v_cache, block_table) -> bool:
    """Whether ``torch_fa2`` takes these tensors as they are (PyTorch's FA2 needs an Ampere or newer GPU)."""
    return (
        q.is_cuda
        and deps.HAS_TORCH_FA2
        and deps.ampere_or_newer(q.device.index or 0)
        and block_table is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[2] % 8 == 0
        and q.shape[2] <= 256
        and flat_rows(k_cache) is not None
        and flat_rows(k_cache) == flat_rows(v_cache)
    )
