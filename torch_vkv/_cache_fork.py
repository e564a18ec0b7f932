"""Forks of :class:`~torch_vkv.KVCache`: slots that share the physical pages of a prefix.

:meth:`_ForkMixin.fork` maps the full pages of a slot's prefix into a new slot
(``Reservation.alias``: the pool counts each page's mappings and frees it only
when the last one goes). Each slot keeps a share id for its leading pages that
fork() lent or mapped (the same page index in every buffer) and ``_page_refs``
how many slots map each id, so that memory_stats counts a shared page once and
a freed slot never keeps a page another slot maps (deferred reclamation counts
a freed slot's pages as freeable). The C++ slot table sees a forked slot as
any other: its committed pages, from its first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from torch_vkv import _remap
from torch_vkv._checks import ArgumentTypeError, check_int, fail
from torch_vkv._lifetime import locked
from torch_vkv.errors import OutOfPagesError, OutOfSlotsError

if TYPE_CHECKING:
    from torch_vkv.cache import KVCache


class _ForkMixin:
    """:meth:`fork` and the shared-page bookkeeping of :class:`~torch_vkv.KVCache`."""

    @locked
    def fork(self: "KVCache", slot: int, num_tokens: int) -> int:
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
        changed, also when the pages run out after the check (another user of
        a shared pool, the driver): the freed slot it picked keeps the pages it
        had cached, since its pages are unmapped only once every new page is
        there (pages of other freed slots reclaimed for the fork stay
        reclaimed, as in a failed :meth:`step`). ``ValueError`` for a cache
        with a ``sliding_window`` (a windowed layer gives back the first pages
        a fork would share).

        On CUDA the pages the new slot held before are unmapped after the work
        queued on the current stream: work on other streams that still reads
        the freed request's rows is the caller's to finish first.
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
        stale = int(self._committed_pages[new])  # pages the freed slot still holds (all its own)
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
        at = self._free_slots.index(new)
        del self._free_slots[at]
        try:
            self._fork_pages(new, slot, full, need)
        except BaseException:
            self._free_slots.insert(at, new)  # in its place: the freed order is the reclaim order
            raise
        self._copy_rows(new, slot, full * self.page_size, num_tokens * self.bytes_per_token_buffer)
        self._active.add(new)
        self._active_mask[new] = True
        self._used_tokens[new] = num_tokens
        return new

    @locked
    def remap(self: "KVCache", slots: Sequence[int], sources: Sequence[int], num_tokens: Sequence[int]) -> int:
        """Slot ``slots[i]`` takes the first ``num_tokens[i]`` tokens of slot ``sources[i]``,
        in every layer, for every ``i`` at once (beam search's reorder, a batch repeat or select).

        A parallel assignment: every source is read as it was before the call,
        so permutations (``a <- b`` and ``b <- a``) work. As in :meth:`fork`,
        the source's pages that lie entirely below ``num_tokens[i]`` are
        mapped into the destination, not copied; pages the two slots already
        share are left alone; only the partly filled last page is copied. A
        destination thus copies at most one page per buffer, cycles of the
        assignment included (a cycle member is staged by mapping its pages
        aside, which needs one spare page per buffer until its reader has
        copied). ``slots[i] == sources[i]`` crops the slot to
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
        destinations' new last pages do not fit, also when another user of a
        shared pool takes pages meanwhile (they are taken before anything
        moves). A driver error during the moves (a failed map or unmap: not
        expected) is raised as it comes, not rolled back: destinations moved
        before it hold their new rows, the others may not (free them).
        ``ValueError`` for bad
        arguments or a cache with a ``sliding_window`` (whose windowed layers
        gave back the pages a remap would share: copy rows instead). As with
        :meth:`fork`, pages a destination gives up are unmapped after the work
        queued on the current stream (on CUDA).
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

    @locked
    def freeable_pages(self: "KVCache", slots: Sequence[int]) -> int:
        """Pool pages (all buffers together) that freeing every slot of ``slots``
        (active slots) would make available, as :meth:`available_pages` counts
        them: the pages they hold that no other slot maps. A page several of them
        share counts once; a page a slot outside ``slots`` maps (a fork, a cached
        prefix) counts not at all, since freeing gives back only the references.
        A scheduler asks it before freeing cached slots for memory (prefix
        caching's parked slots): freeing one whose pages running slots share
        gains nothing."""
        self._check_open()
        chosen = {self._check_slot(s) for s in slots}
        self._join_async()
        maps: dict[int, int] = {}
        held = 0
        for s in chosen:
            held += self._held_pages(s)
            for i in self._shared_ids[s]:
                maps[i] = maps.get(i, 0) + 1
        # A page with a share id (the same page index in every buffer) counts in `held` once per
        # chosen slot mapping it: it frees once when they are all its mappers, else never.
        extra = sum(n if self._page_refs[i] > n else n - 1 for i, n in maps.items())
        return held - extra * len(self._buffers)

    def _fork_pages(self: "KVCache", new: int, src: int, full: int, need: int) -> None:
        """Maps pages ``[0, full)`` of slot ``src`` at those of the freed slot ``new``
        in every buffer and gives ``new`` pages of its own up to ``need``, all or
        nothing: ``new`` keeps the pages it had on any failure.

        ``new``'s own pages ``[0, k)`` that the prefix replaces return to the pool,
        its pages past ``full`` stay in place, and the pages it lacks up to
        ``need`` are first taken from those ``[0, k)`` (aliased past the prefix
        within its range: no new memory), then committed fresh. Both happen before
        anything of ``new`` is unmapped, so running out (a shared pool, the
        driver) changes nothing; only after that are ``[0, k)`` unmapped and the
        prefix mapped. A driver error in that last alias gives ``new`` pages
        of its own back in ``[0, k)`` (fresh ones: a freed slot's rows are not
        kept), or, if even that fails, leaves it without pages."""
        stale = int(self._committed_pages[new])  # pages the freed slot holds (all its own)
        k = min(stale, full)  # of them, replaced by the prefix
        top = max(stale, full)  # where new's pages end once the prefix is mapped
        moved = min(max(0, need - top), k)  # pages past `top` taken from [0, k)
        fresh = max(0, need - top) - moved  # pages past those, committed fresh
        base, pps = new * self.pages_per_slot, self.pages_per_slot
        reservations = self._reservations
        past: list = []  # mapped past `top`: undone on failure
        try:
            if moved:
                for res in reservations:
                    res.alias(base + top, res, base, moved)
                    past.append((res, base + top, moved))
            if fresh:
                self._reclaim_for(fresh * len(reservations), self._available_pages(reclaim=False), [new])
                for res in reservations:
                    res.commit(base + top + moved, fresh)
                    past.append((res, base + top + moved, fresh))
        except BaseException:
            for res, first, count in past:
                res.decommit(first, count, None)
            raise
        if k:
            # Unmapped at once (alias needs the target pages gone, not pending on a
            # fence): first let the work queued on the current stream finish, it may
            # still read the rows of the request that freed this slot.
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            for res in reservations:
                res.decommit(base, k, None)
        try:
            if full:
                for res in reservations:
                    res.alias(base, res, src * pps, full)
        except BaseException:
            self._restore_fork_target(new, stale, k, full, past)
            raise
        self._unshare(new, 0)
        ids = self._shared_ids[src]
        while len(ids) < full:  # first share of these pages of src
            ids.append(self._next_share_id)
            self._page_refs[self._next_share_id] = 1
            self._next_share_id += 1
        for i in ids[:full]:
            self._page_refs[i] += 1
        self._shared_ids[new] = ids[:full]
        self._set_committed(new, max(top, need))

    def _restore_fork_target(self: "KVCache", new: int, stale: int, k: int, full: int, past: list) -> None:
        """After a driver error mapping a fork's prefix: ``new`` back to ``stale`` pages of its own."""
        base = new * self.pages_per_slot
        try:
            for res in self._reservations:
                res.decommit(base, full, None)  # what the alias mapped (unmapped pages are skipped)
            for res, first, count in past:
                res.decommit(first, count, None)
            if k:
                for res in self._reservations:
                    res.commit(base, k)  # the k pages just went back to the pool
        except BaseException:
            for res in self._reservations:
                res.decommit(base, self.pages_per_slot, None)  # pages not mapped are skipped
            self._set_committed(new, 0)

    def _pages_kept(self: "KVCache", slot: int, keep_tokens: int) -> int:
        """Pages per buffer a crop of ``slot`` to ``keep_tokens`` keeps: those of
        ``pages_for_tokens``, less any past row ``keep_tokens`` that another slot
        still maps (a fork's prefix kept for ``margin_tokens``): the slot's next
        appends go there and would land in the other slot's rows; the next commit
        backs them with pages of the slot's own."""
        keep_pages = self._pages_for(keep_tokens)
        row_pages = -(-keep_tokens * self.bytes_per_token_buffer // self.page_size)  # pages holding rows < keep
        if any(self._page_refs[i] > 1 for i in self._shared_ids[slot][row_pages:keep_pages]):
            return row_pages
        return keep_pages

    def _unshare(self: "KVCache", slot: int, keep_pages: int) -> None:
        """Drops ``slot``'s references to its shared pages from ``keep_pages`` on
        (bookkeeping only: the caller unmaps them)."""
        ids = self._shared_ids[slot]
        for i in ids[keep_pages:]:
            self._page_refs[i] -= 1
            if self._page_refs[i] == 0:
                del self._page_refs[i]
        del ids[keep_pages:]

    def _copy_rows(self: "KVCache", dst: int, src: int, lo: int, hi: int) -> None:
        """Copies bytes ``[lo, hi)`` of slot ``src``'s row to slot ``dst``'s row in every buffer
        (bytes, not tokens: a token may straddle the page boundary at ``lo``)."""
        if hi <= lo:
            return
        for b in self._buffers:
            rows = b.as_subclass(torch.Tensor).view(self.max_batch_size, -1).view(torch.uint8)
            rows[dst, lo:hi].copy_(rows[src, lo:hi])
