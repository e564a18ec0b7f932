"""``KVCache``: the vAttention cache manager.

Every slot (batch row) owns a contiguous virtual range of ``max_seq_len``
tokens in every layer; physical pages are committed as its sequence grows::

    slot 0  |###########=====.................|   # committed and used
    slot 1  |####==...........................|   = committed, not used yet
    slot 2  |.................................|   . reserved only (no memory)
             ^ token 0                 max_seq_len ^

Each slot's range starts on a page boundary (rows are padded to whole pages),
so a page belongs to one slot unless :meth:`KVCache.fork` maps it into
another (a shared prefix, read-only by contract), and a slot's pages can be
handed to another slot without copying anything. Attention kernels read ``key(layer)``
and ``value(layer)`` as ordinary ``[max_batch_size, max_seq_len, num_kv_heads,
head_dim]`` tensors, with ``cache_seqlens`` saying how many rows are valid.

Per-iteration API, as in the paper::

    slot = cache.alloc()                     # a request arrives
    cache.commit(slot, prompt_len)           # back its prompt (or let step_async do it)
    cache.step_async(seq_lens)               # commit this step's need, prefetch the next
    ... forward pass, overlapping the prefetch ...
    cache.free(slot)                         # request done; pages kept for reuse

Modules
-------
The per-slot bookkeeping and the per-step commit decision live in the C++
slot table (``csrc/slots.h``); ``KVCache`` is assembled from this module
(construction, views, slots, commits, stats, lifecycle) and four mixins:
the per-step API (``_cache_step.py``), forks and shared pages
(``_cache_fork.py``), sliding windows (``_cache_windows.py``) and the
buffer and page geometry (``_cache_layout.py``).

Threads
-------
Every method may be called from any thread. One lock per cache (an
``RLock``) is held around its bookkeeping and the commits it makes; the C++
calls release the GIL around driver work and waits, and the background
committer never takes the lock, so waiting for a prefetch under it cannot
deadlock. What the cache cannot know
stays the caller's job: which thread reads or writes which rows. A thread must
only touch rows that a commit which returned has backed, in a slot no other
thread frees, decommits or reclaims meanwhile: after ``free(slot)``, any
thread's commit may reclaim that slot's pages.

Copies and processes
--------------------
A cache owns its pages: ``copy.copy``, ``copy.deepcopy`` and pickling raise
``TypeError`` (clone the rows you want instead). After ``os.fork()`` the
child's copy is unusable: every method raises ``RuntimeError`` and nothing is
released in the child (the parent owns the pages); create a new cache there.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from torch_vkv._cache_fork import _ForkMixin
from torch_vkv._cache_layout import _LayoutMixin
from torch_vkv._cache_step import _StepMixin
from torch_vkv._cache_windows import _WindowMixin, parse_windows
from torch_vkv._checks import ArgumentTypeError, check_int, check_stream, fail
from torch_vkv._ext import core
from torch_vkv._shared_writes import register as _register_owner
from torch_vkv._lifetime import Closable, DropAfterCapture, Unique, forked_error, locked, repr_before_init, track
from torch_vkv.errors import OutOfSlotsError
from torch_vkv.pool import ADDRESS_SPACE_BYTES, PagePool, resolve_device
from torch_vkv.tensor import VirtualKVTensor, VirtualKVView

__all__ = ["KVCache", "LAYOUTS"]

#: ``per_layer``: K and V of each layer in their own ``[B, S, H, D]`` tensors
#: (as the paper). ``interleaved``: one ``[B, S, L, 2, H, D]`` tensor in which
#: all layers of a token share pages, so a page holds ``num_layers * 2`` times
#: fewer tokens and commits are that much finer.
LAYOUTS = ("per_layer", "interleaved")

class KVCache(_StepMixin, _ForkMixin, _WindowMixin, _LayoutMixin, Closable, DropAfterCapture, Unique):
    """A KV cache in virtual memory with pages committed on demand.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        Model shape.
    max_batch_size : int
        Number of slots (concurrent requests).
    max_seq_len : int
        Tokens per slot, the virtual capacity of each request. The whole reservation, ``max_batch_size *
        max_seq_len * bytes_per_token`` rounded to pages, must fit in the address space
        (:data:`torch_vkv.pool.ADDRESS_SPACE_BYTES`, 128 TiB).
    dtype : torch.dtype
        Element type of K and V (default ``torch.float16``).
    device : str or torch.device, optional
        ``"cuda[:N]"`` (CUDA virtual memory) or ``"cpu"`` (host backend);
        default: the current CUDA device, else the CPU.
    memory_budget : int, optional
        Bytes of physical memory the cache may commit; ``None`` means up to a
        static allocation's size (the driver may run out first, which raises
        :class:`OutOfPagesError` too).
    layout : str
        ``"per_layer"`` or ``"interleaved"`` (see :data:`LAYOUTS`).
    margin_tokens : int
        Extra rows committed past each reservation, for kernels that read a
        tile past the last valid token (FlashAttention-3 reads up to 128-256
        rows). The rows hold finite values.
    page_size : int, optional
        Host backend only: bytes per page (default 2 MiB).
    pool : PagePool, optional
        A pool to draw pages from (shared with other caches); by default the
        cache makes its own. Closing a cache on a shared pool returns its pages
        to the pool's free list and destroys none.
    sliding_window : int or list of (int or None), optional
        Tokens each layer attends to (Hugging Face's
        ``sliding_window``: a query at ``p`` sees keys ``[p - W + 1, p]``, i.e.
        ``attention(..., window_left=W - 1)``); an int applies to every layer,
        a list gives one entry per layer, ``None`` for a global layer. Each
        :meth:`step` / :meth:`step_async` decommits the pages of a windowed
        layer that lie entirely behind ``L - W``, ``L`` the slot's length
        before that step (its new tokens are written from ``L`` on and read
        keys from ``L - W + 1`` on), ordered after the work queued on the
        current stream like every decommit. The ``interleaved`` layout shares
        each page across layers, so it keeps a page while any layer needs it:
        nothing is given back when some layer is global, and pages behind the
        largest window when every layer slides (``per_layer`` suits models
        with global and sliding layers). See docs/design.md, "Pages behind
        the window".

    Notes
    -----
    Newly committed rows hold finite values: pages fresh from the driver are
    zero-filled once, recycled pages keep K/V values of an earlier request.
    Safe to call from several threads (see the module docstring for what stays
    the caller's job); cannot be copied or pickled; unusable in a child
    process after ``fork()``.
    """

    _copy_hint = "clone the rows you need (cache.key(layer)[slot, :n].clone())"

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float16,
        device: Any = None,
        memory_budget: int | None = None,
        layout: str = "per_layer",
        margin_tokens: int = 0,
        page_size: int | None = None,
        pool: PagePool | None = None,
        sliding_window: int | Sequence[int | None] | None = None,
    ) -> None:
        self._closed = True  # until construction succeeds
        self._forked = False
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self.num_layers = check_int("num_layers", num_layers, low=1)
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        self.head_dim = check_int("head_dim", head_dim, low=1)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, low=1)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, low=1)
        self.margin_tokens = check_int("margin_tokens", margin_tokens, low=0, high=1 << 62)
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype == torch.uint8):
            fail("dtype", "a floating-point torch.dtype", dtype, ArgumentTypeError)
        if layout not in LAYOUTS:
            fail("layout", f"one of {LAYOUTS}", layout)
        if memory_budget is not None:
            memory_budget = check_int("memory_budget", memory_budget, low=0)
        if pool is not None and not isinstance(pool, PagePool):
            fail("pool", "a torch_vkv.PagePool or None", pool, ArgumentTypeError)
        self.dtype = dtype
        self.layout = layout
        self.device = resolve_device(device)

        itemsize = torch.empty((), dtype=dtype).element_size()
        # Bytes of one token in one buffer (the unit that commit rounds to pages).
        per_buffer_heads = self.num_kv_heads * self.head_dim * itemsize
        self.bytes_per_token_buffer = per_buffer_heads * (2 * self.num_layers if layout == "interleaved" else 1)
        #: Bytes of one token in all layers, K and V.
        self.bytes_per_token = 2 * self.num_layers * per_buffer_heads
        # Checked before anything is reserved: the C++ takes 64-bit sizes.
        if self.max_batch_size * self.max_seq_len * self.bytes_per_token > ADDRESS_SPACE_BYTES:
            fail(
                "max_seq_len",
                f"at most {ADDRESS_SPACE_BYTES // (self.max_batch_size * self.bytes_per_token)} tokens per slot "
                f"with max_batch_size={self.max_batch_size} and {self.bytes_per_token} bytes per token "
                f"(the reservation must fit in the {ADDRESS_SPACE_BYTES >> 40} TiB address space)",
                max_seq_len,
            )
        #: Tokens each layer attends to (``None``: all), from ``sliding_window`` (one entry per layer: after the size check).
        self.sliding_window = parse_windows(sliding_window, self.num_layers)

        if pool is None:
            probe = PagePool(self.device, page_size=page_size)
            page = probe.page_size
        else:
            if memory_budget is not None:
                fail("memory_budget", "None when a shared pool is given (the pool holds the budget)", memory_budget)
            if page_size is not None and page_size != pool.page_size:
                fail("page_size", f"None or the pool's page size {pool.page_size}", page_size)
            if pool.device != self.device:
                fail("pool", f"a PagePool on {self.device}", pool)
            pool.stats()  # raises in a child process if the pool was inherited through fork()
            page = pool.page_size
        # Pad each slot's row to whole pages: tokens per row must make
        # row_bytes a multiple of the page size.
        unit = page // math.gcd(page, self.bytes_per_token_buffer)
        self.padded_seq_len = -(-self.max_seq_len // unit) * unit
        self.pages_per_slot = self.padded_seq_len * self.bytes_per_token_buffer // page
        num_buffers = 2 * self.num_layers if layout == "per_layer" else 1
        self.reserved_bytes = num_buffers * self.max_batch_size * self.pages_per_slot * page
        if self.reserved_bytes > ADDRESS_SPACE_BYTES:  # page padding can push a near fit over
            if num_buffers * self.max_batch_size * page > ADDRESS_SPACE_BYTES:  # not even one page a slot fits
                fail("max_batch_size", f"at most {ADDRESS_SPACE_BYTES // (num_buffers * page)} slots with "
                     f"{num_buffers} buffers of {page}-byte pages (a slot takes at least a page of each buffer, "
                     f"in the {ADDRESS_SPACE_BYTES >> 40} TiB address space)", max_batch_size)  # fmt: skip
            fail("max_seq_len", f"a size whose reservation, {self.reserved_bytes} bytes once rows are padded to "
                 f"{page}-byte pages, fits in the {ADDRESS_SPACE_BYTES >> 40} TiB address space", max_seq_len)

        # A cache that made its own pool trims it on close; one on a shared pool does not.
        self._owns_pool = pool is None
        if pool is None:
            pool = probe
            pool.set_max_bytes(self.reserved_bytes if memory_budget is None else memory_budget)
        self.pool = pool
        self.page_size = page

        B, S, H, D, L = self.max_batch_size, self.padded_seq_len, self.num_kv_heads, self.head_dim, self.num_layers
        if layout == "per_layer":
            self._buffers = [VirtualKVTensor.empty((B, S, H, D), dtype=dtype, pool=pool) for _ in range(2 * L)]
            kv = [(b, b[:, : self.max_seq_len]) for b in self._buffers]
            self._keys = [VirtualKVView.of(*kv[2 * l]) for l in range(L)]
            self._values = [VirtualKVView.of(*kv[2 * l + 1]) for l in range(L)]
        else:
            buf = VirtualKVTensor.empty((B, S, L, 2, H, D), dtype=dtype, pool=pool)
            self._buffers = [buf]
            self._keys = [VirtualKVView.of(buf, buf[:, : self.max_seq_len, l, 0]) for l in range(L)]
            self._values = [VirtualKVView.of(buf, buf[:, : self.max_seq_len, l, 1]) for l in range(L)]
        for view in self._keys + self._values:  # for backends that read whole tiles past a length (flex)
            view.margin_tokens = self.margin_tokens
        self._reservations = [b.reservation for b in self._buffers]

        self._free_slots: list[int] = list(range(B))  # freed order: oldest first
        self._active: set[int] = set()
        self._committer = core().Committer()
        # The slot table (csrc/slots.h) owns the per-slot bookkeeping and makes
        # the per-step commit decision in C++; these are NumPy views of its
        # arrays, written here only under the cache's lock (as every call into it is).
        self._slots = core().SlotTable(
            self._reservations, self._buffer_windows(), self._committer, num_slots=B, max_seq_len=self.max_seq_len,
            padded_seq_len=S, pages_per_slot=self.pages_per_slot, margin_tokens=self.margin_tokens,
            bytes_per_token=self.bytes_per_token_buffer,
        )  # fmt: skip
        arrays = self._slots.arrays
        self._active_mask: np.ndarray = arrays["active"]  # bool [B]
        self._used_tokens: np.ndarray = arrays["used"]  # tokens committed for each slot's current request
        # Pages per buffer backing each slot, from its start, and the largest
        # num_tokens they serve: set through _set_committed only.
        self._committed_pages: np.ndarray = arrays["committed"]
        self._covered_tokens: np.ndarray = arrays["covered"]
        self._committed_pages.flags.writeable = self._covered_tokens.flags.writeable = False
        self._first_pages: np.ndarray = arrays["first_pages"]  # [G, B]: sliding windows (_cache_windows.py)
        # Shared pages (fork): slot -> share id of each of its leading pages
        # that fork() mapped or lent (the same page index in every buffer);
        # share id -> number of slots mapping it.
        self._shared_ids: list[list[int]] = [[] for _ in range(B)]
        self._page_refs: dict[int, int] = {}
        self._next_share_id = 0
        self._init_windows()
        self._closed = False
        # No finalizer: like any storage, the buffers' reservations are
        # released when the last tensor over them dies (the cache's, or a
        # view kept by the caller), never under a live view.
        _register_owner(self, self._reservations)  # view writes into shared pages: refused
        track(self)

    # ------------------------------------------------------------------ views
    def key(self, layer: int) -> VirtualKVView:
        """Keys of ``layer``: ``[max_batch_size, max_seq_len, num_kv_heads, head_dim]``,
        same address for the cache's lifetime, a :class:`VirtualKVView` (ops on
        it return plain tensors; its ``repr`` reads committed rows only).

        Rows past what was committed read as zeros on the host backend; on
        CUDA reading them faults, so that is the caller's responsibility. The
        view keeps the memory alive after the cache is dropped; after
        :meth:`close` it reads zeros (host) or is invalid (CUDA)."""
        self._check_open()
        return self._keys[check_int("layer", layer, low=0, high=self.num_layers - 1)]

    def value(self, layer: int) -> VirtualKVView:
        """Values of ``layer``, shaped like :meth:`key`."""
        self._check_open()
        return self._values[check_int("layer", layer, low=0, high=self.num_layers - 1)]

    @property
    @locked
    def active_slots(self) -> list[int]:
        """Slots in use (returned by :meth:`alloc`, not freed since), ascending."""
        self._check_open()
        return sorted(self._active)

    @property
    @locked
    def num_free_slots(self) -> int:
        """Slots :meth:`alloc` can still hand out."""
        self._check_open()
        return len(self._free_slots)

    @locked
    def committed_tokens(self, slot: int) -> int:
        """Rows of ``slot`` that are backed in every layer (at least what was
        committed; page rounding may back more)."""
        slot = self._check_slot(slot, active=False)
        self._join_async()
        return self._committed_rows(slot)

    # ------------------------------------------------------------------ slots
    @locked
    def alloc(self, num_tokens: int | None = None) -> int:
        """Takes a free slot and returns it, preferring one whose pages are still committed (the new
        request reuses them): with ``num_tokens`` (what the request may reach), the one backing it with
        the fewest pages to spare; else, or when none backs it, the one holding the most pages. Raises
        :class:`OutOfSlotsError` when every slot is in use, ``ValueError`` when ``num_tokens`` is past
        ``max_seq_len`` (no slot can hold it)."""
        self._check_open()
        need = None if num_tokens is None else self._pages_for(check_int("num_tokens", num_tokens, low=0,
                                                                         high=self.max_seq_len))  # fmt: skip
        if not self._free_slots:
            raise OutOfSlotsError(f"all {self.max_batch_size} slots of the KV cache are in use")
        held = [int(self._committed_pages[s]) for s in self._free_slots]
        fits = [] if need is None else [i for i, h in enumerate(held) if h >= need]
        pick = min(fits, key=held.__getitem__) if fits else max(range(len(held)), key=held.__getitem__)
        slot = self._free_slots.pop(pick)
        self._active.add(slot)
        self._active_mask[slot] = True
        self._used_tokens[slot] = 0
        return slot

    @locked
    def free(self, slot: int) -> None:
        """Ends the request in ``slot``. Its pages stay committed (deferred reclamation) for the next request
        in the slot until memory is needed elsewhere. Freeing a slot that is not in use raises ``ValueError``."""
        slot = self._check_slot(slot)
        # A prefetch for this slot may still be running: its pages must be credited before the decommits
        # below count what the slot holds.
        self._join_async()
        self._active.discard(slot)
        self._active_mask[slot] = False
        self._used_tokens[slot] = 0
        self._free_slots.append(slot)
        if self._windowed and self._first_pages[:, slot].any():
            # Its windowed layers lost their first rows, which the next request needs: no warm reuse.
            self._decommit_slot(slot, 0, None)
        elif any(self._page_refs[i] > 1 for i in self._shared_ids[slot]):
            # Pages another slot still maps: a freed slot keeps only pages of its own (the next
            # request there writes from row 0, and reclamation counts them as freeable).
            self._decommit_slot(slot, 0, None)
        else:
            self._unshare(slot, 0)

    def release(self, slot: int) -> None:
        """Alias of :meth:`free` (``PagedKVCache`` speaks the same vocabulary)."""
        self.free(slot)

    # ---------------------------------------------------------------- commits
    @locked
    def can_commit(self, slot: int, num_tokens: int) -> bool:
        """Whether :meth:`commit` would succeed now (same checks, no change)."""
        slot = self._check_slot(slot)
        return self.can_step({slot: check_int("num_tokens", num_tokens, low=0, high=self.max_seq_len)})

    @locked
    def commit(self, slot: int, num_tokens: int) -> None:
        """Backs tokens ``[0, num_tokens)`` of ``slot`` in every layer, plus
        ``margin_tokens``: maps physical pages under the slot's reserved range.
        Never shrinks (see :meth:`decommit`). All or nothing: raises
        :class:`OutOfPagesError` with nothing changed (``used_bytes`` included)."""
        slot = self._check_slot(slot)
        self.step({slot: check_int("num_tokens", num_tokens, low=0, high=self.max_seq_len)})

    def reserve(self, slot: int, num_tokens: int) -> None:
        """Alias of :meth:`commit`, its first name (kept working)."""
        self.commit(slot, num_tokens)

    def can_reserve(self, slot: int, num_tokens: int) -> bool:
        """Alias of :meth:`can_commit`."""
        return self.can_commit(slot, num_tokens)

    # ------------------------------------------------------- page arithmetic
    def pages_for_tokens(self, num_tokens: int) -> int:
        """Pages per buffer that back tokens ``[0, num_tokens)`` of a slot
        (``margin_tokens`` included); 0 for ``num_tokens <= 0``."""
        return self._pages_for(check_int("num_tokens", num_tokens))

    def tokens_for_pages(self, num_pages: int) -> int:
        """The largest ``num_tokens`` that ``num_pages`` pages per buffer back
        (``margin_tokens`` excluded, capped at ``max_seq_len``): the inverse of
        :meth:`pages_for_tokens`, ``pages_for_tokens(tokens_for_pages(p)) <= p``."""
        num_pages = check_int("num_pages", num_pages, low=0)
        # Past 2**62 pages every count backs max_seq_len tokens; the table takes int64.
        return self._slots.tokens_for(min(num_pages, 1 << 62))

    @locked
    def decommit(self, slot: int, keep_tokens: int = 0, *, stream: Any = None) -> int:
        """Returns pages of ``slot`` beyond ``keep_tokens`` (+ margin) to the
        pool, e.g. after a crop; an active slot then uses at most
        ``keep_tokens`` tokens (``used_bytes`` follows even when no page is
        dropped). On CUDA the unmap waits for the work queued on ``stream``
        (default: current stream). Returns pages decommitted per buffer."""
        slot = self._check_slot(slot, active=False)
        keep = check_int("keep_tokens", keep_tokens, low=0, high=self.max_seq_len)
        check_stream(stream)
        self._join_async()
        self._check_window_crop(slot, keep)
        if slot in self._active:
            self._used_tokens[slot] = min(self._used_tokens[slot], keep)
        keep_pages = self._pages_kept(slot, keep)
        drop = int(self._committed_pages[slot]) - keep_pages
        if drop <= 0:
            return 0
        self._decommit_slot(slot, keep_pages, stream)
        return drop

    @locked
    def reclaim(self, *, stream: Any = None) -> int:
        """Decommits the pages that freed slots still hold; returns pages per
        buffer freed. Pages go back to the pool (``pool.trim()`` returns them
        to the driver)."""
        self._check_open()
        check_stream(stream)
        self._join_async()
        freed = 0
        for slot in self._free_slots:
            freed += int(self._committed_pages[slot])
            self._decommit_slot(slot, 0, stream)
        return freed

    # ------------------------------------------------------------------ stats
    @locked
    def memory_stats(self) -> dict[str, Any]:
        """Memory of the cache, in bytes and pages.

        ``reserved_bytes`` (virtual), ``committed_bytes`` (physical, mapped),
        ``used_bytes`` (tokens committed for active requests x bytes per token),
        ``cached_bytes`` (committed by freed slots, kept for reuse),
        ``shared_pages`` (physical pages that several slots map after :meth:`fork`,
        each counted once in ``committed_bytes``),
        ``window_committed_bytes`` (what the layers with a ``sliding_window`` hold,
        part of ``committed_bytes``; 0 without windows),
        ``free_pages`` / ``pool_pages`` / ``max_pages`` (the pool's free, existing and budgeted pages),
        ``page_size``, ``tokens_per_page``, ``active_slots``, ``commit_calls``,
        ``map_calls``, ``set_access_calls``, ``unmap_calls``,
        ``commit_seconds``, ``decommit_seconds``.
        """
        self._check_open()
        self._join_async()
        s = self.pool.stats()
        held = [self._held_pages(slot) for slot in range(self.max_batch_size)]
        nb = len(self._buffers)
        shared = sum(1 for r in self._page_refs.values() if r > 1) * nb  # physical pages mapped by 2+ slots
        extra_maps = sum(r - 1 for r in self._page_refs.values()) * nb  # mappings past each page's first
        return {
            "reserved_bytes": self.reserved_bytes,
            "committed_bytes": (sum(held) - extra_maps) * self.page_size,
            "shared_pages": shared,
            "used_bytes": int(self._used_tokens.sum()) * self.bytes_per_token,
            "cached_bytes": self._held_pages_sum(self._free_slots) * self.page_size,
            "window_committed_bytes": self._window_committed_pages() * self.page_size,
            "free_pages": s["free_pages"],
            "pool_pages": s["created_pages"],
            "max_pages": s["max_pages"],
            "page_size": self.page_size,
            "tokens_per_page": self.tokens_per_page,
            "active_slots": len(self._active),
            "commit_calls": self._slots.commit_calls,
            "map_calls": s["map_calls"],
            "set_access_calls": s["set_access_calls"],
            "unmap_calls": s["unmap_calls"],
            "commit_seconds": s["commit_seconds"],
            "decommit_seconds": s["decommit_seconds"],
        }

    # ------------------------------------------------------------- lifecycle
    @locked
    def close(self) -> None:
        """Returns every page to the pool now. Views obtained from :meth:`key` /
        :meth:`value` stay safe to hold and print (``<released>``): on the host
        backend they read zeros, on CUDA reading them is invalid like freed
        memory. The address ranges are released when the last view dies.
        Idempotent; every other method then raises ``RuntimeError``.

        The pages go back to the pool; a cache that made its own pool also
        returns them to the driver, one on a shared pool leaves that to the
        pool's owner (:meth:`PagePool.trim`)."""
        if self._forked:
            raise forked_error(type(self).__name__, "cache", self._pid)
        if self._closed:
            return
        try:
            self._join_async()
        except Exception:
            pass
        self._closed = True
        for b in self._buffers:
            b.close()
        self._keys = self._values = []
        self._buffers = []
        self._reservations = []
        self._slots.close()  # drops its references to the buffers
        self._shared_ids = [[] for _ in range(self.max_batch_size)]
        self._page_refs = {}
        if self._owns_pool:
            self.pool.trim()

    @property
    def closed(self) -> bool:
        """Whether the cache is closed (or was inherited through ``fork()``)."""
        return self._closed

    @repr_before_init
    def __repr__(self) -> str:
        """Shape, layout and, per active slot, ``used/committed`` rows.

        Reads bookkeeping only, never K/V memory, and takes no lock (a snapshot
        while another thread commits may be one step stale)."""
        head = (
            f"{type(self).__name__}(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
            f"dtype={self.dtype}, device={str(self.device)!r}, layout={self.layout!r}"
        )
        if self._forked:
            return f"{head}, created in process {self._pid} before fork(): unusable here)"
        if self._closed:
            return f"{head}, closed)"
        active = sorted(self._active)
        shown = ", ".join(f"{s}: {int(self._used_tokens[s])}/{self._committed_rows(s)}" for s in active[:8])
        if len(active) > 8:
            shown += f", ... ({len(active) - 8} more)"
        return f"{head}, tokens_per_page={self.tokens_per_page}, rows used/committed by slot={{{shown}}})"

    def _mark_forked(self) -> None:
        # In a child after fork(): unusable. Nothing is released here (the
        # parent owns the pages; the C++ objects refuse to touch them). The
        # lock may have been held by a parent thread that does not exist
        # here: replace it.
        self._forked = True
        self._closed = True
        self._lock = threading.RLock()

    # -------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            if self._forked:
                raise forked_error(type(self).__name__, "cache", self._pid)
            raise RuntimeError(f"the {type(self).__name__} is closed")  # a subclass's own name

    def _check_slot(self, slot: Any, *, active: bool = True) -> int:
        self._check_open()
        slot = check_int("slot", slot, low=0, high=self.max_batch_size - 1)
        if active and slot not in self._active:
            fail("slot", "a slot returned by alloc() and not freed since", slot)
        return slot

    def _committed_rows(self, slot: int) -> int:
        return min(self.max_seq_len, int(self._committed_pages[slot]) * self.page_size // self.bytes_per_token_buffer)

    def _set_committed(self, slot: int, pages: int) -> None:
        self._slots.set_committed(slot, pages)

    def _pages_for(self, num_tokens: int) -> int:
        # Past padded_seq_len every count wants the whole row; the table takes int64.
        return self._slots.pages_for(max(-1, min(num_tokens, self.padded_seq_len)))

    def _decommit_slot(self, slot: int, keep_pages: int, stream: Any) -> None:
        count = int(self._committed_pages[slot]) - keep_pages
        if count <= 0:
            return
        self._unshare(slot, keep_pages)
        fence = self._buffers[0]._fence_stream(stream)
        if self._windowed:
            self._decommit_windowed(slot, keep_pages, fence)
        else:
            first = slot * self.pages_per_slot + keep_pages
            for res in self._reservations:
                res.decommit(first, count, fence)
        self._set_committed(slot, keep_pages)
