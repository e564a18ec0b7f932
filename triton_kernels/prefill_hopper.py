"""Prefill attention for Hopper in Gluon, warp-specialised as FlashAttention-3: one warpgroup
streams key tiles through a TMA ring, two consumer warpgroups of 64 query rows each take every tile.

Same contract as :func:`triton_kernels.prefill.prefill_attention` (varlen queries packed
``[total_q, num_heads, head_dim]``, causal bottom-right aligned, contiguous cache rows, GQA), for
the case it is built for: an sm90 GPU, bf16/fp16, head_dim 64 or 128, no window, no softcap, no
block table, a cache :func:`triton_kernels.prefill.tma_problem` accepts (:func:`hopper_problem`).
:func:`triton_kernels.prefill.prefill_attention` runs it by itself where it measured faster
(``default_kernel``), else with ``kernel="gluon"``.

Why Gluon, and why two consumers: in Triton's language each tile's ``Q K^T`` is waited for before its
softmax, so the exponentials never run while the tensor cores work (docs/benchmarks.md, twenty-first
session). Gluon issues the asynchronous warpgroup MMAs (``wgmma``), their waits, the mbarriers and
the copies by hand. A single warpgroup overlapping its own softmax with its own ``P V`` (issue both
products, wait for the first, softmax, wait for the second) compiles to the right PTX, but ptxas
moves the second wait up next to the first, so that kernel (commit f13a9f5) ran at 0.91x the Triton
one. Two consumers that never wait for each other overlap instead: while one computes
exponentials, the other's products keep the tensor cores busy (1.04-1.07x the Triton kernel on the
H100, twenty-sixth session; 1.10-1.12x once the diagonal band came through the ring, twenty-seventh).

Per program ``(m_block, head, request)`` (heaviest causal blocks first; with GQA the query heads of
a KV head interleaved, :func:`triton_kernels.prefill.block_order`):

* the loader (the default partition, its registers given to the consumers) copies the key tiles
  that lie wholly below the request's length (committed rows: the diagonal band's tiles included,
  all but a tile crossing the length) into a ring of ``STAGES`` K and V buffers: one ``ready``
  mbarrier a buffer (the copies' bytes), one ``empty`` mbarrier (an arrive from each consumer once it
  is done with the tile);
* each consumer loads its 64 query rows, then per tile: ``S = Q K^T``, the online softmax (the
  causal mask only on the band's tiles), ``O += P V`` (P from registers), release. ``PINGPONG``
  instead has the consumers take turns at the tensor cores over the full tiles (a consumer issues
  ``P V`` of the tile before and ``Q K^T`` of this one together when the other hands it the turn):
  FlashAttention-3's schedule, no faster here;
* a ragged end (a tile crossing the length: rows up to each consumer's last query position) is read
  by each consumer with masked loads into the ring buffer of its own index, once both released it,
  so no row past a request's length is touched (it may be an uncommitted page).
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

import functools

import torch

from .prefill import _check_requests, _is_hopper, default_group_order

if GLUON_IMPORT_ERROR is None:

    @gluon.jit
    def _consumer(
        half, q_ptr, k_ptr, v_ptr, o_ptr, k_ring, v_ring, ready, empty, turn, q_start, q_len, total_q, head, slot, kv_head,
        seqlen, first_pos, n_full, n_ring, qk_mul,
        stride_qt, stride_qh, stride_ks, stride_kb, stride_kh, stride_vs, stride_vb, stride_vh, stride_ot, stride_oh,
        TILE_LAYOUT: gl.constexpr, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
    ):  # fmt: skip
        """Rows ``half * ROWS ..`` of the query block, on one warpgroup."""
        dtype: gl.constexpr = k_ring.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        cols_t: gl.constexpr = HEAD_DIM // 8
        io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // cols_t, cols_t], [4, 1], [1, 0])
        row_io: gl.constexpr = gl.SliceLayout(1, io_layout)
        col_io: gl.constexpr = gl.SliceLayout(0, io_layout)

        offs_m = first_pos - (seqlen - q_len) + half * ROWS + gl.arange(0, ROWS, layout=row_io)  # rows of the request
        offs_d = gl.arange(0, HEAD_DIM, layout=col_io)
        q_rows = (q_start + offs_m).to(gl.int64)
        m_ok = (offs_m < q_len) & (q_rows >= 0) & (q_rows < total_q)
        q = gl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        q_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], TILE_LAYOUT)
        q_smem.store(q.to(dtype))
        fence_async_shared()
        _cta_barrier()

        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
        o = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        q_pos = first_pos + half * ROWS + gl.arange(0, ROWS, layout=row_s)
        if PINGPONG:
            o, l_i, m_i = _full_tiles_pingpong(
                half, q_smem, k_ring, v_ring, ready, empty, turn, n_full, qk_mul, o, l_i, m_i, s_zero,
                p_layout, row_o, HEAD_DIM, BLOCK_N, STAGES,
            )  # fmt: skip
        else:
            for t in range(n_full):
                o, l_i, m_i = _ring_tile(q_smem, k_ring, v_ring, ready, empty, t, t * BLOCK_N, seqlen, qk_mul, q_pos, o,
                                         l_i, m_i, s_zero, p_layout, row_o, HEAD_DIM, BLOCK_N, STAGES, False, False)  # fmt: skip
        if CAUSAL:  # the diagonal band's tiles below the length, loaded by the loader: causal mask
            for t in range(n_full, n_ring):
                o, l_i, m_i = _ring_tile(q_smem, k_ring, v_ring, ready, empty, t, t * BLOCK_N, seqlen, qk_mul, q_pos, o,
                                         l_i, m_i, s_zero, p_layout, row_o, HEAD_DIM, BLOCK_N, STAGES, True, False)  # fmt: skip

        # The ragged end (a tile that crosses the length): masked loads into ring buffer `half`, once
        # both consumers have released its last tile (the loader loads nothing after the ring's tiles).
        if CAUSAL:
            hi = gl.maximum(gl.minimum(first_pos + (half + 1) * ROWS, seqlen), 0)
        else:
            hi = seqlen
        uses = (n_ring - half + STAGES - 1) // STAGES  # tiles that went through buffer `half`
        mbarrier.wait(empty.index(half), (uses - 1) & 1, pred=uses > 0)
        kb_smem = k_ring.index(half).reshape([BLOCK_N, HEAD_DIM])
        vb_smem = v_ring.index(half).reshape([BLOCK_N, HEAD_DIM])
        k_base = k_ptr + slot.to(gl.int64) * stride_kb + kv_head * stride_kh
        v_base = v_ptr + slot.to(gl.int64) * stride_vb + kv_head * stride_vh
        for start in range(n_ring * BLOCK_N, hi, BLOCK_N):
            offs_n = start + gl.arange(0, BLOCK_N, layout=row_io)
            n_ok = offs_n < hi
            rows = offs_n.to(gl.int64)[:, None]
            _cta_barrier()  # this warpgroup's products of the tile before are done (they waited)
            # K, then V: one tile's registers at a time (both at once spill)
            kb_smem.store(gl.load(k_base + rows * stride_ks + offs_d[None, :], mask=n_ok[:, None], other=0.0))
            vb_smem.store(gl.load(v_base + rows * stride_vs + offs_d[None, :], mask=n_ok[:, None], other=0.0))
            fence_async_shared()
            _cta_barrier()
            s_tok = warpgroup_mma(q_smem, kb_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            scores = warpgroup_mma_wait(0, deps=(s_tok,))
            key_pos = start + gl.arange(0, BLOCK_N, layout=col_s)
            visible = key_pos[None, :] < hi
            if CAUSAL:
                visible = visible & (key_pos[None, :] <= q_pos[:, None])
            p, m_i, l_i, o = _online_softmax(gl.where(visible, scores, float("-inf")), m_i, l_i, o, qk_mul, row_o, True)
            o_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), vb_smem, o, is_async=True)
            o = warpgroup_mma_wait(0, deps=(o_tok,))

        l_o = gl.convert_layout(l_i, row_o)
        out = o / gl.where(l_o == 0.0, 1.0, l_o)[:, None]  # a row that sees no key (bad lengths): 0
        out = gl.convert_layout(out.to(o_ptr.dtype.element_ty), io_layout)
        gl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out, mask=m_ok[:, None])

    @gluon.jit
    def _online_softmax(scores, m_i, l_i, o, qk_mul, row_o: gl.constexpr, MASKED: gl.constexpr):
        """One tile's step of the online softmax: ``(p, m_i, l_i, o)`` with ``o`` rescaled to the
        new row maxima. ``MASKED``: a row may have seen no key yet (-inf scores only)."""
        m_new = gl.maximum(m_i, gl.max(scores, axis=1))
        if MASKED:
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = gl.exp2((m_i - m_use) * qk_mul)
        p = gl.exp2(scores * qk_mul - (m_use * qk_mul)[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        o = o * gl.convert_layout(alpha, row_o)[:, None]
        return p, m_new, l_i, o

    @gluon.jit
    def _ring_tile(q_smem, k_ring, v_ring, ready, empty, ring_idx, key_start, key_end, qk_mul, q_pos, o, l_i, m_i,
                   s_zero, p_layout: gl.constexpr, row_o: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL_MASK: gl.constexpr, END_MASK: gl.constexpr):  # fmt: skip
        """The ring's tile ``ring_idx`` (keys from ``key_start``): wait for its copies, ``S = Q K^T``,
        the softmax (keys past a query's position hidden with ``CAUSAL_MASK``, keys from ``key_end``
        on with ``END_MASK``), ``O += P V``, release the buffer."""
        stage = ring_idx % STAGES
        mbarrier.wait(ready.index(stage), (ring_idx // STAGES) & 1)
        k_t = k_ring.index(stage).reshape([BLOCK_N, HEAD_DIM])
        v_t = v_ring.index(stage).reshape([BLOCK_N, HEAD_DIM])
        s_tok = warpgroup_mma(q_smem, k_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        scores = warpgroup_mma_wait(0, deps=(s_tok,))
        key_pos = key_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_zero.type.layout))
        if CAUSAL_MASK:
            scores = gl.where(key_pos[None, :] <= q_pos[:, None], scores, float("-inf"))
        if END_MASK:
            scores = gl.where(key_pos[None, :] < key_end, scores, float("-inf"))
        p, m_i, l_i, o = _online_softmax(scores, m_i, l_i, o, qk_mul, row_o, CAUSAL_MASK or END_MASK)
        o_tok = warpgroup_mma(gl.convert_layout(p.to(k_ring.dtype), p_layout), v_t, o, is_async=True)
        o = warpgroup_mma_wait(0, deps=(o_tok,))
        mbarrier.arrive(empty.index(stage), count=1)
        return o, l_i, m_i

    @gluon.jit
    def _full_tiles_pingpong(half, q_smem, k_ring, v_ring, ready, empty, turn, n_full, qk_mul, o, l_i, m_i, s_zero,
                             p_layout: gl.constexpr, row_o: gl.constexpr, HEAD_DIM: gl.constexpr,
                             BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """The full tiles, the two consumers taking turns at the tensor cores (FlashAttention-3's
        ping-pong): each issues ``P_{t-1} V_{t-1}`` and ``Q K_t^T`` together when its turn comes, hands
        the turn over, and runs its softmax of tile t while the other's products run."""
        other = 1 - half
        alpha = gl.full(m_i.shape, 1.0, gl.float32, layout=row_o)
        if n_full > 0:
            mbarrier.wait(ready.index(0), 0)
            mbarrier.wait(turn.index(half), 0)
            s_tok = warpgroup_mma(q_smem, k_ring.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)  # fmt: skip
            mbarrier.arrive(turn.index(other), count=1)
            scores = warpgroup_mma_wait(0, deps=(s_tok,))
            m_i = gl.max(scores, axis=1)
            p = gl.exp2(scores * qk_mul - (m_i * qk_mul)[:, None])
            l_i = gl.sum(p, axis=1)
            p_prev = gl.convert_layout(p.to(k_ring.dtype), p_layout)
            for t in range(1, n_full):
                stage = t % STAGES
                prev = (t - 1) % STAGES
                mbarrier.wait(ready.index(stage), (t // STAGES) & 1)
                mbarrier.wait(turn.index(half), t & 1)
                o = o * alpha[:, None]
                o_tok = warpgroup_mma(p_prev, v_ring.index(prev).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
                s_tok = warpgroup_mma(q_smem, k_ring.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                                      s_zero, use_acc=False, is_async=True)  # fmt: skip
                mbarrier.arrive(turn.index(other), count=1)
                o, scores = warpgroup_mma_wait(0, deps=(o_tok, s_tok))
                mbarrier.arrive(empty.index(prev), count=1)  # tile t-1 is done with
                m_new = gl.maximum(m_i, gl.max(scores, axis=1))
                alpha = gl.convert_layout(gl.exp2((m_i - m_new) * qk_mul), row_o)
                p = gl.exp2(scores * qk_mul - (m_new * qk_mul)[:, None])
                l_i = l_i * gl.convert_layout(alpha, m_i.type.layout) + gl.sum(p, axis=1)
                m_i = m_new
                p_prev = gl.convert_layout(p.to(k_ring.dtype), p_layout)
            last = (n_full - 1) % STAGES
            mbarrier.wait(turn.index(half), n_full & 1)
            o = o * alpha[:, None]
            o_tok = warpgroup_mma(p_prev, v_ring.index(last).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
            mbarrier.arrive(turn.index(other), count=1)
            o = warpgroup_mma_wait(0, deps=(o_tok,))
            mbarrier.arrive(empty.index(last), count=1)
        return o, l_i, m_i

    @gluon.jit
    def _block_keys(r, q_len, q_block, seqlens_ptr, slots_ptr, num_slots, max_len, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, HAS_SLOTS: gl.constexpr):  # fmt: skip
        """Request ``r``'s cache row and the key tiles of its query block from ``q_block``:
        ``(seqlen, slot, first_pos, n_full, n_tma, n_tiles)``. Bad metadata (a slot out of range, a
        length below the query count or past the cache) reads no key: rows get 0. Tiles
        ``[0, n_tma)`` lie wholly below the length (committed rows: TMA copies), the first ``n_full``
        of them visible to every query of the block (no mask); ``n_tiles`` reach the block's last
        visible key (at most one more than ``n_tma``). Mirrored in plain Python by ``tile_plan``."""
        seqlen = gl.load(seqlens_ptr + r)
        if HAS_SLOTS:
            slot = gl.load(slots_ptr + r)
        else:
            slot = r
        ok = (slot >= 0) & (slot < num_slots) & (seqlen >= q_len) & (seqlen <= max_len)
        if not ok:  # bad metadata: no key is read, rows get 0
            seqlen = 0
            slot = 0
        first_pos = seqlen - q_len + q_block
        if CAUSAL:
            n_full = gl.maximum(gl.minimum(first_pos + 1, seqlen), 0) // BLOCK_N
            n_tiles = (gl.maximum(gl.minimum(first_pos + BLOCK_M, seqlen), 0) + BLOCK_N - 1) // BLOCK_N
            n_tma = gl.minimum(n_tiles, seqlen // BLOCK_N)
        else:
            n_full = seqlen // BLOCK_N
            n_tiles = (seqlen + BLOCK_N - 1) // BLOCK_N
            n_tma = n_full
        return seqlen, slot, first_pos, n_full, n_tma, n_tiles

    @gluon.jit
    def _tma_tile(k_desc, v_desc, k_ring, v_ring, ready, empty, ring_idx, t, slot, kv_head, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):  # fmt: skip
        """Key tile ``t`` (wholly below the length) into ring buffer ``ring_idx % STAGES`` once both
        consumers released it: two TMA copies."""
        stage = ring_idx % STAGES
        mbarrier.wait(empty.index(stage), ((ring_idx // STAGES) & 1) ^ 1, pred=ring_idx >= STAGES)
        mbarrier.expect(ready.index(stage), 2 * k_desc.block_type.nbytes)
        _tma_load(k_desc, [slot, t * BLOCK_N, kv_head, 0], ready.index(stage), k_ring.index(stage))
        _tma_load(v_desc, [slot, t * BLOCK_N, kv_head, 0], ready.index(stage), v_ring.index(stage))

    @gluon.jit
    def _loader(k_desc, v_desc, k_ring, v_ring, ready, empty, slot, kv_head, n_ring, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr):  # fmt: skip
        """The default partition (one warpgroup, registers given to the consumers; one thread issues
        the copies): key tiles below the length into the ring, a buffer reused once both consumers
        released it."""
        for t in range(n_ring):
            _tma_tile(k_desc, v_desc, k_ring, v_ring, ready, empty, t, t, slot, kv_head, BLOCK_N, STAGES)

    @gluon.jit(do_not_specialize=["total_q"])
    def _prefill_hopper_kernel(
        q_ptr, k_desc, v_desc, k_ptr, v_ptr, o_ptr, seqlens_ptr, cu_q_ptr, slots_ptr, total_q, num_slots, max_len,
        qk_mul, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_ot,
        stride_oh,
        TILE_LAYOUT: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_SLOTS: gl.constexpr,
        num_warps: gl.constexpr, PINGPONG: gl.constexpr = False, GROUP_ORDER: gl.constexpr = False,
    ):  # fmt: skip
        """Program ``(m_block, head, request)``: its metadata, the ring and its barriers, then the
        loader (this program's own warps) and the two consumers (the workers' warps). ``GROUP_ORDER``:
        grid ``(m_blocks * GROUP, num_kv_heads, requests)``, the query blocks of a KV head's ``GROUP``
        heads interleaved, heaviest first over them (``block_order``)."""
        if GROUP_ORDER:
            index = gl.program_id(0)
            head = gl.program_id(1) * GROUP + index % GROUP
            if CAUSAL:
                pid_m = gl.num_programs(0) // GROUP - 1 - index // GROUP
            else:
                pid_m = index // GROUP
        else:
            if CAUSAL:  # heaviest query blocks first
                pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
            else:
                pid_m = gl.program_id(0)
            head = gl.program_id(1)
        r = gl.program_id(2)
        q_start = gl.load(cu_q_ptr + r)
        q_len = gl.load(cu_q_ptr + r + 1) - q_start
        # Before the early exit: the request's length and slot are loaded with its query range, one
        # round trip to memory at each block's start instead of two.
        seqlen, slot, first_pos, n_full, n_ring, _ = _block_keys(r, q_len, pid_m * BLOCK_M, seqlens_ptr, slots_ptr,
                                                                 num_slots, max_len, BLOCK_M, BLOCK_N, CAUSAL, HAS_SLOTS)  # fmt: skip
        if pid_m * BLOCK_M >= q_len:
            return
        kv_head = head // GROUP

        dtype: gl.constexpr = k_desc.dtype
        k_ring = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_ring = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrive from each consumer
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # PINGPONG's turns
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.arrive(turn.index(0), count=1)  # consumer 0 starts
        fence_async_shared()
        ROWS: gl.constexpr = BLOCK_M // 2
        gl.warp_specialize(
            [
                (_loader, (k_desc, v_desc, k_ring, v_ring, ready, empty, slot, kv_head, n_ring, BLOCK_N, STAGES)),
                (_consumer, (0, q_ptr, k_ptr, v_ptr, o_ptr, k_ring, v_ring, ready, empty, turn, q_start, q_len, total_q, head, slot,
                  kv_head, seqlen, first_pos, n_full, n_ring, qk_mul, stride_qt, stride_qh, stride_ks, stride_kb,
                  stride_kh, stride_vs, stride_vb, stride_vh, stride_ot, stride_oh, TILE_LAYOUT, HEAD_DIM, ROWS,
                  BLOCK_N, STAGES, CAUSAL, PINGPONG)),
                (_consumer, (1, q_ptr, k_ptr, v_ptr, o_ptr, k_ring, v_ring, ready, empty, turn, q_start, q_len, total_q, head, slot,
                  kv_head, seqlen, first_pos, n_full, n_ring, qk_mul, stride_qt, stride_qh, stride_ks, stride_kb,
                  stride_kh, stride_vs, stride_vb, stride_vh, stride_ot, stride_oh, TILE_LAYOUT, HEAD_DIM, ROWS,
                  BLOCK_N, STAGES, CAUSAL, PINGPONG)),
            ],
            [4, 4],  # warps of each consumer
            [240, 240],  # registers a consumer thread may use (setmaxnreg; the loader keeps what is left)
        )


#: Launch of :func:`prefill_hopper`: 128 queries a program (two consumer warpgroups of 64 rows and the
#: loader's warpgroup), 128-key tiles, three ring buffers per K and V (Q 32 KiB + 6 x 32 KiB of shared
#: memory at head_dim 128; 1.02-1.05x two on the H100: docs/benchmarks.md).
BLOCK_M, BLOCK_N, NUM_WARPS, STAGES = 128, 128, 4, 3


@functools.lru_cache(maxsize=None)
def shared_layout(block: tuple, dtype: torch.dtype):
    """Gluon's default NVMMA shared layout of a ``block`` tile of ``dtype`` (bf16 or fp16), built once:
    ``get_default_for`` took 9-12 us of host time a call on the H100 machines' hosts (thirtieth
    session), and a launch needs two, beside 95-125 us for the whole eager call."""
    element = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for(list(block), element)


@functools.lru_cache(maxsize=None)
def _triton_version() -> tuple[int, ...]:
    import triton

    return tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2] if part.isdigit())


def tile_plan(seqlen: int, q_len: int, m_block: int, causal: bool) -> dict:
    """The key tiles of program ``m_block`` of a request, as the kernel's prologue computes them
    (plain Python, for tests on any machine): ``n_full`` tiles visible to every query of the block
    (no mask), ``n_ring`` tiles through the TMA ring (all below ``seqlen``: committed rows), per
    consumer ``hi``: the end of the keys it reads, the rows ``[n_ring * BLOCK_N, hi)`` by masked loads;
    ``n_tiles``: the persistent kernel's tiles (``prefill_hopper_persistent.py``: tiles ``[n_ring,
    n_tiles)``, at most one, read by its loader with masked loads below ``seqlen``, zeros past it)."""
    first_pos = seqlen - q_len + m_block * BLOCK_M
    rows = BLOCK_M // 2
    if causal:
        n_full = max(min(first_pos + 1, seqlen), 0) // BLOCK_N
        hi_block = max(min(first_pos + BLOCK_M, seqlen), 0)
        n_ring = min(-(-hi_block // BLOCK_N), seqlen // BLOCK_N)
        hi = [max(min(first_pos + (half + 1) * rows, seqlen), 0) for half in (0, 1)]
        n_tiles = -(-hi_block // BLOCK_N)
    else:
        n_full = n_ring = seqlen // BLOCK_N
        hi = [seqlen, seqlen]
        n_tiles = -(-seqlen // BLOCK_N)
    return dict(first_pos=first_pos, n_full=n_full, n_ring=n_ring, hi=hi, n_tiles=n_tiles)


def hopper_problem(q: torch.Tensor, k_cache: torch.Tensor, block_table, window_left, softcap) -> str | None:
    """Why :func:`prefill_hopper` cannot take this call, or None."""
    if GLUON_IMPORT_ERROR is not None:
        return f"Triton's Gluon dialect ({GLUON_IMPORT_ERROR})"
    if _triton_version() < (3, 6):  # Gluon's API moves between releases: run on 3.6, compiled with 3.9
        return f"Triton >= 3.6 for its Gluon API, got {__import__('triton').__version__}"
    if not q.is_cuda or not _is_hopper(q.device.index or 0):
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
    stages: int = STAGES,
    pingpong: bool = False,
    persistent: bool = False,
    group_order: bool | None = None,
) -> torch.Tensor:
    """The kernel over ``q`` and a cache; the caller checked :func:`hopper_problem` and
    ``prefill.tma_problem``. Shapes as :func:`triton_kernels.prefill.prefill_attention`.
    ``stages``: ring buffers per K and V (2 or 3 fit the shared memory at head_dim 128);
    ``pingpong``: the consumers take turns at the tensor cores (see the module docstring);
    ``persistent``: one program per SM over all blocks (``prefill_hopper_persistent.py``; its
    queries are copied by TMA: ``ValueError`` where they cannot be); ``group_order``: the launch
    order of :func:`~.prefill.block_order` (``None``: where causal, with a GQA group of two or more heads)."""
    if stages not in (2, 3):  # each consumer's band needs a buffer of its own; four do not fit
        raise ValueError(f"prefill_hopper: stages: expected 2 or 3, got {stages!r}")
    if persistent:
        from . import prefill_hopper_persistent as pp

        if pingpong or group_order:
            raise ValueError("prefill_hopper: persistent=True has its own order and no ping-pong schedule; "
                             f"expected pingpong=False and group_order=None or False, got {pingpong!r} and "
                             f"{group_order!r}")  # fmt: skip
        problem = pp.tma_queries_problem(q, cache_seqlens.shape[0], max_seqlen_q)
        if problem is not None:
            raise ValueError(f"prefill_hopper(persistent=True): expected {problem}")
        return pp.prefill_hopper_persistent(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q,
                                            slots=slots, causal=causal, scale=scale, out=out, stages=stages)  # fmt: skip
    T, H, D = q.shape
    R = cache_seqlens.shape[0]
    block = [1, BLOCK_N, 1, D]
    desc_layout = shared_layout(tuple(block), q.dtype)
    k_desc, v_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), block, desc_layout) for t in (k_cache, v_cache))
    _check_requests("prefill_hopper", R)
    m_blocks = -(-max(1, min(int(max_seqlen_q), T)) // BLOCK_M)
    group = H // k_cache.shape[2]
    if group_order is None:
        group_order = default_group_order(causal, group)
    grid = (m_blocks * group, H // group, R) if group_order else (m_blocks, H, R)
    _prefill_hopper_kernel[grid](
        q, k_desc, v_desc, k_cache, v_cache, out, cache_seqlens, cu_seqlens_q,
        slots if slots is not None else cache_seqlens,
        T, k_cache.shape[0], k_cache.shape[1], scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        TILE_LAYOUT=shared_layout((BLOCK_N, D), q.dtype),
        GROUP=group, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages,
        CAUSAL=bool(causal), HAS_SLOTS=slots is not None,
        PINGPONG=bool(pingpong), GROUP_ORDER=bool(group_order), num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def compile_kernel_for_sm90(head_dim: int = 128, stages: int = STAGES, causal: bool = True, pingpong: bool = False,
                            persistent: bool = False, group_order: bool | None = None):  # fmt: skip
    """The kernel (``persistent``: ``prefill_hopper_persistent.py``'s) compiled for sm90 with the
    installed Triton, no GPU needed (bf16, GQA group 4): Triton's compiled kernel (``.asm["ptx"]``,
    ``.asm["cubin"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if persistent:
        from .prefill_hopper_persistent import _prefill_persistent_kernel as fn
    else:
        fn = _prefill_hopper_kernel
    signature = {name: "i32" for name in fn.arg_names}  # lengths, bounds, strides
    signature.update({name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr") if name in fn.arg_names})
    signature.update({name: "*i32" for name in ("seqlens_ptr", "cu_q_ptr", "slots_ptr", "counter_ptr") if name in fn.arg_names})
    signature["qk_mul"] = "fp32"
    blocks = dict(k_desc=[1, BLOCK_N, 1, head_dim], v_desc=[1, BLOCK_N, 1, head_dim], q_desc=[BLOCK_M // 2, 1, head_dim])
    for name, block in blocks.items():
        if name in fn.arg_names:
            layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
            signature[name] = f"tensordesc<bf16[{','.join(map(str, block))}],{layout!r}>"
    constants = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages, CAUSAL=causal,
                     HAS_SLOTS=False, num_warps=NUM_WARPS)  # fmt: skip
    if persistent:
        constants.update(ORDER=0, DYNAMIC=False)
    else:
        constants.update(TILE_LAYOUT=gl.NVMMASharedLayout.get_default_for([BLOCK_N, head_dim], gl.bfloat16),
                         PINGPONG=pingpong,
                         GROUP_ORDER=default_group_order(causal, 4) if group_order is None else group_order)  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    source = GluonASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})


def compile_for_sm90(head_dim: int = 128, stages: int = STAGES, causal: bool = True, pingpong: bool = False,
                     persistent: bool = False, group_order: bool | None = None) -> dict:  # fmt: skip
    """:func:`compile_kernel_for_sm90` summarised: ``{"wgmma": MMA instructions in the PTX,
    "stack_bytes": a thread's stack frame, where ptxas spills (from the cubin, ``None`` without
    Triton's ``cuobjdump``), "shared_bytes": shared memory a program}``. A check that the kernel builds for the device's
    architecture, and what ``ptxas`` made of it (``scripts/diag_sass.py --gluon`` shows its loops)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    kernel = compile_kernel_for_sm90(head_dim, stages, causal, pingpong, persistent, group_order)
    stack = None
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=False).stdout
        found = re.search(r"STACK:(\d+)", usage)
        stack = int(found.group(1)) if found else None
    return dict(wgmma=kernel.asm["ptx"].count("wgmma.mma_async"), stack_bytes=stack,
                shared_bytes=kernel.metadata.shared)  # fmt: skip
