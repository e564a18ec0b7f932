"""Sliding windows of :class:`~torch_vkv.KVCache`: the pages a windowed layer gives back.

A layer with a sliding window of W tokens needs, after a step to length L,
only rows >= L - W (the next query, at L, sees keys from L - W + 1). Its
buffers then hold pages ``[first, committed)`` of a slot instead of
``[0, committed)``: ``_first_pages[g, slot]`` per group g of buffers sharing a
window; every other buffer, and the page count ``_committed_pages``, stay as
without windows. The per-step trim runs in the C++ slot table
(``SlotTable.trim_windows``, only on a step where some window crosses a page);
this module holds what the rest of the cache needs to know about windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from torch_vkv._checks import check_int, fail
from torch_vkv._lifetime import locked

if TYPE_CHECKING:
    from torch_vkv.cache import KVCache


class _WindowMixin:
    """Window bookkeeping of :class:`~torch_vkv.KVCache` (see the module docstring)."""

    def _init_windows(self: "KVCache") -> None:
        """Buffer groups and first pages, from the slot table (``_slots``, already built)."""
        self._window_sizes = np.array(self._slots.window_sizes, dtype=np.int64)  # [G]
        self._windowed = bool(len(self._window_sizes))
        # Group of each buffer (K and V of layer l are buffers 2l and 2l + 1), -1: global.
        self._buffer_group = list(self._slots.buffer_groups)
        self._group_buffers = [
            [self._reservations[i] for i, g in enumerate(self._buffer_group) if g == gi]
            for gi in range(len(self._window_sizes))
        ]

    @locked
    def window_start(self: "KVCache", layer: int) -> np.ndarray:
        """First row of each slot that ``layer`` still holds (int64 ``[max_batch_size]``): the
        rows below it were given back behind the layer's sliding window; 0 for a global layer."""
        self._check_open()
        layer = check_int("layer", layer, low=0, high=self.num_layers - 1)
        self._join_async()
        g = self._buffer_group[2 * layer if self.layout == "per_layer" else 0] if self._windowed else -1
        if g < 0:
            return np.zeros(self.max_batch_size, dtype=np.int64)
        return -(-self._first_pages[g] * self.page_size // self.bytes_per_token_buffer)

    @property
    def windowed(self: "KVCache") -> bool:
        """Whether some buffer gives back the pages behind a sliding window: then :meth:`window_start`
        can be above 0 and ``fork``/``remap`` are refused. False for an ``interleaved`` cache with a
        global layer (its pages hold every layer of a token, so none goes) and without ``sliding_window``."""
        return self._windowed

    def _buffer_windows(self: "KVCache") -> list[int]:
        """The window of each buffer for the slot table (0: keeps every page). ``per_layer``: its
        layer's. ``interleaved``: its one buffer holds every layer of a token, so a page goes only
        once no layer needs it: the largest window when every layer slides, else 0."""
        if self.layout == "per_layer":
            return [self.sliding_window[i // 2] or 0 for i in range(len(self._buffers))]
        if any(w is None for w in self.sliding_window):
            return [0]
        return [max(self.sliding_window)]

    def _decommit_windowed(self: "KVCache", slot: int, keep_pages: int, fence: Any) -> None:
        """``_decommit_slot`` when some buffers start at a later page: each buffer gives back
        its committed pages from ``keep_pages`` on."""
        end = int(self._committed_pages[slot])
        for res, g in zip(self._reservations, self._buffer_group):
            lo = keep_pages if g < 0 else max(keep_pages, int(self._first_pages[g, slot]))
            if end > lo:
                res.decommit(slot * self.pages_per_slot + lo, end - lo, fence)
        np.minimum(self._first_pages[:, slot], keep_pages, out=self._first_pages[:, slot])

    def _held_pages(self: "KVCache", slot: int) -> int:
        """Pages committed for ``slot`` in all buffers together."""
        held = int(self._committed_pages[slot]) * len(self._buffers)
        if self._windowed:
            held -= sum(int(self._first_pages[g, slot]) * len(b) for g, b in enumerate(self._group_buffers))
        return held

    def _held_pages_sum(self: "KVCache", slots: Sequence[int]) -> int:
        """:meth:`_held_pages` summed over ``slots``, in NumPy (a scheduler asks
        for all freed slots every iteration)."""
        if not slots:
            return 0
        idx = np.asarray(slots, dtype=np.intp)
        held = int(self._committed_pages[idx].sum()) * len(self._buffers)
        if self._windowed:
            held -= sum(int(self._first_pages[g, idx].sum()) * len(b) for g, b in enumerate(self._group_buffers))
        return held

    def _window_committed_pages(self: "KVCache") -> int:
        total = 0
        for g, bufs in enumerate(self._group_buffers):
            total += int((self._committed_pages - self._first_pages[g]).sum()) * len(bufs)
        return total

    def _check_window_crop(self: "KVCache", slot: int, keep: int) -> None:
        """A crop to ``keep`` tokens must leave every windowed layer the rows its next query reads."""
        if not self._windowed or keep == 0:
            return
        for g, w in enumerate(self._window_sizes.tolist()):
            first_row = -(-int(self._first_pages[g, slot]) * self.page_size // self.bytes_per_token_buffer)
            if first_row > max(0, keep - w):
                fail(f"keep_tokens of slot {slot}", f"0 or at least {first_row + w} (its layers with a "
                     f"{w}-token window gave back the rows below {first_row})", keep)  # fmt: skip


#: The slot table takes windows as int64.
_INT64_MAX = (1 << 63) - 1


def parse_windows(sliding_window: Any, num_layers: int) -> list[int | None]:
    """``sliding_window`` -> one entry per layer (``None``: a global layer)."""
    if sliding_window is None:
        return [None] * num_layers
    if isinstance(sliding_window, (Sequence, np.ndarray)) and not isinstance(sliding_window, (str, bytes)):
        if len(sliding_window) != num_layers:
            fail("sliding_window", f"an int or a list of {num_layers} entries (one per layer)",
                 list(sliding_window))  # fmt: skip
        windows = [None if w is None else check_int(f"sliding_window[{i}]", w, low=1, high=_INT64_MAX)
                   for i, w in enumerate(sliding_window)]  # fmt: skip
    else:
        windows = [check_int("sliding_window", sliding_window, low=1, high=_INT64_MAX)] * num_layers
    return windows
