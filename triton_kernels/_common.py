"""Pieces shared by every kernel: row addressing and the online-softmax tile loop.

Row addressing is the one place where the contiguous kernels and their paged
twins differ. With ``PAGED=False`` the cache is contiguous virtual memory,
``[B, S_max, num_kv_heads, head_dim]`` with any batch/row/head stride::

    offset(slot, pos) = slot * stride_b + pos * stride_s

With ``PAGED=True`` the cache is a block pool ``[num_blocks, PAGE_SIZE,
num_kv_heads, head_dim]`` and ``slot`` selects a row of the block table::

    offset(slot, pos) = block_table[slot, pos // PAGE_SIZE] * stride_b
                        + (pos % PAGE_SIZE) * stride_s

So a paged twin is the same kernel with one extra dependent load (the block
id) per tile row; that load and the loss of contiguity are exactly the cost of
paging we want to measure, with everything else equal.

Bounds: the launchers trust their (already checked) shapes, but never the
*values* of device metadata. Each kernel treats a request whose slot is
outside ``[0, num_slots)`` or whose length is outside ``[num_new_tokens,
max_len]`` as empty (it reads no key and writes no row of the cache), and
``_rows`` clamps a block id read from the block table into ``[0, num_blocks)``
and reports it as not valid, so no address ever leaves the cache.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import triton
import triton.language as tl


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def bounds(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> tuple[int, int, int]:
    """(num_slots, max_len, num_blocks) of a cache, the limits the kernels hold metadata to."""
    if block_table is None:
        return k_cache.shape[0], k_cache.shape[1], 1
    return block_table.shape[0], block_table.shape[1] * k_cache.shape[1], k_cache.shape[0]


#: Triton's CPU interpreter (``TRITON_INTERPRET=1``) patches ``triton.language`` for the kernel it runs:
#: two threads' kernels at once failed (``Did you forget to add @triton.jit``) or crashed the process.
_INTERPRETER_LOCK = threading.RLock()


def _new_interpreter_lock() -> None:
    # A child forked while another thread ran a kernel would inherit the lock held, by a thread it lacks.
    global _INTERPRETER_LOCK
    _INTERPRETER_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_new_interpreter_lock)


def on_tensor_device(launcher):
    """Run ``launcher(t, ...)`` with ``t``'s CUDA device current.

    Triton launches on the *current* device, whatever device the arguments live on: a cache on
    ``cuda:1`` while ``cuda:0`` is current (a model placed on the second GPU without
    ``torch.cuda.set_device``) would run the kernel on the wrong GPU, an illegal address that kills
    the CUDA context. The check costs a device query per call, and nothing in a graph replay. Calls on
    CPU tensors (Triton's interpreter, which is not thread safe) take turns."""

    @functools.wraps(launcher)
    def launch(t, *args, **kwargs):
        if not t.is_cuda:
            with _INTERPRETER_LOCK:
                return launcher(t, *args, **kwargs)
        if t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)

    return launch


def dot_f32(t) -> bool:
    """Upcast dot operands to fp32: only under the CPU interpreter, whose bf16/fp16 tl.dot is unreliable."""
    return not t.is_cuda


@triton.jit
def _request(seqlens_ptr, slots_ptr, r, num_new, num_slots, max_len, HAS_SLOTS: tl.constexpr):
    """(slot, seqlen, ok) of request ``r``: ``ok`` when its metadata stays inside the cache,
    ``0 <= slot < num_slots`` and ``num_new <= seqlen <= max_len`` (the new tokens fit below
    the length, the length in the row). Without slots, request ``r`` uses slot ``r``."""
    seqlen = tl.load(seqlens_ptr + r)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + r).to(tl.int64)
    else:
        slot = r.to(tl.int64)
    ok = (slot >= 0) & (slot < num_slots) & (seqlen >= num_new) & (seqlen <= max_len)
    return slot, seqlen, ok


@triton.jit
def _rows(
    bt_ptr,  # block table, int32 [num_slots, max_blocks]; unused unless PAGED
    stride_bt,  # block-table row stride (elements)
    slot,  # int64 scalar: cache row (contiguous) or block-table row (paged)
    pos,  # int32 [BLOCK]: token positions inside the request
    mask,  # bool [BLOCK]: positions whose block id may be read
    num_blocks,  # blocks in the pool (PAGED only): ids outside [0, num_blocks) are clamped
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """(block, row-in-block, ok) of the positions ``pos``; offset = block * stride_b + row * stride_s.

    ``ok`` is ``mask`` and, when PAGED, "the block id read is inside the pool"; a bad id is
    clamped into the pool, so even an unmasked load stays in bounds (a store must use ``ok``).
    """
    if PAGED:
        blk = tl.load(bt_ptr + slot * stride_bt + pos // PAGE_SIZE, mask=mask, other=0).to(tl.int64)
        ok = mask & (blk >= 0) & (blk < num_blocks)
        blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1)
        return blk, (pos % PAGE_SIZE).to(tl.int64), ok
    else:
        return slot + tl.zeros_like(pos).to(tl.int64), pos.to(tl.int64), mask


@triton.jit
def _dot(a, b):
    """``a @ b`` with fp32 accumulation. fp32 operands use exact fp32 products ("ieee"): Triton's
    default for them on a GPU is TF32 (10-bit mantissa), about 1e-3 off a float32 reference,
    enough to flip a greedy token of a float32 model."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc):
    """``acc + a @ b``, accumulated inside the MMA (no separate add of a product tile); precision as :func:`_dot`."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tanh(x):
    """tanh from exp2 (the CPU interpreter has no libdevice): sign(x) * (1 - e) / (1 + e), e = exp(-2|x|)."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # 2 * log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attn_tiles(
    acc,  # fp32 [BLOCK_M, HEAD_DIM] running numerator
    l_i,  # fp32 [BLOCK_M] running denominator
    m_i,  # fp32 [BLOCK_M] running max (log2 domain)
    q,  # [BLOCK_M, HEAD_DIM] queries, already in the cache dtype
    q_pos,  # int32 [BLOCK_M] position of each query row (for the causal mask)
    k_ptr,
    v_ptr,
    k_desc,  # USE_TMA: tensor descriptors of k/v_cache [B, S_max, H_kv, D], block [1, BLOCK_N, 1, D]
    v_desc,
    bt_ptr,
    stride_bt,
    slot,
    kv_head,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    lo,  # first key position of this loop (multiple of BLOCK_N)
    hi,  # keys >= hi are never read
    key_lo,  # keys < key_lo are never read (the window's start for the block's first query; else 0)
    window,  # WINDOW: a query at p sees keys >= p - window
    num_blocks,  # PAGED: blocks in the pool (bad block ids are clamped, and masked in the masked tiles)
    qk_mul,  # softmax scale * log2(e); with SOFTCAP: softmax scale / softcap
    cap_out,  # SOFTCAP: softcap * log2(e)
    MASKED: tl.constexpr,  # False: every key in [lo, hi) is valid and visible, hi - lo a multiple of BLOCK_N
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,  # sliding window (masked tiles mask keys < q_pos - window)
    SOFTCAP: tl.constexpr,  # scores soft-capped: softcap * tanh(score / softcap)
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast dot operands (the CPU interpreter's bf16 dot is wrong)
    USE_TMA: tl.constexpr,  # full tiles through the tensor descriptors (bulk copies on Hopper); not with PAGED
    EVICT: tl.constexpr,  # the pointer loads' L2 eviction policy ("" or "evict_first"; descriptors take none)
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if MASKED:
            blk, row, n_ok = _rows(
                bt_ptr, stride_bt, slot, offs_n, (offs_n < hi) & (offs_n >= key_lo), num_blocks, PAGED, PAGE_SIZE
            )
            # Masked loads: rows past the length are never read, so NaN or
            # unmapped memory there cannot leak in (0 * NaN would be NaN).
            k = tl.load(
                k_ptr + (blk * stride_kb + row * stride_ks + kv_head * stride_kh)[:, None] + offs_d[None, :],
                mask=n_ok[:, None],
                other=0.0,
                eviction_policy=EVICT,
            )
            v = tl.load(
                v_ptr + (blk * stride_vb + row * stride_vs + kv_head * stride_vh)[:, None] + offs_d[None, :],
                mask=n_ok[:, None],
                other=0.0,
                eviction_policy=EVICT,
            )
        elif USE_TMA:
            # Full tiles only: every row is below the length, so committed (a masked tile's rows
            # past the length could lie in uncommitted pages, which a bulk copy would touch).
            k = k_desc.load([slot.to(tl.int32), start, kv_head, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = v_desc.load([slot.to(tl.int32), start, kv_head, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            blk, row, _ = _rows(bt_ptr, stride_bt, slot, offs_n, offs_n < hi, num_blocks, PAGED, PAGE_SIZE)
            k = tl.load(k_ptr + (blk * stride_kb + row * stride_ks + kv_head * stride_kh)[:, None] + offs_d[None, :],
                        eviction_policy=EVICT)
            v = tl.load(v_ptr + (blk * stride_vb + row * stride_vs + kv_head * stride_vh)[:, None] + offs_d[None, :],
                        eviction_policy=EVICT)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = _dot(q, tl.trans(k))
        if MASKED or SOFTCAP:
            qk = qk * qk_mul
            if SOFTCAP:
                qk = cap_out * _tanh(qk)
            if MASKED:
                ok = n_ok[None, :]
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= q_pos[:, None])
                if WINDOW:
                    ok = ok & (offs_n[None, :] >= q_pos[:, None] - window)
                qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that sees no key yet keeps m = -inf; subtract 0 instead so
            # exp2(-inf - -inf) never makes a NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
        else:
            # The full tiles (most of the work): scale and subtract the running max in one FMA per
            # score. qk_mul > 0 (score_params), so the max of the raw scores, scaled, is the
            # max of the scaled ones. Every key here is visible, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_mul)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_mul - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_span(
    acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, k_desc, v_desc, bt_ptr, stride_bt, slot, kv_head,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    lo, lo_full, hi_full, hi, key_lo, window, num_blocks, qk_mul, cap_out,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    """Keys ``[lo, hi)``: the masked window edge ``[lo, lo_full)`` (empty without a window),
    full tiles ``[lo_full, hi_full)`` without masks, then the masked rest ``[hi_full, hi)``.

    Keys below ``key_lo`` are never read (masked loads), so rows behind a sliding
    window may hold anything, or be decommitted.
    """
    if WINDOW:
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, k_desc, v_desc, bt_ptr, stride_bt, slot, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            lo, lo_full, key_lo, window, num_blocks, qk_mul, cap_out,
            MASKED=True, CAUSAL=CAUSAL, WINDOW=WINDOW, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            PAGED=PAGED, PAGE_SIZE=PAGE_SIZE, DOT_F32=DOT_F32, USE_TMA=False, EVICT=EVICT,
        )  # fmt: skip
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, k_desc, v_desc, bt_ptr, stride_bt, slot, kv_head,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        lo_full, hi_full, key_lo, window, num_blocks, qk_mul, cap_out,
        MASKED=False, CAUSAL=CAUSAL, WINDOW=WINDOW, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
        PAGED=PAGED, PAGE_SIZE=PAGE_SIZE, DOT_F32=DOT_F32, USE_TMA=USE_TMA, EVICT=EVICT,
    )  # fmt: skip
    return _attn_tiles(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, k_desc, v_desc, bt_ptr, stride_bt, slot, kv_head,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        tl.maximum(hi_full, lo_full), hi, key_lo, window, num_blocks, qk_mul, cap_out,
        MASKED=True, CAUSAL=CAUSAL, WINDOW=WINDOW, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
        PAGED=PAGED, PAGE_SIZE=PAGE_SIZE, DOT_F32=DOT_F32, USE_TMA=False, EVICT=EVICT,
    )  # fmt: skip


def score_params(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_mul, cap_out) of the kernels: scores in the log2 domain, soft-capped when ``softcap > 0``."""
    if not scale > 0:  # the full tiles take the max of the unscaled scores (_attn_tiles)
        raise ValueError(f"expected a softmax scale > 0, got {scale}")
    log2e = 1.4426950408889634
    if softcap > 0:
        return scale / softcap, softcap * log2e
    return scale * log2e, 1.0
