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

Prefix caching (``prefix_caching=True``): a :class:`PrefixIndex` keys the full
prompt blocks each slot holds. A new request forks the slot holding its
longest cached prefix (:meth:`KVManager.fork`: full pages shared, a partial
one copied). A finished request's slot is *parked* (kept active, its pages
past the indexed blocks given back) until memory or a slot is needed: then
the least recently used parked slot is freed, which drops only its own
references to pages other slots share (for memory, only parked slots whose
eviction gives pages back: :meth:`KVManager.can_grow`). ``parking_slots``
extra slots hold them, so parking never takes a slot a running request needs.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from torch_vkv import KVCache, KVCacheCapacityError
from torch_vkv._checks import fail
from torch_vkv.pool import ADDRESS_SPACE_BYTES
from torch_vkv.serving.prefix import PrefixIndex, block_keys
from torch_vkv.serving.request import Request

__all__ = ["KVManager", "PREWARM_KEEP_FREE", "PREWARM_PAGES", "static_budget"]

#: Most pool pages :meth:`KVManager.prewarm` commits for its first slot: about 2 ms of driver calls on an
#: H200 (~30 us a 2 MiB page), well inside a decode step of a model worth serving.
PREWARM_PAGES = 64
#: Fraction of the pool's pages that :meth:`KVManager.prewarm` leaves free.
PREWARM_KEEP_FREE = 0.05


def static_budget(kind: str, *, layout: str, num_slots: int, max_seq_len: int, num_layers: int, num_kv_heads: int,
                  head_dim: int, itemsize: int, page_size: int = 2 << 20, block_size: int = 16) -> int:  # fmt: skip
    """Bytes of a static cache of ``num_slots`` x ``max_seq_len`` tokens, in
    whole pages per slot: for ``virtual`` pages of ``page_size`` bytes per
    buffer (a tiny model's static size is less than one page per buffer,
    which could not back one token), for ``paged`` blocks of ``block_size``
    tokens (a slot's last block is whole even when ``max_seq_len`` ends in it)."""
    if kind != "virtual":
        blocks_per_slot = -(-max_seq_len // block_size)
        return num_slots * blocks_per_slot * block_size * 2 * num_layers * num_kv_heads * head_dim * itemsize
    buffers = 2 * num_layers if layout == "per_layer" else 1
    per_slot = max_seq_len * num_kv_heads * head_dim * itemsize * (2 * num_layers // buffers)
    return num_slots * buffers * (-(-per_slot // page_size)) * page_size


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
        prefix_caching: keep and share full prompt blocks between requests.
        parking_slots: slots past ``num_slots`` for parked (finished, cached)
            requests; ``num_slots`` below is the total.
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
        prefix_caching: bool = False,
        parking_slots: int = 0,
    ) -> None:
        self.kind = kind
        itemsize = torch.empty((), dtype=dtype).element_size()
        request_slots = num_slots
        windowed = sliding_window is not None and any(w is not None for w in sliding_window)
        #: Whether pages behind sliding windows are given back (virtual ``per_layer`` with a window).
        self.gives_back_windows = windowed and kind == "virtual" and layout == "per_layer"
        #: Whether slots can share pages (prefix caching, ``n > 1``): not where sliding layers give
        #: back their first pages, which a fork would share (``KVCache.fork`` refuses those caches).
        self.can_fork = not self.gives_back_windows
        prefix_caching = prefix_caching and self.can_fork
        if prefix_caching and parking_slots:
            if memory_budget is None and kind == "virtual":  # parked slots do not enlarge the default budget
                memory_budget = static_budget(
                    kind, layout=layout, num_slots=num_slots, max_seq_len=max_seq_len, num_layers=num_layers,
                    num_kv_heads=num_kv_heads, head_dim=head_dim, itemsize=itemsize, page_size=page_size or 2 << 20,
                )  # fmt: skip
            num_slots += parking_slots
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.num_layers = num_layers
        #: Bytes of one token's K and V in all layers.
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * itemsize
        if kind == "virtual" and num_slots * max_seq_len * self.bytes_per_token > ADDRESS_SPACE_BYTES:
            # KVCache says the same in its own terms (its max_batch_size counts the engine's slots too).
            fail("max_seq_len", f"at most {ADDRESS_SPACE_BYTES // (num_slots * self.bytes_per_token)} tokens: every "
                 f"one of the engine's {num_slots} slots (max_batch_size, the CUDA graphs' scratch slot, prefix "
                 f"caching's parked slots) reserves max_seq_len rows of {self.bytes_per_token} bytes in the "
                 f"{ADDRESS_SPACE_BYTES >> 40} TiB address space", max_seq_len)  # fmt: skip
        self.memory_budget = memory_budget
        #: Pool pages held for good by engine-internal slots (:meth:`alloc_pinned`).
        self.pinned_pages = 0
        #: Host seconds in :meth:`can_grow` and :meth:`grow`: page commits made in the calling thread
        #: and waits for the background ones (virtual), block-table updates (paged).
        self.grow_seconds = 0.0
        #: Host seconds in :meth:`prewarm` (virtual), spent while the GPU runs a step.
        self.prewarm_seconds = 0.0
        self._prewarm_page_seconds = 0.0  # measured host seconds per prewarmed pool page
        #: Set by the scheduler each iteration: a waiting request found too little memory, or a
        #: running one was preempted. Eager allocation pauses and :meth:`fit` trims while it holds.
        self.memory_bound = False
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
            self.block_tokens = max(1, int(self.cache.tokens_per_page))
        else:
            from torch_vkv import PagedKVCache  # imported lazily by the package

            block_bytes = self.bytes_per_token * block_size
            per_slot = -(-max_seq_len // block_size)
            num_blocks = request_slots * per_slot if memory_budget is None else memory_budget // block_bytes
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
            self.block_tokens = block_size
        #: The prefix cache's index (``None`` when prefix caching is off).
        self.prefix = PrefixIndex(self.block_tokens) if prefix_caching else None
        # Pool pages each parked slot holds, and their sum: admission reads it every step.
        self._parked_pages: dict[int, int] = {}
        self._parked_total = 0
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
        """Slots :meth:`alloc` can hand out, parked ones included (evicted on demand)."""
        return self.cache.num_free_slots + (len(self.prefix.parked) if self.prefix is not None else 0)

    def alloc(self, num_tokens: Optional[int] = None) -> int:
        """A free slot; virtual: the one whose pages back ``num_tokens`` (the
        first step's tokens) with the fewest to spare, else the one holding the
        most pages (``KVCache.alloc``)."""
        self._make_free_slot(None)
        slot = self.cache.alloc(num_tokens) if self.kind == "virtual" else self.cache.alloc()
        self._active[slot] = True
        self._covered[slot] = self.cache.committed_tokens(slot)
        return slot

    def free(self, slot: int, *, park: bool = False) -> None:
        """Ends the slot's request. With ``park`` and prefix caching, a slot
        holding indexed prompt blocks is parked: it keeps those blocks (its
        pages past them are given back) until :meth:`evict`. Otherwise the
        slot is freed: virtual pages stay with it until memory is needed
        elsewhere (deferred reclamation), paged blocks return at once; pages
        shared with other slots stay with them."""
        prefix = self.prefix
        if park and prefix is not None and prefix.num_blocks(slot):
            keep = prefix.num_blocks(slot) * self.block_tokens
            self.cache.decommit(slot, keep)
            self._covered[slot] = self.cache.committed_tokens(slot)
            prefix.park(slot)
            self._parked_pages[slot] = self.pages_for(int(self._covered[slot]))
            self._parked_total += self._parked_pages[slot]
            return
        if prefix is not None:
            prefix.remove(slot)
            self._parked_total -= self._parked_pages.pop(slot, 0)
        self.cache.free(slot)
        self._active[slot] = False
        if self.kind == "paged":
            self._covered[slot] = 0

    def fit(self, slot: int, max_tokens: int) -> int:
        """Virtual, while memory limits the batch (:attr:`memory_bound`): gives
        back the pages of a just taken ``slot`` past ``max_tokens``, all its
        request can ever use. A warm slot (a freed request's pages, eager
        allocation) may hold more, and an active slot keeps them out of every
        other request's reach until it ends. Returns the pool pages given back."""
        # With memory to spare the pages stay: the next request in this slot may use them.
        if not self.memory_bound:
            return 0
        return self.give_back_spare(slot, max_tokens)

    def give_back_spare(self, slot: int, num_tokens: int) -> int:
        """Virtual: gives back the pages of ``slot`` past its first ``num_tokens``
        tokens (paged: nothing; a block is taken only when a step needs it).
        Only for pages that hold no K/V: past a running request's tokens so
        far (a warm slot's pages up to its maximum length, a prefetched page).
        The scheduler calls it when memory is short (``Scheduler._give_back_spare``):
        the admission estimate counts such pages as available, and they go
        before anybody's K/V does. Returns the pool pages given back."""
        if self.kind != "virtual" or self.cache.committed_tokens(slot) <= num_tokens:
            return 0
        dropped = self.cache.decommit(slot, min(num_tokens, self.max_seq_len))
        self._covered[slot] = self.cache.committed_tokens(slot)
        return dropped * self._pages_per_group

    def evict(self, exclude: Optional[int] = None) -> bool:
        """Frees the least recently used parked slot (not ``exclude``); False when none is."""
        slot = self.prefix.lru(exclude) if self.prefix is not None else None
        if slot is None:
            return False
        self.free(slot)
        return True

    def _make_free_slot(self, exclude: Optional[int]) -> None:
        if not self.cache.num_free_slots:
            self.evict(exclude)

    # ---------------------------------------------------------- prefix cache
    def match(self, req: Request) -> tuple[Optional[int], int]:
        """(slot, tokens): the slot holding the longest cached prefix of ``req``'s
        tokens and its length, at most ``req.num_tokens - 1`` (the last token is
        always computed, for its logits); ``(None, 0)`` on a miss or with prefix
        caching off. Only prompt blocks are cached."""
        if self.prefix is None:
            return None, 0
        if req.block_keys is None:
            req.block_keys = block_keys(req.prompt_token_ids, self.block_tokens)
        slot, hit = self.prefix.lookup(req.token_ids, req.block_keys)
        return slot, min(hit, req.num_tokens - 1)

    def fork(self, src: int, num_tokens: int) -> int:
        """A new slot whose first ``num_tokens`` tokens are ``src``'s: full pages
        shared, a partial page copied (``KVCache.fork`` / ``PagedKVCache.fork``).
        Raises ``OutOfSlotsError`` / ``OutOfPagesError`` with nothing changed."""
        self._make_free_slot(src)
        slot = self.cache.fork(src, num_tokens)
        if self.prefix is not None:
            self.prefix.touch(src)
        self._active[slot] = True
        self._covered[slot] = self.cache.committed_tokens(slot)
        return slot

    def index(self, req: Request) -> None:
        """Adds ``req``'s newly computed full prompt blocks to the prefix cache."""
        prefix = self.prefix
        if prefix is None or req.block_keys is None:
            return
        n = min(req.num_computed_tokens, len(req.prompt_token_ids)) // self.block_tokens
        if n > prefix.num_blocks(req.slot):
            prefix.add(req.slot, req.prompt_token_ids, req.block_keys[:n])

    def pending_keys(self, scheduled: Iterable[tuple[Request, int]]) -> set[int]:
        """Keys of the prompt blocks that ``(request, new tokens)`` pairs
        complete in this step (indexed once it ran)."""
        keys: set[int] = set()
        if self.prefix is None:
            return keys
        for r, n in scheduled:
            if r.block_keys is not None and r.num_computed_tokens < len(r.prompt_token_ids):
                hi = min(r.num_computed_tokens + n, len(r.prompt_token_ids)) // self.block_tokens
                keys.update(r.block_keys[r.num_computed_tokens // self.block_tokens : hi])
        return keys

    def shared_pages(self, num_tokens: int) -> int:
        """Pool pages a fork of ``num_tokens`` tokens maps instead of committing."""
        if self.kind == "paged":
            return num_tokens // self.block_tokens
        return num_tokens * self.cache.bytes_per_token_buffer // self.page_bytes * self._pages_per_group

    # ----------------------------------------------------------------- pages
    def pages_for(self, num_tokens: int) -> int:
        """Pool pages that tokens ``[0, num_tokens)`` of one slot take."""
        return self.cache.pages_for_tokens(num_tokens) * self._pages_per_group

    @property
    def usable_pages(self) -> int:
        """Pool pages requests can ever hold: the budget's, less those pinned
        by engine-internal slots (:meth:`alloc_pinned`)."""
        return self.total_pages - self.pinned_pages

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether one request of ``num_tokens`` tokens fits in the budget
        with no other request running (pinned pages excluded)."""
        return self.pages_for(num_tokens) <= self.usable_pages

    def longest_alone(self, max_seq_len: int) -> int:
        """The most tokens (at most ``max_seq_len``) one request can reach
        with no other request running; 0 when not even one token fits."""
        low, high = 0, max_seq_len  # fits_alone(low) holds (0 tokens take no page); find the last that does
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.fits_alone(mid) else (low, mid - 1)
        return low

    def alloc_pinned(self, num_tokens: int) -> int:
        """A slot for the engine's own use (the CUDA graphs' scratch slot)
        holding ``num_tokens`` tokens for its whole life: its pages are taken
        off :attr:`usable_pages`, so no request is accepted that could only
        run with them. Raises :class:`~torch_vkv.OutOfPagesError` when the
        budget cannot back it."""
        slot = self.alloc()
        seq = np.zeros(self.num_slots, dtype=np.int64)
        seq[slot] = num_tokens
        try:
            self.grow(seq)
        except BaseException:
            self.free(slot)
            raise
        self.pinned_pages += self.pages_for(num_tokens)
        return slot

    def need_pages(self, slot: Optional[int], num_tokens: int) -> int:
        """Pool pages that growing ``slot`` (``None``: a fresh slot) to
        ``num_tokens`` takes: an upper bound for virtual, exact for paged."""
        have = 0 if slot is None else int(self._covered[slot])
        if num_tokens <= have:
            return 0
        return self.pages_for(num_tokens) - (self.pages_for(have) if have else 0)

    def need_pages_total(self, seq_lens: np.ndarray) -> int:
        """:meth:`need_pages` summed over the slots of ``seq_lens`` (int64
        ``[num_slots]``, 0 = not growing); only slots past what they hold are
        looked at."""
        return sum(self.need_pages(int(s), int(seq_lens[s])) for s in np.flatnonzero(seq_lens > self._covered))

    def available_pages(self) -> int:
        """Pool pages a step can still take: free ones, ones not created yet,
        (virtual) pages cached by freed slots or whose decommit waits on a
        fence, and the pages of parked slots. A parked slot's pages count in
        full, though evicting it frees only those no other slot shares, and
        virtual counts do not wait for background commits (an upper bound for
        admission; :meth:`can_grow` is exact)."""
        held = self._parked_total
        if self.kind == "paged":
            return int(self.cache.memory_stats()["free_pages"]) + held
        # Not memory_stats(): it waits for the last step's background commit, every iteration.
        return self.cache.available_pages() + held

    def can_grow(self, seq_lens: np.ndarray) -> bool:
        """Whether every slot ``s`` with ``seq_lens[s] > 0`` can hold
        ``seq_lens[s]`` tokens at once (exact). ``seq_lens``: int64 ``[num_slots]``.
        With prefix caching, when pages are short, it evicts parked slots that
        give pages back (:meth:`_evict_for`): none when evicting them all would
        not do (the caller preempts instead, which may make fewer evictions
        enough), never one whose pages running slots share (that frees nothing)."""
        t0 = time.perf_counter()
        try:
            if self._fits(seq_lens):  # every step: one check
                return True
            return self.prefix is not None and self._evict_for(self._short_pages(seq_lens), seq_lens) <= 0
        finally:
            self.grow_seconds += time.perf_counter() - t0

    def _fits(self, seq_lens: np.ndarray) -> bool:
        if self.kind == "virtual":
            return self.cache.can_step(seq_lens)
        return self._short_pages(seq_lens) <= 0

    def _short_pages(self, seq_lens: np.ndarray) -> int:
        """Pool pages that growing to ``seq_lens`` lacks now (<= 0: it fits)."""
        if self.kind == "virtual":
            return self.cache.step_pages(seq_lens) - self.cache.available_pages()
        grow = np.flatnonzero(seq_lens > self._covered)
        if grow.size == 0:
            return 0
        bs = self.block_tokens  # _covered is whole blocks (grow below), so this is exact
        need = (-(-seq_lens[grow] // bs) - (-(-self._covered[grow] // bs))).sum()
        return int(need) - self.cache.pool.num_free

    def _evict_for(self, short: int, seq_lens: np.ndarray) -> int:
        """Evicts parked slots to find ``short`` missing pages; returns what is
        still missing (<= 0: found). Only what gives pages back goes, least
        recently used first: nothing when evicting every parked slot would not
        free ``short`` pages (``freeable_pages``: pages no other slot maps; a
        parked slot whose pages running slots share frees none); else the
        shortest run of parked slots from the least recently used on that frees
        them, less the slots of that run whose eviction adds nothing (their
        pages stay mapped by slots outside it). Slots sharing pages only with
        each other are freed together."""
        cache, parked = self.cache, self.prefix.parked
        if not parked or cache.freeable_pages(parked) < short:
            return short
        lo, hi = 1, len(parked)  # freeable_pages grows with the run: find the shortest that frees enough
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cache.freeable_pages(parked[:mid]) >= short else (mid + 1, hi)
        run = parked[:lo]
        total = cache.freeable_pages(run)
        needed = [s for s in run if cache.freeable_pages([s]) or cache.freeable_pages([r for r in run if r != s]) < total]
        for s in needed:
            self.free(s)
        return self._short_pages(seq_lens)

    def grow(self, seq_lens: np.ndarray) -> None:
        """Backs ``seq_lens`` (see :meth:`can_grow`); all or nothing. Virtual:
        one ``step_async`` (commits now, prefetches the next token's pages in
        the background). Raises :class:`torch_vkv.KVCacheCapacityError` when the memory
        is not there (only if the driver itself runs out after ``can_grow``)."""
        t0 = time.perf_counter()
        try:
            self._grow(seq_lens)
        finally:
            self.grow_seconds += time.perf_counter() - t0

    def _grow(self, seq_lens: np.ndarray) -> None:
        if self.kind == "virtual":
            self.cache.step_async(seq_lens)
            # _covered holds what whole pages back, so the next decodes skip need_pages (a Python call
            # each) until they cross into a new page: about one step in tokens_per_page.
            c = self.cache
            for s in np.flatnonzero(seq_lens > self._covered):
                n = int(seq_lens[s])
                self._covered[s] = max(n, c.tokens_for_pages(c.pages_for_tokens(n)))
            return
        # Paged: only slots that cross into a new block (about one in block_size per decode step)
        # reach the cache; _covered then holds whole blocks, so the others are skipped next step.
        grow = np.flatnonzero(seq_lens > self._covered)
        # One block-table update for every slot that grows (all or nothing; can_grow checked them).
        if len(grow):
            self.cache.commit_many(grow.tolist(), seq_lens[grow].tolist())
        bs = self.block_tokens
        self._covered[grow] = np.minimum(-(-seq_lens[grow] // bs) * bs, self.max_seq_len)

    def prewarm(self, num_tokens: Union[int, Sequence[int]], *, num_slots: int = 1,
                seconds: Optional[float] = None) -> int:  # fmt: skip
        """Eager allocation (virtual): backs the ``num_slots`` free slots that
        :meth:`alloc` hands out next for ``num_tokens`` tokens each (a sequence:
        one slot for each of its counts, the largest first), only while the pool
        keeps :data:`PREWARM_KEEP_FREE` of its pages free and memory does not
        limit the batch (:attr:`memory_bound`): pages committed ahead would
        only be reclaimed again. The engine calls it after launching each
        forward, so new requests' first pages are mapped while the GPU works
        instead of before their prefill. Not where sliding layers give back
        their pages (a freed slot's windowed pages go back at once there).

        ``seconds=None``: one call of at most :data:`PREWARM_PAGES` pool pages
        (one page group at least). ``seconds``: the host time the caller can
        spare (the GPU's remaining work): slot after slot, the first as without
        it, the next ones only as many pages as the measured cost of a page
        fits in the time left. Returns the pages committed."""
        if self.kind != "virtual" or self.gives_back_windows or not self.cache.num_free_slots:
            return 0
        if self.memory_bound:
            return 0  # memory is what limits the batch: pages committed ahead would be reclaimed again
        t0 = time.perf_counter()
        keep = int(PREWARM_KEEP_FREE * self.total_pages)
        counts = sorted(num_tokens, reverse=True) if isinstance(num_tokens, Sequence) else [num_tokens] * num_slots
        committed = 0
        try:
            for k in range(1, min(len(counts), self.cache.num_free_slots) + 1):
                cap = max(PREWARM_PAGES, self._pages_per_group)
                if k > 1:
                    if seconds is None:
                        break
                    left = t0 + seconds - time.perf_counter()
                    cap = int(left / self._prewarm_page_seconds) if self._prewarm_page_seconds else 0
                    if cap < self._pages_per_group:
                        break
                t = time.perf_counter()
                n = self.cache.prewarm(counts[k - 1], num_slots=k, max_pages=cap, keep_free_pages=keep)
                if n:
                    # Host seconds per pool page, for the next calls' budgets (the driver's cost varies).
                    per_page = (time.perf_counter() - t) / n
                    ema = self._prewarm_page_seconds
                    self._prewarm_page_seconds = per_page if not ema else 0.5 * (ema + per_page)
                committed += n
            return committed
        except KVCacheCapacityError:
            # Raised by the join of the last grow's background prefetch (the driver ran out), rolled
            # back there: that prefetch skipped. The next grow commits what its step needs, or the
            # scheduler preempts; out of memory is never the caller's exception.
            return committed
        finally:
            self.prewarm_seconds += time.perf_counter() - t0

    def synchronize(self) -> None:
        """Waits for the background commits of the last :meth:`grow` (virtual)."""
        if self.kind == "virtual":
            self.cache.synchronize()

    def reclaim(self) -> None:
        """Evicts every parked slot (the prefix cache empties), then, virtual:
        returns the pages cached by freed slots to the pool."""
        while self.evict():
            pass
        if self.kind == "virtual":
            self.cache.reclaim()

    # ----------------------------------------------------------------- stats
    def committed_bytes(self) -> int:
        """Physical KV bytes held (freed slots' cached pages included), exact:
        waits for background commits."""
        return int(self.cache.memory_stats()["committed_bytes"])

    def mapped_bytes(self) -> int:
        """:meth:`committed_bytes` read from the pool's counter without waiting
        for background commits (one in flight may or may not count yet): for
        sampling memory every iteration without serialising the commits."""
        if self.kind == "paged":
            return self.committed_bytes()
        return int(self.cache.pool.stats()["mapped_pages"]) * self.page_bytes

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
