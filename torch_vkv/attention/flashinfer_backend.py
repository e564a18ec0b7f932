"""Backend ``flashinfer``: FlashInfer's kernels, unchanged, over the cache's contiguous rows.

Two entry points of FlashInfer (>= 0.7) are used as they are:

* **Decode** (``cu_seqlens_q=None``): ``BatchDecodeWithPagedKVCacheWrapper(...,
  "NHD", use_tensor_cores=True)`` over a page table laid on the cache's own
  rows: pages of ``P`` rows (:func:`decode_page_rows`, :data:`DECODE_PAGE_ROWS`
  at most), so a slot ``s`` is the ``S_max / P`` consecutive pages from
  ``s * S_pad / P`` on (:func:`decode_pages` is the view, no copy). FlashInfer
  splits a request's keys in whole pages (at least ``128 / P`` of them), so
  pages smaller than a slot are what lets it split one long request over the
  GPU; with one page per slot (the first version) batch 1 at 16K ran 7x
  slower than FlashInfer's own paged cache (H200, 2026-12-02). The wrapper is
  made in FlashInfer's CUDA-graph mode and planned **once per shape** for every
  request at the full ``S_max`` (the split covers the whole row; a tile past a
  request's real length is empty in the kernel: its ``chunk_start`` and
  ``chunk_end`` are clamped to the length). Each call writes the page table
  (:func:`decode_page_table`) into the wrapper's own buffers on the device, so
  no length is read on the host and the op is capturable once it has run
  outside the graph (plan outside the graph, run inside). A request keeps all
  ``S_max / P`` pages in the table and its length goes into ``last_page_len``
  through FlashInfer's formula ``(pages - 1) * P + last_page_len`` (see
  :func:`decode_page_table`).
* **Prefill / chunked prefill / mixed** (``cu_seqlens_q`` given):
  ``BatchPrefillWithRaggedKVCacheWrapper`` (``backend="fa3"`` on Hopper,
  ``"fa2"`` elsewhere) over the cache flattened to rows
  (:func:`~torch_vkv.attention.common.flatten`): request ``r``'s keys are the
  contiguous rows ``[slots[r] * S_pad, slots[r] * S_pad + cache_seqlens[r])``.
  The ragged layout needs non-decreasing ``kv_indptr``, so requests are taken in
  slot order and the rows between two requests become an empty *gap request*
  (no query, so no work): :func:`ragged_layout`. Its plan needs the lengths on
  the host: the host copies attached to the metadata tensors
  (:mod:`~torch_vkv.attention.host_values`; the serving engine attaches them),
  else the device metadata read with one sync, one copy of all of it (eager
  only; plans are reused while the metadata values stay the same, e.g. across
  layers). A sync per layer also stalls the host's queueing of the layer's
  other kernels, so the GPU idles through every layer's host work. When every
  request is valid the output needs no masking afterwards and FA3's tail
  zeroing uses the tensors as given. Under CUDA-graph capture such a step runs
  the Triton kernels instead.

``window_left`` and ``softcap`` are passed through (``window_left`` /
``logits_soft_cap``). fp16/bf16, ``head_dim`` in {64, 128, 256}, K and V views
with equal strides; layouts whose strides do not fit FlashInfer's 32-bit
element offsets raise :class:`ValueError` (:func:`layout_problem`), and ``auto``
skips ``flashinfer`` for them.

FA3 loads whole key tiles and masks only the scores, so before an FA3 prefill
the rows ``[len, len + FA3_TILE - 1)`` of each used slot are zeroed (the tail of
a tile of any size up to ``FA3_TILE`` rows: FlashInfer's are 80-192, not all
dividing 256)
(``zero_tail``, as for ``flex``): ``0 * NaN`` cannot reach ``P @ V``. FA3 runs
only where that is possible (:func:`fa3_tail_fits`): every request's tail rows
inside its slot's view and, on a ``KVCache`` view, committed
(``KVCache(margin_tokens=FA3_TILE)`` commits them); and without a sliding window
(its tiles are not page aligned, so the one holding the window's start could
reach a page already given back). Otherwise the call takes FlashInfer's FA2
prefill, whose loads stop at each request's last key.

Plans and workspaces are kept per device and shape in this module (FlashInfer's
wrappers are stateful); calls are expected on one stream at a time. They are
allocated on a side stream (:func:`_outside_graph_pools`): a first call inside
``torch.compile``'s CUDA-graph warm-up would otherwise put them in the graph's
private pool, which cudagraph trees refuse ("tensors in the cudagraph pool not
tracked as outputs").
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from . import deps
from .common import ATTN_SCHEMA, flat_rows, flatten
from .inputs import valid_requests
from .host_values import host_values

__all__ = ["DECODE_PAGE_ROWS", "FA3_TILE", "decode_max_pages", "decode_page_rows", "decode_page_table", "decode_pages", "fa3_tail_fits", "layout_problem", "ragged_layout", "flashinfer_attention"]

#: Largest page of the decode page table, in rows (see :func:`decode_page_rows`).
DECODE_PAGE_ROWS = 64
#: Smallest page worth splitting into; below it a slot is one page.
MIN_DECODE_PAGE_ROWS = 16
#: Rows past a request's last key that an FA3 tile may load (zeroed before an FA3 prefill).
FA3_TILE = 256
#: Bytes of FlashInfer's float workspace per device (its recommended 128 MiB, doubled for long prefills).
WORKSPACE_BYTES = 256 << 20
HEAD_DIMS = (64, 128, 256)
_U32 = 1 << 32
_I32 = (1 << 31) - 1


# ----------------------------------------------------------------------------- host metadata (pure)


def layout_problem(k_cache: torch.Tensor, v_cache: torch.Tensor, *, decode: bool) -> Optional[str]:
    """Why FlashInfer cannot address this cache view, or None when it can (shapes and strides only).

    Decode: the page stride (``page_rows * stride(1)``, or ``stride(0)`` with one page
    per slot; :func:`decode_page_rows`) and the row/head strides below ``2**32``
    elements (FlashInfer keeps them in ``uint32``). Prefill: the flattened rows
    ``(B - 1) * S_pad + S_max`` times ``stride(1)`` below ``2**32`` (the ragged kernels
    compute ``row * stride`` in 32 bits) and ``stride(0)`` a multiple of ``stride(1)``.
    K and V must have equal strides in both cases.
    """
    if k_cache.stride() != v_cache.stride():
        return f"K and V views with equal strides, got {k_cache.stride()} / {v_cache.stride()}"
    if decode:
        page_rows = decode_page_rows(k_cache)
        strides = decode_pages(k_cache, page_rows).stride()
        if max(strides[:3]) >= _U32:
            return f"page, row and head strides below 2**32 elements (pages of {page_rows} rows), got {strides}"
        return None
    s_pad = flat_rows(k_cache)
    if s_pad is None:
        return f"stride(0) a multiple of stride(1) (rows of one buffer), got {k_cache.stride()}"
    rows = (k_cache.shape[0] - 1) * s_pad + k_cache.shape[1]
    if rows * k_cache.stride(1) >= _U32 or rows > _I32:
        return f"(B - 1) * S_pad + S_max = {rows} rows of stride {k_cache.stride(1)} below 2**32 elements"
    return None


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


def ragged_layout(lengths: list, cu_seqlens_q: list, slots: list, s_pad: int, num_slots: int, max_len: int) -> tuple:
    """Host metadata of FlashInfer's ragged prefill over the flattened cache rows.

    Valid requests are visited in slot order; request ``r`` becomes a *pseudo
    request* with its query rows and keys ``[slots[r] * s_pad, slots[r] * s_pad +
    lengths[r])``; the rows before it not owned by the previous one become a gap
    pseudo request with no query rows (no work). Invalid requests (slot out of
    range, length below its new tokens or above ``max_len``) follow with no keys.

    Parameters
    ----------
    lengths : ``[R]`` ints, keys per request (new tokens included).
    cu_seqlens_q : ``[R + 1]`` ints, query row offsets.
    slots : ``[R]`` ints, the cache row of each request.
    s_pad, num_slots, max_len : rows between two slots, slots, and rows usable per slot.

    Returns
    -------
    qo_indptr, kv_indptr : lists of ints, ``[P + 1]`` each, non-decreasing.
    q_order : list of query rows in pseudo-request order, or None when that is the identity.
    valid : list of bools ``[R]``.

    Raises
    ------
    ValueError : two valid requests share a slot (their rows would overlap).
    """
    R = len(lengths)
    n = [cu_seqlens_q[r + 1] - cu_seqlens_q[r] for r in range(R)]
    valid = [0 <= slots[r] < num_slots and 0 <= n[r] <= lengths[r] <= max_len for r in range(R)]
    order = sorted((r for r in range(R) if valid[r]), key=lambda r: slots[r])
    for a, b in zip(order, order[1:]):
        if slots[a] == slots[b]:
            raise ValueError(f"flashinfer prefill: expected distinct slots (contiguous rows per request), "
                             f"got requests {a} and {b} both in slot {slots[a]}")  # fmt: skip
    order += [r for r in range(R) if not valid[r]]
    qo, kv, pos, next_row, identity = [0], [0], 0, 0, True
    for r in order:
        start = slots[r] * s_pad if valid[r] else pos
        if start > pos:  # gap request: rows nobody attends to
            qo.append(qo[-1])
            kv.append(start)
        pos = start + (lengths[r] if valid[r] else 0)
        qo.append(qo[-1] + n[r])
        kv.append(pos)
        if n[r] > 0:  # the query rows are in order while each request's start where the last one's end
            identity = identity and cu_seqlens_q[r] == next_row
            next_row = cu_seqlens_q[r + 1]
    # O(R) unless rows must move: listing every row costed ~0.5 ms of host time a call at 8K rows (measured).
    q_order = None if identity else [i for r in order for i in range(cu_seqlens_q[r], cu_seqlens_q[r + 1])]
    return qo, kv, q_order, valid


def metadata_on_host(parts: list) -> list:
    """The int values of the 1-D metadata tensors ``parts``, concatenated: their attached host copies
    (:mod:`.host_values`) when every one has them, else one device-to-host copy (one sync, not one per tensor)."""
    known = [host_values(t) for t in parts]
    if all(k is not None for k in known):
        return [v for k in known for v in k]
    return torch.cat([t.reshape(-1).to(torch.int64) for t in parts]).tolist()


def fa3_tail_fits(k_cache: torch.Tensor, lengths: list, slots: list, valid: list) -> bool:
    """Whether FA3 may read each valid request's rows ``[len, len + FA3_TILE - 1)``.

    They must lie in the slot's view (``zero_tail`` zeroes them; past the view are
    another slot's rows, which may hold anything or be decommitted) and, when the
    tensor lies over a ``KVCache`` (its view, or a plain slice of it, as the HF
    adapter's layers are), be committed. Reads the page table only (no device work).
    """
    from .inputs import _committed_rows_check

    committed = _committed_rows_check(k_cache)  # None: a tensor no cache knows
    for length, slot, ok in zip(lengths, slots, valid):
        if not ok:
            continue
        need = length + FA3_TILE - 1
        if need > k_cache.shape[1] or (committed is not None and not committed(slot, length, need)):
            return False
    return True


# ----------------------------------------------------------------------------- wrappers and plans

_WORKSPACE: dict = {}  # device -> FlashInfer float workspace (shared: used only during a run, one stream)
_DECODE: dict = {}  # (device, R, shapes, options) -> _DecodePlan
# (device, fa backend, shapes, dtype, causal, window, softcap) -> [wrapper, last plan key, event after its plan].
# One wrapper per kind of layer: a model alternating sliding and global layers would re-plan one wrapper at
# every layer, and plan() writes a pinned host buffer whose copy to the GPU is only queued.
_RAGGED: dict = {}


@contextlib.contextmanager
def _outside_graph_pools(device: torch.device) -> Iterator[None]:
    """Allocates the block's long-lived state (workspaces, plans) outside any CUDA
    graph pool. CUDA-graph trees route the allocations of their stream to the
    graph's pool, warm-up runs included; a side stream's allocations are not
    routed. The side stream waits for the current one and back."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        yield  # the CPU, or a capture (plans are refused there, see _decode)
        return
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _workspace(device: torch.device) -> torch.Tensor:
    ws = _WORKSPACE.get(device)
    if ws is None:
        with _outside_graph_pools(device):
            ws = _WORKSPACE[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws


def _prefill_backend(device: torch.device) -> str:
    """FA3 on Hopper (sm90), FlashInfer's FA2 elsewhere."""
    return "fa3" if deps.cuda_capability(device.index or 0)[0] == 9 else "fa2"


class _DecodePlan(GraphDecodePlan):
    """A CUDA-graph-mode tensor-core decode wrapper planned once for ``R`` requests at ``S_max`` keys.

    The page-table buffers belong to this object; every run rewrites ``indices``
    and ``last_page_len`` on the device (capturable), never the plan.
    """

    def __init__(self, fi, q, k_cache, R, scale, window_left, softcap):
        dev = q.device
        self.page_rows = decode_page_rows(k_cache)
        self.max_pages = decode_max_pages(k_cache.shape[1], self.page_rows)
        s_pad = flat_rows(k_cache)
        # One page per slot is the view as given (page index = slot), else pages of the flattened rows.
        self.pages_per_slot = s_pad // self.page_rows if self.page_rows != k_cache.shape[1] else 1
        # The plan's table: every request at the full S_max (any lengths <= S_max written later fit).
        lens = torch.full((R,), k_cache.shape[1], dtype=torch.int32)
        indptr, indices, last = decode_page_table(lens, torch.zeros(R, dtype=torch.int32), self.page_rows,
                                                  self.pages_per_slot, self.max_pages)  # fmt: skip
        self.indptr, self.indices, self.last_page_len = indptr.to(dev), indices.to(dev), last.to(dev)
        self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
            _workspace(dev), "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len, backend="fa2",
        )  # fmt: skip
        self.wrapper.plan(
            indptr, indices, last, q.shape[1], k_cache.shape[2], q.shape[2], self.page_rows,
            window_left=window_left, logits_soft_cap=softcap, q_data_type=q.dtype, kv_data_type=k_cache.dtype,
            sm_scale=scale, non_blocking=False,
        )  # fmt: skip

    def run(self, q, k_cache, v_cache, cache_seqlens, slots):
        """``[R, H, D]``: rows of bad requests (see :meth:`write_entries`) are zeros."""
        ok = self.write_entries(cache_seqlens, slots, None, num_slots=k_cache.shape[0], max_len=k_cache.shape[1],
                                num_blocks=1)  # fmt: skip
        pages = (decode_pages(k_cache, self.page_rows), decode_pages(v_cache, self.page_rows))
        return torch.where(ok[:, None, None], self.wrapper.run(q, pages), 0)  # a 0-length row may hold NaN


def decode_plan(table: dict, key: tuple, q: torch.Tensor, shape: str, make) -> object:
    """``table[key]``, made by ``make()`` outside any graph pool on its first call. A decode is planned
    once per shape outside a CUDA graph, then runs inside (plan outside, run inside): a first call
    inside a capture is a ``RuntimeError`` naming the shape."""
    plan = table.get(key)
    if plan is None:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("flashinfer decode: expected one call outside the CUDA graph first (it plans "
                               f"the kernel for this shape: {shape}), got the first call inside a capture")
        with _outside_graph_pools(q.device):
            plan = table[key] = make()
    return plan


def _decode(fi, q, k_cache, v_cache, cache_seqlens, slots, scale, window_left, softcap):
    R = cache_seqlens.shape[0]
    key = (q.device, R, tuple(k_cache.shape), k_cache.stride(), q.shape[1], q.dtype, scale, window_left, softcap,
           DECODE_PAGE_ROWS)
    plan = decode_plan(_DECODE, key, q, f"{R} requests, cache {tuple(k_cache.shape)}",
                       lambda: _DecodePlan(fi, q, k_cache, R, scale, window_left, softcap))
    # Device metadata is never read: a bad request attends to no key (length 0, slot 0).
    return plan.run(q, k_cache, v_cache, cache_seqlens, slots)


def _ragged(fi, q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, causal, scale, window_left, softcap):
    """(out, every request valid with consistent ``cu_seqlens_q``): FlashInfer's ragged prefill."""
    dev, R = q.device, cache_seqlens.shape[0]
    s_pad = flat_rows(k_cache)
    parts = [cache_seqlens, cu_seqlens_q] + ([slots] if slots is not None else [])
    host = metadata_on_host(parts)
    lengths, cu = host[:R], host[R : 2 * R + 1]
    slot_list = host[2 * R + 1 :] if slots is not None else list(range(R))
    qo, kv, q_order, valid = ragged_layout(lengths, cu, slot_list, s_pad, k_cache.shape[0], k_cache.shape[1])
    clean = all(valid) and cu[0] == 0 and cu[-1] == q.shape[0] and all(a <= b for a, b in zip(cu, cu[1:]))
    backend = _prefill_backend(dev)
    if backend == "fa3" and (window_left >= 0 or not fa3_tail_fits(k_cache, lengths, slot_list, valid)):
        backend = "fa2"  # see the module docstring: FA3's tile reads past the keys are not safe here
    H, H_kv, D = q.shape[1], k_cache.shape[2], q.shape[2]
    kind = (dev, backend, H, H_kv, D, q.dtype, causal, window_left, softcap)
    holder = _RAGGED.get(kind)
    if holder is None:
        with _outside_graph_pools(dev):
            holder = _RAGGED[kind] = [fi.BatchPrefillWithRaggedKVCacheWrapper(
                _workspace(dev), "NHD", backend=backend), None, None]  # fmt: skip
    wrapper = holder[0]
    plan_key = (tuple(qo), tuple(kv), scale)
    if holder[1] != plan_key:  # layers of one step share the plan
        if holder[2] is not None:
            # plan() rewrites the pinned host buffer whose copy the last plan only queued: wait for that copy.
            holder[2].synchronize()
        with _outside_graph_pools(dev):
            wrapper.plan(
                torch.tensor(qo, dtype=torch.int32), torch.tensor(kv, dtype=torch.int32), H, H_kv, D,
                causal=causal, window_left=window_left, logits_soft_cap=softcap, sm_scale=scale,
                q_data_type=q.dtype, kv_data_type=k_cache.dtype,
            )  # fmt: skip
            if dev.type == "cuda":
                holder[2] = torch.cuda.Event()
                holder[2].record()  # on the side stream, after the plan's copies
        holder[1] = plan_key
    if backend == "fa3":
        if all(valid):  # the tensors as given (no host-to-device copy)
            lens = cache_seqlens.to(torch.int32)
            rows = slots.to(torch.int32) if slots is not None else torch.arange(R, dtype=torch.int32, device=dev)
        else:
            ok = torch.tensor(valid, dtype=torch.bool, device=dev)
            lens = torch.where(ok, cache_seqlens, 0).to(torch.int32)
            rows = torch.tensor([s if v else 0 for s, v in zip(slot_list, valid)], dtype=torch.int32, device=dev)
        # The launcher itself: inside this op, the zero_tail op's dispatch would only add host time.
        deps.triton_kernels().zero_tail(k_cache, v_cache, lens, multiple=FA3_TILE, limit=k_cache.shape[1], slots=rows,
                                            any_tile=True)
    kf, vf = flatten(k_cache, s_pad), flatten(v_cache, s_pad)
    if q_order is None:
        return wrapper.run(q.contiguous(), kf, vf), clean
    order = torch.tensor(q_order, dtype=torch.long, device=dev)
    out = torch.empty_like(q)
    out[order] = wrapper.run(q.index_select(0, order), kf, vf)
    return out, clean


def _zero_invalid_rows(out, cache_seqlens, cu_seqlens_q, k_cache, slots):
    """Rows of requests whose metadata is out of range are zero (their kv range was empty)."""
    ok, _, _ = valid_requests(k_cache, cache_seqlens, cu_seqlens_q, slots, None)
    n = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).clamp(min=0).long()
    req_ok = torch.repeat_interleave(ok, n, output_size=out.shape[0]) if out.shape[0] else ok[:0]
    return torch.where(req_ok[:, None, None], out, 0)


@torch.library.custom_op("torch_vkv::flashinfer_attention", mutates_args=(), schema=ATTN_SCHEMA)
def flashinfer_attention(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
    window_left=-1, softcap=0.0,
):  # fmt: skip
    return flashinfer_attention_impl(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal,
                                     scale, max_seqlen_q, num_splits, window_left, softcap)  # fmt: skip


def flashinfer_attention_impl(
    q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
    window_left=-1, softcap=0.0,
) -> torch.Tensor:  # fmt: skip
    """What :func:`flashinfer_attention` runs (called directly where :func:`~.common.dispatch_free`: the
    dispatcher's custom-op path cost 150-600 us of host time a call on the H200, ``scripts/diag_prefill.py``)."""
    args = (q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q,
            window_left, softcap)
    if q.is_cuda and q.device.index != torch.cuda.current_device():
        # FlashInfer's wrappers run on the current device's stream: make q's device current.
        with torch.cuda.device(q.device):
            return _flashinfer_attention(*args)
    return _flashinfer_attention(*args)


def _flashinfer_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale,
                          max_seqlen_q, window_left, softcap):  # fmt: skip
    fi = deps.flashinfer_module()
    if fi is None:
        raise RuntimeError("flashinfer backend: expected the flashinfer package to be importable, got ImportError")
    if block_table is not None:
        from . import flashinfer_paged as paged

        problem = paged.paged_layout_problem(k_cache, v_cache, block_table)
    else:
        problem = layout_problem(k_cache, v_cache, decode=cu_seqlens_q is None)
    if problem is not None:
        raise ValueError(f"flashinfer backend: expected {problem}")
    if cu_seqlens_q is None:
        if block_table is not None:
            return paged.paged_decode(fi, _workspace(q.device), q, k_cache, v_cache, cache_seqlens, slots,
                                      block_table, scale, window_left, softcap)  # fmt: skip
        return _decode(fi, q, k_cache, v_cache, cache_seqlens, slots, scale, window_left, softcap)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        # The prefill plans need the lengths on the host, which a capture cannot read.
        if not deps.triton_usable(q.device):
            raise RuntimeError("flashinfer prefill inside a CUDA-graph capture: expected host-readable lengths "
                               "or triton for the fallback, got neither")  # fmt: skip
        from .triton_backend import triton_attention

        return triton_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal,
                                scale, max_seqlen_q, 0, window_left, softcap)  # fmt: skip
    if block_table is not None:
        return paged.paged_prefill(fi, _workspace(q.device), _prefill_backend(q.device), q, k_cache, v_cache,
                                   cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, window_left,
                                   softcap)  # fmt: skip
    out, clean = _ragged(fi, q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, causal, scale, window_left,
                         softcap)  # fmt: skip
    return out if clean else _zero_invalid_rows(out, cache_seqlens, cu_seqlens_q, k_cache, slots)


@flashinfer_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, block_table, causal, scale, max_seqlen_q, num_splits,
      window_left=-1, softcap=0.0):  # fmt: skip
    return torch.empty_like(q)


def flashinfer_supported(q, k_cache, v_cache, *, decode: bool, block_table=None) -> bool:
    """Whether ``flashinfer`` takes these tensors as they are (shapes, dtypes, strides; no value read)."""
    if not (q.is_cuda and deps.has_flashinfer() and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[2] in HEAD_DIMS):  # fmt: skip
        return False
    if block_table is not None:
        from .flashinfer_paged import paged_layout_problem

        return paged_layout_problem(k_cache, v_cache, block_table) is None
    return layout_problem(k_cache, v_cache, decode=decode) is None
