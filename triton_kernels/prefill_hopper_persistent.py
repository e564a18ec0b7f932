"""The Hopper prefill as a persistent kernel: one program per SM takes ``(query block, head,
request)`` items in turn, so a block's start (its queries' copy, the first key tile's latency) and
end (its output) overlap the work of the blocks beside it instead of standing alone.

Same contract and the same warpgroups as :mod:`triton_kernels.prefill_hopper` (a loader, two
consumers of 64 query rows); what differs:

* **a ring across items**: the loader never waits for a block to end; its tile counter runs on over
  the program's items, so the next block's first key tile is copied while this one's last tiles
  are computed, and its queries (by TMA, into each consumer's query buffer) as soon as that consumer
  finished its last product of the block, while it normalises and stores the output;
* **every key tile through the ring**: a tile that crosses a request's length (rows past it may be
  uncommitted pages, so no tensor-descriptor copy can take it) is read by the loader with masked
  loads (zeros past the length) into its ring buffer, so the consumers see one kind of tile and mask
  scores only on the diagonal band and that tile;
* **a static order**: items heaviest first (the causal blocks nearest the diagonal's far end), dealt
  to the programs in a snake (``p``, then ``2G - 1 - p``, ...), which gives each program about the
  same number of key tiles when the weights fall linearly, as they do in a causal prefill. Three
  variants for diagnostics (private keywords of :func:`prefill_hopper_persistent`): ``_order=1``
  takes items head by head as the other kernel's grid, ``_order=N`` (N >= 2, dividing the heads)
  takes N heads at a time, heaviest blocks first over them (heads whose keys fit L2 together),
  ``_dynamic=True`` hands each program its next item from an atomic counter (the loader takes it
  and passes it to the consumers through shared memory). :func:`item_coords` mirrors the orders.

Items are every ``(m_block, head, request)`` of the launch grid the non-persistent kernel would
have; a block past a request's queries is skipped, which costs a few loads: :func:`persistent_problem`
keeps calls where most are empty (many short requests beside one long) on the other kernel.

Status: correct (the CUDA tests of ``tests/test_prefill_hopper.py`` run it through the whole matrix)
and, as measured on the H100, 0.92-0.97x the other kernel (docs/benchmarks.md, twenty-ninth
session). Timer stamps per item: at 8K its consumers span the same time as the other kernel's
(items overlap), the loss lies outside them (set-up or exit; not the launch: its wrapper's host time
is within 6-40 us of the other's, thirtieth session); at 32K a key tile costs 4-22% more (level
order: every KV head's keys through L2 at once). ``_order=8`` with the dynamic counter (levels over
two KV heads, whose keys fit L2) recovers most of that at 32K and stays at 0.93-0.94x the other
kernel (thirtieth session). Off by default (``prefill.GLUON_PERSISTENT_DEFAULT``) until it measures
faster.
"""

from __future__ import annotations

import functools

import torch

from .prefill_hopper import BLOCK_M, BLOCK_N, GLUON_IMPORT_ERROR, NUM_WARPS, STAGES, shared_layout

if GLUON_IMPORT_ERROR is None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .prefill_hopper import _block_keys, _cta_barrier, _ring_tile, _tma_load, _tma_tile

    #: One int32 in shared memory, as a tensor of one warpgroup (the item index handed to the consumers).
    _SCALAR_LAYOUT = gl.constexpr(gl.BlockedLayout([1], [32], [4], [0]))

    @gluon.jit
    def _snake(k):
        """The static order's ``k``-th item of this program: ``p``, then ``2G - 1 - p``, ``2G + p``, ..."""
        programs = gl.num_programs(0)
        p = gl.program_id(0)
        return k * programs + p + (k % 2) * (programs - 1 - 2 * p)

    @gluon.jit
    def _item(i, num_items, cu_q_ptr, seqlens_ptr, slots_ptr, num_slots, max_len, num_m_blocks, num_heads,
              num_requests, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
              HAS_SLOTS: gl.constexpr, ORDER: gl.constexpr):  # fmt: skip
        """This program's ``k``-th item and its key tiles, computed alike by the three partitions:
        ``(valid, head, q_start, q_len, q_block, seqlen, slot, first_pos, n_full, n_tma, n_tiles)``.
        ``n_full`` tiles are visible to every query of the block, ``n_tma`` (all below the length)
        are copied by TMA, tiles ``[n_tma, n_tiles)`` (at most one, crossing the length) by masked loads."""
        if ORDER == 0:
            per_level = num_heads * num_requests
            m_block = num_m_blocks - 1 - i // per_level  # heaviest first
            rem = i % per_level
        elif ORDER == 1:  # head-major, as the other kernel's grid: a request's head at a time, its heaviest blocks first
            m_block = num_m_blocks - 1 - i % num_m_blocks
            rem = i // num_m_blocks
        else:  # ORDER heads at a time (their keys fit L2 together), heaviest blocks first over them
            per_group = num_m_blocks * ORDER
            within = i % per_group
            m_block = num_m_blocks - 1 - within // ORDER
            rem = (i // per_group) * ORDER + within % ORDER
        r = rem // num_heads
        head = rem % num_heads
        q_start = gl.load(cu_q_ptr + r)
        q_len = gl.load(cu_q_ptr + r + 1) - q_start
        q_block = m_block * BLOCK_M
        valid = (i < num_items) & (q_block < q_len)
        seqlen, slot, first_pos, n_full, n_tma, n_tiles = _block_keys(r, q_len, q_block, seqlens_ptr, slots_ptr,
                                                                      num_slots, max_len, BLOCK_M, BLOCK_N, CAUSAL,
                                                                      HAS_SLOTS)  # fmt: skip
        return valid, head, q_start, q_len, q_block, seqlen, slot, first_pos, n_full, n_tma, n_tiles

    @gluon.jit
    def _masked_tile(k_ptr, v_ptr, k_ring, v_ring, ready, empty, ring_idx, t, seqlen, slot, kv_head,
                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """Key tile ``t`` (crossing the length) into ring buffer ``ring_idx % STAGES`` by masked
        loads, a few rows at a time (the loader keeps few registers), zeros past the length."""
        stage = ring_idx % STAGES
        mbarrier.wait(empty.index(stage), ((ring_idx // STAGES) & 1) ^ 1, pred=ring_idx >= STAGES)
        cols: gl.constexpr = HEAD_DIM // 8
        CHUNK: gl.constexpr = 4 * (32 // cols)  # rows one pass of the loader's 4 warps covers
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // cols, cols], [4, 1], [1, 0])
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        k_base = k_ptr + slot.to(gl.int64) * stride_kb + kv_head * stride_kh
        v_base = v_ptr + slot.to(gl.int64) * stride_vb + kv_head * stride_vh
        k_tile = k_ring.index(stage).reshape([BLOCK_N, HEAD_DIM])
        v_tile = v_ring.index(stage).reshape([BLOCK_N, HEAD_DIM])
        for c in gl.static_range(BLOCK_N // CHUNK):
            offs_n = t * BLOCK_N + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
            n_ok = (offs_n < seqlen)[:, None]
            rows = offs_n.to(gl.int64)[:, None]
            k_tile.slice(c * CHUNK, CHUNK).store(gl.load(k_base + rows * stride_ks + offs_d[None, :], mask=n_ok, other=0.0))
            v_tile.slice(c * CHUNK, CHUNK).store(gl.load(v_base + rows * stride_vs + offs_d[None, :], mask=n_ok, other=0.0))
        fence_async_shared()  # the stores, before the consumers' products read them
        _cta_barrier()  # every loader thread stored (a barrier of the loader's warps only)
        mbarrier.arrive(ready.index(stage), count=1)

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, k_ptr, v_ptr, q_smem, k_ring, v_ring, q_ready, q_empty, ready, empty,
                idx_smem, idx_ready, idx_empty, counter_ptr, cu_q_ptr, seqlens_ptr, slots_ptr, num_slots, max_len,
                num_m_blocks, num_heads, num_requests,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_SLOTS: gl.constexpr, ORDER: gl.constexpr,
                DYNAMIC: gl.constexpr):  # fmt: skip
        """The default partition: per item, its first key tile, then each consumer's queries (once
        that consumer is done with the item before), then the other key tiles."""
        ROWS: gl.constexpr = BLOCK_M // 2
        num_items = num_m_blocks * num_heads * num_requests
        ring_idx = 0
        n_items = 0
        k = 0
        i = gl.program_id(0)
        while i < num_items:
            valid, head, q_start, q_len, q_block, seqlen, slot, first_pos, n_full, n_tma, n_tiles = _item(
                i, num_items, cu_q_ptr, seqlens_ptr, slots_ptr, num_slots, max_len, num_m_blocks, num_heads,
                num_requests, BLOCK_M, BLOCK_N, CAUSAL, HAS_SLOTS, ORDER)  # fmt: skip
            if valid:
                kv_head = head // GROUP
                if n_tma > 0:  # the first key tile before the queries: it is waited for first
                    _tma_tile(k_desc, v_desc, k_ring, v_ring, ready, empty, ring_idx, 0, slot, kv_head, BLOCK_N, STAGES)
                for half in gl.static_range(2):  # rows past the tensor (the last request's block) read as 0
                    mbarrier.wait(q_empty.index(half), (n_items & 1) ^ 1, pred=n_items > 0)
                    mbarrier.expect(q_ready.index(half), q_desc.block_type.nbytes)
                    _tma_load(q_desc, [q_start + q_block + half * ROWS, head, 0], q_ready.index(half), q_smem.index(half))
                for t in range(1, n_tma):
                    _tma_tile(k_desc, v_desc, k_ring, v_ring, ready, empty, ring_idx + t, t, slot, kv_head, BLOCK_N, STAGES)
                for t in range(n_tma, n_tiles):  # at most one: the tile crossing the length
                    _masked_tile(k_ptr, v_ptr, k_ring, v_ring, ready, empty, ring_idx + t, t, seqlen, slot, kv_head,
                                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                 HEAD_DIM, BLOCK_N, STAGES)  # fmt: skip
                ring_idx += n_tiles
                n_items += 1
            if DYNAMIC:  # the next item from the launch's counter, handed to the consumers (two slots)
                i = gl.num_programs(0) + gl.atomic_add(counter_ptr, 1)
                idx = k % 2
                mbarrier.wait(idx_empty.index(idx), ((k // 2) & 1) ^ 1, pred=k >= 2)
                idx_smem.index(idx).store(gl.full([1], i, gl.int32, layout=_SCALAR_LAYOUT))
                _cta_barrier()
                mbarrier.arrive(idx_ready.index(idx), count=1)
            else:
                i = _snake(k + 1)
            k += 1

    @gluon.jit
    def _consumer(half, q_smem, k_ring, v_ring, q_ready, q_empty, ready, empty, idx_smem, idx_ready, idx_empty, o_ptr,
                  cu_q_ptr, seqlens_ptr, slots_ptr, total_q, num_slots, max_len, num_m_blocks, num_heads, num_requests,
                  qk_mul, stride_ot, stride_oh,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  CAUSAL: gl.constexpr, HAS_SLOTS: gl.constexpr, ORDER: gl.constexpr, DYNAMIC: gl.constexpr):  # fmt: skip
        """Rows ``half * 64 ..`` of each item's query block, on one warpgroup."""
        ROWS: gl.constexpr = BLOCK_M // 2
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        q_tile = q_smem.index(half).reshape([ROWS, HEAD_DIM])
        num_items = num_m_blocks * num_heads * num_requests
        ring_idx = 0
        n_items = 0
        k = 0
        i = gl.program_id(0)
        while i < num_items:
            valid, head, q_start, q_len, q_block, seqlen, slot, first_pos, n_full, n_tma, n_tiles = _item(
                i, num_items, cu_q_ptr, seqlens_ptr, slots_ptr, num_slots, max_len, num_m_blocks, num_heads,
                num_requests, BLOCK_M, BLOCK_N, CAUSAL, HAS_SLOTS, ORDER)  # fmt: skip
            if valid:
                q_pos = first_pos + half * ROWS + gl.arange(0, ROWS, layout=row_s)
                m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
                l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
                o = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
                mbarrier.wait(q_ready.index(half), n_items & 1)
                for t in range(n_full):
                    o, l_i, m_i = _ring_tile(q_tile, k_ring, v_ring, ready, empty, ring_idx + t, t * BLOCK_N, seqlen,
                                             qk_mul, q_pos, o, l_i, m_i, s_zero, p_layout, row_o, HEAD_DIM, BLOCK_N,
                                             STAGES, False, False)  # fmt: skip
                for t in range(n_full, n_tiles):  # the diagonal band, the tile crossing the length
                    o, l_i, m_i = _ring_tile(q_tile, k_ring, v_ring, ready, empty, ring_idx + t, t * BLOCK_N, seqlen,
                                             qk_mul, q_pos, o, l_i, m_i, s_zero, p_layout, row_o, HEAD_DIM, BLOCK_N,
                                             STAGES, CAUSAL, True)  # fmt: skip
                mbarrier.arrive(q_empty.index(half), count=1)  # its products are done: the next block's queries
                ring_idx += n_tiles
                n_items += 1
                # Stored from the products' own layout: a layout conversion would take 16 KiB of shared
                # memory, which the query buffers (alive across items) leave no room for.
                offs_m = q_block + half * ROWS + gl.arange(0, ROWS, layout=row_o)
                q_rows = (q_start + offs_m).to(gl.int64)
                m_ok = (offs_m < q_len) & (q_rows >= 0) & (q_rows < total_q)
                l_o = gl.convert_layout(l_i, row_o)
                out = o / gl.where(l_o == 0.0, 1.0, l_o)[:, None]  # a row that sees no key (bad lengths): 0
                gl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                         out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])  # fmt: skip
            if DYNAMIC:
                idx = k % 2
                mbarrier.wait(idx_ready.index(idx), (k // 2) & 1)
                i = gl.max(idx_smem.index(idx).load(_SCALAR_LAYOUT), axis=0)
                mbarrier.arrive(idx_empty.index(idx), count=1)
            else:
                i = _snake(k + 1)
            k += 1

    @gluon.jit(do_not_specialize=["total_q", "num_m_blocks", "num_requests"])
    def _prefill_persistent_kernel(
        q_desc, k_desc, v_desc, k_ptr, v_ptr, o_ptr, seqlens_ptr, cu_q_ptr, slots_ptr, counter_ptr, total_q, num_slots,
        max_len, num_m_blocks, num_heads, num_requests, qk_mul,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_ot, stride_oh,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_SLOTS: gl.constexpr, num_warps: gl.constexpr,
        ORDER: gl.constexpr = 0, DYNAMIC: gl.constexpr = False,
    ):  # fmt: skip
        """One program a streaming multiprocessor: the buffers and barriers, then the loader (this
        program's own warps) and the two consumers over the program's items."""
        dtype: gl.constexpr = k_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_ring = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_ring = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrive from each consumer
        idx_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        idx_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        idx_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=1)
            mbarrier.init(idx_ready.index(i), count=1)
            mbarrier.init(idx_empty.index(i), count=2)
        fence_async_shared()
        gl.warp_specialize(
            [
                (_loader, (q_desc, k_desc, v_desc, k_ptr, v_ptr, q_smem, k_ring, v_ring, q_ready, q_empty, ready, empty,
                           idx_smem, idx_ready, idx_empty, counter_ptr, cu_q_ptr, seqlens_ptr, slots_ptr, num_slots,
                           max_len, num_m_blocks, num_heads, num_requests, stride_kb, stride_ks, stride_kh, stride_vb,
                           stride_vs, stride_vh, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, HAS_SLOTS, ORDER,
                           DYNAMIC)),
                (_consumer, (0, q_smem, k_ring, v_ring, q_ready, q_empty, ready, empty, idx_smem, idx_ready, idx_empty,
                             o_ptr, cu_q_ptr, seqlens_ptr, slots_ptr, total_q, num_slots, max_len, num_m_blocks,
                             num_heads, num_requests, qk_mul, stride_ot, stride_oh, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                             CAUSAL, HAS_SLOTS, ORDER, DYNAMIC)),
                (_consumer, (1, q_smem, k_ring, v_ring, q_ready, q_empty, ready, empty, idx_smem, idx_ready, idx_empty,
                             o_ptr, cu_q_ptr, seqlens_ptr, slots_ptr, total_q, num_slots, max_len, num_m_blocks,
                             num_heads, num_requests, qk_mul, stride_ot, stride_oh, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                             CAUSAL, HAS_SLOTS, ORDER, DYNAMIC)),
            ],
            [4, 4],  # warps of each consumer
            [240, 240],  # registers a consumer thread may use (the loader keeps what is left)
        )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tma_queries_problem(q: torch.Tensor, num_requests: int, max_seqlen_q: int) -> str | None:
    """Why the persistent kernel cannot take this call, or None: its queries are copied by TMA
    (16-byte aligned base and row strides, unit stride last) and its items are counted in int32."""
    if q.stride(-1) != 1 or q.data_ptr() % 16 or any(s * q.element_size() % 16 for s in q.stride()[:-1]):
        return f"queries TMA can copy (16-byte aligned base and strides, stride(-1) == 1), got strides {q.stride()}"
    if _num_items(q, num_requests, max_seqlen_q) >= 2**31:
        return "fewer than 2**31 (query block, head, request) items"
    return None


def persistent_problem(q: torch.Tensor, num_requests: int, max_seqlen_q: int) -> str | None:
    """Why the persistent kernel should not take this call by default, or None:
    :func:`tma_queries_problem`, or a grid mostly of empty items (a skipped item costs each
    program a few loads): at least half of the items must hold queries."""
    problem = tma_queries_problem(q, num_requests, max_seqlen_q)
    full_items = -(-q.shape[0] // BLOCK_M) * q.shape[1]  # at least this many items hold queries
    if problem is None and 2 * full_items < _num_items(q, num_requests, max_seqlen_q):
        return "a grid mostly of query blocks, not many short requests beside a long one"
    return problem


def _num_items(q: torch.Tensor, num_requests: int, max_seqlen_q: int) -> int:
    """The launch grid's ``(m_block, head, request)`` items (as many as the other kernel's programs)."""
    return -(-max(1, min(int(max_seqlen_q), q.shape[0])) // BLOCK_M) * q.shape[1] * num_requests


def item_coords(i: int, num_m_blocks: int, num_heads: int, num_requests: int, order: int = 0) -> tuple[int, int, int]:
    """Item ``i``'s ``(m_block, head, request)`` in the kernel's ``ORDER`` (``_item``, in plain Python
    for tests): 0 level by level over every head and request, 1 head by head, N >= 2 N heads at a
    time; the heaviest query blocks (highest ``m_block``) first in each."""
    if order == 0:
        per_level = num_heads * num_requests
        m_block, rem = num_m_blocks - 1 - i // per_level, i % per_level
    elif order == 1:
        m_block, rem = num_m_blocks - 1 - i % num_m_blocks, i // num_m_blocks
    else:
        per_group = num_m_blocks * order
        within = i % per_group
        m_block, rem = num_m_blocks - 1 - within // order, (i // per_group) * order + within % order
    return m_block, rem % num_heads, rem // num_heads


def snake_items(program: int, programs: int, num_items: int) -> list[int]:
    """The items program ``program`` of ``programs`` takes, in order, as the kernel deals them
    (plain Python, for tests on any machine): ``p``, ``2G - 1 - p``, ``2G + p``, ..."""
    rounds = -(-num_items // programs)
    items = (k * programs + program + (k % 2) * (programs - 1 - 2 * program) for k in range(rounds))
    return [i for i in items if i < num_items]


def prefill_hopper_persistent(
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
    num_programs: int | None = None,
    _order: int = 0,
    _dynamic: bool = False,
) -> torch.Tensor:
    """As :func:`triton_kernels.prefill_hopper.prefill_hopper`, persistent; the caller checked
    ``hopper_problem``, ``prefill.tma_problem`` and :func:`tma_queries_problem`. ``num_programs``:
    programs launched (default: one per SM; never more than items), for tests and diagnostics."""
    from .prefill import _check_requests

    if stages not in (2, 3):
        raise ValueError(f"prefill_hopper_persistent: stages: expected 2 or 3, got {stages!r}")
    if not (_order in (0, 1) or (_order >= 2 and q.shape[1] % _order == 0)):
        raise ValueError(f"prefill_hopper_persistent: _order: expected 0, 1 or a divisor >= 2 of the {q.shape[1]} "
                         f"heads, got {_order!r}")  # fmt: skip
    if num_programs is not None and num_programs < 1:
        raise ValueError(f"prefill_hopper_persistent: num_programs: expected >= 1, got {num_programs!r}")
    T, H, D = q.shape
    R = cache_seqlens.shape[0]
    _check_requests("prefill_hopper_persistent", R)
    kv_block, q_block = [1, BLOCK_N, 1, D], [BLOCK_M // 2, 1, D]
    kv_layout = shared_layout(tuple(kv_block), q.dtype)
    k_desc, v_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), kv_block, kv_layout) for t in (k_cache, v_cache))
    q_desc = TensorDescriptor(q, list(q.shape), list(q.stride()), q_block, shared_layout(tuple(q_block), q.dtype))
    num_m_blocks = -(-max(1, min(int(max_seqlen_q), T)) // BLOCK_M)
    programs = _num_sms(q.device.index or 0) if num_programs is None else int(num_programs)
    grid = (min(programs, num_m_blocks * H * R),)
    _prefill_persistent_kernel[grid](
        q_desc, k_desc, v_desc, k_cache, v_cache, out, cache_seqlens, cu_seqlens_q,
        slots if slots is not None else cache_seqlens,
        torch.zeros(1, dtype=torch.int32, device=q.device) if _dynamic else cache_seqlens,
        T, k_cache.shape[0], k_cache.shape[1], num_m_blocks, H, R, scale * 1.4426950408889634,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=H // k_cache.shape[2], HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages,
        CAUSAL=bool(causal), HAS_SLOTS=slots is not None, num_warps=NUM_WARPS, ORDER=_order, DYNAMIC=_dynamic,
    )  # fmt: skip
    return out
