"""Split-KV decode attention (flash-decoding) over a contiguous or paged KV cache.

One query token per request. A decode step reads the whole KV of every
request once and does almost no arithmetic, so it is bound by memory
bandwidth; the work is spread over ``num_requests x num_kv_heads x
NUM_SPLITS`` programs so that a small batch still fills the GPU:

* ``_decode_split_kernel``: program ``(r, kv_head, split)`` attends the
  ``GROUP = num_heads // num_kv_heads`` query heads that share ``kv_head``
  (K/V are read once for the whole group, which is what makes GQA cheap) to
  its share of request ``r``'s keys. The share is computed on the device from
  ``cache_seqlens[r]``: every split gets ``ceil(len / NUM_SPLITS)`` keys
  (rounded up to ``BLOCK_N``), so no split is idle however large ``S_max`` is,
  and the launch shape never depends on the lengths (CUDA-graph safe).
  It writes a partial output and its log-sum-exp.
* ``_decode_reduce_kernel``: merges the ``NUM_SPLITS`` partials per head.
  With ``fuse_merge`` (opt-in) the merge runs inside the first kernel instead: the last
  split of each ``(request, kv head)`` to finish (an atomic counter per pair,
  which that split sets back to zero) merges its query heads, one launch
  instead of two (`merge_counters`, :func:`default_merge_counters`, say where the counters live).

With ``NUM_SPLITS == 1`` the first kernel writes the final output directly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import _attn_span, _request, bounds, dot_f32, next_pow2, on_tensor_device, score_params
from .decode_launch import (
    default_decode_block_n,
    default_decode_evict_first,
    default_decode_stages,
    default_decode_tma,
    default_num_splits,
)
from .prefill import attention_reference, capturing, tile_descriptors


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [num_requests, num_heads, HEAD_DIM]
    k_ptr,  # cache [B, S_max, H_kv, D] or pool [num_blocks, PAGE_SIZE, H_kv, D]
    v_ptr,
    k_desc,  # USE_TMA: tensor descriptors of k/v_cache (else k_ptr/v_ptr again, unused)
    v_desc,
    seqlens_ptr,  # int32 [num_requests]
    slots_ptr,  # int32/int64 [num_requests] (unused unless HAS_SLOTS)
    bt_ptr,  # int32 [num_slots, max_blocks] (unused unless PAGED)
    o_ptr,  # DIRECT: out [num_requests, num_heads, D]; else fp32 [num_requests, num_heads, NUM_SPLITS, D]
    lse_ptr,  # fp32 [num_requests, num_heads, NUM_SPLITS] (unused if DIRECT)
    count_ptr,  # FUSE_MERGE: int32 [>= num_requests * H_kv], zero: splits of (r, kv head) done so far
    out_ptr,  # FUSE_MERGE: out [num_requests, num_heads, D]
    stride_out_t, stride_out_h,
    num_slots, max_len, num_blocks,  # bounds of the metadata (_common.bounds)
    qk_mul, cap_out,  # score scaling (_common.score_params)
    window,  # WINDOW: the query (position seqlen - 1) sees keys [seqlen - 1 - window, seqlen - 1]
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,  # k_cache: batch (or block), row, head
    stride_vb, stride_vs, stride_vh,  # v_cache
    stride_bt,
    stride_ot, stride_oh,
    stride_os,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DIRECT: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    FUSE_MERGE: tl.constexpr = False,
    GROUP_P2: tl.constexpr = 1,  # FUSE_MERGE: next_pow2(GROUP)
    BLOCK_S: tl.constexpr = 1,  # FUSE_MERGE: next_pow2(NUM_SPLITS)
    CHUNK_S: tl.constexpr = 1,  # FUSE_MERGE: splits merged per load
    EVICT: tl.constexpr = "",  # K/V pointer loads' L2 eviction policy: "" or "evict_first"
):
    r = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot, seqlen, ok = _request(seqlens_ptr, slots_ptr, r, 1, num_slots, max_len, HAS_SLOTS)
    # Bad metadata (slot out of range, length outside [1, max_len]): no key is read, output 0.
    seqlen = tl.where(ok, seqlen, 0)

    if WINDOW:
        # Only the window is split and read: keys [key_lo, seqlen); the tile holding key_lo is masked.
        key_lo = tl.maximum(seqlen - 1 - window, 0)
    else:
        key_lo = 0
    base = key_lo // BLOCK_N * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(seqlen - base, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = base + split * per_split
    hi = tl.minimum(lo + per_split, seqlen)
    # Full tiles first (no masks on the loads), then at most one partial tile.
    hi_full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    # The window edge: the first tile, masked when key_lo is not tile aligned.
    lo_full = tl.minimum(tl.maximum(tl.cdiv(key_lo, BLOCK_N) * BLOCK_N, lo), tl.maximum(hi_full, lo))

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    g_ok = offs_g < GROUP
    # BLOCK_G >= 16 rows so tl.dot can use tensor cores; the extra rows are zero.
    q = tl.load(q_ptr + r * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + seqlen - 1  # decode: every key < seqlen is visible

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_span(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, k_desc, v_desc, bt_ptr, stride_bt, slot, kv_head,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        lo, lo_full, hi_full, hi, key_lo, window, num_blocks, qk_mul, cap_out,
        CAUSAL=False, WINDOW=WINDOW, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE, DOT_F32=DOT_F32,
        USE_TMA=USE_TMA, EVICT=EVICT,
    )  # fmt: skip

    # An empty split (lo >= seqlen) has l = 0: store 0 and lse = -inf, weight 0 in the merge.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DIRECT:
        o_offs = r * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        o_offs = r * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        tl.store(o_ptr + o_offs, out, mask=g_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        lse_base = lse_ptr + r * NUM_SPLITS * tl.num_programs(1) * GROUP
        tl.store(lse_base + heads * NUM_SPLITS + split, lse, mask=g_ok)
        if FUSE_MERGE:
            # The barrier puts every thread's stores before the atomic, whose release (GPU scope)
            # publishes them; the last split's acquire orders its loads after all the others' stores.
            tl.debug_barrier()
            count = count_ptr + r * tl.num_programs(1) + kv_head
            if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
                tl.store(count, 0)  # ready for the next call (graph replays included): no memset
                _merge_splits(o_ptr, lse_base, out_ptr, r, kv_head, stride_ot, stride_oh, stride_os,
                              stride_out_t, stride_out_h, GROUP, GROUP_P2, HEAD_DIM, NUM_SPLITS, BLOCK_S, CHUNK_S)  # fmt: skip


@triton.jit
def _merge_splits(mid_o_ptr, lse_base, out_ptr, r, kv_head, stride_ot, stride_oh, stride_os, stride_out_t,
                  stride_out_h, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr):  # fmt: skip
    """The fused merge: the ``GROUP`` query heads of ``(r, kv_head)`` over all ``NUM_SPLITS``
    partials, ``CHUNK_S`` splits a load, the chunks unrolled (wide loads in flight together rather
    than one round trip a split, which made an earlier fused merge slower than the merge kernel)."""
    offs_g = tl.arange(0, GROUP_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, CHUNK_S)
    g_ok = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    lse_rows = lse_base + heads * NUM_SPLITS  # [GROUP_P2]
    # The largest log-sum-exp per head, all splits in one load. .cg: read from L2, never from a line
    # this SM's L1 may hold from before the other splits wrote.
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_rows[:, None] + offs_s[None, :], mask=g_ok[:, None] & (offs_s < NUM_SPLITS)[None, :],
                  other=float("-inf"), cache_modifier=".cg")  # fmt: skip
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (length 0): output 0, not NaN
    denom = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM], dtype=tl.float32)
    # Unrolled: the chunks' loads do not wait for each other.
    for s0 in tl.static_range(0, NUM_SPLITS, CHUNK_S):
        ss = s0 + offs_c
        ok = g_ok[:, None] & (ss < NUM_SPLITS)[None, :]  # [GROUP_P2, CHUNK_S]
        w = tl.math.exp2(tl.load(lse_rows[:, None] + ss[None, :], mask=ok, other=float("-inf"),
                                 cache_modifier=".cg") - m[:, None])  # fmt: skip
        offs = r * stride_ot + heads[:, None, None] * stride_oh + ss[None, :, None] * stride_os + offs_d[None, None, :]
        part = tl.load(mid_o_ptr + offs, mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
        denom += tl.sum(w, 1)
        acc += tl.sum(w[:, :, None] * part, 1)
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(out_ptr + r * stride_out_t + heads[:, None] * stride_out_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])  # fmt: skip


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,  # fp32 [num_requests, num_heads, NUM_SPLITS, D], contiguous
    mid_lse_ptr,  # fp32 [num_requests, num_heads, NUM_SPLITS], contiguous (log2 domain)
    o_ptr,  # [num_requests, num_heads, D]
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    base = r * NUM_HEADS + h
    lse = tl.load(mid_lse_ptr + base * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (length 0): output 0, not NaN
    w = tl.math.exp2(lse - m)
    o = tl.load(mid_o_ptr + (base * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(o_ptr + r * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))


#: Fused-merge counters of eager calls, per (device, stream): the kernel leaves them zeroed, so they
#: are made (and zeroed) once, not at every call.
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def default_merge_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros, at least ``n``, for :func:`decode_attention`'s fused merge on ``device``'s current stream.

    One buffer per ``(device, stream)`` is kept and reused: every call leaves its counters at zero,
    and calls on one stream run one after another. It is allocated on that stream (a buffer replaced
    by a larger one is freed in the stream's order). During the warm-up of ``torch.compile``'s
    CUDA-graph trees it lands in the graph's pool (torch 2.11 routes the thread's allocations there,
    whatever the stream: a side stream did not help on the GPU), which then refuses it: code under
    ``mode="reduce-overhead"`` passes its own ``merge_counters`` or does not fuse. Not for a call being
    captured (``RuntimeError``): a graph may be replayed on any stream, beside eager calls or other
    graphs, so it cannot share these.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "default_merge_counters: expected a call outside CUDA-graph capture, got one inside: a capture "
            "makes no counters of its own (decode_attention takes the merge kernel there, or merge_counters=)"
        )
    # On the CPU (Triton's interpreter) calls run one at a time (_common.on_tensor_device).
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < n:
        n = max(n, 1024, 2 * counters.numel() if counters is not None else 0)
        counters = _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return counters


def default_fuse_merge(num_splits: int, paged: bool = False) -> bool:
    """Whether :func:`decode_attention` merges the splits inside its first kernel by itself, without
    ``merge_counters`` given: never (``False``); with ``merge_counters`` it does.

    Measured on the H100 (``scripts/diag_ab.py --profile``, Llama-3-8B heads, bf16, per layer of a
    32-layer step graph, counters made once and given, 2026-12-05): batch 1, 16K: 30.0 us against
    30.8 with the merge kernel; batch 2, 16K 50.9 against 51.8; batch 4, 16K 94.3 against 95.4;
    batch 1, 32K 52.1 against 53.1; batch 8, 16K 180.3 against 181.6. Counters zeroed before every
    call were slower than the merge kernel (31.3 us at batch 1, 16K). But counters the library makes
    and keeps by itself broke ``torch.compile``'s CUDA-graph trees on the GPU: made in a capture, or
    even on a side stream during the trees' warm-up (torch 2.11 routes the thread's allocations to
    the graph's pool), they are a live tensor in that pool, and the trees refuse it ("tensor(s) in the
    cudagraph pool not tracked as outputs"). So the fused merge is the caller's choice: counters made
    outside any capture or warm-up and kept as long as the graphs that use them. An earlier fused
    merge, one load per split, was 4-7 us slower at batch 1-4, 16K on the H200."""
    return False


def _merge_chunk(group_p2: int, head_dim: int, num_splits: int) -> int:
    """Splits merged per load of the fused merge: at most 8192 fp32 values (64 registers a thread
    at 4 warps), at least one split."""
    return max(1, min(next_pow2(num_splits), 8192 // (group_p2 * head_dim)))


@on_tensor_device
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    slots: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    window_left: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    tma: bool | None = None,
    fuse_merge: bool | None = None,
    merge_counters: torch.Tensor | None = None,
    evict_first: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-KV decode: one query per request over its cached keys.

    Parameters
    ----------
    q : shape ``[num_requests, num_heads, head_dim]``, fp16/bf16/fp32.
    k_cache, v_cache : shape ``[B, S_max, num_kv_heads, head_dim]`` (any
        batch/row/head strides, ``stride(-1) == 1``), or, with ``block_table``,
        block pools ``[num_blocks, page_size, num_kv_heads, head_dim]``.
    cache_seqlens : int32, shape ``[num_requests]``: valid keys per request,
        the current token included.
    slots : int, shape ``[num_requests]``: cache row (or block-table row) of
        each request; default ``arange(num_requests)``.
    block_table : int32, shape ``[num_slots, max_blocks]``: the paged twin.
    window_left : sliding window: the query sees keys ``[len - 1 - window_left, len)``;
        only those are read and split (the cost stops growing with the context).
    softcap : scores become ``softcap * tanh(score / softcap)`` before the softmax.
    num_splits : splits per (request, kv head); default :func:`default_num_splits`
        (of the window's length with ``window_left``).
    block_n : keys per tile; default :func:`default_decode_block_n`.
    num_warps, num_stages : launch parameters (tuning; defaults 4 / :func:`default_decode_stages`).
    tma : read the full key tiles through tensor descriptors (bulk copies on Hopper), as
        :func:`~.prefill.prefill_attention` does; a contiguous cache only (:func:`~.prefill.tma_problem`).
        ``None``: :func:`default_decode_tma` decides (large batches on Hopper, in CUDA-graph capture);
        ``False``: never.
    fuse_merge : with more than one split, the last split of each ``(request, kv head)`` to finish
        merges the partials (an atomic counter per pair) instead of a second kernel: one launch
        fewer. ``None``: when ``merge_counters`` is given (else :func:`default_fuse_merge`: no).
    merge_counters : int32, at least ``num_requests * num_kv_heads`` zeros, contiguous, on q's
        device: the fused merge's counters, left at zero by every call; for a CUDA graph, made
        outside its capture (and outside ``torch.compile``'s CUDA-graph warm-up) and kept as long as
        the graph. With ``fuse_merge=True`` and none given, :func:`default_merge_counters` (one
        buffer per stream; refused in a capture). Two calls must not use one buffer at the same
        time (calls on one stream never do; two graphs given one buffer and replayed on two streams
        at once would).
    evict_first : read K and V with the L2's evict-first policy (``ld.global.L2::cache_hint``):
        each cache line is read once, so the lines a decode brings in are the first replaced, and
        what else the L2 holds (dirty lines of the step's other kernels included) stays. Only loads
        outside a software pipeline (``num_stages=1``) carry it: Triton 3.6 drops it from pipelined
        copies and tensor descriptors. ``None``: :func:`default_decode_evict_first`.

    Returns
    -------
    out : shape ``[num_requests, num_heads, head_dim]``, q's dtype.

    Trusts the shapes, dtypes and strides (checked by ``torch_vkv.attention``);
    a request with out-of-range metadata values reads no key and gets zeros.
    """
    R, H, D = q.shape
    H_kv = k_cache.shape[2]
    group = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    max_len = (block_table.shape[1] * page_size) if paged else k_cache.shape[1]
    span = max_len if window_left is None else min(max_len, window_left + 1)  # keys a call may read
    if num_splits is None:
        num_splits = default_num_splits(R, H_kv, span, q.device, paged=paged)
    if tma is None:
        tma = default_decode_tma(q, k_cache, v_cache, block_table, num_splits, span)
    if block_n is None:
        block_n = default_decode_block_n(R, H_kv, D, num_splits, q.device, tma, span, q.element_size(), paged)
    if num_stages is None:
        num_stages = default_decode_stages(R, H_kv, D, num_splits, q.device, tma, q.element_size(), paged, span)
    if evict_first is None:
        evict_first = default_decode_evict_first(num_splits, num_stages, span, bool(tma), paged)
    if out is None:
        out = torch.empty_like(q)
    if R == 0:
        return out
    block_g = max(16, next_pow2(group))
    direct = num_splits == 1
    if direct:
        mid_o, mid_lse = out, out  # mid_lse unused
        stride_os = 0
    else:
        mid_o = torch.empty((R, H, num_splits, D), device=q.device, dtype=torch.float32)
        mid_lse = torch.empty((R, H, num_splits), device=q.device, dtype=torch.float32)
        stride_os = mid_o.stride(2)
    if fuse_merge is None:
        fuse_merge = merge_counters is not None or default_fuse_merge(num_splits, paged)
    fused = not direct and bool(fuse_merge)
    if fused:
        if merge_counters is None:
            if capturing(q):
                raise ValueError(
                    "decode_attention: expected merge_counters with fuse_merge=True in a CUDA-graph capture "
                    "(int32 zeros made outside it, at least num_requests * num_kv_heads), got none"
                )
            merge_counters = default_merge_counters(q.device, R * H_kv)
        elif merge_counters.dtype != torch.int32 or merge_counters.numel() < R * H_kv or \
                not merge_counters.is_contiguous() or merge_counters.device != q.device:  # fmt: skip
            raise ValueError(
                f"decode_attention: expected merge_counters to be contiguous int32 zeros on {q.device} with at "
                f"least num_requests * num_kv_heads = {R * H_kv} elements, got {merge_counters.dtype} of "
                f"{merge_counters.numel()} on {merge_counters.device}"
            )
    group_p2 = next_pow2(group)
    bt = block_table if paged else cache_seqlens
    k_desc, v_desc = tile_descriptors("decode_attention", k_cache, v_cache, block_table, block_n, tma)
    _decode_split_kernel[(R, H_kv, num_splits)](
        q, k_cache, v_cache, k_desc, v_desc, cache_seqlens, slots if slots is not None else cache_seqlens, bt,
        mid_o, mid_lse, merge_counters if fused else cache_seqlens, out, out.stride(0), out.stride(1),
        *bounds(k_cache, block_table), *score_params(scale, softcap or 0.0),
        window_left if window_left is not None else 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0) if paged else 0,
        mid_o.stride(0), mid_o.stride(1), stride_os,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=D, BLOCK_N=block_n, NUM_SPLITS=num_splits, DIRECT=direct,
        WINDOW=window_left is not None, SOFTCAP=bool(softcap), HAS_SLOTS=slots is not None, PAGED=paged, PAGE_SIZE=page_size, DOT_F32=dot_f32(q),
        USE_TMA=bool(tma), FUSE_MERGE=fused, EVICT="evict_first" if evict_first else "", GROUP_P2=group_p2, BLOCK_S=next_pow2(num_splits), CHUNK_S=_merge_chunk(group_p2, D, num_splits),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if not direct and not fused:
        _decode_reduce_kernel[(R, H)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=H, HEAD_DIM=D, NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits),
            num_warps=4,
        )  # fmt: skip
    return out


def decode_reference(
    q, k_cache, v_cache, cache_seqlens, *, slots=None, block_table=None, scale=None, window_left=None, softcap=None
):
    """Plain-PyTorch float64 reference of :func:`decode_attention` (host syncs; tests only)."""
    cu = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return attention_reference(
        q, k_cache, v_cache, cache_seqlens, cu, slots=slots, block_table=block_table, causal=True, scale=scale,
        window_left=window_left, softcap=softcap,
    )  # fmt: skip


def compile_decode_for_sm90(num_stages: int = 3, evict_first: bool = False, head_dim: int = 128,
                            block_n: int = 64) -> dict:  # fmt: skip
    """:func:`decode_attention`'s split kernel (one split, bf16, GQA group 4, pointer loads) compiled
    for sm90 with the installed Triton, no GPU needed, summarised from its PTX: ``{"l2_hinted_loads":
    loads carrying an L2 cache policy, "async_copies": pipelined copies (cp.async)}``. A check that
    ``evict_first`` reaches the loads where :func:`~.decode_launch.default_decode_evict_first` uses
    it (without a pipeline), and that Triton still drops it from pipelined copies."""
    from triton.backends.compiler import GPUTarget

    fn = _decode_split_kernel
    signature = {name: "i32" for name in fn.arg_names}  # lengths, bounds, strides
    signature.update({n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "k_desc", "v_desc", "o_ptr", "out_ptr")})
    signature.update({n: "*i32" for n in ("seqlens_ptr", "slots_ptr", "bt_ptr", "count_ptr")})
    signature.update(lse_ptr="*fp32", qk_mul="fp32", cap_out="fp32")
    constants = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=head_dim, BLOCK_N=block_n, NUM_SPLITS=1, DIRECT=True, WINDOW=False,
                     SOFTCAP=False, HAS_SLOTS=False, PAGED=False, PAGE_SIZE=1, DOT_F32=False, USE_TMA=False,
                     FUSE_MERGE=False, GROUP_P2=4, BLOCK_S=1, CHUNK_S=1, EVICT="evict_first" if evict_first else "")  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    # 16-byte aligned pointers and strides, as a launch on real tensors specialises them (vector loads)
    aligned = [i for i, n in enumerate(fn.arg_names) if n.endswith(("_ptr", "_desc")) or n.startswith("stride_")]
    source = triton.compiler.ASTSource(
        fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )  # fmt: skip
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "num_stages": num_stages}).asm["ptx"]  # fmt: skip
    return dict(l2_hinted_loads=ptx.count("L2::cache_hint"), async_copies=ptx.count("cp.async.cg"))
