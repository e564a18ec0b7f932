"""FlashInfer's decode page table for one step, written in one launch.

FlashInfer's decode runs in CUDA-graph mode from a plan made once per shape, with every
request at its full ``max_pages`` pages (``indptr = arange(R + 1) * max_pages`` is fixed);
each call only rewrites ``indices`` and ``last_page_len`` on the device. Done with torch
operations, checking the metadata and building those two tensors took about 30 small
kernels per layer (a third of a decode step's time at batch 64, measured in ``bench
serve``); this kernel does it in one, one program per request:

* ``ok[r]``: the request is valid: its slot in ``[0, num_slots)``, its length in ``[1,
  max_len]`` and, over a block pool, every block it uses inside ``[0, num_blocks)``;
* ``indices[r * max_pages + j]``: page ``j`` of the request: ``block_table[slot, j]``
  clamped into the pool (paged), or ``slot * pages_per_slot + j`` (the rows of a virtual
  cache seen as pages); a bad request's slot is 0;
* ``last_page_len[r] = len - (max_pages - 1) * page_rows`` with ``len`` 0 for a bad
  request: FlashInfer's length ``(max_pages - 1) * page_rows + last_page_len`` is then
  exactly ``len`` (negative ``last_page_len`` is meant), and it reads no page past it.

:func:`torch_vkv.attention.flashinfer_backend.decode_page_entries_reference` is the same in
torch operations (the fallback where Triton cannot run).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import next_pow2, on_tensor_device


@triton.jit(do_not_specialize=["stride_bt", "num_slots", "max_len", "num_blocks", "pages_per_slot", "max_pages",
                             "page_rows"])
def _decode_page_entries_kernel(
    seqlens_ptr,  # [R] any integer dtype
    slots_ptr,  # [R] (unused unless HAS_SLOTS)
    bt_ptr,  # [num_slots, max_pages] int32 (unused unless PAGED)
    stride_bt,
    indices_ptr,  # int32 [R * max_pages]
    last_ptr,  # int32 [R]
    ok_ptr,  # bool [R]
    num_slots, max_len, num_blocks, pages_per_slot, max_pages, page_rows,
    HAS_SLOTS: tl.constexpr,
    PAGED: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    length = tl.load(seqlens_ptr + r).to(tl.int64)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + r).to(tl.int64)
    else:
        slot = r
    ok = (slot >= 0) & (slot < num_slots) & (length >= 1) & (length <= max_len)
    slot = tl.where(ok, slot, 0)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for j0 in range(0, max_pages, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        inside = j < max_pages
        if PAGED:
            ids = tl.load(bt_ptr + slot * stride_bt + j, mask=inside, other=0).to(tl.int64)
            used = inside & (j.to(tl.int64) * page_rows < length)
            bad += (used & ((ids < 0) | (ids >= num_blocks))).to(tl.int32)
            ids = tl.minimum(tl.maximum(ids, 0), num_blocks - 1)
        else:
            ids = slot * pages_per_slot + j
        tl.store(indices_ptr + r * max_pages + j, ids.to(tl.int32), mask=inside)
    ok = ok & (tl.sum(bad, axis=0) == 0)
    length = tl.where(ok, length, 0)
    tl.store(last_ptr + r, (length - (max_pages - 1) * page_rows).to(tl.int32))
    tl.store(ok_ptr + r, ok)


@on_tensor_device
def decode_page_entries(
    cache_seqlens: torch.Tensor,
    slots: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    indices: torch.Tensor,
    last_page_len: torch.Tensor,
    *,
    num_slots: int,
    max_len: int,
    num_blocks: int,
    page_rows: int,
    pages_per_slot: int,
    max_pages: int,
) -> torch.Tensor:
    """Write FlashInfer's decode ``indices`` (int32 ``[R * max_pages]``) and ``last_page_len``
    (int32 ``[R]``) in place; return ``ok`` (bool ``[R]``). See the module docstring.

    ``block_table`` (int32 ``[num_slots, max_pages]``) for a block pool, None for a
    virtual cache (then ``pages_per_slot`` pages lie between two slots). Capturable
    in a CUDA graph: nothing is read on the host.
    """
    R = cache_seqlens.shape[0]
    ok = torch.empty(R, dtype=torch.bool, device=cache_seqlens.device)
    if R == 0:
        return ok
    paged = block_table is not None
    _decode_page_entries_kernel[(R,)](
        cache_seqlens, slots if slots is not None else cache_seqlens,
        block_table if paged else cache_seqlens, block_table.stride(0) if paged else 0,
        indices, last_page_len, ok,
        num_slots, max_len, num_blocks, pages_per_slot, max_pages, page_rows,
        HAS_SLOTS=slots is not None, PAGED=paged, BLOCK=min(next_pow2(max_pages), 1024),
    )  # fmt: skip
    return ok

