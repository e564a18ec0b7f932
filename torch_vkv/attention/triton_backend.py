"""Backend ``triton``: our kernels (``torch_vkv.triton_kernels``) as one custom op.

Split-KV decode (flash-decoding) when ``cu_seqlens_q`` is None, else the
varlen causal prefill kernel; with ``block_table`` their paged twins. The
launchers trust the input checked by :func:`torch_vkv.attention.attention`
and mask bad metadata values on the device.
"""

from __future__ import annotations

import torch

from . import deps
from .common import ATTN_SCHEMA
from .host_values import host_values


def pow2_dim(d: int) -> bool:
    """A head_dim the Triton kernels take: a power of two in [16, 256]."""
    return 16 <= d <= 256 and d & (d - 1) == 0


@torch.library.custom_op("torch_vkv::triton_attention", mutates_args=(), schema=ATTN_SCHEMA)
def triton_attention(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
    window_left=-1, softcap=0.0,
):  # fmt: skip
    return triton_attention_impl(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale,
                                 max_seqlen_q, num_splits, window_left, softcap)  # fmt: skip


def triton_attention_impl(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
    window_left=-1, softcap=0.0,
) -> torch.Tensor:  # fmt: skip
    """What :func:`triton_attention` runs (called directly where :func:`~.common.dispatch_free`)."""
    tk = deps.triton_kernels()
    win = window_left if window_left >= 0 else None
    cap = softcap if softcap > 0 else None
    if cu_seqlens_q is None:
        return tk.decode_attention(
            q, k_cache, v_cache, cache_seqlens, slots=slots, block_table=block_table, scale=scale,
            num_splits=num_splits if num_splits > 0 else None, window_left=win, softcap=cap,
        )  # fmt: skip
    # Lengths known on the host (the engine's and the HF adapter's steps: metadata_tensor) let the work
    # decide whether tensor descriptors pay for their host cost: a 512-row chunk over 16K keys does.
    lengths = host_values(cache_seqlens)
    max_keys = max(lengths) if lengths else None
    kernel = tk.default_kernel(q, k_cache, v_cache, block_table, win, cap, max_keys=max_keys)
    # (the Gluon kernel reads through descriptors by construction: tma is the Triton kernel's choice)
    tma = kernel == "triton" and tk.default_tma(q, k_cache, v_cache, block_table, max_keys=max_keys)
    return tk.prefill_attention(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q,
        slots=slots, block_table=block_table, causal=causal, scale=scale, window_left=win, softcap=cap, tma=tma,
        kernel=kernel,
    )  # fmt: skip


@triton_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
      window_left=-1, softcap=0.0):  # fmt: skip
    return torch.empty_like(q)
