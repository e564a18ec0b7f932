"""The decode page table of backend ``flashinfer`` over the cache's own rows (host and device metadata).

FlashInfer's tensor-core decode reads a paged KV cache; over a contiguous cache
the pages are simply runs of ``P`` consecutive rows (:func:`decode_page_rows`),
slot ``s`` the ``S_max / P`` pages from ``s * S_pad / P`` on (:func:`decode_pages`,
a view). :func:`decode_page_table` lays out one step's table; the plan objects
(:class:`GraphDecodePlan`) rewrite its entries on the device each call. See
:mod:`.flashinfer_backend` for how the wrapper is planned and run.
"""

from __future__ import annotations

import torch

from . import deps
from .common import flat_rows

__all__ = ["DECODE_PAGE_ROWS", "GraphDecodePlan", "decode_max_pages", "decode_page_entries_reference",
           "decode_page_rows", "decode_page_table", "decode_pages"]

#: Largest page of the decode page table, in rows (see :func:`decode_page_rows`).
DECODE_PAGE_ROWS = 64
#: Smallest page worth splitting into; below it a slot is one page.
MIN_DECODE_PAGE_ROWS = 16


def decode_page_rows(k_cache: torch.Tensor) -> int:
    """Rows per page of the decode page table over ``k_cache`` (shapes and strides only).

    The largest power of two from :data:`DECODE_PAGE_ROWS` down to
    :data:`MIN_DECODE_PAGE_ROWS`, at most ``S_max``, that divides the row pitch ``S_pad``
    between two slots, so every slot starts on a page and its :func:`decode_max_pages`
    pages lie inside its pitch; the last page of a slot may reach past ``S_max`` into the
    slot's own padding rows (never read: FlashInfer reads a request's keys up to its
    length), and those of the last slot must lie inside the tensor's storage. Else
    ``S_max``: one page per slot (no split of a request's keys).

    ``S_max`` itself need not be a multiple: a cache of 99,727 rows (a KVCache sized to a
    prompt plus its output) took one page per slot before, so FlashInfer, which splits a
    request's keys in whole pages, could not split its long requests: its decode steps at
    80-99K context in the engine were 5x slower than FlashInfer's paged decode (49.4 ms
    against 10.6-10.9, H200, sixteenth session). With pages of 64 rows they are level with
    it (inter-token latency p50 11.3 ms against 11.9 for FlashInfer paged, nineteenth
    session; docs/benchmarks.md).
    """
    S, s_pad = k_cache.shape[1], flat_rows(k_cache)
    rows = DECODE_PAGE_ROWS
    while s_pad is not None and rows >= MIN_DECODE_PAGE_ROWS:
        if rows <= S and s_pad % rows == 0 and _pages_in_storage(k_cache, s_pad, rows):
            return rows
        rows //= 2
    return S


def decode_max_pages(S: int, page_rows: int) -> int:
    """Pages of one slot's view: ``ceil(S_max / page_rows)``."""
    return -(-S // page_rows)


def _pages_in_storage(cache: torch.Tensor, s_pad: int, page_rows: int) -> bool:
    """Whether every page of :func:`decode_pages` (the last slot's last one, whole) lies in ``cache``'s storage."""
    B, S, H, D = cache.shape
    if S % page_rows == 0:
        return True  # inside the view itself
    if cache.device.type == "meta":
        return True  # shapes only: no storage to hold to
    last_row = (B - 1) * s_pad + decode_max_pages(S, page_rows) * page_rows - 1
    end = cache.storage_offset() + last_row * cache.stride(1) + (H - 1) * cache.stride(2) + (D - 1) * cache.stride(3) + 1
    return end * cache.element_size() <= cache.untyped_storage().nbytes()


def decode_pages(cache: torch.Tensor, page_rows: int) -> torch.Tensor:
    """``[B, S_max, H, D]`` -> ``[num_pages, page_rows, H, D]``: the same memory as pages (no copy).

    Page ``p`` is the rows ``[p * page_rows, (p + 1) * page_rows)`` of the flattened
    cache (:func:`~torch_vkv.attention.common.flatten`), so slot ``s`` starts at page
    ``s * S_pad / page_rows``; the last page of a slot may reach into its padding rows
    (:func:`decode_page_rows`). With ``page_rows == S_max`` a page is a slot (the view
    as given).
    """
    B, S, H, D = cache.shape
    if page_rows == S:
        return cache
    s_pad = flat_rows(cache)
    num_pages = (B - 1) * s_pad // page_rows + decode_max_pages(S, page_rows)
    return cache.as_strided((num_pages, page_rows, H, D), (page_rows * cache.stride(1),) + cache.stride()[1:])


def decode_page_table(cache_seqlens: torch.Tensor, rows: torch.Tensor, page_rows: int, pages_per_slot: int,
                      max_pages: int) -> tuple:  # fmt: skip
    """The page table of a decode step: every request keeps all ``max_pages`` pages of its slot.

    Parameters
    ----------
    cache_seqlens : shape ``[R]``: keys per request (0 for a request to be skipped), at most
        ``max_pages * page_rows``.
    rows : shape ``[R]``: the slot of each request.
    page_rows : rows per page.
    pages_per_slot : pages between two slots (``S_pad / page_rows``).
    max_pages : pages of one slot's view (``ceil(S_max / page_rows)``, :func:`decode_max_pages`).

    Returns
    -------
    indptr : int32, shape ``[R + 1]``, ``arange(R + 1) * max_pages``: fixed, so a plan
        made once holds for any lengths.
    indices : int32, shape ``[R * max_pages]``: request ``r``'s pages ``rows[r] *
        pages_per_slot + j``, ``j < max_pages``.
    last_page_len : int32, shape ``[R]``: ``cache_seqlens - (max_pages - 1) * page_rows``,
        negative for a request shorter than its pages. FlashInfer's length of a request
        (``paged_kv_t::get_length``) is ``(pages - 1) * page_size + last_page_len`` in
        32-bit integers, which is then exactly ``cache_seqlens[r]``; it reads no page past
        that length, and no other kernel we call reads ``last_page_len``.
    """
    R = cache_seqlens.shape[0]
    indptr = torch.arange(R + 1, dtype=torch.int32, device=cache_seqlens.device) * max_pages
    return (indptr,) + _page_entries(cache_seqlens, rows, page_rows, pages_per_slot, max_pages)


def _page_entries(cache_seqlens, rows, page_rows: int, pages_per_slot: int, max_pages: int) -> tuple:
    """(indices, last_page_len) of :func:`decode_page_table`: the part that changes between calls."""
    first = rows.to(torch.int32)[:, None] * pages_per_slot
    indices = (first + torch.arange(max_pages, dtype=torch.int32, device=rows.device)).reshape(-1)
    return indices, cache_seqlens.to(torch.int32) - (max_pages - 1) * page_rows


def decode_page_entries_reference(cache_seqlens, slots, block_table, *, num_slots: int, max_len: int,
                                  num_blocks: int, page_rows: int, pages_per_slot: int, max_pages: int) -> tuple:
    """(indices, last_page_len, ok) of a decode step, checked: the torch twin of the Triton kernel
    ``torch_vkv.triton_kernels.decode_page_entries`` (its module docstring has the rules).

    A request is valid (``ok``) when its slot is in ``[0, num_slots)``, its length in ``[1,
    max_len]`` and, over a block pool (``block_table`` given), every block it uses is inside
    ``[0, num_blocks)``. A bad request's length is 0 (``last_page_len`` as for an empty
    request) and its slot 0; block ids are clamped into the pool.
    """
    R, dev = cache_seqlens.shape[0], cache_seqlens.device
    lens = cache_seqlens.long()
    slot = slots.long() if slots is not None else torch.arange(R, device=dev)
    ok = (slot >= 0) & (slot < num_slots) & (lens >= 1) & (lens <= max_len)
    slot = torch.where(ok, slot, 0)
    if block_table is None:
        indices, _ = _page_entries(lens, slot, page_rows, pages_per_slot, max_pages)
    else:
        ids = block_table.long().index_select(0, slot)
        used = torch.arange(max_pages, device=dev)[None, :] * page_rows < lens[:, None]
        ok = ok & ~(used & ((ids < 0) | (ids >= num_blocks))).any(1)
        indices = ids.clamp(0, num_blocks - 1).reshape(-1).to(torch.int32)
    last = (torch.where(ok, lens, 0) - (max_pages - 1) * page_rows).to(torch.int32)
    return indices, last, ok


class GraphDecodePlan:
    """What both decode plans share: FlashInfer's page-table buffers ``indices`` (int32 ``[R *
    max_pages]``) and ``last_page_len`` (int32 ``[R]``), planned once with every request at
    ``max_pages`` pages of ``page_rows`` rows, and rewritten on the device by each call."""

    indices: torch.Tensor
    last_page_len: torch.Tensor
    page_rows: int
    pages_per_slot: int
    max_pages: int

    def write_entries(self, cache_seqlens, slots, block_table, *, num_slots: int, max_len: int,
                      num_blocks: int) -> torch.Tensor:  # fmt: skip
        """Write this step's page table (one Triton launch where Triton runs); return ``ok`` ``[R]``."""
        sizes = dict(num_slots=num_slots, max_len=max_len, num_blocks=num_blocks, page_rows=self.page_rows,
                     pages_per_slot=self.pages_per_slot, max_pages=self.max_pages)  # fmt: skip
        if deps.triton_usable(cache_seqlens.device):
            return deps.triton_kernels().decode_page_entries(cache_seqlens, slots, block_table, self.indices,
                                                             self.last_page_len, **sizes)  # fmt: skip
        indices, last, ok = decode_page_entries_reference(cache_seqlens, slots, block_table, **sizes)
        self.indices.copy_(indices)
        self.last_page_len.copy_(last)
        return ok
