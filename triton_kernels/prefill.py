"""Varlen prefill attention over the cache: causal, bottom-right aligned.

Queries are packed ``[total_q, num_heads, head_dim]``; request ``r`` owns rows
``cu_seqlens_q[r]:cu_seqlens_q[r+1]`` and its keys are the first
``cache_seqlens[r]`` rows of its cache row (its own new tokens included: they
were appended first). The queries sit at the *last* positions, so query ``i``
of a request with ``n`` queries and ``L`` keys is at position ``L - n + i`` and
sees keys ``0 .. L - n + i`` (bottom-right aligned causal mask)::

    keys   0 1 2 3 4 5 6        L = 7, n = 3
    q0     x x x x x . .        position 4
    q1     x x x x x x .        position 5
    q2     x x x x x x x        position 6

This covers plain prefill (``n == L``), chunked prefill (``n < L``) and decode
(``n == 1``) with one kernel, so a mixed batch is one launch.

Program ``(m_block, head, r)`` handles ``BLOCK_M`` queries of one head of one
request. Keys visible to every row of the block are read without masks; only
the diagonal band (and the ragged end) is masked. The launch grid depends on
``max_seqlen_q`` (a host int, an upper bound is fine) and never on lengths
held on the device, so the launch is CUDA-graph safe.

The launcher trusts its inputs' shapes, dtypes and strides (the public entry
``torch_vkv.attention.attention`` checks them once), not the metadata values:
a request whose slot or length is out of range (``_common.py``) reads no key
and gets zero rows, and query rows outside ``[0, total_q)`` (inconsistent
``cu_seqlens_q``) are neither read nor written.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import _attn_span, _request, bounds, dot_f32, on_tensor_device, score_params


# total_q varies with every batch: not specialised (see append._append_kv_kernel).
@triton.jit(do_not_specialize=["total_q"])
def _prefill_kernel(
    q_ptr,  # [total_q, num_heads, HEAD_DIM]
    k_ptr,  # cache [B, S_max, H_kv, D] or pool [num_blocks, PAGE_SIZE, H_kv, D]
    v_ptr,
    k_desc,  # USE_TMA: tensor descriptors of k/v_cache (else k_ptr/v_ptr again, unused)
    v_desc,
    o_ptr,  # [total_q, num_heads, HEAD_DIM]
    seqlens_ptr,  # int32 [num_requests]
    cu_q_ptr,  # int32 [num_requests + 1]
    slots_ptr,  # [num_requests] (unused unless HAS_SLOTS)
    bt_ptr,  # int32 [num_slots, max_blocks] (unused unless PAGED)
    total_q,
    num_slots, max_len, num_blocks,  # bounds of the metadata (_common.bounds)
    qk_mul, cap_out,  # score scaling (_common.score_params)
    window,  # WINDOW: a query at p sees keys [p - window, p]
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,  # k_cache: batch (or block), row, head
    stride_vb, stride_vs, stride_vh,  # v_cache
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    GROUP_ORDER: tl.constexpr = False,
):
    # Heaviest query blocks first (a causal block's work grows with its position): the last
    # programs to start are the light ones, so the launch ends with a short tail. GROUP_ORDER: the
    # GROUP query heads of a KV head (the same keys) take turns at each level (block_order). (Heaviest
    # first over all heads, the query block as the grid's slowest dimension, ran at 0.95x at 32K and
    # 0.91x at 128K on the H100: docs/benchmarks.md, twenty-seventh session.)
    if GROUP_ORDER:
        index = tl.program_id(0)
        head = tl.program_id(1) * GROUP + index % GROUP
        if CAUSAL:
            pid_m = tl.num_programs(0) // GROUP - 1 - index // GROUP
        else:
            pid_m = index // GROUP
    else:
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        else:
            pid_m = tl.program_id(0)
        head = tl.program_id(1)
    r = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + r)
    q_len = tl.load(cu_q_ptr + r + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    slot, seqlen, ok = _request(seqlens_ptr, slots_ptr, r, q_len, num_slots, max_len, HAS_SLOTS)
    # Bad metadata (slot out of range, length outside [q_len, max_len]): no key is read, rows get 0.
    seqlen = tl.where(ok, seqlen, 0)
    kv_head = head // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + offs_m).to(tl.int64)
    m_ok = (offs_m < q_len) & (q_rows >= 0) & (q_rows < total_q)  # cu_seqlens_q may be inconsistent
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    first_pos = seqlen - q_len + pid_m * BLOCK_M  # position of this block's first query
    q_pos = first_pos + tl.arange(0, BLOCK_M)

    if CAUSAL:
        # keys <= first_pos are visible to every row; the rest up to the last row's position is the band.
        hi_full = tl.maximum(tl.minimum(first_pos + 1, seqlen), 0) // BLOCK_N * BLOCK_N
        hi = tl.maximum(tl.minimum(first_pos + BLOCK_M, seqlen), 0)
    else:
        hi_full = seqlen // BLOCK_N * BLOCK_N
        hi = seqlen
    if WINDOW:
        # Whole tiles behind the first row's window are skipped; keys below key_lo are never read.
        # Tiles from lo_full on are inside every row's window (up to hi_full: unmasked).
        key_lo = tl.maximum(first_pos - window, 0)
        lo = key_lo // BLOCK_N * BLOCK_N
        lo_full = tl.cdiv(tl.maximum(first_pos + BLOCK_M - 1 - window, 0), BLOCK_N) * BLOCK_N
        lo_full = tl.minimum(tl.maximum(lo_full, lo), tl.maximum(hi_full, lo))
    else:
        key_lo = 0
        lo = 0
        lo_full = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_span(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, k_desc, v_desc, bt_ptr, stride_bt, slot, kv_head,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        lo, lo_full, hi_full, hi, key_lo, window, num_blocks, qk_mul, cap_out,
        CAUSAL=CAUSAL, WINDOW=WINDOW, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE, DOT_F32=DOT_F32,
        USE_TMA=USE_TMA, EVICT="",  # no hint: every query block of a head reads its keys again (from the L2)
    )  # fmt: skip
    # A query that sees no key (only with bad lengths) gets 0, not NaN.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


def default_launch(head_dim: int, element_size: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) that :func:`prefill_attention` picks by itself.

    Shared memory holds a Q tile and num_stages K and V tiles: fp32 or head_dim
    256 rows (512 bytes) need smaller tiles and fewer stages to fit the 227 KiB
    of an H100/H200 (fp32 x 128 at 128 rows x 3 stages needs 256 KiB). 16-bit
    head_dim 128 takes 128-key tiles: 1.07x the 64-key ones on the H200, and 1.22x
    with tensor descriptors (:func:`default_tma`) (``bench kernels``' prefill_tune, 8K context,
    docs/benchmarks.md). The CPU interpreter takes small tiles.
    """
    wide_rows = element_size * head_dim > 256
    block_m = (64 if wide_rows else 128) if on_gpu else 32
    num_warps = 8 if (head_dim >= 128 and block_m >= 128) else 4
    block_n = 128 if (on_gpu and element_size == 2 and head_dim == 128) else 64 if head_dim <= 128 else 32
    return block_m, block_n, num_warps, 2 if wide_rows else 3


@functools.lru_cache(maxsize=None)
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


#: An eager call of :func:`prefill_attention` reads through tensor descriptors by default when its query
#: rows times its longest key count reach ``EAGER_TMA_MIN_ROWS ** 2`` (a prompt of this many rows; without
#: known key counts, its query rows alone); a call being captured into a CUDA graph takes them at any size.
#: Triton 3.6 encodes the descriptors on the host at every launch: on the H200 (Llama-3-8B heads, bf16,
#: 2026-12-04) an eager prefill of 256 rows took 112.8-126.6 us per call with them against 39.7-45.7
#: without (the host's time), of 2048 rows 112.6-117.6 against 117.0-118.6 (the kernel's).
EAGER_TMA_MIN_ROWS = 2048

#: Whether :func:`default_kernel` picks the Gluon kernel (``prefill_hopper.py``) where it can run:
#: on the H100 (bf16, Llama-3-8B heads, causal, 2026-12-06) 574.8 / 634.1 / 638.3 TFLOP/s at 8K / 32K /
#: 128K against 521.4 / 578.7 / 571.0 for the Triton kernel (docs/benchmarks.md, twenty-seventh session).
GLUON_PREFILL_DEFAULT = True

#: Whether the Gluon kernel runs as a persistent kernel (``prefill_hopper_persistent.py``) where
#: ``persistent_problem`` allows it. Off: on the H100 (2026-12-06) it read 100-113 TFLOP/s at 8K and 32K
#: against 573-649 for the one-program-a-block kernel (docs/benchmarks.md, twenty-eighth session).
GLUON_PERSISTENT_DEFAULT = False


def _tma_capable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None) -> bool:
    """Where descriptors were measured faster in the kernel (Hopper, 16-bit, head_dim 128) and
    :func:`tma_problem` has no objection."""
    return (
        q.is_cuda and q.element_size() == 2 and q.shape[-1] == 128 and _is_hopper(q.device.index or 0)
        and tma_problem(k_cache, v_cache, block_table) is None
    )  # fmt: skip


def capturing(t: torch.Tensor) -> bool:
    """Whether work queued now for ``t``'s device goes into a CUDA graph being captured (the host's
    cost of a launch is then paid once, not at every replay)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def default_tma(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
                max_keys: int | None = None) -> bool:  # fmt: skip
    """Whether :func:`prefill_attention` reads full key tiles through tensor descriptors by itself:
    where the kernel was measured faster (Hopper, 16-bit, head_dim 128: 530 against 465 TFLOP/s at
    8K on the H200) and :func:`tma_problem` has no objection; under CUDA-graph capture at any size,
    eagerly only for a call large enough to hide the descriptors' host cost: ``total_q * max_keys >=
    EAGER_TMA_MIN_ROWS ** 2``. ``max_keys``: the longest request's key count when the caller knows
    it on the host (a chunk of 512 queries over 16K keys qualifies); ``None``: ``total_q``, as for a
    whole prompt."""
    if not _tma_capable(q, k_cache, v_cache, block_table):
        return False
    rows = q.shape[0]
    return capturing(q) or rows * (rows if max_keys is None else max_keys) >= EAGER_TMA_MIN_ROWS**2


def default_group_order(causal: bool, group: int) -> bool:
    """Whether :func:`prefill_attention` (both kernels) launches in :func:`block_order`'s grouped
    order by itself: causal calls with GQA groups of two or more query heads.

    The query blocks of a causal prompt carry unequal work (block ``m`` reads ``m + 1`` key tiles);
    launched heaviest first one head after another, the last head's heavy blocks start when
    little else is left, and at 8K about 5% of the SMs' time went to that tail (the H100's stamps
    and a list-scheduling model agree: SMs finishing between 854 and 935 us). Interleaving a KV
    head's query heads (which read the same keys, so L2 reuse is kept) heaviest first over them ends
    the launch with light blocks. On the H100 (bf16, Llama-3-8B heads, batch 1, seven interleaved
    rounds, 2026-12-06): 545.4 against 512.3-514.5 TFLOP/s at 4K, 585.1 against 566.7-572.5 at 8K,
    617.1 against 606.5-610.2 at 16K, 625.2 against 621.5-624.8 at 32K (docs/benchmarks.md,
    thirty-second session; the Gluon kernel). The Triton kernel, same GPU and run of seven rounds: 489.0
    against 455.5 at 4K, 528.0 against 517.7 at 8K, 570.3 against 576.4 at 32K (1.07x / 1.02x /
    0.99x). Non-causal blocks are equal: not measured, not changed."""
    return bool(causal) and group > 1


def block_order(index: int, kv_head: int, num_m_blocks: int, group: int, causal: bool) -> tuple[int, int]:
    """The ``(m_block, head)`` of program ``(index, kv_head)`` with ``group_order`` (plain Python,
    as both kernels' prologues): grid ``(num_m_blocks * group, num_kv_heads, requests)``, the
    ``group`` query heads of a KV head taking turns at each level, heaviest (causal) blocks first."""
    head = kv_head * group + index % group
    level = index // group
    return (num_m_blocks - 1 - level if causal else level), head


@on_tensor_device
def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    *,
    slots: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    window_left: int | None = None,
    softcap: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tma: bool | None = None,
    kernel: str | None = None,
    group_order: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen attention of packed queries over their cached keys (causal, bottom-right aligned).

    Parameters
    ----------
    q : shape ``[total_q, num_heads, head_dim]``.
    k_cache, v_cache : shape ``[B, S_max, num_kv_heads, head_dim]`` (any
        batch/row/head strides, ``stride(-1) == 1``) or, with ``block_table``,
        block pools ``[num_blocks, page_size, num_kv_heads, head_dim]``.
    cache_seqlens : int32, shape ``[num_requests]``, new tokens included.
    cu_seqlens_q : int32, shape ``[num_requests + 1]``.
    max_seqlen_q : host int, an upper bound on any request's query count
        (``total_q`` always works); sizes the launch grid.
    slots : shape ``[num_requests]``, cache row / block-table row per request.
    block_table : int32, shape ``[num_slots, max_blocks]`` (paged twin).
    window_left : sliding window: a query at position ``p`` sees keys
        ``[p - window_left, p]``; whole tiles behind it are skipped and no key
        below the block's first window is read. ``None``: no window.
    softcap : scores become ``softcap * tanh(score / softcap)`` before the softmax.
    block_m, block_n, num_warps, num_stages : launch parameters; default from the
        shapes (``bench kernels``' ``prefill_tune`` section sweeps them).
    tma : read the full key tiles through tensor descriptors (bulk copies on
        Hopper; :func:`tma_problem` says when a cache cannot); the masked tiles
        keep ordinary loads, so no row past a length is touched. ``None``:
        :func:`default_tma` decides (where measured faster, counting the host's cost of the
        descriptors in an eager call); ``False``: never.
    kernel : ``"triton"`` (this module's kernel, any GPU and the CPU interpreter) or ``"gluon"``
        (``prefill_hopper.py``: sm90, 16-bit, head_dim 64/128, no window, softcap or block table;
        ``ValueError`` naming what it needs otherwise). ``None``: :func:`default_kernel`, or
        ``"triton"`` when a launch parameter or ``tma=False`` is given (they apply to it only).
    group_order : launch the query blocks of a KV head's query heads together, heaviest first over
        them (:func:`block_order`), instead of one head after another. ``None``:
        :func:`default_group_order` (causal calls with GQA).

    Returns
    -------
    out : shape ``[total_q, num_heads, head_dim]``, q's dtype.

    Trusts the shapes, dtypes and strides (checked by ``torch_vkv.attention``);
    out-of-range metadata values are masked (see the module docstring).
    """
    T, H, D = q.shape
    H_kv = k_cache.shape[2]
    R = cache_seqlens.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    paged = block_table is not None
    if kernel is None:
        # Launch parameters or tma=False given: the caller means this module's kernel (the Gluon one
        # reads every full tile through descriptors and has its own launch).
        explicit = tma is False or any(x is not None for x in (block_m, block_n, num_warps, num_stages))
        kernel = "triton" if explicit else default_kernel(q, k_cache, v_cache, block_table, window_left, softcap)
    if kernel == "gluon":
        return _prefill_gluon(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, slots=slots,
                              block_table=block_table, causal=causal, scale=scale, window_left=window_left,
                              softcap=softcap, out=out, group_order=group_order)  # fmt: skip
    if kernel != "triton":
        raise ValueError(f"prefill_attention: kernel: expected 'triton', 'gluon' or None, got {kernel!r}")
    default = default_launch(D, q.element_size(), q.is_cuda)
    block_m = default[0] if block_m is None else block_m
    block_n = default[1] if block_n is None else block_n
    if out is None:
        out = torch.empty_like(q)
    max_seqlen_q = max(1, min(int(max_seqlen_q), T))
    if T == 0 or R == 0:
        return out
    if num_warps is None:  # the default's rule, for the block_m actually used
        num_warps = 8 if (D >= 128 and block_m >= 128) else 4
    num_stages = default[3] if num_stages is None else num_stages
    _check_requests("prefill_attention", R)
    group = H // H_kv
    if group_order is None:
        group_order = default_group_order(causal, group)
    m_blocks = triton.cdiv(max_seqlen_q, block_m)
    grid = (m_blocks * group, H_kv, R) if group_order else (m_blocks, H, R)
    bt = block_table if paged else cache_seqlens
    if tma is None:
        tma = default_tma(q, k_cache, v_cache, block_table)
    k_desc, v_desc = tile_descriptors("prefill_attention", k_cache, v_cache, block_table, block_n, bool(tma))
    _prefill_kernel[grid](
        q, k_cache, v_cache, k_desc, v_desc, out, cache_seqlens, cu_seqlens_q, slots if slots is not None else cache_seqlens, bt,
        T, *bounds(k_cache, block_table), *score_params(scale, softcap or 0.0),
        window_left if window_left is not None else 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        bt.stride(0) if paged else 0,
        GROUP=group, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
        WINDOW=window_left is not None, SOFTCAP=bool(softcap), HAS_SLOTS=slots is not None, PAGED=paged, PAGE_SIZE=k_cache.shape[1] if paged else 1, DOT_F32=dot_f32(q),
        USE_TMA=bool(tma), GROUP_ORDER=bool(group_order),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def _check_requests(name: str, num_requests: int) -> None:
    """Requests are the launch grid's third dimension, which takes at most 65535 programs: a clear
    error instead of a failed launch."""
    if num_requests > 65535:
        raise ValueError(f"{name}: at most 65535 requests in one call, got {num_requests}")


def default_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
                   window_left: int | None, softcap: float | None, max_keys: int | None = None) -> str:  # fmt: skip
    """Which kernel :func:`prefill_attention` runs by itself: ``"gluon"`` (``prefill_hopper.py``)
    where it was measured faster (bf16, head_dim 128) and can take the call, and where
    :func:`default_tma` would read through descriptors (its copies are all tensor-descriptor copies,
    encoded on the host at every eager launch); ``"triton"`` otherwise (fp16 and head_dim 64 run it
    with ``kernel="gluon"``)."""
    if not (q.is_cuda and GLUON_PREFILL_DEFAULT and q.dtype == torch.bfloat16):
        return "triton"
    if not default_tma(q, k_cache, v_cache, block_table, max_keys):
        return "triton"
    from . import prefill_hopper

    return "gluon" if prefill_hopper.hopper_problem(q, k_cache, block_table, window_left, softcap) is None else "triton"


def _prefill_gluon(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, *, slots, block_table, causal,
                   scale, window_left, softcap, out, group_order=None):  # fmt: skip
    from . import prefill_hopper

    problem = prefill_hopper.hopper_problem(q, k_cache, block_table, window_left, softcap) or tma_problem(
        k_cache, v_cache, block_table
    )
    if problem is not None:
        raise ValueError(f"prefill_attention(kernel='gluon'): expected {problem}")
    out = torch.empty_like(q) if out is None else out
    if q.shape[0] == 0 or cache_seqlens.shape[0] == 0:
        return out
    persistent = False
    if GLUON_PERSISTENT_DEFAULT and not group_order:
        from .prefill_hopper_persistent import persistent_problem

        persistent = persistent_problem(q, cache_seqlens.shape[0], max_seqlen_q) is None
    return prefill_hopper.prefill_hopper(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, slots=slots,
                                         causal=causal, scale=scale, out=out, persistent=persistent,
                                         group_order=None if persistent else group_order)  # fmt: skip


def tma_problem(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None) -> str | None:
    """Why ``prefill_attention(tma=True)`` cannot take this cache, or None: a contiguous cache
    (no block table) whose base addresses are 16-byte aligned and whose strides, but the last
    (1 element), are multiples of 16 bytes (what a tensor descriptor needs)."""
    if block_table is not None:
        return "a contiguous cache (no block_table)"
    for t in (k_cache, v_cache):
        esz = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * esz % 16 for st in t.stride()[:-1]):
            return f"16-byte aligned base and strides, unit last stride; got strides {t.stride()} x {esz} bytes"
    return None


def tile_descriptors(caller: str, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
                     block_n: int, tma: bool) -> tuple:  # fmt: skip
    """The kernels' ``k_desc, v_desc``: with ``tma``, tensor descriptors of ``[1, block_n, 1, D]``
    key tiles of each cache (``ValueError`` naming ``caller`` where :func:`tma_problem` objects);
    without, the caches themselves as placeholders (not read without ``USE_TMA``)."""
    if not tma:
        return k_cache, v_cache
    problem = tma_problem(k_cache, v_cache, block_table)
    if problem is not None:
        raise ValueError(f"{caller}(tma=True): expected {problem}")
    from triton.tools.tensor_descriptor import TensorDescriptor

    D = k_cache.shape[-1]
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_n, 1, D]) for t in (k_cache, v_cache))


def gather_paged(pool: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Rows ``0 .. num_tokens`` of one block-table row as a contiguous ``[num_tokens, H_kv, D]`` tensor."""
    page = pool.shape[1]
    pos = torch.arange(num_tokens, device=pool.device)
    return pool[block_table[pos // page].long(), pos % page]


def attention_reference(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=None, *, slots=None, block_table=None, causal=True, scale=None,
    window_left=None, softcap=None, dtype=torch.float64,
) -> torch.Tensor:
    """Plain-PyTorch reference (float64 by default, per-request loop, host syncs; tests and checks only).

    Same contract as :func:`prefill_attention`; reads only the valid rows, so
    NaN past ``cache_seqlens`` (or behind ``window_left``) cannot reach the
    result. ``window_left``: a query at ``p`` sees keys ``[p - window_left, p]``;
    ``softcap``: scores ``softcap * tanh(score / softcap)``. A request with
    out-of-range metadata gets zero rows (as in the kernels).
    """
    R = cache_seqlens.shape[0]
    if cu_seqlens_q is None:
        cu_seqlens_q = torch.arange(R + 1, device=q.device, dtype=torch.int32)
    lens = cache_seqlens.tolist()
    cu = cu_seqlens_q.tolist()
    slot_list = slots.tolist() if slots is not None else list(range(R))
    H, D = q.shape[1], q.shape[2]
    H_kv = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    num_slots, max_len, _ = bounds(k_cache, block_table)
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for r in range(R):
        n, L, s = cu[r + 1] - cu[r], lens[r], slot_list[r]
        if n <= 0 or not (0 <= s < num_slots and n <= L <= max_len):
            continue  # no queries, or bad metadata: zero rows, as the kernels give
        if block_table is not None:
            k = gather_paged(k_cache, block_table[s], L)
            v = gather_paged(v_cache, block_table[s], L)
        else:
            k, v = k_cache[s, :L], v_cache[s, :L]
        if window_left is not None:  # keys behind every query's window: not read (they may be NaN)
            k0 = max(0, L - n - window_left)
            k = torch.cat([k.new_zeros((k0,) + k.shape[1:]), k[k0:]])
            v = torch.cat([v.new_zeros((k0,) + v.shape[1:]), v[k0:]])
        qq = q[cu[r] : cu[r + 1]].to(dtype).transpose(0, 1)  # [H, n, D]
        k = k.to(dtype).repeat_interleave(H // H_kv, dim=1).transpose(0, 1)  # [H, L, D]
        v = v.to(dtype).repeat_interleave(H // H_kv, dim=1).transpose(0, 1)
        scores = (qq @ k.transpose(1, 2)) * scale  # [H, n, L]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(L - n, L, device=q.device)[:, None]
        k_pos = torch.arange(L, device=q.device)[None, :]
        if causal:
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        if window_left is not None:
            scores = scores.masked_fill(k_pos < q_pos - window_left, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (bad lengths) -> 0
        out[cu[r] : cu[r + 1]] = (p @ v).transpose(0, 1)
    return out
