"""The places an index writes, and the check of a write through a :class:`~torch_vkv.VirtualKVTensor`.

``VirtualKVView._check_write`` and ``VirtualKVTensor._check_write`` (``torch_vkv/tensor.py``) ask
:func:`slots_and_rows` which leading indices ("slots") and which rows an index of ``Tensor.__setitem__``
or an in-place method addresses, then whether the bytes those places span lie in committed pages.

Costs stay independent of the tensor's size: a slice is kept as a ``range`` (a write to a 1-D tensor of
10**7 elements listed every index before: seconds and a gigabyte), and the bytes of a ``VirtualKVTensor``
are taken from its own strides and storage offset, whatever in-place ``transpose_``/``as_strided_`` made
of them (the check assumed the layout ``VirtualKVTensor.empty`` made, and passed writes that faulted).
"""

from __future__ import annotations

import bisect
import numbers
from typing import Any, Optional, Sequence

import numpy as np
import torch

from torch_vkv._checks import Described, fail

__all__ = ["check_tensor_write", "index_part", "inside_runs", "slots_and_rows"]


def slots_and_rows(index: Any, num_slots: int, num_rows: int, ndim: int = 4) -> tuple[Optional[Sequence[int]], range]:
    """The slots and rows an index of a ``[slots, rows, ...]`` view (``ndim``
    dimensions) touches, from the places that address its first two
    dimensions. Reads every index form ``Tensor.__setitem__`` takes: ints
    (NumPy ints, 0-d integer tensors and arrays), slices, integer or boolean
    tensors, arrays, lists, tuples and ranges (a mask, boolean or uint8 as
    torch takes it, spans as many dimensions as it has), ``Ellipsis`` and ``None``; a Python bool touches
    everything (``True``) or nothing (``False``). Several advanced indexes
    are taken as their cross product, and rows as ``[min, max]``: a superset
    of what is written. The slots are an ascending ``range`` (from a slice, in O(1)) or a list.
    ``(None, ...)`` only for CUDA index tensors (reading them would sync), which are then not checked."""
    parts = index if isinstance(index, tuple) else (index,)
    if any(isinstance(p, (bool, np.bool_)) and not p for p in parts):
        return [], range(0)
    dims: list[Any] = []  # per dimension of the view that the index consumes: a slice or the indices it takes
    ellipsis_at = None
    for part in parts:
        if part is None or isinstance(part, (bool, np.bool_)):
            continue  # a new dimension: addresses nothing
        if part is Ellipsis:
            ellipsis_at = len(dims) if ellipsis_at is None else ellipsis_at
            continue
        taken = index_part(part)
        if taken is None:
            return None, range(0)
        dims.extend(taken)
    if ellipsis_at is not None:  # it spans the dimensions the other parts leave
        dims[ellipsis_at:ellipsis_at] = [slice(None)] * max(0, ndim - len(dims))
    picked: list[Sequence[int]] = []
    for part, size in zip(dims[:2], (num_slots, num_rows)):
        if isinstance(part, slice):
            taken = range(*part.indices(size))
            picked.append(taken[::-1] if taken.step < 0 else taken)  # ascending, still a range
        else:  # out-of-range indices are left to torch, which raises
            picked.append([i + size if i < 0 else i for i in part if -size <= i < size])
    picked += [range(num_slots), range(num_rows)][len(picked):]
    rows = picked[1]
    if not rows:
        return picked[0], range(0)
    low, high = (rows[0], rows[-1]) if isinstance(rows, range) else (min(rows), max(rows))
    return picked[0], range(low, high + 1)


def inside_runs(lo: int, hi: int, runs: list, page_size: int) -> bool:
    """Whether bytes ``[lo, hi)`` lie in one of ``runs`` (merged ``(first page, count)`` ranges, ascending)."""
    i = bisect.bisect_right(runs, (lo // page_size, float("inf"))) - 1
    if i < 0:
        return False
    first, count = runs[i]
    return first * page_size <= lo and hi <= (first + count) * page_size


def index_part(part: Any) -> Optional[list[Any]]:
    """What one non-``None``, non-``Ellipsis`` index part takes in each view
    dimension it consumes: a ``slice`` or a list of ints (``slice(None)``,
    every index, when it is no form torch indexes with: torch then raises).
    ``None`` for a CUDA tensor."""
    if isinstance(part, slice):
        return [part]
    if isinstance(part, numbers.Integral):
        return [[int(part)]]
    if isinstance(part, torch.Tensor):
        if part.device.type != "cpu":
            return None
        arr = part.numpy(force=True) if part.dtype != torch.bfloat16 else None
    else:
        try:
            arr = np.asarray(part)
        except Exception:
            arr = None
    if arr is None or arr.dtype.kind not in "biu":
        return [slice(None)]  # not an index torch writes with: whatever torch does, assume every index
    if arr.dtype.kind == "b" or arr.dtype == np.uint8:  # torch indexes with uint8 as with a mask (deprecated)
        if arr.ndim == 0:  # a 0-d mask: a new dimension, all or nothing (False was handled by the caller)
            return [] if arr else [[]]
        return [[int(i) for i in np.unique(coord)] for coord in np.nonzero(arr)]  # one list per masked dim
    return [[int(i) for i in np.unique(arr)]]


def _runs_of_slots(slots: Sequence[int], merge_gap: int, whole: bool) -> list[tuple[int, int]]:
    """Ascending ``slots`` as runs ``(first, last)`` checked as one byte span each: neighbours at most
    ``merge_gap`` indices apart (their starts at most a page apart: every page between them holds a written
    byte), or adjacent ones when whole rows are written. A range is taken in O(1) when it forms one run;
    else it has at most one index per page (a step past a page), as many as the reservation has pages."""
    if isinstance(slots, range) and (slots.step <= merge_gap or (whole and slots.step == 1)):
        return [(slots[0], slots[-1])]
    spans: list[list[int]] = []
    previous = None
    for i in slots if isinstance(slots, range) else sorted(set(slots)):
        if previous is not None and (i - previous <= merge_gap or (whole and i - previous == 1)):
            spans[-1][1] = i
        else:
            spans.append([i, i])
        previous = i
    return [(first, last) for first, last in spans]


def check_tensor_write(t: Any, index: Any, source: Any) -> None:
    """``VirtualKVTensor._check_write`` once the tensor is known eager and the open ``source`` whose memory
    it views is known (itself, or another after ``set_``): raises ``ValueError`` unless every place that
    ``index`` (``None``: all) writes lies in committed pages of ``source``. Bytes come from the tensor's own
    strides and storage offset: exact for the layout ``empty`` made, a superset for any other."""
    reservation, page_size = source.reservation, source.page_size
    shape, strides = tuple(t.shape), tuple(t.stride())
    if not shape:  # 0-d (an in-place reshape of a one-element tensor): one element
        shape, strides = (1,), (1,)
    slots, rows = slots_and_rows(index, shape[0], shape[1] if len(shape) > 1 else 1, len(shape))
    if not slots or not rows or not t.numel():
        return
    esz, offset = t.element_size(), t.storage_offset()
    if len(shape) > 1:
        row_stride, extent = strides[1], 1 + sum((n - 1) * st for n, st in zip(shape[2:], strides[2:]))
        whole = rows.start == 0 and rows.stop == shape[1]
    else:
        row_stride, extent, whole = 0, 1, True
    step_bytes = strides[0] * esz
    merge_gap = page_size // step_bytes if step_bytes else shape[0]  # stride 0: every slot at one place
    runs = reservation.inherited_ranges() if reservation.forked else reservation.committed_ranges()  # merged
    for first, last in _runs_of_slots(slots, merge_gap, whole):
        lo = (offset + first * strides[0] + rows.start * row_stride) * esz
        hi = (offset + last * strides[0] + (rows.stop - 1) * row_stride + extent) * esz
        if not inside_runs(lo, hi, runs, page_size):
            where = f"[{first}]" if first == last else f"[{first}:{last + 1}]"
            where += f", rows [{rows.start}, {rows.stop})" if len(shape) > 1 else ""
            fail(f"{type(t).__name__} write", "places in committed pages (commit them first: t.commit(...))",
                 Described(f"index {where}: bytes [{lo}, {hi}) of the reservation"))  # fmt: skip
