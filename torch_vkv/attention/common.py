"""Pieces shared by several backends: the op schema, the eager fast path, views of the cache's rows."""

from __future__ import annotations

from typing import Optional

import torch

# The schema of every read-only attention op (one op per backend). ``window_left=-1``: no
# sliding window; ``softcap=0.0``: no soft cap (the public entry takes ``None`` for both).
ATTN_SCHEMA = (
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? cu_seqlens_q, Tensor? slots, "
    "Tensor? block_table, bool causal, float scale, int max_seqlen_q, int num_splits, int window_left=-1, "
    "float softcap=0.0) -> Tensor"
)


def dispatch_free(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call may run an op's implementation directly, not through the dispatcher.

    Our ops are custom ops so that ``torch.compile`` traces them (a fake
    implementation, no graph break) and CUDA graphs capture them. In plain eager
    execution the dispatcher adds only its own cost: about 10 us a call, 20 us
    for a mutating op (``fill_defaults`` and version-counter bumps), measured on
    our CPU machine with torch 2.13: 13% of a decode layer's host time in eager
    ``generate()``. So the direct call is taken when nothing would see the
    difference: no ``torch.compile`` trace, no dispatch mode on the stack (fake
    tensors, functionalization, ``make_fx``), no profiler running (a profile
    names our ops, ``torch_vkv::append_kv``, ...), and no input that autograd
    tracks (the ops have no derivative: through the op, backward raises).
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._autograd._profiler_enabled():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def flat_rows(cache: torch.Tensor) -> Optional[int]:
    """S_pad when the cache's batch rows are evenly spaced rows of one buffer, else None."""
    s0, s1 = cache.stride(0), cache.stride(1)
    if cache.shape[0] == 1:
        return cache.shape[1]
    if s1 > 0 and s0 % s1 == 0 and s0 // s1 >= cache.shape[1]:
        return s0 // s1
    return None


def flatten(cache: torch.Tensor, s_pad: int) -> torch.Tensor:
    """``[B, S_max, H, D]`` -> ``[(B-1)*S_pad + S_max, H, D]`` rows of the same memory (no copy)."""
    B, S, H, D = cache.shape
    n = (B - 1) * s_pad + S
    return cache.as_strided((n, H, D), (cache.stride(1), cache.stride(2), 1))


def pad_index(cu_seqlens_q, total_q, max_q, right_aligned):
    """For each packed query row: (request, row in a [R, max_q] padded batch), both in range.

    Rows of an inconsistent ``cu_seqlens_q`` (device metadata is never checked) are clamped
    into ``[0, max_q)``: they may collide, but never index outside the padded batch.
    """
    tok = torch.arange(total_q, device=cu_seqlens_q.device, dtype=torch.int32)
    # Search the whole cu_seqlens_q (cu[0] = 0 <= tok) rather than the view cu_seqlens_q[1:]:
    # torch 2.11's Inductor lowering of searchsorted read that view without its storage offset
    # (an out-of-bounds request index under torch.compile on CUDA). Clamped: never out of range.
    req = (torch.searchsorted(cu_seqlens_q, tok, right=True) - 1).clamp(0, cu_seqlens_q.shape[0] - 2)
    if right_aligned:  # last query of each request in the last padded row
        row = max_q - (cu_seqlens_q[1:][req] - tok)
    else:
        row = tok - cu_seqlens_q[:-1][req]
    return req.long(), row.long().clamp(0, max_q - 1)
