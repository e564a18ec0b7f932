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

Threads
-------
Every method may be called from any thread. One lock per cache (an
``RLock``) is held around its bookkeeping and the commits it makes; the C++
calls release the GIL, and the background committer never takes the lock, so
waiting for a prefetch under it cannot deadlock. What the cache cannot know
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

import functools
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from torch_vkv import _remap
from torch_vkv._checks import INT_TYPES, ArgumentTypeError, check_int, check_int_array, fail
from torch_vkv._ext import core
from torch_vkv._lifetime import Unique, forked_error, track
from torch_vkv.errors import OutOfPagesError, OutOfSlotsError
from torch_vkv.pool import ADDRESS_SPACE_BYTES, PagePool, resolve_device
from torch_vkv.tensor import VirtualKVTensor, VirtualKVView

__all__ = ["KVCache", "LAYOUTS"]

#: ``per_layer``: K and V of each layer in their own ``[B, S, H, D]`` tensors
#: (as the paper). ``interleaved``: one ``[B, S, L, 2, H, D]`` tensor in which
#: all layers of a token share pages, so a page holds ``num_layers * 2`` times
#: fewer tokens and commits are that much finer.
LAYOUTS = ("per_layer", "interleaved")

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Runs ``method`` holding the cache's lock (re-entrant: methods call each other)."""

    @functools.wraps(method)
    def locked(self: "KVCache", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class KVCache(Unique):
    """A KV cache in virtual memory with pages committed on demand.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        Model shape.
    max_batch_size : int
        Number of slots (concurrent requests).
    max_seq_len : int
        Tokens per slot, the virtual capacity of each request. The whole
        reservation, ``max_batch_size * max_seq_len * bytes_per_token`` rounded
        to pages, must fit in the address space
        (:data:`torch_vkv.pool.ADDRESS_SPACE_BYTES`, 128 TiB).
    dtype : torch.dtype
        Element type of K and V.
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
        ``per_layer`` layout only. Tokens each layer attends to (Hugging Face's
        ``sliding_window``: a query at ``p`` sees keys ``[p - W + 1, p]``, i.e.
        ``attention(..., window_left=W - 1)``); an int applies to every layer,
        a list gives one entry per layer, ``None`` for a global layer. Each
        :meth:`step` / :meth:`step_async` decommits the pages of a windowed
        layer that lie entirely behind ``L - W``, ``L`` the slot's length
        before that step (its new tokens are written from ``L`` on and read
        keys from ``L - W + 1`` on), ordered after the work queued on the
        current stream like every decommit. See docs/design.md, "Pages behind
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
        self.margin_tokens = check_int("margin_tokens", margin_tokens, low=0)
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype == torch.uint8):
            fail("dtype", "a floating-point torch.dtype", dtype, ArgumentTypeError)
        if layout not in LAYOUTS:
            fail("layout", f"one of {LAYOUTS}", layout)
        #: Tokens each layer attends to (``None``: all), from ``sliding_window``.
        self.sliding_window = _parse_windows(sliding_window, self.num_layers, layout)
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
            fail(
                "max_seq_len",
                f"a size whose reservation, {self.reserved_bytes} bytes once rows are padded to "
                f"{page}-byte pages, fits in the {ADDRESS_SPACE_BYTES >> 40} TiB address space",
                max_seq_len,
            )

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
        self._reservations = [b.reservation for b in self._buffers]

        self._free_slots: list[int] = list(range(B))  # freed order: oldest first
        # Per-slot bookkeeping as arrays: step() checks every slot each
        # iteration, and vector compares keep that to a few microseconds.
        self._active: set[int] = set()
        self._active_mask = np.zeros(B, dtype=bool)
        self._used_tokens = np.zeros(B, dtype=np.int64)  # tokens committed for each slot's current request
        self._committed_pages = [0] * B  # pages per buffer backing each slot, from its start
        self._covered_tokens = np.zeros(B, dtype=np.int64)  # largest num_tokens those pages serve
        self._committer = core().Committer()
        self._pending_ticket: int | None = None
        self._pending_pages: dict[int, int] = {}
        self._commit_calls = 0
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
    def tokens_per_page(self) -> int | float:
        """Tokens one page holds in one buffer: the commit granularity
        (about a thousand for per_layer on 2 MiB pages, tens for interleaved).
        A float when a token does not divide the page."""
        q, r = divmod(self.page_size, self.bytes_per_token_buffer)
        return q if r == 0 else self.page_size / self.bytes_per_token_buffer

    @property
    @_locked
    def active_slots(self) -> list[int]:
        """Slots in use (returned by :meth:`alloc`, not freed since), ascending."""
        self._check_open()
        return sorted(self._active)

    @property
    @_locked
    def num_free_slots(self) -> int:
        """Slots :meth:`alloc` can still hand out."""
        self._check_open()
        return len(self._free_slots)

    @_locked
    def committed_tokens(self, slot: int) -> int:
        """Rows of ``slot`` that are backed in every layer (at least what was
        committed; page rounding may back more)."""
        slot = self._check_slot(slot, active=False)
        self._join_async()
        return self._committed_rows(slot)

    # ------------------------------------------------------------------ slots
    @_locked
    def alloc(self) -> int:
        """Takes a free slot and returns it. A slot freed earlier whose pages are
        still committed is preferred: the new request reuses them. Raises
        :class:`OutOfSlotsError` when every slot is in use."""
        self._check_open()
        if not self._free_slots:
            raise OutOfSlotsError(f"all {self.max_batch_size} slots of the KV cache are in use")
        warmest = max(range(len(self._free_slots)), key=lambda i: self._committed_pages[self._free_slots[i]])
        slot = self._free_slots.pop(warmest)
        self._active.add(slot)
        self._active_mask[slot] = True
        self._used_tokens[slot] = 0
        return slot

    @_locked
    def free(self, slot: int) -> None:
        """Ends the request in ``slot``. Its pages stay committed (deferred
        reclamation) for the next request in the slot until memory is needed
        elsewhere. Freeing a slot that is not in use raises ``ValueError``."""
        slot = self._check_slot(slot)
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

    # ---------------------------------------------------------------- commits
    @_locked
    def can_commit(self, slot: int, num_tokens: int) -> bool:
        """Whether :meth:`commit` would succeed now (same checks, no change)."""
        slot = self._check_slot(slot)
        return self.can_step({slot: check_int("num_tokens", num_tokens, low=0, high=self.max_seq_len)})

    @_locked
    def commit(self, slot: int, num_tokens: int) -> None:
        """Backs tokens ``[0, num_tokens)`` of ``slot`` in every layer, plus
        ``margin_tokens``: maps physical pages under the slot's reserved range.
        Never shrinks (see :meth:`decommit`). All or nothing: raises
        :class:`OutOfPagesError` with nothing changed (``used_bytes`` included)."""
        slot = self._check_slot(slot)
        self.step({slot: check_int("num_tokens", num_tokens, low=0, high=self.max_seq_len)})

    def reserve(self, slot: int, num_tokens: int) -> None:
        """Alias of :meth:`commit`, its first name (the address space is
        reserved at construction; this call commits pages). Kept working."""
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
        if num_pages == 0:
            return 0
        rows = num_pages * self.page_size // self.bytes_per_token_buffer
        return max(0, min(self.max_seq_len, rows - self.margin_tokens))

    @_locked
    def step(self, seq_lens: Sequence[int] | np.ndarray | torch.Tensor | Mapping[int, int]) -> None:
        """Commits, now, what every active slot needs for this iteration.

        Parameters
        ----------
        seq_lens : list, numpy.ndarray, torch.Tensor or mapping
            Tokens each slot must hold after this step, its new tokens
            included: ``max_batch_size`` integers, shape ``[max_batch_size]``
            (0 for slots to leave alone; a CUDA tensor costs a device sync), or
            a ``{slot: num_tokens}`` mapping of active slots. An int64 NumPy
            array (kept and updated in place) is the fastest form; at batch 64
            on the host backend a list or a CPU tensor costs about 2 us more
            per call, a mapping about 6 us more.

        All or nothing across slots: :class:`OutOfPagesError` leaves every slot
        as it was, ``used_bytes`` included.
        """
        need = self._parse_seq_lens(seq_lens)
        self._join_async()
        before = self._used_tokens.copy() if self._windowed else None
        self._commit_now(need)
        self._trim_windows(need, before)

    @_locked
    def step_async(
        self,
        seq_lens: Sequence[int] | np.ndarray | torch.Tensor | Mapping[int, int],
        *,
        lookahead_tokens: int = 1,
    ) -> None:
        """The paper's per-iteration call: backs ``seq_lens`` now (normally
        already done by the previous call's prefetch) and commits, on the
        background thread, what ``seq_lens + lookahead_tokens`` will need, so
        the next step finds its pages mapped. Call :meth:`synchronize` (or any
        other method) before relying on the prefetched rows.

        Parameters
        ----------
        seq_lens : list, numpy.ndarray, torch.Tensor or mapping
            As for :meth:`step`: shape ``[max_batch_size]`` or ``{slot: num_tokens}``.
        lookahead_tokens : int
            Tokens past ``seq_lens`` to prefetch for each slot that ``seq_lens`` names.

        The synchronous part is all or nothing (:class:`OutOfPagesError`
        changes nothing). The prefetch takes only pages that are free now; if
        memory is short it is skipped, and the next call's synchronous part
        raises :class:`OutOfPagesError` when the need is real.
        """
        lookahead = check_int("lookahead_tokens", lookahead_tokens, low=0)
        need = self._parse_seq_lens(seq_lens)
        self._join_async()
        before = self._used_tokens.copy() if self._windowed else None
        self._commit_now(need)
        self._trim_windows(need, before)
        ahead = np.where(need > 0, np.minimum(need + lookahead, self.max_seq_len), 0)
        plan = self._plan(ahead)
        if not plan:
            return
        new_pages = sum(p - self._committed_pages[s] for s, p in plan.items()) * len(self._buffers)
        if new_pages > self._available_pages(reclaim=False):
            return  # no reclaiming in the background; the next step decides
        jobs = []
        for slot, pages in plan.items():
            first = slot * self.pages_per_slot + self._committed_pages[slot]
            jobs += [(res, first, pages - self._committed_pages[slot]) for res in self._reservations]
        self._pending_pages = plan
        self._pending_ticket = self._committer.submit(jobs)
        self._commit_calls += 1

    @_locked
    def synchronize(self) -> None:
        """Waits for the background commits of :meth:`step_async`. A failure
        there (another user of a shared pool took the pages) is raised here and
        leaves the prefetched slots as they were before the prefetch."""
        self._check_open()
        self._join_async()

    @_locked
    def decommit(self, slot: int, keep_tokens: int = 0, *, stream: Any = None) -> int:
        """Returns pages of ``slot`` beyond ``keep_tokens`` (+ margin) to the
        pool, e.g. after a crop; an active slot then uses at most
        ``keep_tokens`` tokens (``used_bytes`` follows even when no page is
        dropped). On CUDA the unmap waits for the work queued on ``stream``
        (default: current stream). Returns pages decommitted per buffer."""
        slot = self._check_slot(slot, active=False)
        keep = check_int("keep_tokens", keep_tokens, low=0, high=self.max_seq_len)
        self._join_async()
        self._check_window_crop(slot, keep)
        if slot in self._active:
            self._used_tokens[slot] = min(self._used_tokens[slot], keep)
        keep_pages = self._pages_for(keep)
        drop = self._committed_pages[slot] - keep_pages
        if drop <= 0:
            return 0
        self._decommit_slot(slot, keep_pages, stream)
        return drop

    @_locked
    def reclaim(self, *, stream: Any = None) -> int:
        """Decommits the pages that freed slots still hold; returns pages per
        buffer freed. Pages go back to the pool (``pool.trim()`` returns them
        to the driver)."""
        self._check_open()
        self._join_async()
        freed = 0
        for slot in self._free_slots:
            freed += self._committed_pages[slot]
            self._decommit_slot(slot, 0, stream)
        return freed

    @_locked
    def can_step(self, seq_lens: Sequence[int] | np.ndarray | torch.Tensor | Mapping[int, int]) -> bool:
        """Whether :meth:`step` would succeed now (``seq_lens`` as for :meth:`step`)."""
        need = self._parse_seq_lens(seq_lens)
        self._join_async()
        plan = self._plan(need)
        return sum(p - self._committed_pages[s] for s, p in plan.items()) * len(self._buffers) <= (
            self._available_pages(reclaim=True)
        )

    # ----------------------------------------------------------- shared pages
    # fork() maps the full pages of a slot's prefix into a new slot
    # (Reservation.alias: the pool counts each page's mappings and frees it only
    # when the last one goes). Here each slot keeps a share id for its leading
    # pages that fork() lent or mapped (the same page index in every buffer)
    # and ``_page_refs`` how many slots map each id, so that memory_stats counts
    # a shared page once and a freed slot never keeps a page another slot maps
    # (deferred reclamation counts a freed slot's pages as freeable).

    @_locked
    def fork(self, slot: int, num_tokens: int) -> int:
        """Takes a free slot whose first ``num_tokens`` tokens, in every layer, are
        those of ``slot``, and returns it (parallel sampling, beam search, a cached prefix).

        The pages of ``slot`` that lie entirely below ``num_tokens`` are mapped
        into the new slot, not copied: both slots read the same physical pages.
        The partly filled last page (and the ``margin_tokens`` rows) is
        committed fresh in the new slot and its rows below ``num_tokens`` are
        copied. New pages per buffer: ``pages_for_tokens(num_tokens)`` minus the
        shared ones, at most one without ``margin_tokens``.

        A shared page is **read-only by contract**: neither slot may write the
        rows it holds, those below the last page boundary under ``num_tokens``
        (appends go past the shared prefix, which is what decoding does; a
        crop into the prefix must end on a page boundary before writing
        again). A page returns to the pool only when no slot maps
        it: :meth:`free` of a slot holding shared pages decommits all its pages
        at once (so deferred reclamation never takes a page another slot
        reads), and :meth:`decommit` below the prefix drops the slot's own
        mappings only.

        Parameters
        ----------
        slot : int
            An active slot (from :meth:`alloc` or :meth:`fork`).
        num_tokens : int
            Tokens to share, at most those committed for ``slot``'s request.

        Raises :class:`OutOfSlotsError` / :class:`OutOfPagesError` with nothing
        changed; ``ValueError`` for a cache with a ``sliding_window`` (a windowed
        layer gives back the first pages a fork would share).
        """
        slot = self._check_slot(slot)
        num_tokens = check_int("num_tokens", num_tokens, low=0)
        self._join_async()
        if self._windowed:
            fail("fork", "a cache without sliding_window (windowed layers give back the pages a fork would share)",
                 f"sliding_window={self.sliding_window}")  # fmt: skip
        have = int(self._used_tokens[slot])
        if num_tokens > have:
            fail("num_tokens", f"an int <= {have} (the tokens committed for slot {slot})", num_tokens)
        if not self._free_slots:
            raise OutOfSlotsError(f"all {self.max_batch_size} slots of the KV cache are in use")
        nb = len(self._buffers)
        full = num_tokens * self.bytes_per_token_buffer // self.page_size  # pages shared, per buffer
        need = self._pages_for(num_tokens)
        # Prefer a freed slot without pages: the shared prefix replaces what it holds.
        new = min(self._free_slots, key=lambda s: self._committed_pages[s])
        stale = self._committed_pages[new]  # pages the freed slot still holds (all its own)
        fresh = max(0, need - max(stale, full)) * nb
        # Freed slots' pages count as available; the new slot's own pages [0, full)
        # return to the pool, its pages past the prefix are reused in place.
        available = self._available_pages(reclaim=True) - stale * nb + min(stale, full) * nb
        if fresh > available:
            raise OutOfPagesError(
                f"out of physical pages: fork of {num_tokens} tokens of slot {slot} needs {fresh} new page(s) of "
                f"{self.page_size} bytes, {available} available including pages cached by freed slots "
                f"(budget {self.pool.max_pages} pages)",
                requested_pages=fresh,
                available_pages=available,
            )
        self._free_slots.remove(new)
        try:
            self._map_prefix(new, slot, full)
            if need > self._committed_pages[new]:
                self._commit_plan({new: need})
        except BaseException:
            self._decommit_slot(new, 0, None)
            self._free_slots.append(new)
            raise
        self._copy_rows(new, slot, full * self.page_size, num_tokens * self.bytes_per_token_buffer)
        self._active.add(new)
        self._active_mask[new] = True
        self._used_tokens[new] = num_tokens
        return new

    @_locked
    def remap(self, slots: Sequence[int], sources: Sequence[int], num_tokens: Sequence[int]) -> int:
        """Slot ``slots[i]`` takes the first ``num_tokens[i]`` tokens of slot ``sources[i]``,
        in every layer, for every ``i`` at once (beam search's reorder, a batch repeat or select).

        A parallel assignment: every source is read as it was before the call,
        so permutations (``a <- b`` and ``b <- a``) work. As in :meth:`fork`,
        the source's pages that lie entirely below ``num_tokens[i]`` are
        mapped into the destination, not copied; pages the two slots already
        share are left alone; only the partly filled last page is copied. A
        destination thus copies at most one page per buffer, plus one page
        for each cycle of the assignment (staged while its slots are
        overwritten). ``slots[i] == sources[i]`` crops the slot to
        ``num_tokens[i]`` tokens (its pages stay; a shared page at the new end
        is replaced by a copy of its own, since appends go there).

        Afterwards each destination uses ``num_tokens[i]`` tokens (``used_bytes``),
        keeps the pages it owned past the shared prefix (no recommit), and the
        shared pages are read-only by contract, as after :meth:`fork`. Slots
        not named are untouched; a page returns to the pool only when no slot
        maps it.

        Parameters
        ----------
        slots : sequence of int
            Distinct active destination slots.
        sources : sequence of int
            Active slots, one per destination (may repeat, may be destinations).
        num_tokens : sequence of int
            Tokens taken, one per destination, at most those committed for its
            source's request.

        Returns
        -------
        int
            Bytes copied (partial pages, all buffers); 0 when every destination
            ends on a page boundary or already shares its source's pages.

        Raises :class:`OutOfPagesError` with nothing changed when the
        destinations' new last pages do not fit; ``ValueError`` for bad
        arguments or a cache with a ``sliding_window`` (whose windowed layers
        gave back the pages a remap would share: copy rows instead).
        """
        self._check_open()
        lists = []
        for what, seq in (("slots", slots), ("sources", sources), ("num_tokens", num_tokens)):
            if isinstance(seq, torch.Tensor):
                seq = seq.tolist()
            if not isinstance(seq, (Sequence, np.ndarray)) or isinstance(seq, (str, bytes)):
                fail(what, "a sequence of ints", type(seq), ArgumentTypeError)
            lists.append(list(seq))
        if not len(lists[0]) == len(lists[1]) == len(lists[2]):
            fail("slots, sources, num_tokens", "sequences of one length", tuple(len(x) for x in lists))
        dsts = [self._check_slot(s) for s in lists[0]]
        srcs = [self._check_slot(s) for s in lists[1]]
        if len(set(dsts)) != len(dsts):
            fail("slots", "distinct slots", dsts)
        self._join_async()
        if self._windowed:
            fail("remap", "a cache without sliding_window (windowed layers give back the pages a remap would share)",
                 f"sliding_window={self.sliding_window}")  # fmt: skip
        moves = {}
        for d, s, n in zip(dsts, srcs, lists[2]):
            have = int(self._used_tokens[s])
            moves[d] = (s, check_int(f"num_tokens for slot {d} (source slot {s} has {have} tokens)", n, low=0, high=have))
        return _remap.remap(self, moves)

    def _map_prefix(self, dst: int, src: int, count: int) -> None:
        """Maps pages ``[0, count)`` of slot ``src`` at pages ``[0, count)`` of slot ``dst`` in every
        buffer, replacing what ``dst`` holds there (its own pages, given back to the pool)."""
        if count == 0:
            return
        held = self._committed_pages[dst]
        if held:
            # Unmapped at once (alias needs the target pages gone, not pending on a
            # fence): first let the work queued on the current stream finish, it may
            # still read the rows of the request that freed this slot.
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            for res in self._reservations:
                res.decommit(dst * self.pages_per_slot, min(held, count), None)
        self._unshare(dst, 0)
        done = []
        try:
            for res in self._reservations:
                res.alias(dst * self.pages_per_slot, res, src * self.pages_per_slot, count)
                done.append(res)
        except BaseException:
            for res in done:
                res.decommit(dst * self.pages_per_slot, count, None)
            if held > count:  # pages past the prefix stay; [0, held) is now a hole: drop the rest too
                for res in self._reservations:
                    res.decommit(dst * self.pages_per_slot + count, held - count, None)
            self._set_committed(dst, 0)
            raise
        ids = self._shared_ids[src]
        while len(ids) < count:  # first share of these pages of src
            ids.append(self._next_share_id)
            self._page_refs[self._next_share_id] = 1
            self._next_share_id += 1
        for i in ids[:count]:
            self._page_refs[i] += 1
        self._shared_ids[dst] = ids[:count]
        self._set_committed(dst, max(held, count))

    def _unshare(self, slot: int, keep_pages: int) -> None:
        """Drops ``slot``'s references to its shared pages from ``keep_pages`` on
        (bookkeeping only: the caller unmaps them)."""
        ids = self._shared_ids[slot]
        for i in ids[keep_pages:]:
            self._page_refs[i] -= 1
            if self._page_refs[i] == 0:
                del self._page_refs[i]
        del ids[keep_pages:]

    def _copy_rows(self, dst: int, src: int, lo: int, hi: int) -> None:
        """Copies bytes ``[lo, hi)`` of slot ``src``'s row to slot ``dst``'s row in every buffer
        (bytes, not tokens: a token may straddle the page boundary at ``lo``)."""
        if hi <= lo:
            return
        for b in self._buffers:
            rows = b.as_subclass(torch.Tensor).view(self.max_batch_size, -1).view(torch.uint8)
            rows[dst, lo:hi].copy_(rows[src, lo:hi])

    # ------------------------------------------------------------------ stats
    @_locked
    def memory_stats(self) -> dict[str, Any]:
        """Memory of the cache, in bytes and pages.

        ``reserved_bytes`` (virtual), ``committed_bytes`` (physical, mapped),
        ``used_bytes`` (tokens committed for active requests x bytes per token),
        ``cached_bytes`` (committed by freed slots, kept for reuse),
        ``shared_pages`` (physical pages that several slots map after :meth:`fork`,
        each counted once in ``committed_bytes``),
        ``window_committed_bytes`` (what the layers with a ``sliding_window`` hold,
        part of ``committed_bytes``; 0 without windows),
        ``free_pages`` / ``pool_pages`` (the pool's free and existing pages),
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
            "cached_bytes": sum(held[slot] for slot in self._free_slots) * self.page_size,
            "window_committed_bytes": self._window_committed_pages() * self.page_size,
            "free_pages": s["free_pages"],
            "pool_pages": s["created_pages"],
            "max_pages": s["max_pages"],
            "page_size": self.page_size,
            "tokens_per_page": self.tokens_per_page,
            "active_slots": len(self._active),
            "commit_calls": self._commit_calls,
            "map_calls": s["map_calls"],
            "set_access_calls": s["set_access_calls"],
            "unmap_calls": s["unmap_calls"],
            "commit_seconds": s["commit_seconds"],
            "decommit_seconds": s["decommit_seconds"],
        }

    # ------------------------------------------------------------- lifecycle
    @_locked
    def close(self) -> None:
        """Returns every page to the pool now. Views obtained from :meth:`key` /
        :meth:`value` stay safe to hold and print (``<released>``): on the host
        backend they read zeros, on CUDA reading them is invalid like freed
        memory. The address ranges are released when the last view dies.
        Idempotent.

        The pages go back to the pool; a cache that made its own pool also
        returns them to the driver, one on a shared pool leaves that to the
        pool's owner (:meth:`PagePool.trim`)."""
        if self._forked:
            raise forked_error("KVCache", "cache", self._pid)
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
        self._shared_ids = [[] for _ in range(self.max_batch_size)]
        self._page_refs = {}
        if self._owns_pool:
            self.pool.trim()

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether the cache is closed (or was inherited through ``fork()``)."""
        return self._closed

    def __repr__(self) -> str:
        """Shape, layout and, per active slot, ``used/committed`` rows.

        Reads bookkeeping only, never K/V memory, and takes no lock (a snapshot
        while another thread commits may be one step stale)."""
        head = (
            f"KVCache(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, dtype={self.dtype}, "
            f"device={str(self.device)!r}, layout={self.layout!r}"
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
        self._pending_ticket = None

    # -------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            if self._forked:
                raise forked_error("KVCache", "cache", self._pid)
            raise RuntimeError("the KVCache is closed")

    def _check_slot(self, slot: Any, *, active: bool = True) -> int:
        self._check_open()
        slot = check_int("slot", slot, low=0, high=self.max_batch_size - 1)
        if active and slot not in self._active:
            fail("slot", "a slot returned by alloc() and not freed since", slot)
        return slot

    def _committed_rows(self, slot: int) -> int:
        return min(self.max_seq_len, self._committed_pages[slot] * self.page_size // self.bytes_per_token_buffer)

    def _set_committed(self, slot: int, pages: int) -> None:
        self._committed_pages[slot] = pages
        self._covered_tokens[slot] = self.tokens_for_pages(pages)

    def _pages_for(self, num_tokens: int) -> int:
        if num_tokens <= 0:
            return 0
        rows = min(num_tokens + self.margin_tokens, self.padded_seq_len)
        return -(-rows * self.bytes_per_token_buffer // self.page_size)

    def _parse_seq_lens(self, seq_lens: Any) -> np.ndarray:
        """``seq_lens`` in any accepted form -> int64 ``[max_batch_size]``, 0 = leave alone.

        The per-step hot path: vector checks, precise messages only on failure."""
        self._check_open()
        B = self.max_batch_size
        if isinstance(seq_lens, Mapping):
            return self._parse_mapping(seq_lens)
        if isinstance(seq_lens, torch.Tensor):
            got = f"{seq_lens.dtype} tensor of shape {tuple(seq_lens.shape)}"
            if seq_lens.dtype.is_floating_point or seq_lens.dtype.is_complex or seq_lens.dtype == torch.bool:
                fail("seq_lens", "a 1-D integer tensor", got, ArgumentTypeError)
            if seq_lens.dim() != 1:
                fail("seq_lens", "a 1-D integer tensor", got)
            seq_lens = seq_lens.detach().cpu().numpy()
        elif not isinstance(seq_lens, (Sequence, np.ndarray)) or isinstance(seq_lens, (str, bytes)):
            fail("seq_lens", "a sequence, a {slot: num_tokens} mapping or a 1-D tensor", type(seq_lens), ArgumentTypeError)
        shape = seq_lens.shape if isinstance(seq_lens, np.ndarray) else (len(seq_lens),)
        if shape != (B,):
            fail("seq_lens", f"{B} entries (one per slot)", f"shape {shape}")
        need = check_int_array("seq_lens", seq_lens, low=0, high=self.max_seq_len)
        inactive = (need != 0) & ~self._active_mask
        if inactive.any():
            self._check_slot(int(np.flatnonzero(inactive)[0]))
        return need

    def _parse_mapping(self, seq_lens: Mapping[Any, Any]) -> np.ndarray:
        B, max_len = self.max_batch_size, self.max_seq_len
        need = np.zeros(B, dtype=np.int64)
        if not seq_lens:
            return need
        slots, counts = list(seq_lens.keys()), list(seq_lens.values())
        if set(map(type, slots)) <= INT_TYPES and set(map(type, counts)) <= INT_TYPES:
            try:
                s, n = np.array(slots, dtype=np.int64), np.array(counts, dtype=np.int64)
            except OverflowError:
                pass  # a count past int64: the precise path below names it
            else:
                if (
                    ((s >= 0) & (s < B)).all()
                    and ((n >= 0) & (n <= max_len)).all()
                    and self._active_mask[s].all()
                ):
                    need[s] = n
                    return need
        for slot, n in seq_lens.items():  # something is wrong: find it, with its message
            slot = self._check_slot(slot)
            need[slot] = check_int(f"seq_lens[{slot}]", n, low=0, high=max_len)
        return need

    def _plan(self, need: np.ndarray) -> dict[int, int]:
        """{slot: pages per buffer wanted} for the slots that must grow."""
        grow = np.flatnonzero(need > self._covered_tokens)
        return {int(slot): self._pages_for(int(need[slot])) for slot in grow}

    def _available_pages(self, *, reclaim: bool) -> int:
        s = self.pool.stats()
        available = s["free_pages"] + max(0, s["max_pages"] - s["created_pages"]) + s["pending_pages"]
        if reclaim:
            available += sum(self._held_pages(slot) for slot in self._free_slots)
        return available

    def _commit_now(self, need: np.ndarray) -> None:
        plan = self._plan(need)
        if plan:
            self._commit_plan(plan)
        # Only once every page is mapped: a failed step changes nothing.
        np.maximum(self._used_tokens, need, out=self._used_tokens)

    def _commit_plan(self, plan: dict[int, int]) -> None:
        nb = len(self._buffers)
        wanted = sum(p - self._committed_pages[s] for s, p in plan.items()) * nb
        available = self._available_pages(reclaim=True)
        if wanted > available:
            raise OutOfPagesError(
                f"out of physical pages: this step needs {wanted} new page(s) of {self.page_size} bytes "
                f"(slots {sorted(plan)}), {available} available including pages cached by freed slots "
                f"(budget {self.pool.max_pages} pages)",
                requested_pages=wanted,
                available_pages=available,
            )
        # Deferred reclamation: take pages from freed slots, oldest first,
        # only when the pool cannot serve the step by itself.
        short = wanted - self._available_pages(reclaim=False)
        for victim in list(self._free_slots):
            if short <= 0:
                break
            if self._committed_pages[victim]:
                short -= self._held_pages(victim)
                self._decommit_slot(victim, 0, None)
        done: list[tuple[Any, int, int]] = []
        try:
            for slot, pages in plan.items():
                first = slot * self.pages_per_slot + self._committed_pages[slot]
                count = pages - self._committed_pages[slot]
                for res in self._reservations:
                    res.commit(first, count)
                    done.append((res, first, count))
        except BaseException:
            # All or nothing: undo this step's commits (unused, so no fence).
            for res, first, count in done:
                res.decommit(first, count, None)
            raise
        for slot, pages in plan.items():
            self._set_committed(slot, pages)
        self._commit_calls += 1

    def _decommit_slot(self, slot: int, keep_pages: int, stream: Any) -> None:
        count = self._committed_pages[slot] - keep_pages
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

    def _join_async(self) -> None:
        if self._pending_ticket is None:
            return
        ticket, plan = self._pending_ticket, self._pending_pages
        self._pending_ticket, self._pending_pages = None, {}
        try:
            self._committer.wait(ticket)
        except BaseException:
            # Jobs run buffer by buffer; find what each slot really has and
            # roll the partial prefetch back so every buffer agrees.
            for slot in plan:
                first = slot * self.pages_per_slot + self._committed_pages[slot]
                count = plan[slot] - self._committed_pages[slot]
                for res in self._reservations:
                    res.decommit(first, count, None)
            raise
        for slot, pages in plan.items():
            self._set_committed(slot, max(self._committed_pages[slot], pages))

    # ------------------------------------------------------ sliding windows
    # A layer with a sliding window of W tokens needs, after a step to length L,
    # only rows >= L - W (the next query, at L, sees keys from L - W + 1). Its
    # buffers then hold pages [first, committed) of a slot instead of
    # [0, committed): ``_first_pages[g, slot]`` per group g of buffers sharing a
    # window; every other buffer, and the page count ``_committed_pages``, stay
    # as without windows.

    def _init_windows(self) -> None:
        windows = sorted({w for w in self.sliding_window if w is not None})
        self._windowed = bool(windows)
        self._window_sizes = np.array(windows, dtype=np.int64)  # [G]
        self._first_pages = np.zeros((len(windows), self.max_batch_size), dtype=np.int64)  # [G, B]
        # Group of each buffer (K and V of layer l are buffers 2l and 2l + 1), -1: global.
        group = {w: g for g, w in enumerate(windows)}
        self._buffer_group = [group.get(self.sliding_window[i // 2], -1) for i in range(len(self._buffers))]
        self._group_buffers = [
            [self._reservations[i] for i, g in enumerate(self._buffer_group) if g == gi] for gi in range(len(windows))
        ]

    def _trim_windows(self, need: np.ndarray, before: np.ndarray | None) -> None:
        """Decommit, in every windowed buffer, the pages of the slots this step names (``need > 0``)
        that lie entirely behind ``before - W``, ``before`` the slot's length before the step: this
        step writes its new tokens from ``before`` on, and its first query (at ``before``) reads keys
        from ``before - W + 1`` on. So a layer holds at most W + new tokens + 2 pages of rows.
        Vectorised; no-op without windows."""
        if not self._windowed:
            return
        # First page still needed: the one holding row before - W (floor), never past what is committed.
        target = np.maximum(before[None, :] - self._window_sizes[:, None], 0) * self.bytes_per_token_buffer
        target //= self.page_size
        np.minimum(target, np.asarray(self._committed_pages)[None, :], out=target)
        grow = (need[None, :] > 0) & (target > self._first_pages)
        if not grow.any():
            return
        fence = self._buffers[0]._fence_stream(None)
        for g, slot in zip(*np.nonzero(grow)):
            lo, hi = int(self._first_pages[g, slot]), int(target[g, slot])
            for res in self._group_buffers[g]:
                res.decommit(int(slot) * self.pages_per_slot + lo, hi - lo, fence)
            self._first_pages[g, slot] = hi

    def _decommit_windowed(self, slot: int, keep_pages: int, fence: Any) -> None:
        """``_decommit_slot`` when some buffers start at a later page: each buffer gives back
        its committed pages from ``keep_pages`` on."""
        end = self._committed_pages[slot]
        for res, g in zip(self._reservations, self._buffer_group):
            lo = keep_pages if g < 0 else max(keep_pages, int(self._first_pages[g, slot]))
            if end > lo:
                res.decommit(slot * self.pages_per_slot + lo, end - lo, fence)
        np.minimum(self._first_pages[:, slot], keep_pages, out=self._first_pages[:, slot])

    @_locked
    def window_start(self, layer: int) -> np.ndarray:
        """First row of each slot that ``layer`` still holds (int64 ``[max_batch_size]``): the
        rows below it were given back behind the layer's sliding window; 0 for a global layer."""
        self._check_open()
        layer = check_int("layer", layer, low=0, high=self.num_layers - 1)
        self._join_async()
        g = self._buffer_group[2 * layer] if self._windowed else -1
        if g < 0:
            return np.zeros(self.max_batch_size, dtype=np.int64)
        return -(-self._first_pages[g] * self.page_size // self.bytes_per_token_buffer)

    def _held_pages(self, slot: int) -> int:
        """Pages committed for ``slot`` in all buffers together."""
        held = self._committed_pages[slot] * len(self._buffers)
        if self._windowed:
            held -= sum(int(self._first_pages[g, slot]) * len(b) for g, b in enumerate(self._group_buffers))
        return held

    def _window_committed_pages(self) -> int:
        total = 0
        committed = np.asarray(self._committed_pages)
        for g, bufs in enumerate(self._group_buffers):
            total += int((committed - self._first_pages[g]).sum()) * len(bufs)
        return total

    def _check_window_crop(self, slot: int, keep: int) -> None:
        """A crop to ``keep`` tokens must leave every windowed layer the rows its next query reads."""
        if not self._windowed or keep == 0:
            return
        for g, w in enumerate(self._window_sizes.tolist()):
            first_row = -(-int(self._first_pages[g, slot]) * self.page_size // self.bytes_per_token_buffer)
            if first_row > max(0, keep - w):
                fail(f"keep_tokens of slot {slot}", f"0 or at least {first_row + w} (its layers with a "
                     f"{w}-token window gave back the rows below {first_row})", keep)  # fmt: skip


def _parse_windows(sliding_window: Any, num_layers: int, layout: str) -> list[int | None]:
    """``sliding_window`` -> one entry per layer (``None``: a global layer)."""
    if sliding_window is None:
        return [None] * num_layers
    if isinstance(sliding_window, (Sequence, np.ndarray)) and not isinstance(sliding_window, (str, bytes)):
        if len(sliding_window) != num_layers:
            fail("sliding_window", f"an int or a list of {num_layers} entries (one per layer)",
                 f"{len(sliding_window)} entries")  # fmt: skip
        windows = [None if w is None else check_int(f"sliding_window[{i}]", w, low=1) for i, w in enumerate(sliding_window)]
    else:
        windows = [check_int("sliding_window", sliding_window, low=1)] * num_layers
    if layout != "per_layer" and any(w is not None for w in windows):
        fail("sliding_window", "None with layout='interleaved' (its pages hold every layer of a token, so a "
             "page behind a window is still needed by the global layers: use layout='per_layer')", sliding_window)  # fmt: skip
    return windows
