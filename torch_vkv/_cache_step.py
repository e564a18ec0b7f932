"""The per-step API of :class:`~torch_vkv.KVCache`: ``step``, ``step_async``, ``can_step``, ``synchronize``.

The slot table itself (per-slot lengths and committed pages, the windows'
first pages, the queued prefetch) lives in the C++ core (``csrc/slots.h``,
``torch_vkv._C.SlotTable``), which also decides, per step, what to commit now
and what to prefetch. A step whose ``seq_lens`` is a 1-D int32/int64 NumPy
array (or a CPU tensor of those) and that crosses no page boundary is one C++
call. Python takes over only where it must, each time with the table left as
it was:

* input that is not such an array, or not valid: parsed here
  (:meth:`_StepMixin._parse_seq_lens`, which raises the precise error) and
  passed again as an int64 array;
* a step the pool cannot serve by itself: pages of freed slots are reclaimed
  here (their order and the fork bookkeeping are the cache's), or
  :class:`~torch_vkv.OutOfPagesError` is raised, and the step runs again;
* pages behind a sliding window: the table trims them in C++, with the fence
  stream asked of torch here, only on a step where some window crosses a page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from torch_vkv._checks import INT_TYPES, ArgumentTypeError, check_int, check_int_array, fail
from torch_vkv._lifetime import locked
from torch_vkv.errors import OutOfPagesError

if TYPE_CHECKING:
    from torch_vkv.cache import KVCache

__all__ = ["STEP_DONE", "STEP_INVALID", "STEP_SHORT", "STEP_TRIM"]

#: Statuses of ``SlotTable.step`` (``csrc/slots.h``), equal to ``torch_vkv._C.STEP_*``
#: (kept as plain ints so that importing torch_vkv does not load the extension).
STEP_DONE, STEP_INVALID, STEP_SHORT, STEP_TRIM = 0, 1, 2, 3

# CPU tensors of these dtypes reach the C++ fast path as a NumPy view (no copy).
_FAST_TENSOR_DTYPES = (torch.int64, torch.int32)

SeqLens = Sequence[int] | np.ndarray | torch.Tensor | Mapping[int, int]


class _StepMixin:
    """The per-iteration methods of :class:`~torch_vkv.KVCache` (see the module docstring)."""

    @locked
    def step(self: "KVCache", seq_lens: SeqLens) -> None:
        """Commits, now, what every active slot needs for this iteration.

        Parameters
        ----------
        seq_lens : list, numpy.ndarray, torch.Tensor or mapping
            Tokens each slot must hold after this step, its new tokens
            included: ``max_batch_size`` integers, shape ``[max_batch_size]``
            (0 for slots to leave alone; a CUDA tensor costs a device sync), or
            a ``{slot: num_tokens}`` mapping of active slots. An int64 or int32
            NumPy array (or CPU tensor) is the fastest form: it goes to the C++
            slot table as it is; a list or a mapping is converted first.

        All or nothing across slots: :class:`OutOfPagesError` leaves every slot
        as it was, ``used_bytes`` included.
        """
        self._step(seq_lens, -1)

    def step_async(self: "KVCache", seq_lens: SeqLens, *, lookahead_tokens: int = 1) -> None:
        """The paper's per-iteration call: backs ``seq_lens`` now (normally
        already done by the previous call's prefetch) and commits, on the
        background thread, what ``seq_lens + lookahead_tokens`` will need, so
        the next step finds its pages mapped. Call :meth:`synchronize` (or any
        other method) before relying on the prefetched rows, and
        :meth:`committed_tokens` to know they are there (a prefetch that found
        no page is skipped).

        Parameters
        ----------
        seq_lens : list, numpy.ndarray, torch.Tensor or mapping
            As for :meth:`step`: shape ``[max_batch_size]`` or ``{slot: num_tokens}``.
        lookahead_tokens : int
            Tokens past ``seq_lens`` to prefetch for each slot that ``seq_lens`` names.

        The synchronous part is all or nothing (:class:`OutOfPagesError`
        changes nothing). The prefetch takes only pages that are free now; if
        memory is short it is skipped, and the next call's synchronous part
        raises :class:`OutOfPagesError` when the need is real. A call where
        no slot crosses a page boundary is one C++ call over the slot table
        (docs/design.md, "The slot table").
        """
        if type(lookahead_tokens) is not int or not 0 <= lookahead_tokens <= self.max_seq_len:
            # Past max_seq_len every lookahead means the whole row (and the table takes int64).
            lookahead_tokens = min(check_int("lookahead_tokens", lookahead_tokens, low=0), self.max_seq_len)
        # The lock taken here rather than by @locked, and the common case
        # inlined: this is the per-iteration call (docs/design.md, "The slot table").
        with self._lock:
            if type(seq_lens) is np.ndarray and not self._closed:
                status = self._slots.step(seq_lens, lookahead_tokens)
                if status != STEP_DONE:
                    self._finish_step(seq_lens, lookahead_tokens, status)
            else:
                self._step(seq_lens, lookahead_tokens)

    @locked
    def prewarm(self: "KVCache", num_tokens: int, *, num_slots: int = 1, max_pages: int | None = None,
                keep_free_pages: int = 0) -> int:  # fmt: skip
        """Eager allocation: commits pages under the free slots that :meth:`alloc`
        hands out next, so that a new request starts on mapped memory instead of
        waiting for the driver. A serving engine calls it while the GPU runs a
        step (``torch_vkv.serving.Engine`` does, after launching each forward).

        Parameters
        ----------
        num_tokens : int
            Tokens each such slot should be backed for (a new request's first chunk).
        num_slots : int
            How many of the next free slots (the warmest first, as :meth:`alloc` picks them).
        max_pages : int or None
            At most this many pages in all, counting every buffer (``None``: no limit);
            a slot grows by whole pages in every buffer, so less than one page per
            buffer commits nothing.
        keep_free_pages : int
            Pages to leave free in the pool.

        Takes only pages the pool has free now: it never reclaims another
        freed slot's pages, and the pages it commits stay reclaimable by any
        slot that needs memory (deferred reclamation). Best effort: returns
        the pages committed, 0 when there is nothing to do or no memory for it.
        """
        self._check_open()
        num_tokens = check_int("num_tokens", num_tokens, low=0, high=self.max_seq_len)
        num_slots = check_int("num_slots", num_slots, low=0)
        keep_free_pages = check_int("keep_free_pages", keep_free_pages, low=0)
        budget = None if max_pages is None else check_int("max_pages", max_pages, low=0)
        if not num_tokens or not num_slots or not self._free_slots:
            return 0
        target = self._pages_for(num_tokens)
        # alloc() takes the free slot holding the most pages, the first freed among equals.
        held = self._committed_pages
        if num_slots == 1:
            order = [max(self._free_slots, key=lambda s: int(held[s]))]
        else:
            order = sorted(self._free_slots, key=lambda s: -int(held[s]))[:num_slots]
        if all(int(held[s]) >= target for s in order):
            return 0  # the usual case in a running server: freed slots keep their pages
        per_buffer = len(self._buffers)
        if self._available_pages(reclaim=False) - keep_free_pages < per_buffer:
            return 0  # not a page group free even before the queued prefetch takes its pages
        self._join_async()  # the committer's queued prefetch takes its pages first
        free_now = self._available_pages(reclaim=False) - keep_free_pages
        budget = free_now if budget is None else min(budget, free_now)
        plan = {}
        for slot in order:
            have = int(self._committed_pages[slot])
            add = min(target - have, budget // per_buffer)
            if add > 0:
                plan[slot] = have + add
                budget -= add * per_buffer
        if not plan:
            return 0
        committed = sum(p - int(self._committed_pages[s]) for s, p in plan.items()) * per_buffer
        try:
            self._slots.commit_slots(list(plan.items()))
        except OutOfPagesError:  # another user of a shared pool took them: nothing changed
            return 0
        return committed

    @locked
    def can_step(self: "KVCache", seq_lens: SeqLens) -> bool:
        """Whether :meth:`step` would succeed now (``seq_lens`` as for :meth:`step`):
        ``step_pages(seq_lens) <= available_pages()``."""
        return self.step_pages(seq_lens) <= self._available_pages(reclaim=True)

    @locked
    def step_pages(self: "KVCache", seq_lens: SeqLens) -> int:
        """Pool pages (all buffers together) that :meth:`step` to ``seq_lens`` (as
        for :meth:`step`) must commit now, past what its slots hold once the queued
        prefetch has landed (it waits for it): a scheduler short of memory compares
        it with :meth:`available_pages` to know how many pages it lacks."""
        self._check_open()
        wanted = self._slots.plan_pages(seq_lens)
        if wanted < 0:
            wanted = self._slots.plan_pages(self._parse_seq_lens(seq_lens))
        return int(wanted)

    @property
    @locked
    def seq_lens(self: "KVCache") -> np.ndarray:
        """The tokens each slot uses now: the lengths the cache was last told, as
        a new int64 NumPy array of shape ``[max_batch_size]`` (a snapshot: writing
        into it changes nothing). A slot's entry is what the last :meth:`step`,
        :meth:`step_async`, :meth:`commit`, :meth:`fork` or :meth:`remap` gave
        it, lowered by a :meth:`decommit` below it (a crop); 0 for a free slot.
        ``memory_stats()["used_bytes"]`` is their sum times ``bytes_per_token``;
        a step to ``seq_lens`` gives a sliding layer back the pages behind
        ``seq_lens[slot] - W``. Not the prefetched rows: :meth:`committed_tokens`
        says what is backed."""
        self._check_open()
        return self._used_tokens.astype(np.int64, copy=True)

    @locked
    def available_pages(self: "KVCache") -> int:
        """Pool pages a commit could take now: free ones, ones not created yet,
        ones whose decommit waits on a fence, and those cached by freed slots
        (reclaimed on demand). Unlike :meth:`memory_stats` it does not wait for
        the background commits of :meth:`step_async` (a page they are taking
        may still count): the cheap figure for a scheduler's admission, which
        :meth:`can_step` then checks exactly."""
        self._check_open()
        return self._available_pages(reclaim=True)

    @locked
    def synchronize(self: "KVCache") -> None:
        """Waits for the background commits of :meth:`step_async`. A prefetch
        that found no page (another user of a shared pool took them, or the
        driver is full) is rolled back and skipped, as one queued when memory
        was short: only a synchronous step or :meth:`commit` backs rows for
        sure (it raises :class:`OutOfPagesError` when it cannot), and
        :meth:`committed_tokens` says what is backed. Other driver errors are
        raised here, the prefetched slots left as they were before it."""
        self._check_open()
        self._join_async()

    # -------------------------------------------------------------- internals
    def _join_async(self: "KVCache") -> None:
        self._slots.join()

    def _step(self: "KVCache", seq_lens: Any, lookahead: int) -> None:
        """One step through the C++ slot table (``lookahead < 0``: no prefetch)."""
        if self._closed:
            self._check_open()
        fast = seq_lens
        if type(seq_lens) is torch.Tensor and seq_lens.is_cpu and seq_lens.dtype in _FAST_TENSOR_DTYPES:
            fast = seq_lens.numpy()  # a view; integer tensors never require grad
        status = self._slots.step(fast, lookahead)
        if status != STEP_DONE:
            self._finish_step(seq_lens, lookahead, status)

    def _finish_step(self: "KVCache", given: Any, lookahead: int, status: int) -> None:
        """The rest of a step the table answered with ``status``: parse, reclaim or trim."""
        slots = self._slots
        seq_lens = given
        if status == STEP_INVALID:
            seq_lens = self._parse_seq_lens(given)  # the precise error, or an int64 array the table takes
            status = slots.step(seq_lens, lookahead)
        if status == STEP_SHORT:
            if not isinstance(seq_lens, np.ndarray):  # a CPU tensor the table read as it was
                seq_lens = self._parse_seq_lens(seq_lens)
            wanted, pool_available = slots.short_pages()
            self._reclaim_for(wanted, pool_available, np.flatnonzero(seq_lens > self._covered_tokens).tolist())
            status = slots.step(seq_lens, lookahead)
            if status == STEP_SHORT:  # the pool shrank meanwhile (a shared pool's other user)
                wanted, available = slots.short_pages()
                raise OutOfPagesError(
                    f"out of physical pages: this step needs {wanted} new page(s) of {self.page_size} bytes, "
                    f"{available} available after reclaiming freed slots (budget {self.pool.max_pages} pages)",
                    requested_pages=wanted,
                    available_pages=available,
                )
        if status == STEP_TRIM:
            slots.trim_windows(self._buffers[0]._fence_stream(None))
        elif status != STEP_DONE:
            raise RuntimeError(f"torch_vkv internal error: the slot table refused a checked step (status {status})")

    def _reclaim_for(self: "KVCache", wanted: int, pool_available: int, slots: list[int]) -> None:
        """Deferred reclamation: takes pages from freed slots, oldest first, until the pool can
        serve ``wanted`` pages (all buffers) for ``slots``; raises :class:`OutOfPagesError`,
        changing nothing, when even all of them would not do."""
        cached = sum(self._held_pages(slot) for slot in self._free_slots)
        if wanted > pool_available + cached:
            raise OutOfPagesError(
                f"out of physical pages: this step needs {wanted} new page(s) of {self.page_size} bytes "
                f"(slots {slots}), {pool_available + cached} available including pages cached by freed slots "
                f"(budget {self.pool.max_pages} pages)",
                requested_pages=wanted,
                available_pages=pool_available + cached,
            )
        short = wanted - pool_available
        for victim in list(self._free_slots):
            if short <= 0:
                break
            if self._committed_pages[victim]:
                short -= self._held_pages(victim)
                self._decommit_slot(victim, 0, None)

    def _commit_plan(self: "KVCache", plan: dict[int, int]) -> None:
        """Commits ``{slot: pages per buffer}`` from each slot's committed end, all or nothing,
        reclaiming freed slots' pages when the pool alone is short (the commit path of
        :meth:`fork`; steps go through the slot table's own)."""
        wanted = sum(max(0, p - int(self._committed_pages[s])) for s, p in plan.items()) * len(self._buffers)
        if wanted:
            self._reclaim_for(wanted, self._available_pages(reclaim=False), sorted(plan))
        self._slots.commit_slots(list(plan.items()))

    def _available_pages(self: "KVCache", *, reclaim: bool) -> int:
        # free + creatable within the budget + pending a fence, read without the pool's mutex (which the
        # background committer holds through its driver calls): a snapshot that every commit re-checks.
        available = self.pool._pool.available()
        if reclaim:
            available += self._held_pages_sum(self._free_slots)
        return available

    def _parse_seq_lens(self: "KVCache", seq_lens: Any) -> np.ndarray:
        """``seq_lens`` in any accepted form -> int64 ``[max_batch_size]``, 0 = leave alone.

        The slow path (the table took the input as it was otherwise): precise messages."""
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
            if seq_lens.device.type == "meta":
                fail("seq_lens", "a tensor with values (on the CPU or a GPU)", f"{got} on the meta device")
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

    def _parse_mapping(self: "KVCache", seq_lens: Mapping[Any, Any]) -> np.ndarray:
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
                if ((s >= 0) & (s < B)).all() and ((n >= 0) & (n <= max_len)).all() and self._active_mask[s].all():
                    need[s] = n
                    return need
        for slot, n in seq_lens.items():  # something is wrong: find it, with its message
            slot = self._check_slot(slot)
            need[slot] = check_int(f"seq_lens[{slot}]", n, low=0, high=max_len)
        return need
