"""Prefill attention for Hopper in Gluon: the softmax of one key tile runs while the tensor cores
multiply the previous tile's probabilities by its values.

Same contract as :func:`triton_kernels.prefill.prefill_attention` (varlen queries packed
``[total_q, num_heads, head_dim]``, causal bottom-right aligned, contiguous cache rows, GQA), for
the case it is built for: an sm90 GPU, bf16/fp16, head_dim 64 or 128, no window, no softcap, no
block table, a cache :func:`triton_kernels.prefill.tma_problem` accepts.
:func:`triton_kernels.prefill.prefill_attention` sends calls here by itself where measured faster.

Why Gluon: in Triton's language the loop ``S = Q K^T; softmax; O += P V`` waits for ``Q K^T``
with ``P V`` of the tile before, so the exponentials never overlap a matrix product (the
twenty-first session read it in the SASS: docs/benchmarks.md). Gluon issues the asynchronous
warpgroup MMAs (``wgmma``) and their waits explicitly, so each iteration does, as FlashAttention-3's
"intra-warpgroup overlap"::

    issue S_j = Q K_j^T          (async)
    issue O  += P_{j-1} V_{j-1}  (async)
    wait until S_j is done       (P V still running)
    softmax of S_j -> P_j, alpha_j
    wait until P V is done; O *= alpha_j

Keys come through a ring of ``STAGES`` TMA buffers per K and V (one mbarrier each); a K buffer is
refilled once the product that read it is done, a V buffer one iteration later. The key tiles
visible to every query of the block are read this way, without masks; the diagonal band and a
ragged end (at most ``ceil(BLOCK_M / BLOCK_N) + 1`` tiles) are read with masked loads into the first
ring buffer, so no row past a request's length is touched (it may be an uncommitted page).
Program ``(m_block, head, request)``, heaviest causal blocks first, as the Triton kernel.
"""

from __future__ import annotations

try:  # Gluon is Triton's lower-level dialect (triton >= 3.4); without it this kernel is not offered.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # The CTA-wide barrier: ``thread_barrier`` in Triton 3.6 (the GPU image's), ``barrier`` later.
    _cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    # The TMA load: ``async_copy_global_to_shared`` in 3.6, ``async_load`` later.
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    GLUON_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the installed Triton
    GLUON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

import torch

if GLUON_IMPORT_ERROR is None:

    @gluon.jit(do_not_specialize=["total_q"])
    def _prefill_hopper_kernel(
        q_ptr,  # [total_q, num_heads, HEAD_DIM]
        k_desc,  # TMA descriptors of k/v_cache [B, S_max, H_kv, D], blocks [1, BLOCK_N, 1, D]
        v_desc,
        k_ptr,  # the caches again, for the masked tiles
        v_ptr,
        o_ptr,  # [total_q, num_heads, HEAD_DIM]
        seqlens_ptr,  # int32 [num_requests]
        cu_q_ptr,  # int32 [num_requests + 1]
        slots_ptr,  # [num_requests] (unused unless HAS_SLOTS)
        total_q,
        num_slots,
        max_len,
        qk_mul,  # softmax scale * log2(e)
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        TILE_LAYOUT: gl.constexpr,  # NVMMASharedLayout of a [BLOCK_M or BLOCK_N, HEAD_DIM] tile
        GROUP: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        HAS_SLOTS: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        dtype: gl.constexpr = k_desc.dtype
        # One wgmma accumulator layout for the scores and the output (warps stacked along the rows,
        # 16 rows a warp); the probabilities feed the second product from registers.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        # Global loads and stores: 16-byte vectors along head_dim.
        cols_t: gl.constexpr = HEAD_DIM // 8
        io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // cols_t, cols_t], [num_warps, 1], [1, 0])
        row_io: gl.constexpr = gl.SliceLayout(1, io_layout)
        col_io: gl.constexpr = gl.SliceLayout(0, io_layout)

        if CAUSAL:  # heaviest query blocks first: the launch ends with the light ones
            pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
        else:
            pid_m = gl.program_id(0)
        head = gl.program_id(1)
        r = gl.program_id(2)
        q_start = gl.load(cu_q_ptr + r)
        q_len = gl.load(cu_q_ptr + r + 1) - q_start
        if pid_m * BLOCK_M >= q_len:
            return
        seqlen = gl.load(seqlens_ptr + r)
        if HAS_SLOTS:
            slot = gl.load(slots_ptr + r)
        else:
            slot = r
        # Bad metadata (slot out of range, length outside [q_len, max_len]): no key is read, rows get 0.
        ok = (slot >= 0) & (slot < num_slots) & (seqlen >= q_len) & (seqlen <= max_len)
        if not ok:
            seqlen = 0
            slot = 0
        kv_head = head // GROUP

        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_io)
        offs_d = gl.arange(0, HEAD_DIM, layout=col_io)
        q_rows = (q_start + offs_m).to(gl.int64)
        m_ok = (offs_m < q_len) & (q_rows >= 0) & (q_rows < total_q)  # cu_seqlens_q may be inconsistent
        q = gl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], TILE_LAYOUT)
        q_smem.store(q.to(dtype))

        first_pos = seqlen - q_len + pid_m * BLOCK_M  # position of this block's first query
        if CAUSAL:
            # Keys <= first_pos are visible to every row; the band up to the last row's position is masked.
            hi_full = gl.maximum(gl.minimum(first_pos + 1, seqlen), 0) // BLOCK_N * BLOCK_N
            hi = gl.maximum(gl.minimum(first_pos + BLOCK_M, seqlen), 0)
        else:
            hi_full = seqlen // BLOCK_N * BLOCK_N
            hi = seqlen
        n_full = hi_full // BLOCK_N

        k_ring = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_ring = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
        fence_async_shared()  # Q's tile and the barriers, before the async proxy uses them
        _cta_barrier()
        tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8
        for i in gl.static_range(STAGES):
            _load_tile(k_desc, k_ring, k_bars, i, i, slot, kv_head, n_full, tile_bytes, BLOCK_N)
            _load_tile(v_desc, v_ring, v_bars, i, i, slot, kv_head, n_full, tile_bytes, BLOCK_N)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

        if n_full > 0:
            # Tile 0: scores and softmax alone (nothing to overlap with yet).
            mbarrier.wait(k_bars.index(0), 0)
            s_tok = warpgroup_mma(q_smem, _tile(k_ring, 0, BLOCK_N, HEAD_DIM).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)  # fmt: skip
            scores = warpgroup_mma_wait(0, deps=(s_tok,))
            m_i = gl.max(scores, axis=1)
            p = gl.exp2(scores * qk_mul - (m_i * qk_mul)[:, None])
            l_i = gl.sum(p, axis=1)
            p_prev = gl.convert_layout(p.to(dtype), p_layout)
            alpha = gl.full([BLOCK_M], 1.0, gl.float32, layout=row_o)
            for j in range(1, n_full):
                stage = j % STAGES
                prev = (j - 1) % STAGES
                mbarrier.wait(k_bars.index(stage), (j // STAGES) & 1)
                s_tok = warpgroup_mma(q_smem, _tile(k_ring, stage, BLOCK_N, HEAD_DIM).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)  # fmt: skip
                o = o * alpha[:, None]  # tile j-1's rescale, while the scores are computed
                mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
                o_tok = warpgroup_mma(p_prev, _tile(v_ring, prev, BLOCK_N, HEAD_DIM), o, is_async=True)
                # Refill the buffers every warpgroup is done with: K of tile j-1, V of tile j-2. Here,
                # not after the products' wait: ptxas hoists a barrier there, and the wait with it,
                # above the softmax.
                _cta_barrier()
                _load_tile(k_desc, k_ring, k_bars, prev, j - 1 + STAGES, slot, kv_head, n_full, tile_bytes, BLOCK_N)
                # (tile STAGES - 1, at j == 1, was loaded before the loop; a predicate, not a branch:
                # a branch here splits the loop body and ptxas then waits for P V before the softmax)
                _load_tile(v_desc, v_ring, v_bars, (j + STAGES - 2) % STAGES, gl.where(j >= 2, j - 2 + STAGES, n_full),
                           slot, kv_head, n_full, tile_bytes, BLOCK_N)  # fmt: skip
                # wgmma groups retire in order: one left in flight is P V, so the scores are ready.
                scores = warpgroup_mma_wait(1, deps=(s_tok,))
                m_new = gl.maximum(m_i, gl.max(scores, axis=1))
                alpha = gl.convert_layout(gl.exp2((m_i - m_new) * qk_mul), row_o)
                p = gl.exp2(scores * qk_mul - (m_new * qk_mul)[:, None])
                l_i = l_i * gl.convert_layout(alpha, row_s) + gl.sum(p, axis=1)
                m_i = m_new
                o = warpgroup_mma_wait(0, deps=(o_tok,))
                # The 16-bit probabilities only now: their registers are the running product's operand
                # (writing them earlier makes ptxas wait for that product before the softmax).
                p_prev = gl.convert_layout(p.to(dtype), p_layout)
            last = (n_full - 1) % STAGES
            o = o * alpha[:, None]
            mbarrier.wait(v_bars.index(last), ((n_full - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_prev, _tile(v_ring, last, BLOCK_N, HEAD_DIM), o, is_async=True)
            o = warpgroup_mma_wait(0, deps=(o_tok,))
            _cta_barrier()  # the ring's buffer 0 is reused below

        # The band and the ragged end: masked loads into ring buffer 0 (every load issued above
        # was for a tile below n_full, so no copy is in flight any more).
        kb_smem = _tile(k_ring, 0, BLOCK_N, HEAD_DIM)
        vb_smem = _tile(v_ring, 0, BLOCK_N, HEAD_DIM)
        k_base = k_ptr + slot.to(gl.int64) * stride_kb + kv_head * stride_kh
        v_base = v_ptr + slot.to(gl.int64) * stride_vb + kv_head * stride_vh
        q_pos = first_pos + gl.arange(0, BLOCK_M, layout=row_s)
        for start in range(hi_full, hi, BLOCK_N):
            offs_n = start + gl.arange(0, BLOCK_N, layout=row_io)
            n_ok = offs_n < hi
            rows = offs_n.to(gl.int64)[:, None]
            k = gl.load(k_base + rows * stride_ks + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = gl.load(v_base + rows * stride_vs + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            kb_smem.store(k)
            vb_smem.store(v)
            fence_async_shared()
            _cta_barrier()
            s_tok = warpgroup_mma(q_smem, kb_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            scores = warpgroup_mma_wait(0, deps=(s_tok,))
            key_pos = start + gl.arange(0, BLOCK_N, layout=col_s)
            visible = key_pos[None, :] < hi
            if CAUSAL:
                visible = visible & (key_pos[None, :] <= q_pos[:, None])
            scores = gl.where(visible, scores, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(scores, axis=1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet
            alpha = gl.exp2((m_i - m_use) * qk_mul)
            p = gl.exp2(scores * qk_mul - (m_use * qk_mul)[:, None])
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            o = o * gl.convert_layout(alpha, row_o)[:, None]
            o_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), vb_smem, o, is_async=True)
            o = warpgroup_mma_wait(0, deps=(o_tok,))
            _cta_barrier()  # both warpgroups are done with the tiles before the next store

        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))
        # A query that sees no key (only with bad lengths) gets 0, not NaN.
        l_o = gl.convert_layout(l_i, row_o)
        out = o / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
        out = gl.convert_layout(out.to(o_ptr.dtype.element_ty), io_layout)
        gl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out, mask=m_ok[:, None])

    @gluon.jit
    def _tile(ring, index, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Ring buffer ``index`` ([1, BLOCK_N, 1, HEAD_DIM], the descriptor's block) as a 2-D tile."""
        return ring.index(index).reshape([BLOCK_N, HEAD_DIM])

    @gluon.jit
    def _load_tile(desc, ring, bars, index, tile, slot, kv_head, n_full, tile_bytes: gl.constexpr,
                   BLOCK_N: gl.constexpr):  # fmt: skip
        """Start the copy of key tile ``tile`` into ring buffer ``index``, if it is a full tile."""
        wanted = tile < n_full
        mbarrier.expect(bars.index(index), tile_bytes, pred=wanted)
        _tma_load(desc, [slot, tile * BLOCK_N, kv_head, 0], bars.index(index), ring.index(index),
                                        pred=wanted)  # fmt: skip


#: Launch of :func:`prefill_hopper`: 128 queries a program (two warpgroups of 64 rows), 128-key tiles,
#: ring buffers per K and V: three for the warp-specialised kernel (Q 32 KiB + 6 x 32 KiB of shared
#: memory at head_dim 128; 1.03-1.05x two on the H100, docs/benchmarks.md), two for the one in step.
BLOCK_M, BLOCK_N, NUM_WARPS, STAGES, WS_STAGES = 128, 128, 8, 2, 3


def hopper_problem(q: torch.Tensor, k_cache: torch.Tensor, block_table, window_left, softcap) -> str | None:
    """Why :func:`prefill_hopper` cannot take this call, or None."""
    if GLUON_IMPORT_ERROR is not None:
        return f"Triton's Gluon dialect ({GLUON_IMPORT_ERROR})"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "an sm90 (Hopper) GPU"
    if q.dtype not in (torch.bfloat16, torch.float16) or k_cache.dtype != q.dtype:
        return f"bf16 or fp16 queries and cache of one dtype, got {q.dtype} and {k_cache.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"head_dim 64 or 128, got {q.shape[-1]}"
    if block_table is not None or window_left is not None or softcap:
        return "no block_table, window_left or softcap"
    return None


def prefill_hopper(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    *,
    slots: torch.Tensor | None,
    causal: bool,
    scale: float,
    out: torch.Tensor,
    stages: int | None = None,
    warp_specialized: bool = True,
    pingpong: bool = False,
) -> torch.Tensor:
    """The Gluon kernel over ``q`` and a cache; the caller checked :func:`hopper_problem` and
    ``prefill.tma_problem``. Shapes as :func:`triton_kernels.prefill.prefill_attention`.

    ``warp_specialized``: ``prefill_hopper_ws.py``'s kernel (a loader warpgroup and two consumer
    warpgroups of 64 rows); ``False``: this module's (two warpgroups in step, each overlapping its
    softmax with its own ``P V`` as far as ptxas lets it). ``pingpong`` (warp-specialised only): the
    two consumers take turns at the tensor cores, FlashAttention-3's schedule."""
    T, H, D = q.shape
    R = cache_seqlens.shape[0]
    if stages is None:
        stages = WS_STAGES if warp_specialized else STAGES
    element = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    block = [1, BLOCK_N, 1, D]
    desc_layout = gl.NVMMASharedLayout.get_default_for(block, element)
    k_desc, v_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), block, desc_layout) for t in (k_cache, v_cache))
    grid = (-(-max(1, min(int(max_seqlen_q), T)) // BLOCK_M), H, R)
    extra = {}
    if warp_specialized:
        from .prefill_hopper_ws import _prefill_hopper_ws_kernel as kernel

        extra["PINGPONG"] = bool(pingpong)
    else:
        kernel = _prefill_hopper_kernel
    kernel[grid](
        q, k_desc, v_desc, k_cache, v_cache, out, cache_seqlens, cu_seqlens_q,
        slots if slots is not None else cache_seqlens,
        T, k_cache.shape[0], k_cache.shape[1], scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        TILE_LAYOUT=gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], element),
        GROUP=H // k_cache.shape[2], HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages,
        CAUSAL=bool(causal), HAS_SLOTS=slots is not None,
        num_warps=4 if warp_specialized else NUM_WARPS, **extra,
    )  # fmt: skip
    return out


def compile_for_sm90(head_dim: int = 128, stages: int | None = None, causal: bool = True,
                     warp_specialized: bool = True) -> dict:  # fmt: skip
    """Compile the kernel for sm90 with the installed Triton, no GPU needed (bf16, GQA group 4):
    ``{"wgmma": MMA instructions in the PTX, "spilled_bytes": local memory a thread (from the cubin,
    ``None`` without Triton's ``cuobjdump``), "shared_bytes": shared memory a program}``. A check that
    the kernel builds for the device's architecture, and what ``ptxas`` made of it."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if warp_specialized:
        from .prefill_hopper_ws import _prefill_hopper_ws_kernel as fn
    else:
        fn = _prefill_hopper_kernel
    num_warps = 4 if warp_specialized else NUM_WARPS
    stages = (WS_STAGES if warp_specialized else STAGES) if stages is None else stages
    block = [1, BLOCK_N, 1, head_dim]
    signature = {name: "i32" for name in fn.arg_names}  # lengths, bounds, strides
    signature.update({name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")})
    signature.update({name: "*i32" for name in ("seqlens_ptr", "cu_q_ptr", "slots_ptr")})
    signature["qk_mul"] = "fp32"
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    signature.update(k_desc=f"tensordesc<bf16[{','.join(map(str, block))}],{layout!r}>")
    signature["v_desc"] = signature["k_desc"]
    constants = dict(
        TILE_LAYOUT=gl.NVMMASharedLayout.get_default_for([BLOCK_N, head_dim], gl.bfloat16), GROUP=4, HEAD_DIM=head_dim,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages, CAUSAL=causal, HAS_SLOTS=False, num_warps=num_warps,
    )  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    source = GluonASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})  # fmt: skip
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    spilled = None
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=False).stdout
        found = re.search(r"LOCAL:(\d+)", usage)
        spilled = int(found.group(1)) if found else None
    return dict(wgmma=kernel.asm["ptx"].count("wgmma.mma_async"), spilled_bytes=spilled,
                shared_bytes=kernel.metadata.shared)  # fmt: skip
