"""``PrefixIndex``: the engine's automatic prefix cache, as a hash chain over full blocks of prompt tokens.

A *block* is ``block_tokens`` prompt tokens: the tokens one page of the KV
layout holds (``KVCache.tokens_per_page``, rounded down) for ``kv="virtual"``,
a block of ``block_size`` tokens for ``kv="paged"``. Block ``i`` of a prompt is
keyed by ``hash((key of block i - 1, its token ids))``, so one key names the
whole prefix up to the end of the block (vLLM's block hashes)::

    prompt   [ t0 .. t15 ][ t16 .. t31 ][ t32 .. t40 ]      block_tokens = 16
    keys      h0 = H(-, b0)  h1 = H(h0, b1)   (partial block: not keyed)

    index    h0 -> {slot 3, slot 7}    h1 -> {slot 3}        (slots that hold the block's K/V)

The index maps each key to the slots whose K/V hold that prefix (a slot that
holds block ``i`` holds blocks ``0 .. i`` too). :meth:`PrefixIndex.lookup`
walks a new prompt's keys while they are indexed and checks the token ids of
the chosen slot (a hash collision never maps wrong K/V). The engine then forks
that slot (``KVCache.fork`` / ``PagedKVCache.fork``: full pages shared, a
partial page copied) and prefills only the rest.

This module is bookkeeping only: which slot holds which blocks, the slots
kept after their request finished (*parked*, least recently used first) and
the hit counters. :class:`torch_vkv.serving.kv.KVManager` owns it and does the
page work.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

__all__ = ["PrefixIndex", "block_keys"]

_ROOT = 0x5EED  # parent key of a prompt's first block


def block_keys(token_ids: Sequence[int], block_tokens: int, start: int = 0, parent: Optional[int] = None) -> list[int]:
    """Hash-chain keys of the full blocks of ``token_ids`` from block ``start`` on.

    ``parent``: the key of block ``start - 1`` (``None`` for ``start == 0``).
    Python's ``hash`` of a tuple of ints is deterministic (no per-process salt).
    """
    keys = []
    key = _ROOT if parent is None else parent
    for b in range(start, len(token_ids) // block_tokens):
        key = hash((key, tuple(token_ids[b * block_tokens : (b + 1) * block_tokens])))
        keys.append(key)
    return keys


class PrefixIndex:
    """Which slots hold which full prompt blocks; parked slots in LRU order; hit counters.

    Args:
        block_tokens: tokens per block (>= 1), the caching granularity.
    """

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._holders: dict[int, dict[int, None]] = {}  # key -> slots (insertion-ordered set)
        self._keys: dict[int, list[int]] = {}  # slot -> keys of its indexed blocks, in order
        self._tokens: dict[int, Sequence[int]] = {}  # slot -> the token ids its blocks hold
        self._parked: OrderedDict[int, None] = OrderedDict()  # least recently used first
        #: Tokens of admitted prefills that were looked up / found in the cache.
        self.query_tokens = 0
        self.hit_tokens = 0

    # ----------------------------------------------------------------- index
    def num_blocks(self, slot: int) -> int:
        """Blocks of ``slot`` in the index."""
        return len(self._keys.get(slot, ()))

    def add(self, slot: int, token_ids: Sequence[int], keys: Sequence[int]) -> None:
        """Indexes blocks ``num_blocks(slot) .. len(keys) - 1`` of ``slot``, whose K/V
        hold ``token_ids`` (the list is kept, not copied: it must not change below
        ``len(keys) * block_tokens``)."""
        have = self._keys.setdefault(slot, [])
        self._tokens[slot] = token_ids
        for key in keys[len(have) :]:
            self._holders.setdefault(key, {})[slot] = None
            have.append(key)

    def remove(self, slot: int) -> None:
        """Drops every block of ``slot`` from the index (and the slot from the parked list)."""
        for key in self._keys.pop(slot, ()):
            holders = self._holders[key]
            del holders[slot]
            if not holders:
                del self._holders[key]
        self._tokens.pop(slot, None)
        self._parked.pop(slot, None)

    def lookup(self, token_ids: list[int], keys: Sequence[int]) -> tuple[Optional[int], int]:
        """The slot holding the longest indexed prefix of ``token_ids`` and that
        prefix's length in tokens (a multiple of ``block_tokens``); ``(None, 0)``
        on a miss. ``keys``: :func:`block_keys` of (a prefix of) ``token_ids``.
        Token lists (here and in :meth:`add`) are Python lists."""
        lo, hi = 0, len(keys)
        while lo < hi:  # keys of a chain are indexed as a prefix: bisect the longest one
            mid = (lo + hi + 1) // 2
            if keys[mid - 1] in self._holders:
                lo = mid
            else:
                hi = mid - 1
        B = self.block_tokens
        for n in range(lo, 0, -1):  # verify the token ids; step back on a (rare) collision
            for slot in self._holders.get(keys[n - 1], ()):
                if self._tokens[slot][: n * B] == token_ids[: n * B]:  # lists
                    return slot, n * B
        return None, 0

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        """Counts one admitted prefill: ``query_tokens`` looked up, ``hit_tokens`` reused."""
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    # ---------------------------------------------------------------- parked
    def park(self, slot: int) -> None:
        """Marks ``slot`` (its request finished) as kept for its blocks: most recently used."""
        self._parked[slot] = None
        self._parked.move_to_end(slot)

    def touch(self, slot: int) -> None:
        """A hit in a parked ``slot``: it becomes the most recently used."""
        if slot in self._parked:
            self._parked.move_to_end(slot)

    def is_parked(self, slot: int) -> bool:
        return slot in self._parked

    @property
    def parked(self) -> list[int]:
        """Parked slots, least recently used first."""
        return list(self._parked)

    def lru(self, exclude: Optional[int] = None) -> Optional[int]:
        """The least recently used parked slot other than ``exclude``, or ``None``."""
        return next((s for s in self._parked if s != exclude), None)
