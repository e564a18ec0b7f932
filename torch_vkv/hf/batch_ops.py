"""Batch operations of a :class:`~torch_vkv.hf.VirtualKVCache`: rows take other rows' histories.

``reorder_cache`` (beam search, every step), ``batch_repeat_interleave`` and
``batch_select_indices`` are one operation: new row ``b`` takes old row
``index[b]``. Row ``b`` is always slot ``b`` of the one :class:`KVCache`, so
this is :meth:`KVCache.remap`: the source's full pages are mapped into the
destination and only its partly filled last page is copied; rows that keep
their own history (``index[b] == b``) do nothing, and pages two rows already
share (the prompt, after the first beam step) are not touched again::

    before (beam 1 <- beam 0)        after
    row 0  |P0|P1|a2|                row 0  |P0|P1|a2|
    row 1  |P0|P1|b2|                row 1  |P0|P1|a2'|   a2' = copy of a2's rows, P = shared pages

Shared pages are read-only: decoding appends past them, and a crop into them
(:func:`shrink`) first gives the row its own copy of the page at its new end.

Copies instead of remaps (the old path, kept for comparison and as the
fallback): caches with sliding-window layers (a windowed layer gave back the
first pages a remap would share; :meth:`KVCache.remap` refuses them), and
``cache._copy_batch_ops = True`` (what ``python -m torch_vkv bench hf --beam``
compares against). Both count the bytes they write into the cache in
``memory_stats()["batch_copied_bytes"]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from torch_vkv._checks import Described, fail

if TYPE_CHECKING:  # pragma: no cover
    from torch_vkv.hf.cache import VirtualKVCache

__all__ = ["gather", "row_index", "shrink", "staging_bytes"]


def staging_bytes(kv: Any) -> int:
    """Bytes a reorder may hold beyond the pages of the rows: each cycle of the
    permutation stages one member, which holds one page per buffer more until its
    reader has copied (:meth:`KVCache.remap`), and a batch has at most
    ``max_batch_size // 2`` cycles. Without them a budget of exactly a static
    allocation's size fails beam search once the beams fill every page of their rows."""
    return (kv.max_batch_size // 2) * len(kv._buffers) * kv.page_size


def row_index(what: str, indices: Any, batch: int, *, allow_mask: bool) -> list[int]:
    """``indices`` as a list of rows: a 1-D integer tensor or sequence (an empty one: no
    rows), or (``allow_mask``) a bool mask of one entry per row. Checked because ``int()``
    takes anything: a bool ``beam_idx`` became rows 1/0, a float 1.5 row 1, and a short
    mask dropped rows, all silently, where ``DynamicCache``'s ``index_select`` / indexing raise."""
    kinds = "integer row indices or a bool mask" if allow_mask else "integer row indices"
    try:
        idx = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError):  # None, a slice, a ragged list: not indices at all
        fail(what, f"a 1-D tensor or sequence of {kinds}", Described(f"a {type(indices).__name__}: {indices!r}"),
             TypeError)  # fmt: skip
    if idx.dim() != 1:
        fail(what, "a 1-D tensor of row indices", Described(f"shape {tuple(idx.shape)}"))
    # uint8 is a mask to torch's indexing (DynamicCache's batch_select_indices), never row numbers.
    is_mask = idx.dtype in (torch.bool, torch.uint8)
    if is_mask and allow_mask:
        if idx.numel() != batch:
            fail(what, f"a bool mask of {batch} entries (one per row)", idx.numel())
        idx = idx.nonzero().flatten()
    elif idx.numel() and (is_mask or idx.is_floating_point() or idx.is_complex()):
        fail(what, kinds, Described(f"dtype {idx.dtype}"), TypeError)
    return [int(i) for i in idx.tolist()]


def gather(cache: "VirtualKVCache", index: list[int]) -> None:
    """New row ``b`` = old row ``index[b]``, for every layer; rows past ``len(index)`` are emptied."""
    cache._check_open()
    lengths = cache._lengths
    old_rows, seq = lengths.rows(), lengths.seq_length()
    old_b = len(old_rows)
    for i in index:
        if not -old_b <= i < old_b:
            fail("row index", f"an int in [-{old_b}, {old_b}) (a row of the batch; negative: from the end)", i)
    index = [i % old_b for i in index]
    new_b = len(index)
    if new_b > cache.max_batch_size:
        fail("batch size after the batch operation", f"at most max_batch_size={cache.max_batch_size}", new_b)
    if index == list(range(old_b)):
        return
    new_rows = [old_rows[i] for i in index]
    kv = cache._kv
    if cache._copy_batch_ops or _windowed(kv):
        cache._batch_copied_bytes += _gather_by_copy(cache, index, old_rows, new_rows)
    else:
        cache._batch_copied_bytes += kv.remap(range(new_b), index, new_rows)
    lengths.set(new_rows, seq)
    cache._step = None
    shrink(cache, new_rows)


def shrink(cache: "VirtualKVCache", rows: list[int]) -> None:
    """Rows ``b`` keep ``rows[b]`` tokens (rows past them none): pages beyond are
    decommitted and the KVCache's per-slot counts are set to the new lengths."""
    kv = cache._kv
    windowed = _windowed(kv)
    if not windowed and rows:
        # A row whose new end falls in a page it shares gets its own copy of that page
        # (it appends there next); the others only set their token counts.
        kv.remap(range(len(rows)), range(len(rows)), rows)
    for b in range(cache.max_batch_size):
        keep = rows[b] if b < len(rows) else 0
        kv.decommit(b, keep)  # sets the used tokens to at most `keep`; windowed: keeps what the window needs
        if keep and not windowed:
            kv.commit(b, keep)  # and at least `keep`


def _windowed(kv: Any) -> bool:
    return any(w is not None for w in kv.sliding_window)


def _gather_by_copy(cache: "VirtualKVCache", index: list[int], old_rows: list[int], new_rows: list[int]) -> int:
    """The copying path: rows are copied, every layer. Returns bytes written."""
    kv = cache._kv
    cache._commit(new_rows)
    new_b, dev = len(index), kv.device
    copied = 0
    for layer in cache.layers:
        start = kv.window_start(layer.layer_idx)
        if start.any():  # a sliding layer gave rows back: copy from each row's window start
            copied += _gather_window(layer, index, old_rows, start)
            continue
        for buf in layer.buffers():
            row_bytes = buf[0, 0].numel() * buf.element_size()
            if len(set(old_rows)) == 1:  # one gather for the whole batch
                n = old_rows[0]
                if n:
                    buf[:new_b, :n] = buf[torch.tensor(index, device=dev), :n]
                    copied += new_b * n * row_bytes
            else:  # ragged rows (vkv after left padding): row by row
                saved = {i: buf[i, : old_rows[i]].clone() for i in set(index)}
                for b, i in enumerate(index):
                    buf[b, : old_rows[i]] = saved[i]
                    copied += old_rows[i] * row_bytes
    return copied


def _gather_window(layer: Any, index: list[int], old_rows: list[int], start: np.ndarray) -> int:
    """``_gather_by_copy`` for a sliding layer: row ``b`` takes old row ``i``'s rows from
    ``max(start[b], start[i])`` on (rows below ``start`` are not committed). Returns bytes written."""
    for b, i in enumerate(index):
        if start[b] > start[i] and old_rows[i] > start[i]:
            raise NotImplementedError(
                f"VirtualKVCache: row {b} gave back rows below {start[b]} in layer {layer.layer_idx} (sliding "
                f"window), but old row {i} needs them from {start[i]}: expected rows of equal lengths"
            )
    copied = 0
    for buf in layer.buffers():
        row_bytes = buf[0, 0].numel() * buf.element_size()
        saved = {i: buf[i, start[i] : old_rows[i]].clone() for i in set(index)}
        for b, i in enumerate(index):
            lo = max(int(start[b]), int(start[i]))
            if old_rows[i] > lo:
                buf[b, lo : old_rows[i]] = saved[i][lo - int(start[i]) :]
                copied += (old_rows[i] - lo) * row_bytes
    return copied
