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
  other kernels, so the GPU idles through every layer's host work. The layout
  and the device tensors made from it (the moved query rows' order) are kept
  for the layers of a step too (:class:`_StepLayout`). Invalid requests (a slot
  outside the cache, a length out of range, query offsets outside the rows
  given) get no query row in the plan and zero output rows, so bad metadata
  never makes FlashInfer read or write past ``q``; when every request is valid
  FA3's tail zeroing uses the tensors as given. Under CUDA-graph capture such a
  step runs the Triton kernels instead.

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
made by :func:`~torch_vkv._graph_pools.outside_graph_pools` (under CUDA-graph
trees, in a helper thread on a side stream), as is FlashInfer's own scratch
(:func:`with_flashinfer_scratch`): a first call inside ``torch.compile``'s
CUDA-graph warm-up would otherwise put them in the graph's private pool, which
the trees refuse ("tensors in the cudagraph pool not tracked as outputs"). The
trees route the allocations of the warming thread (torch 2.11 and 2.13),
whatever its stream.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, TypeVar

import torch

from .._graph_pools import outside_graph_pools
from . import deps
from .common import ATTN_SCHEMA, flat_rows, flatten
from .host_values import host_values
from .flashinfer_pages import (  # noqa: F401  (re-exported: the decode page table is part of this backend)
    DECODE_PAGE_ROWS, MIN_DECODE_PAGE_ROWS, GraphDecodePlan, decode_max_pages, decode_page_entries_reference,
    decode_page_rows, decode_page_table, decode_pages,
)

__all__ = ["DECODE_PAGE_ROWS", "FA3_TILE", "decode_max_pages", "decode_page_rows", "decode_page_table", "decode_pages", "fa3_tail_fits", "layout_problem", "ragged_layout", "flashinfer_attention"]

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


def ragged_layout(lengths: list, cu_seqlens_q: list, slots: list, s_pad: int, num_slots: int, max_len: int,
                  total_q: Optional[int] = None) -> tuple:
    """Host metadata of FlashInfer's ragged prefill over the flattened cache rows.

    Valid requests are visited in slot order; request ``r`` becomes a *pseudo
    request* with its query rows and keys ``[slots[r] * s_pad, slots[r] * s_pad +
    lengths[r])``; the rows before it not owned by the previous one become a gap
    pseudo request with no query rows (no work). Invalid requests (slot out of
    range, length below its new tokens or above ``max_len``, query rows outside
    ``[0, total_q)``) are left out: no query row, no key.

    Parameters
    ----------
    lengths : ``[R]`` ints, keys per request (new tokens included).
    cu_seqlens_q : ``[R + 1]`` ints, query row offsets.
    slots : ``[R]`` ints, the cache row of each request.
    s_pad, num_slots, max_len : rows between two slots, slots, and rows usable per slot.
    total_q : query rows given (``cu_seqlens_q[-1]`` when None).

    Returns
    -------
    qo_indptr, kv_indptr : lists of ints, ``[P + 1]`` each, non-decreasing.
    q_order : the query rows in pseudo-request order, or None when that is every row in order
        (``range(total_q)``); rows of no valid request are in neither (their output is zero).
    valid : list of bools ``[R]``.

    Raises
    ------
    ValueError : two valid requests share a slot (their rows would overlap).
    """
    R = len(lengths)
    cu = cu_seqlens_q
    total = cu[R] if total_q is None else total_q
    n = [cu[r + 1] - cu[r] for r in range(R)]
    valid = [0 <= slots[r] < num_slots and 0 <= cu[r] <= cu[r + 1] <= total and n[r] <= lengths[r] <= max_len
             for r in range(R)]  # fmt: skip
    order = sorted((r for r in range(R) if valid[r]), key=lambda r: slots[r])
    for a, b in zip(order, order[1:]):
        if slots[a] == slots[b]:
            raise ValueError(f"flashinfer prefill: expected distinct slots (contiguous rows per request), "
                             f"got requests {a} and {b} both in slot {slots[a]}")  # fmt: skip
    qo, kv, pos, next_row, identity = [0], [0], 0, 0, True
    for r in order:
        start = slots[r] * s_pad
        if start > pos:  # gap request: rows nobody attends to
            qo.append(qo[-1])
            kv.append(start)
        pos = start + lengths[r]
        qo.append(qo[-1] + n[r])
        kv.append(pos)
        if n[r] > 0:  # the query rows are in order while each request's start where the last one's end
            identity = identity and cu[r] == next_row
            next_row = cu[r + 1]
    identity = identity and next_row == total  # and no row is left to an invalid request
    # O(R) unless rows must move: listing every row costed ~0.5 ms of host time a call at 8K rows (measured).
    q_order = None if identity else [i for r in order for i in range(cu[r], cu[r + 1])]
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

T = TypeVar("T")

_WORKSPACE: dict = {}  # device -> FlashInfer float workspace (shared: used only during a run, one stream)
_DECODE: dict = {}  # (device, R, shapes, options) -> _DecodePlan
# (device, fa backend, shapes, dtype, causal, window, softcap) -> [wrapper, last plan key, event after its plan].
# One wrapper per kind of layer: a model alternating sliding and global layers would re-plan one wrapper at
# every layer, and plan() writes a pinned host buffer whose copy to the GPU is only queued.
_RAGGED: dict = {}
_LAYOUT: dict = {}  # device -> (metadata key, _StepLayout) of the last prefill step


def _flashinfer_scratch(num_qo_heads: int, device: torch.device) -> None:
    """FlashInfer's process-wide scratch tensors that its wrappers' ``run()`` make on first use and
    keep: the ALiBi slopes of ``num_qo_heads`` heads (0.7 makes them on every prefill run, ALiBi or
    not). Made here, called inside :func:`~torch_vkv._graph_pools.outside_graph_pools`, they do not
    land in the pool of a CUDA-graph warm-up that runs a wrapper first."""
    fi = deps.flashinfer_module()
    utils = sys.modules.get(f"{getattr(fi, '__name__', '')}.utils")
    make = getattr(utils, "_get_cache_alibi_slopes_buf", None)
    if make is not None:  # other FlashInfer versions: nothing known to make
        make(num_qo_heads, device)


def with_flashinfer_scratch(device: torch.device, num_qo_heads: int, make: Callable[[], T]) -> T:
    """``make()`` outside any CUDA graph's pool, FlashInfer's scratch for ``num_qo_heads`` heads first."""

    def both() -> T:
        _flashinfer_scratch(num_qo_heads, device)
        return make()

    return outside_graph_pools(device, both)


def replan(holder: list, plan_key: tuple, device: torch.device, num_qo_heads: int, plan: Callable[[], None]) -> None:
    """``plan()`` (a prefill wrapper's host plan) where ``plan_key`` differs from the last one
    (``holder``: ``[wrapper, last plan key, event after the last plan's copies]``; the layers of a step
    share a plan): after the copy that the last plan queued, outside graph pools, FlashInfer's scratch
    first (:func:`with_flashinfer_scratch`)."""
    if holder[1] == plan_key:
        return
    if holder[2] is not None:
        # plan() rewrites the pinned host buffer whose copy the last plan only queued: wait for that copy.
        holder[2].synchronize()

    def planned() -> Optional[torch.cuda.Event]:
        plan()
        if device.type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record()  # on the plan's stream, after its copies
        return done

    holder[2] = with_flashinfer_scratch(device, num_qo_heads, planned)
    holder[1] = plan_key


def _workspace(device: torch.device) -> torch.Tensor:
    ws = _WORKSPACE.get(device)
    if ws is None:
        ws = _WORKSPACE[device] = outside_graph_pools(
            device, lambda: torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device))
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
        plan = table[key] = with_flashinfer_scratch(q.device, q.shape[1], make)
    return plan


def _decode(fi, q, k_cache, v_cache, cache_seqlens, slots, scale, window_left, softcap):
    R = cache_seqlens.shape[0]
    # The page size is part of the key: it depends on the storage's size too (two caches of one shape may differ).
    key = (q.device, R, tuple(k_cache.shape), k_cache.stride(), q.shape[1], q.dtype, scale, window_left, softcap,
           decode_page_rows(k_cache))
    plan = decode_plan(_DECODE, key, q, f"{R} requests, cache {tuple(k_cache.shape)}",
                       lambda: _DecodePlan(fi, q, k_cache, R, scale, window_left, softcap))
    # Device metadata is never read: a bad request attends to no key (length 0, slot 0).
    return plan.run(q, k_cache, v_cache, cache_seqlens, slots)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device`` without a sync (a pageable host-to-device copy waits for the stream),
    outside graph pools: the step's layout keeps it."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    # The host allocator keeps the pinned copy until the copy ran.
    return outside_graph_pools(device, lambda: t.pin_memory().to(device, non_blocking=True))


class _StepLayout:
    """One step's ragged layout and the device tensors made from it, shared by the layers of the
    step (same metadata values): listing the moved query rows and copying them cost host time and
    a sync per layer otherwise."""

    def __init__(self, lengths, cu, slot_list, s_pad, k_cache, T, dev):
        qo, kv, q_order, self.valid = ragged_layout(lengths, cu, slot_list, s_pad, k_cache.shape[0], k_cache.shape[1],
                                                    T)  # fmt: skip
        self.qo, self.kv = tuple(qo), tuple(kv)  # the plan's key too: made once, not per layer
        self.lengths, self.slot_list = lengths, slot_list
        self.order = None if q_order is None else _to_device(q_order, torch.long, dev)
        self.all_valid = all(self.valid)
        self._fa3 = None
        self._dev = dev

    def fa3_rows(self) -> tuple:
        """``(lengths, slots)`` on the device with invalid requests at length 0 in slot 0 (no tail)."""
        if self._fa3 is None:
            lens = [n if ok else 0 for n, ok in zip(self.lengths, self.valid)]
            rows = [s if ok else 0 for s, ok in zip(self.slot_list, self.valid)]
            self._fa3 = (_to_device(lens, torch.int32, self._dev), _to_device(rows, torch.int32, self._dev))
        return self._fa3


def _step_layout(dev, host, lengths, cu, slot_list, s_pad, k_cache, T) -> _StepLayout:
    key = (tuple(host), s_pad, k_cache.shape[0], k_cache.shape[1], T)
    last = _LAYOUT.get(dev)
    if last is None or last[0] != key:
        last = _LAYOUT[dev] = (key, _StepLayout(lengths, cu, slot_list, s_pad, k_cache, T, dev))
    return last[1]


def _ragged(fi, q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, causal, scale, window_left, softcap):
    """FlashInfer's ragged prefill ``[T, H, D]``; rows of invalid requests (see :func:`ragged_layout`) are zero."""
    dev, R, T = q.device, cache_seqlens.shape[0], q.shape[0]
    s_pad = flat_rows(k_cache)
    parts = [cache_seqlens, cu_seqlens_q] + ([slots] if slots is not None else [])
    host = metadata_on_host(parts)
    lengths, cu = host[:R], host[R : 2 * R + 1]
    slot_list = host[2 * R + 1 :] if slots is not None else list(range(R))
    layout = _step_layout(dev, host, lengths, cu, slot_list, s_pad, k_cache, T)
    backend = _prefill_backend(dev)
    if backend == "fa3" and (window_left >= 0 or not fa3_tail_fits(k_cache, lengths, slot_list, layout.valid)):
        backend = "fa2"  # see the module docstring: FA3's tile reads past the keys are not safe here
    H, H_kv, D = q.shape[1], k_cache.shape[2], q.shape[2]
    kind = (dev, backend, H, H_kv, D, q.dtype, causal, window_left, softcap)
    holder = _RAGGED.get(kind)
    if holder is None:
        workspace = _workspace(dev)
        holder = _RAGGED[kind] = [outside_graph_pools(
            dev, lambda: fi.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=backend)), None, None]
    wrapper = holder[0]
    replan(holder, (layout.qo, layout.kv, scale), dev, H, lambda: wrapper.plan(
        torch.tensor(layout.qo, dtype=torch.int32), torch.tensor(layout.kv, dtype=torch.int32), H, H_kv, D,
        causal=causal, window_left=window_left, logits_soft_cap=softcap, sm_scale=scale, q_data_type=q.dtype,
        kv_data_type=k_cache.dtype))  # fmt: skip
    if backend == "fa3":
        if layout.all_valid:  # the tensors as given (no host-to-device copy)
            lens = cache_seqlens.to(torch.int32)
            rows = slots.to(torch.int32) if slots is not None else torch.arange(R, dtype=torch.int32, device=dev)
        else:
            lens, rows = layout.fa3_rows()
        # The launcher itself: inside this op, the zero_tail op's dispatch would only add host time.
        deps.triton_kernels().zero_tail(k_cache, v_cache, lens, multiple=FA3_TILE, limit=k_cache.shape[1], slots=rows,
                                            any_tile=True)
    kf, vf = flatten(k_cache, s_pad), flatten(v_cache, s_pad)
    if layout.order is None:  # every query row planned in place
        return wrapper.run(q.contiguous(), kf, vf)
    out = torch.zeros_like(q)  # rows of invalid requests stay zero
    if layout.order.numel():
        out[layout.order] = wrapper.run(q.index_select(0, layout.order), kf, vf)
    return out


# No mutated argument in the schema although FA3 zeroes rows past each length: those rows hold no key of
# any request (appends overwrite them), so no reader sees a change; declaring the caches mutated would make
# functionalization copy them whole around every call under torch.compile.
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
    return _ragged(fi, q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, slots, causal, scale, window_left, softcap)


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
