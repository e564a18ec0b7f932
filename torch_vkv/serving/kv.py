"""``KVManager``: the engine's slots and pages, over a ``KVCache`` or a ``PagedKVCache``.

The scheduler speaks in slots and token counts; this module turns them into
pages of one of the two caches, so that ``kv="virtual"`` and ``kv="paged"``
differ only here and a comparison isolates KV management:

* ``virtual``: a :class:`torch_vkv.KVCache` (contiguous virtual rows, pages
  committed on demand, deferred reclamation of freed slots); one
  ``step_async`` per iteration commits what the step needs and prefetches the
  next token's pages in the background.
* ``paged``: a :class:`torch_vkv.paged.PagedKVCache` (block pools and a block
  table, blocks of ``block_size`` tokens); ``commit`` per growing request.

Capacity is always counted in *pool pages*: a 2 MiB page (host backend:
``page_size`` bytes) of one buffer for ``virtual`` (a slot's page group costs
one page in each of its ``2 * num_layers`` or 1 buffers), a block of all
layers for ``paged``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from torch_vkv import KVCache

__all__ = ["KVManager"]


class KVManager:
    """Slots and pages for ``num_slots`` requests.

    Args:
        kind: ``"virtual"`` or ``"paged"``.
        num_layers, num_kv_heads, head_dim, dtype, device: the model's KV shape.
        num_slots: slots (concurrent requests, plus engine-internal ones).
        max_seq_len: tokens per slot.
        memory_budget: bytes of KV memory (``None``: a static allocation's size).
        layout, page_size: ``KVCache``'s (virtual only).
        block_size: tokens per block (paged only).
        sliding_window: each layer's window in tokens (``None``: global), or
            ``None`` for none. Virtual ``per_layer`` only: passed to
            ``KVCache(sliding_window=)``, so pages behind a layer's window are
            given back at each :meth:`grow`. The ``interleaved`` layout and
            ``paged`` keep every page (one page or block holds all layers of
            a token, which the global layers still read); the attention applies
            the window in every case.
    """

    def __init__(
        self,
        kind: str,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        memory_budget: Optional[int],
        layout: str = "per_layer",
        page_size: Optional[int] = None,
        block_size: int = 16,
        sliding_window: Optional[list] = None,
    ) -> None:
        self.kind = kind
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.num_layers = num_layers
        itemsize = torch.empty((), dtype=dtype).element_size()
        #: Bytes of one token's K and V in all layers.
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * itemsize
        self.memory_budget = memory_budget
        windowed = sliding_window is not None and any(w is not None for w in sliding_window)
        #: Whether pages behind sliding windows are given back (virtual ``per_layer`` with a window).
        self.gives_back_windows = windowed and kind == "virtual" and layout == "per_layer"
        if kind == "virtual":
            self.cache: Any = KVCache(
                num_layers, num_kv_heads, head_dim, max_batch_size=num_slots, max_seq_len=max_seq_len,
                dtype=dtype, device=device, memory_budget=memory_budget, layout=layout, page_size=page_size,
                sliding_window=sliding_window if self.gives_back_windows else None,
            )  # fmt: skip
            # A page group (one page of a slot in every buffer) costs this many pool pages.
            self._pages_per_group = 2 * num_layers if layout == "per_layer" else 1
            self.page_bytes = self.cache.page_size
            self.total_pages = int(self.cache.memory_stats()["max_pages"])
            self.block_table = None
        else:
            from torch_vkv import PagedKVCache  # imported lazily by the package

            block_bytes = self.bytes_per_token * block_size
            per_slot = -(-max_seq_len // block_size)
            num_blocks = num_slots * per_slot if memory_budget is None else memory_budget // block_bytes
            if num_blocks < 1:
                raise ValueError(
                    f"memory_budget: expected at least one block of {block_size} tokens ({block_bytes} bytes), "
                    f"got {memory_budget}"
                )
            self.cache = PagedKVCache(
                num_layers, num_kv_heads, head_dim, num_blocks=num_blocks, max_batch_size=num_slots,
                max_seq_len=max_seq_len, page_size=block_size, dtype=dtype, device=device,
            )  # fmt: skip
            self._pages_per_group = 1
            self.page_bytes = block_bytes
            self.total_pages = num_blocks
            self.block_table = self.cache.block_table
        self.device = torch.device(device)
        # Tokens each slot is known to have backed (a lower bound for virtual:
        # step_async may prefetch more): the scheduler's estimates read it.
        self._covered = np.zeros(num_slots, dtype=np.int64)
        self._active = np.zeros(num_slots, dtype=bool)
        self._keys = [self.cache.key(l) for l in range(num_layers)]
        self._values = [self.cache.value(l) for l in range(num_layers)]

    # ----------------------------------------------------------------- views
    def key(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys: ``[num_slots, max_seq_len, num_kv_heads, head_dim]``
        (virtual) or the block pool ``[num_blocks, block_size, num_kv_heads, head_dim]`` (paged)."""
        return self._keys[layer]

    def value(self, layer: int) -> torch.Tensor:
        return self._values[layer]

    # ----------------------------------------------------------------- slots
    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free_slots

    def alloc(self) -> int:
        """A free slot (virtual: the one that still holds the most pages)."""
        slot = self.cache.alloc()
        self._active[slot] = True
        self._covered[slot] = self.cache.committed_tokens(slot)
        return slot

    def free(self, slot: int) -> None:
        """Ends the slot's request. Virtual: its pages stay with the slot until
        memory is needed elsewhere (deferred reclamation); paged: blocks return
        to the pool at once."""
        self.cache.free(slot)
        self._active[slot] = False
        if self.kind == "paged":
            self._covered[slot] = 0

    # ----------------------------------------------------------------- pages
    def pages_for(self, num_tokens: int) -> int:
        """Pool pages that tokens ``[0, num_tokens)`` of one slot take."""
        return self.cache.pages_for_tokens(num_tokens) * self._pages_per_group

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether one request of ``num_tokens`` tokens fits in the whole budget."""
        return self.pages_for(num_tokens) <= self.total_pages

    def need_pages(self, slot: Optional[int], num_tokens: int) -> int:
        """Pool pages that growing ``slot`` (``None``: a fresh slot) to
        ``num_tokens`` takes: an upper bound for virtual, exact for paged."""
        have = 0 if slot is None else int(self._covered[slot])
        if num_tokens <= have:
            return 0
        return self.pages_for(num_tokens) - (self.pages_for(have) if have else 0)

    def available_pages(self) -> int:
        """Pool pages a step can still take: free ones, ones not created yet
        and (virtual) pages cached by freed slots. A lower bound for virtual
        (pages whose decommit waits on a fence count only once it completes)."""
        s = self.cache.memory_stats()
        if self.kind == "paged":
            return int(s["free_pages"])
        uncreated = max(0, int(s["max_pages"]) - int(s["pool_pages"]))
        return int(s["free_pages"]) + uncreated + int(s["cached_bytes"]) // self.page_bytes

    def can_grow(self, seq_lens: np.ndarray) -> bool:
        """Whether every slot ``s`` with ``seq_lens[s] > 0`` can hold
        ``seq_lens[s]`` tokens at once (exact). ``seq_lens``: int64 ``[num_slots]``."""
        if self.kind == "virtual":
            return self.cache.can_step(seq_lens)
        grow = np.flatnonzero(seq_lens > self._covered)
        need = sum(self.need_pages(int(s), int(seq_lens[s])) for s in grow)
        return need <= self.cache.pool.num_free

    def grow(self, seq_lens: np.ndarray) -> None:
        """Backs ``seq_lens`` (see :meth:`can_grow`); all or nothing. Virtual:
        one ``step_async`` (commits now, prefetches the next token's pages in
        the background). Raises :class:`torch_vkv.KVCacheCapacityError` when the memory
        is not there (only if the driver itself runs out after ``can_grow``)."""
        if self.kind == "virtual":
            self.cache.step_async(seq_lens)
        else:
            for s in np.flatnonzero(seq_lens > self._covered):
                self.cache.commit(int(s), int(seq_lens[s]))  # all or nothing per slot; can_grow checked all
        np.maximum(self._covered, seq_lens, out=self._covered)

    def synchronize(self) -> None:
        """Waits for the background commits of the last :meth:`grow` (virtual)."""
        if self.kind == "virtual":
            self.cache.synchronize()

    def reclaim(self) -> None:
        """Virtual: returns the pages cached by freed slots to the pool (paged: nothing to do)."""
        if self.kind == "virtual":
            self.cache.reclaim()

    # ----------------------------------------------------------------- stats
    def committed_bytes(self) -> int:
        return int(self.cache.memory_stats()["committed_bytes"])

    def window_committed_bytes(self) -> int:
        """Bytes the sliding layers' buffers hold (virtual ``per_layer`` with windows; else 0)."""
        if not self.gives_back_windows:
            return 0
        return int(self.cache.memory_stats()["window_committed_bytes"])

    def slot_pages(self, slot: int) -> list:
        """Identifiers of the pool pages backing ``slot`` (for tests of page
        ownership): block ids (paged), ``(slot, page index)`` pairs (virtual:
        a slot's range never shares a page with another slot)."""
        if self.kind == "paged":
            n = self.cache.pages_for_tokens(self.cache.committed_tokens(slot))
            return self.block_table[slot, :n].tolist()
        n = self.cache.pages_for_tokens(self.cache.committed_tokens(slot))
        return [(slot, p) for p in range(n)]

    def close(self) -> None:
        if self.kind == "virtual":
            self.cache.close()
        self._keys = self._values = []
