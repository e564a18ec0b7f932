"""In-place append of new tokens' K/V into the cache (contiguous or paged).

Token ``t`` of request ``r`` (rows ``cu_seqlens_q[r]:cu_seqlens_q[r+1]`` of the
packed ``k_new``/``v_new``) goes to position ``cache_seqlens[r] - (cu_seqlens_q[r+1] - t)``
of its cache row: ``cache_seqlens`` already counts the new tokens (append
first, then attend), so the new tokens fill the last positions.

One program per new token copies all its KV heads. The request of a token is
found by a binary search over ``cu_seqlens_q`` inside the kernel, so there is
no extra launch and nothing depends on host-side lengths (CUDA-graph safe).

The launchers trust their inputs' shapes, dtypes and strides (the public entry
``torch_vkv.attention.append_kv`` checks them once) but not the metadata
values: a request whose slot is out of range, whose length is below its
number of new tokens or above the row (``max_len``), or whose block id falls
outside the pool writes nothing (see ``_common.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _request, _rows, bounds, next_pow2, on_tensor_device


# Runtime sizes are not specialised (Triton would compile a variant per value
# equal to 1 or divisible by 16): a serving engine's batches take every value,
# and each new variant is a compile of about a second in the middle of a step.
@triton.jit(do_not_specialize=["num_requests", "search_steps"])
def _append_kv_kernel(
    k_new_ptr,  # [total_q, H_kv, HEAD_DIM]
    v_new_ptr,
    k_ptr,  # cache [B, S_max, H_kv, D] or pool [num_blocks, PAGE_SIZE, H_kv, D]
    v_ptr,
    seqlens_ptr,  # int32 [num_requests]
    cu_q_ptr,  # int32 [num_requests + 1] (unused unless VARLEN)
    slots_ptr,  # [num_requests] (unused unless HAS_SLOTS)
    bt_ptr,  # int32 [num_slots, max_blocks] (unused unless PAGED)
    num_requests,
    search_steps,  # VARLEN: binary-search steps over cu_q, bit_length(num_requests) + 1
    num_slots, max_len, num_blocks,  # bounds of the metadata (_common.bounds)
    stride_knt, stride_knh,  # k_new: token, head
    stride_vnt, stride_vnh,  # v_new
    stride_kb, stride_ks, stride_kh,  # k_cache: batch (or block), row, head
    stride_vb, stride_vs, stride_vh,  # v_cache
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    if VARLEN:
        # Largest r with cu[r] <= t (invariant cu[lo] <= t < cu[hi]).
        lo = t * 0
        hi = lo + num_requests
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            go = tl.load(cu_q_ptr + mid) <= t
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        r = lo
        q_start = tl.load(cu_q_ptr + r)
        q_end = tl.load(cu_q_ptr + r + 1)
    else:
        r = t
        q_start = t
        q_end = t + 1
    slot, seqlen, valid = _request(seqlens_ptr, slots_ptr, r, q_end - q_start, num_slots, max_len, HAS_SLOTS)
    pos = seqlen - (q_end - t)

    # Bad metadata writes nothing: a slot outside the cache, a length below the request's
    # new tokens or past the row, or a token outside its request's rows (cu_seqlens_q not
    # non-decreasing) would otherwise land outside [0, max_len) of some slot.
    valid = valid & (q_start <= t) & (t < q_end)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    pos_v = tl.zeros([1], dtype=tl.int32) + tl.where(valid, pos, -1)  # a valid request's pos is >= 0
    blk, row, row_ok = _rows(bt_ptr, stride_bt, slot, pos_v, pos_v >= 0, num_blocks, PAGED, PAGE_SIZE)
    ok = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & row_ok[:, None]
    k_row = tl.sum(blk * stride_kb + row * stride_ks, 0)  # [1] -> scalar
    v_row = tl.sum(blk * stride_vb + row * stride_vs, 0)
    t64 = t.to(tl.int64)
    k = tl.load(k_new_ptr + t64 * stride_knt + offs_h[:, None] * stride_knh + offs_d[None, :], mask=ok)
    v = tl.load(v_new_ptr + t64 * stride_vnt + offs_h[:, None] * stride_vnh + offs_d[None, :], mask=ok)
    tl.store(k_ptr + k_row + offs_h[:, None] * stride_kh + offs_d[None, :], k.to(k_ptr.dtype.element_ty), mask=ok)
    tl.store(v_ptr + v_row + offs_h[:, None] * stride_vh + offs_d[None, :], v.to(v_ptr.dtype.element_ty), mask=ok)


@on_tensor_device
def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> None:
    """Write ``k_new``/``v_new`` at the last positions of each request's cache row, in place.

    Parameters
    ----------
    k_cache, v_cache : shape ``[B, S_max, num_kv_heads, head_dim]`` (any
        batch/row/head strides, ``stride(-1) == 1``), or, with ``block_table``,
        block pools ``[num_blocks, page_size, num_kv_heads, head_dim]``.
    k_new, v_new : shape ``[total_q, num_kv_heads, head_dim]``, packed like the queries.
    cache_seqlens : int32, shape ``[num_requests]``, the new tokens included.
    cu_seqlens_q : int32, shape ``[num_requests + 1]``; ``None``: one token per request.
    slots : shape ``[num_requests]``, cache row (block-table row) per request.
    block_table : int32, shape ``[num_slots, max_blocks]`` (paged twin).

    Trusts the shapes, dtypes and strides (checked by the public entry); a request
    with out-of-range metadata values writes nothing.
    """
    T = k_new.shape[0]
    R = cache_seqlens.shape[0]
    if T == 0 or R == 0:
        return
    paged = block_table is not None
    H_kv, D = k_cache.shape[2], k_cache.shape[3]
    bt = block_table if paged else cache_seqlens
    _append_kv_kernel[(T,)](
        k_new, v_new, k_cache, v_cache, cache_seqlens,
        cu_seqlens_q if cu_seqlens_q is not None else cache_seqlens,
        slots if slots is not None else cache_seqlens, bt, R, max(1, R.bit_length() + 1),
        *bounds(k_cache, block_table), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0) if paged else 0,
        NUM_KV_HEADS=H_kv, BLOCK_H=next_pow2(H_kv), HEAD_DIM=D, BLOCK_D=next_pow2(D),
        VARLEN=cu_seqlens_q is not None,
        HAS_SLOTS=slots is not None, PAGED=paged, PAGE_SIZE=k_cache.shape[1] if paged else 1,
        num_warps=4 if H_kv * D >= 1024 else 1,
    )  # fmt: skip


def append_kv_reference(k_cache, v_cache, k_new, v_new, cache_seqlens, *, cu_seqlens_q=None, slots=None, block_table=None):
    """Plain-PyTorch twin of :func:`append_kv` (host syncs; tests only); skips requests with bad metadata."""
    R = cache_seqlens.shape[0]
    cu = cu_seqlens_q.tolist() if cu_seqlens_q is not None else list(range(R + 1))
    lens = cache_seqlens.tolist()
    slot_list = slots.tolist() if slots is not None else list(range(R))
    num_slots, max_len, num_blocks = bounds(k_cache, block_table)
    for r in range(R):
        n = cu[r + 1] - cu[r]
        if not (0 <= slot_list[r] < num_slots and 0 <= n <= lens[r] <= max_len):
            continue
        for i in range(n):
            pos = lens[r] - n + i
            s = slot_list[r]
            if block_table is not None:
                page = k_cache.shape[1]
                b = int(block_table[s, pos // page])
                if not 0 <= b < num_blocks:
                    continue
                k_cache[b, pos % page] = k_new[cu[r] + i]
                v_cache[b, pos % page] = v_new[cu[r] + i]
            else:
                k_cache[s, pos] = k_new[cu[r] + i]
                v_cache[s, pos] = v_new[cu[r] + i]


@triton.jit(do_not_specialize=["limit"])
def _zero_tail_kernel(
    k_ptr,
    v_ptr,
    seqlens_ptr,  # int32 [num_requests]
    slots_ptr,
    bt_ptr,
    limit,  # positions >= limit are never written (the row's padded length)
    num_slots,
    max_len,
    num_blocks,
    stride_kb, stride_ks, stride_kh,  # k_cache: batch (or block), row, head
    stride_vb, stride_vs, stride_vh,  # v_cache
    stride_bt,
    MULTIPLE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    ANY_TILE: tl.constexpr,
):
    r = tl.program_id(0)
    slot, seqlen, ok = _request(seqlens_ptr, slots_ptr, r, 0, num_slots, max_len, HAS_SLOTS)
    pos = seqlen + tl.program_id(1)
    if ANY_TILE:  # the tail of any tile of at most MULTIPLE rows
        end = tl.minimum(seqlen + MULTIPLE - 1, limit)
    else:
        end = tl.minimum(tl.cdiv(seqlen, MULTIPLE) * MULTIPLE, limit)
    end = tl.where(ok, end, -1)  # bad metadata zeroes nothing
    pos_v = tl.zeros([1], dtype=tl.int32) + pos
    blk, row, row_ok = _rows(bt_ptr, stride_bt, slot, pos_v, (pos_v >= 0) & (pos_v < end), num_blocks, PAGED, PAGE_SIZE)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_h[:, None] < NUM_KV_HEADS) & row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    zero = tl.zeros([BLOCK_H, HEAD_DIM], dtype=k_ptr.dtype.element_ty)
    k_row = tl.sum(blk * stride_kb + row * stride_ks, 0)
    v_row = tl.sum(blk * stride_vb + row * stride_vs, 0)
    tl.store(k_ptr + k_row + offs_h[:, None] * stride_kh + offs_d[None, :], zero, mask=ok)
    tl.store(v_ptr + v_row + offs_h[:, None] * stride_vh + offs_d[None, :], zero, mask=ok)


@on_tensor_device
def zero_tail(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    multiple: int,
    limit: int,
    slots: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    any_tile: bool = False,
) -> None:
    """Zero positions ``[len, min(round_up(len, multiple), limit))`` of each request's row, in place;
    with ``any_tile``, ``[len, min(len + multiple - 1, limit))``: the rows past ``len`` that a tile of
    any size up to ``multiple`` rows, aligned to its own size, can cover (FA3's key tiles are 80-192
    rows depending on head_dim and causality, and not all divide a power of two).

    For kernels that read whole tiles and mask only the scores (FlexAttention,
    FlashAttention-3/4): there ``0 * NaN`` in the P @ V product would leak
    garbage past ``cache_seqlens`` into the output. Those rows hold no data
    (they are overwritten by the next append), so zeroing them is harmless.
    """
    R = cache_seqlens.shape[0]
    if R == 0 or multiple <= 1:
        return
    paged = block_table is not None
    bt = block_table if paged else cache_seqlens
    H_kv, D = k_cache.shape[2], k_cache.shape[3]
    _zero_tail_kernel[(R, multiple - 1)](
        k_cache, v_cache, cache_seqlens, slots if slots is not None else cache_seqlens, bt, limit,
        *bounds(k_cache, block_table),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0) if paged else 0,
        MULTIPLE=multiple, NUM_KV_HEADS=H_kv, BLOCK_H=next_pow2(H_kv), HEAD_DIM=D,
        HAS_SLOTS=slots is not None, PAGED=paged, PAGE_SIZE=k_cache.shape[1] if paged else 1, ANY_TILE=any_tile,
        num_warps=4 if H_kv * D >= 1024 else 1,
    )  # fmt: skip
