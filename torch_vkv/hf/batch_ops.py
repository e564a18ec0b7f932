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
    return (kv.max_batch_size // 2) * kv.num_buffers * kv.page_size


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
    if kv.trims_windows:
        cache._batch_copied_bytes += _gather_windowed(cache, index, old_rows, new_rows)
    elif cache._copy_batch_ops:
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
    windowed = kv.trims_windows
    if not windowed and rows:
        # A row whose new end falls in a page it shares gets its own copy of that page
        # (it appends there next); the others only set their token counts.
        kv.remap(range(len(rows)), range(len(rows)), rows)
    for b in range(cache.max_batch_size):
        keep = rows[b] if b < len(rows) else 0
        kv.decommit(b, keep)  # sets the used tokens to at most `keep`; windowed: keeps what the window needs
        if keep and not windowed:
            kv.commit(b, keep)  # and at least `keep`


def _gather_by_copy(cache: "VirtualKVCache", index: list[int], old_rows: list[int], new_rows: list[int]) -> int:
    """The copying path (no sliding windows): rows are copied, every layer. Returns bytes written."""
    kv = cache._kv
    cache._commit(new_rows)
    new_b, dev = len(index), kv.device
    copied = 0
    for layer in cache.layers:
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


def _gather_windowed(cache: "VirtualKVCache", index: list[int], old_rows: list[int], new_rows: list[int]) -> int:
    """The gather of a cache with sliding-window layers: rows are copied (a windowed layer gave
    back the first pages a remap would share). Returns bytes written.

    Each layer copies the rows its source still holds (from the source's window start). A row
    that gave back rows its new history needs (it was longer than its source, so its window
    starts later) starts over: all its pages go back, and it is committed again from 0, in
    steps of at most a window or a page, each ``KVCache.step`` giving back the pages behind the
    window, so its sliding layers never hold much more than their window."""
    kv = cache._kv
    old_b, new_b = len(old_rows), len(index)
    changed = [b for b in range(new_b) if b >= old_b or index[b] != b]
    windows = {l: w for l, w in enumerate(kv.sliding_window) if w is not None}
    src_start = {l: kv.window_start(l) for l in windows}
    srcs = sorted({index[b] for b in changed})
    saved = {}  # the sources' rows, before any row changes
    for layer in cache.layers:
        st = src_start.get(layer.layer_idx)
        for part, buf in enumerate(layer.buffers()):
            saved[layer.layer_idx, part] = {i: buf[i, (int(st[i]) if st is not None else 0) : old_rows[i]].clone()
                                            for i in srcs}  # fmt: skip
    keep, reset = {}, set()
    for b in changed:
        keep[b] = min(old_rows[b] if b < old_b else 0, new_rows[b])
        if any(int(src_start[l][b]) > max(0, (keep[b] if keep[b] else new_rows[b]) - w) for l, w in windows.items()):
            reset.add(b)  # its windows start past rows its new history reads
    for b in changed:
        # Lowers what the KVCache was told to at most the new length: the commits below then
        # trim the windows from the new history's end, not from this row's old one.
        kv.decommit(b, 0 if b in reset else keep[b])
    chunk = max(max(windows.values()), kv.tokens_per_page)
    level = {b: 0 for b in reset}
    first = True
    while first or any(level[b] < new_rows[b] for b in reset):
        need = np.zeros(kv.max_batch_size, dtype=np.int64)
        for b in reset:
            level[b] = min(level[b] + chunk, new_rows[b])
            need[b] = level[b]
        if first:
            need[[b for b in changed if b not in reset]] = [new_rows[b] for b in changed if b not in reset]
            first = False
        if need.any():
            kv.step(need)
    need = np.zeros(kv.max_batch_size, dtype=np.int64)
    need[changed] = [new_rows[b] for b in changed]
    if need.any():
        kv.step(need)  # every changed row told its new length: pages behind its window go back
    copied = 0
    for layer in cache.layers:
        l = layer.layer_idx
        dst_start = kv.window_start(l) if l in windows else None
        for part, buf in enumerate(layer.buffers()):
            row_bytes = buf[0, 0].numel() * buf.element_size()
            for b in changed:
                i = index[b]
                s0 = int(src_start[l][i]) if l in windows else 0
                lo = max(int(dst_start[b]), s0) if l in windows else 0
                if old_rows[i] > lo:
                    buf[b, lo : old_rows[i]] = saved[l, part][i][lo - s0 :]
                    copied += (old_rows[i] - lo) * row_bytes
    return copied
