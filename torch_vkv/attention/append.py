"""The ops that write the cache: ``append_kv`` and ``zero_tail`` (custom ops that mutate it).

``append_kv`` runs the Triton kernel on CUDA (and on the CPU under
``TRITON_INTERPRET=1``), otherwise one ``index_put_`` per cache with positions
computed on the device. Both trust the checked shapes and mask bad metadata
values: a request whose slot or length is out of range writes nothing.
"""

from __future__ import annotations

import torch

from . import deps
from .inputs import check_committed_writes, valid_requests


def _token_targets(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table, T):
    """(ok, row, pos) of each new token: its cache (or pool) row and position, and whether
    its request is valid; ``row``/``pos`` are in range for every token."""
    req_ok, lens, rows = valid_requests(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table)
    tok = torch.arange(T, device=cache_seqlens.device, dtype=torch.int64)
    if cu_seqlens_q is None:
        req, start, end = tok, tok, tok + 1
    else:
        cu = cu_seqlens_q.long()
        req = (torch.searchsorted(cu, tok, right=True) - 1).clamp(0, cu.shape[0] - 2)
        start, end = cu[req], cu[req + 1]
    ok = req_ok[req] & (start <= tok) & (tok < end)  # a token outside its request's rows: inconsistent cu
    pos = torch.where(ok, lens[req] - (end - tok), 0)
    row = rows[req]
    if block_table is not None:
        page = k_cache.shape[1]
        blk = block_table[row, pos // page].long()
        ok = ok & (blk >= 0) & (blk < k_cache.shape[0])
        row, pos = torch.where(ok, blk, 0), pos % page
    return ok, row, pos


def masked_index_put(cache, row, pos, values, ok, *, sync_free: bool) -> None:
    """``cache[row[i], pos[i]] = values[i]`` for every ``i`` with ``ok[i]``; nothing else changes.

    ``sync_free=False`` (host tensors): drop the masked tokens with a boolean index.
    ``sync_free=True`` (device tensors, capturable): a masked token repeats the write of the
    first token that is ok (same place, same value), or, when no token is ok, rewrites the
    value that its (in-range) place already holds.

    The unbound ``torch.Tensor.index_put_``: a cache view's own method would check its
    places against the page table again, which ``append_kv``'s input checks did already
    (``inputs.py``, host metadata).
    """
    if not sync_free:
        torch.Tensor.index_put_(cache, (row[ok], pos[ok]), values[ok])
        return
    first = torch.argmax(ok.to(torch.int32))  # 0 when no token is ok
    src = torch.where(ok, torch.arange(ok.shape[0], device=ok.device), first)
    row, pos = row[src], pos[src]
    keep = ok[src][:, None, None]  # all False only when no token is ok
    torch.Tensor.index_put_(cache, (row, pos), torch.where(keep, values[src], cache[row, pos]))


@torch.library.custom_op(
    "torch_vkv::append_kv",
    mutates_args=("k_cache", "v_cache"),
    schema="(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens, "
    "Tensor? cu_seqlens_q, Tensor? slots, Tensor? block_table) -> ()",
)
def append_kv_op(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table):
    # Compiled steps reach the op unchecked (checks are skipped while tracing): rows must be committed.
    check_committed_writes(k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table)
    append_kv_impl(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table)


def append_kv_impl(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table) -> None:
    """What :func:`append_kv_op` runs (called directly where :func:`~.common.dispatch_free`)."""
    if deps.triton_usable(k_cache.device):
        deps.triton_kernels().append_kv(
            k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots, block_table=block_table
        )
        return
    # Plain-torch fallback (no triton): positions computed on the device, one index_put per cache.
    T = k_new.shape[0]
    if T == 0 or cache_seqlens.shape[0] == 0:
        return
    ok, row, pos = _token_targets(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table, T)
    sync_free = k_cache.device.type != "cpu"
    masked_index_put(k_cache, row, pos, k_new.to(k_cache.dtype), ok, sync_free=sync_free)
    masked_index_put(v_cache, row, pos, v_new.to(v_cache.dtype), ok, sync_free=sync_free)


@append_kv_op.register_fake
def _(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, slots, block_table):
    return None


@torch.library.custom_op(
    "torch_vkv::zero_tail",
    mutates_args=("k_cache", "v_cache"),
    schema="(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? slots, Tensor? block_table, "
    "int multiple, int limit) -> ()",
)
def zero_tail_op(k_cache, v_cache, cache_seqlens, slots, block_table, multiple, limit):
    deps.triton_kernels().zero_tail(
        k_cache, v_cache, cache_seqlens, multiple=multiple, limit=limit, slots=slots, block_table=block_table
    )


@zero_tail_op.register_fake
def _(k_cache, v_cache, cache_seqlens, slots, block_table, multiple, limit):
    return None


