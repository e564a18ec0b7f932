"""Backend ``flashinfer`` over a paged block pool (``block_table`` given): FlashInfer's own paged kernels.

This is the paged baseline a serving system would run (``bench serve`` configuration
``paged-16:flashinfer``), beside the same backend over a virtual cache
(:mod:`.flashinfer_backend`). ``k_cache`` / ``v_cache`` are block pools
``[num_blocks, block_size, num_kv_heads, head_dim]`` and ``block_table[slot]`` the
blocks of a slot's rows, in order.

* **Decode** (``cu_seqlens_q=None``): ``BatchDecodeWithPagedKVCacheWrapper(...,
  use_tensor_cores=True)`` in FlashInfer's CUDA-graph mode, planned **once per
  shape** with every request at the full ``max_blocks`` blocks, as the virtual
  backend's decode is: each call writes the request's row of the block table and
  its length into the wrapper's buffers on the device (``last_page_len = len -
  (max_blocks - 1) * block_size``, negative for a short request; FlashInfer's
  length ``(pages - 1) * page_size + last_page_len`` is then exactly ``len``, and it
  reads no block past it). Capturable once it has run outside the graph.
* **Prefill / chunked prefill / mixed** (``cu_seqlens_q`` given):
  ``BatchPrefillWithPagedKVCacheWrapper`` (``backend="fa3"`` on Hopper, else
  ``"fa2"``), planned on the host from the metadata (one device-to-host copy of all
  of it; plans are reused while the values stay the same, e.g. across layers).
  Under CUDA-graph capture such a step runs the Triton kernels instead.

Bad metadata reads nothing out of the pool: block ids are clamped into it, and a
request whose slot or length is out of range, or whose blocks are not all in the
pool, gets zeros (the Triton kernels' rule).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._graph_pools import outside_graph_pools
from .flashinfer_backend import decode_plan, replan
from .flashinfer_pages import GraphDecodePlan
from .inputs import cache_bounds, safe_blocks, valid_requests

__all__ = ["paged_decode", "paged_prefill", "paged_layout_problem"]

_U32 = 1 << 32

_DECODE: dict = {}  # (device, shape key) -> _PagedDecodePlan
_PREFILL: dict = {}  # (device, backend) -> [wrapper, plan key, event after its plan's copies]


def paged_layout_problem(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor) -> Optional[str]:
    """Why FlashInfer cannot address this block pool, or None (shapes and strides only).

    FlashInfer keeps the page, row and head strides in ``uint32``, and reads K and V with one
    set of strides; its page table is ``int32``.
    """
    if k_cache.stride() != v_cache.stride():
        return f"K and V pools with equal strides, got {k_cache.stride()} / {v_cache.stride()}"
    if max(k_cache.stride()[:3]) >= _U32:
        return f"block, row and head strides below 2**32 elements, got {k_cache.stride()}"
    if block_table.dtype != torch.int32:
        return f"an int32 block_table, got {block_table.dtype}"
    return None


def _requests(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table) -> tuple:
    """(ok, lens, blocks): validity, lengths (0 when bad) and clamped block-table rows ``[R, max_blocks]``."""
    ok, lens, rows = valid_requests(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table)
    bs, num_blocks = k_cache.shape[1], k_cache.shape[0]
    raw = block_table.index_select(0, rows)
    used = torch.arange(raw.shape[1], device=raw.device)[None, :] * bs < lens[:, None]
    ok = ok & ~(used & ((raw < 0) | (raw >= num_blocks))).any(1)
    return ok, torch.where(ok, lens, 0), safe_blocks(raw, num_blocks)


class _PagedDecodePlan(GraphDecodePlan):
    """A CUDA-graph-mode tensor-core decode wrapper planned once for ``R`` requests of ``max_blocks`` blocks."""

    def __init__(self, fi, workspace, q, k_cache, max_blocks, scale, window_left, softcap):
        R, dev, bs = q.shape[0], q.device, k_cache.shape[1]
        self.page_rows, self.max_pages, self.pages_per_slot = bs, max_blocks, max_blocks
        self.indptr = torch.arange(R + 1, dtype=torch.int32, device=dev) * max_blocks
        self.indices = torch.zeros(R * max_blocks, dtype=torch.int32, device=dev)
        self.last_page_len = torch.full((R,), bs, dtype=torch.int32, device=dev)
        self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len, backend="fa2",
        )  # fmt: skip
        # Planned with every request at its full max_blocks blocks: any shorter length fits later.
        self.wrapper.plan(
            self.indptr.cpu(), self.indices.cpu(), self.last_page_len.cpu(), q.shape[1], k_cache.shape[2],
            q.shape[2], bs, window_left=window_left, logits_soft_cap=softcap, q_data_type=q.dtype,
            kv_data_type=k_cache.dtype, sm_scale=scale, non_blocking=False,
        )  # fmt: skip

    def run(self, q, k_cache, v_cache, cache_seqlens, slots, block_table):
        """``[R, H, D]``: rows of bad requests (see :meth:`write_entries`) are zeros."""
        num_slots, max_len, num_blocks = cache_bounds(k_cache, block_table)
        ok = self.write_entries(cache_seqlens, slots, block_table, num_slots=num_slots, max_len=max_len,
                                num_blocks=num_blocks)  # fmt: skip
        return torch.where(ok[:, None, None], self.wrapper.run(q, (k_cache, v_cache)), 0)  # 0-length rows: NaN


def paged_decode(fi, workspace, q, k_cache, v_cache, cache_seqlens, slots, block_table, scale, window_left, softcap):
    """One query per request over its blocks: ``[R, H, D]``."""
    R, max_blocks = cache_seqlens.shape[0], block_table.shape[1]
    key = (q.device, R, tuple(k_cache.shape), k_cache.stride(), max_blocks, q.shape[1], q.dtype, scale,
           window_left, softcap)  # fmt: skip
    plan = decode_plan(_DECODE, key, q, f"{R} requests of {max_blocks} blocks",
                       lambda: _PagedDecodePlan(fi, workspace, q, k_cache, max_blocks, scale, window_left, softcap))
    return plan.run(q, k_cache, v_cache, cache_seqlens, slots, block_table)


def paged_prefill(fi, workspace, backend, q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table,
                  causal, scale, window_left, softcap):  # fmt: skip
    """Queries ``cu_seqlens_q`` of each request over its blocks, planned on the host: ``[T, H, D]``."""
    dev, R, T, bs = q.device, cache_seqlens.shape[0], q.shape[0], k_cache.shape[1]
    max_blocks = block_table.shape[1]
    ok, lens, blocks = _requests(k_cache, cache_seqlens, cu_seqlens_q, slots, block_table)
    # The metadata in one device-to-host copy (one sync, not one per tensor).
    host = torch.cat([lens.long(), ok.long(), cu_seqlens_q.long(), blocks.reshape(-1).long()]).tolist()
    lengths, oks, cu, table = host[:R], host[R : 2 * R], host[2 * R : 3 * R + 1], host[3 * R + 1 :]
    # A bad request has no query row and no block in the plan; its rows of the output are zeros.
    rows = [range(max(cu[r], 0), min(cu[r + 1], T)) if oks[r] else range(0) for r in range(R)]
    qo, kv, indices, last = [0], [0], [], []
    for r in range(R):
        pages = -(-lengths[r] // bs) if oks[r] else 0
        indices += table[r * max_blocks : r * max_blocks + pages]
        qo.append(qo[-1] + len(rows[r]))
        kv.append(kv[-1] + pages)
        last.append(lengths[r] - (pages - 1) * bs if pages else 0)
    holder = _PREFILL.get((dev, backend))
    if holder is None:
        wrapper = outside_graph_pools(dev, lambda: fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD",
                                                                                          backend=backend))
        holder = _PREFILL[(dev, backend)] = [wrapper, None, None]
    wrapper = holder[0]
    H, H_kv, D = q.shape[1], k_cache.shape[2], q.shape[2]
    plan_key = (tuple(qo), tuple(kv), tuple(indices), tuple(last), H, H_kv, D, bs, q.dtype, causal, scale,
                window_left, softcap)  # fmt: skip

    def i32(x):
        return torch.tensor(x, dtype=torch.int32)

    replan(holder, plan_key, dev, H, lambda: wrapper.plan(
        i32(qo), i32(kv), i32(indices), i32(last), H, H_kv, D, bs, causal=causal, window_left=window_left,
        logits_soft_cap=softcap, sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_cache.dtype))  # fmt: skip
    order = [i for rr in rows for i in rr]
    if order == list(range(T)):  # every row planned in place: no gather, no scatter
        return wrapper.run(q.contiguous(), (k_cache, v_cache))
    out = torch.zeros_like(q)
    if order:
        index = torch.tensor(order, dtype=torch.long, device=dev)
        out[index] = wrapper.run(q.index_select(0, index), (k_cache, v_cache))
    return out
