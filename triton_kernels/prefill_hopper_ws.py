"""Warp-specialised variant of the Gluon prefill (FlashAttention-3's layout of work): one loader warp
streams key tiles through a TMA ring, two consumer warpgroups of 64 query rows each take every tile.

The two consumers run independently (each waits for a tile, multiplies, does its softmax and
releases the tile), so the tensor cores work for one while the other computes exponentials: the
overlap a single warpgroup cannot get (ptxas moves the wait for ``P V`` above the softmax: see
``prefill_hopper.py``). Same contract and limits as ``prefill_hopper.py``.
"""

from __future__ import annotations

from .prefill_hopper import GLUON_IMPORT_ERROR

if GLUON_IMPORT_ERROR is None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from .prefill_hopper import _cta_barrier, _tma_load

    @gluon.jit
    def _consumer(
        half, q_ptr, k_ptr, v_ptr, o_ptr, k_ring, v_ring, ready, empty, turn, q_start, q_len, total_q, head, slot, kv_head,
        seqlen, first_pos, hi_full, n_full, qk_mul,
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
        if PINGPONG:
            o, l_i, m_i = _full_tiles_pingpong(
                half, q_smem, k_ring, v_ring, ready, empty, turn, n_full, qk_mul, o, l_i, m_i, s_zero,
                p_layout, row_o, HEAD_DIM, BLOCK_N, STAGES,
            )  # fmt: skip
        else:
            for t in range(n_full):
                stage = t % STAGES
                mbarrier.wait(ready.index(stage), (t // STAGES) & 1)
                k_t = k_ring.index(stage).reshape([BLOCK_N, HEAD_DIM])
                v_t = v_ring.index(stage).reshape([BLOCK_N, HEAD_DIM])
                s_tok = warpgroup_mma(q_smem, k_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                scores = warpgroup_mma_wait(0, deps=(s_tok,))
                m_new = gl.maximum(m_i, gl.max(scores, axis=1))
                alpha = gl.exp2((m_i - m_new) * qk_mul)
                p = gl.exp2(scores * qk_mul - (m_new * qk_mul)[:, None])
                l_i = l_i * alpha + gl.sum(p, axis=1)
                m_i = m_new
                o = o * gl.convert_layout(alpha, row_o)[:, None]
                o_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_t, o, is_async=True)
                o = warpgroup_mma_wait(0, deps=(o_tok,))
                mbarrier.arrive(empty.index(stage), count=1)

        # The band and the ragged end: masked loads into ring buffer `half`, once both consumers have
        # released its last full tile (the loader loads nothing after the full tiles).
        if CAUSAL:
            hi = gl.maximum(gl.minimum(first_pos + (half + 1) * ROWS, seqlen), 0)
        else:
            hi = seqlen
        uses = (n_full - half + STAGES - 1) // STAGES  # full tiles that went through buffer `half`
        mbarrier.wait(empty.index(half), (uses - 1) & 1, pred=uses > 0)
        kb_smem = k_ring.index(half).reshape([BLOCK_N, HEAD_DIM])
        vb_smem = v_ring.index(half).reshape([BLOCK_N, HEAD_DIM])
        k_base = k_ptr + slot.to(gl.int64) * stride_kb + kv_head * stride_kh
        v_base = v_ptr + slot.to(gl.int64) * stride_vb + kv_head * stride_vh
        q_pos = first_pos + half * ROWS + gl.arange(0, ROWS, layout=row_s)
        for start in range(hi_full, hi, BLOCK_N):
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

        l_o = gl.convert_layout(l_i, row_o)
        out = o / gl.where(l_o == 0.0, 1.0, l_o)[:, None]  # a row that sees no key (bad lengths): 0
        out = gl.convert_layout(out.to(o_ptr.dtype.element_ty), io_layout)
        gl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out, mask=m_ok[:, None])

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
    def _loader(k_desc, v_desc, k_ring, v_ring, ready, empty, slot, kv_head, n_full, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr):  # fmt: skip
        """The default partition (one warpgroup, registers given to the consumers; one thread issues
        the copies): full key tiles into the ring, a buffer reused once both consumers released it."""
        tile_bytes: gl.constexpr = 2 * k_desc.block_type.nbytes
        for t in range(n_full):
            stage = t % STAGES
            mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1, pred=t >= STAGES)
            mbarrier.expect(ready.index(stage), tile_bytes)
            _tma_load(k_desc, [slot, t * BLOCK_N, kv_head, 0], ready.index(stage), k_ring.index(stage))
            _tma_load(v_desc, [slot, t * BLOCK_N, kv_head, 0], ready.index(stage), v_ring.index(stage))

    @gluon.jit(do_not_specialize=["total_q"])
    def _prefill_hopper_ws_kernel(
        q_ptr, k_desc, v_desc, k_ptr, v_ptr, o_ptr, seqlens_ptr, cu_q_ptr, slots_ptr, total_q, num_slots, max_len,
        qk_mul, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_ot,
        stride_oh,
        TILE_LAYOUT: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_SLOTS: gl.constexpr,
        num_warps: gl.constexpr, PINGPONG: gl.constexpr = False,
    ):  # fmt: skip
        if CAUSAL:  # heaviest query blocks first
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
        ok = (slot >= 0) & (slot < num_slots) & (seqlen >= q_len) & (seqlen <= max_len)
        if not ok:  # bad metadata: no key is read, rows get 0
            seqlen = 0
            slot = 0
        kv_head = head // GROUP
        first_pos = seqlen - q_len + pid_m * BLOCK_M
        if CAUSAL:
            hi_full = gl.maximum(gl.minimum(first_pos + 1, seqlen), 0) // BLOCK_N * BLOCK_N
        else:
            hi_full = seqlen // BLOCK_N * BLOCK_N
        n_full = hi_full // BLOCK_N

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
                (_loader, (k_desc, v_desc, k_ring, v_ring, ready, empty, slot, kv_head, n_full, BLOCK_N, STAGES)),
                (_consumer, (0, q_ptr, k_ptr, v_ptr, o_ptr, k_ring, v_ring, ready, empty, turn, q_start, q_len, total_q, head, slot,
                  kv_head, seqlen, first_pos, hi_full, n_full, qk_mul, stride_qt, stride_qh, stride_ks, stride_kb,
                  stride_kh, stride_vs, stride_vb, stride_vh, stride_ot, stride_oh, TILE_LAYOUT, HEAD_DIM, ROWS,
                  BLOCK_N, STAGES, CAUSAL, PINGPONG)),
                (_consumer, (1, q_ptr, k_ptr, v_ptr, o_ptr, k_ring, v_ring, ready, empty, turn, q_start, q_len, total_q, head, slot,
                  kv_head, seqlen, first_pos, hi_full, n_full, qk_mul, stride_qt, stride_qh, stride_ks, stride_kb,
                  stride_kh, stride_vs, stride_vb, stride_vh, stride_ot, stride_oh, TILE_LAYOUT, HEAD_DIM, ROWS,
                  BLOCK_N, STAGES, CAUSAL, PINGPONG)),
            ],
            [4, 4],
            [240, 240],
        )
