"""Writes through a cache view into pages that another slot maps (a fork's or remap's shared prefix) are refused.

``KVCache`` registers each of its reservations here (by base address, weakly); ``VirtualKVView._check_write``
asks :func:`check_shared_write` after the committed check. A shared page holds rows of several slots at once,
so a write there would change every slot that maps it (docs/design.md, "Shared pages": read-only). Only the
pages of a slot that another slot maps now count (``_page_refs`` above 1): once the sharing ends the rows are
the slot's own again. Writes the library makes itself (``append_kv``, fork's and remap's copies) go through
plain tensors and are not checked here.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

from torch_vkv._checks import Described, fail

__all__ = ["check_shared_write", "register"]

_OWNERS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def register(cache: Any, reservations: Sequence[Any]) -> None:
    """Names ``cache`` as the owner of the slots of ``reservations`` (one per buffer)."""
    for res in reservations:
        _OWNERS[res.base] = cache


def shared_pages(cache: Any, slot: int) -> int:
    """Leading pages of ``slot`` (per buffer) that some of them another slot maps: up to the last such."""
    ids = cache._shared_ids[slot]
    refs = cache._page_refs
    for i in range(len(ids) - 1, -1, -1):
        if refs.get(ids[i], 0) > 1:
            return i + 1
    return 0


def check_shared_write(view: Any, slots: Sequence[int], lo: int, hi: int) -> None:
    """Raises ``ValueError`` if rows ``[lo, hi)`` of any of ``slots`` of ``view`` touch a page another slot maps."""
    cache = _OWNERS.get(view.source.reservation.base)
    if cache is None or not cache._page_refs or getattr(cache, "_closed", True):
        return
    offset, slot_bytes, row_bytes, _ = view._row_layout()
    ps = view.source.page_size
    for slot in slots:
        n = shared_pages(cache, slot)
        if not n:
            continue
        base = offset + slot * slot_bytes  # byte of the slot's row 0 in the reservation
        end = (slot * cache.pages_per_slot + n) * ps  # end of the slot's shared pages
        if base + lo * row_bytes < end:
            first = max(0, -(-(end - base) // row_bytes))
            fail(f"rows written in slot {slot}", f"rows >= {first} (rows below lie in pages this slot shares with "
                 "another slot through fork, remap or a cached prefix: read-only; remap or decommit the slot "
                 "below them first)", Described(f"rows [{lo}, {hi})"))  # fmt: skip
