"""``KVCache.remap``: slots take other slots' histories by mapping pages, not copying rows.

A parallel assignment over slots: slot ``d`` takes the first ``n`` tokens of
slot ``s`` (every layer, K and V), for several ``(d, s, n)`` at once, reading
every source as it was before the call (beam search's reorder, a batch
repeat or select). Per destination, in every buffer::

    source s     |S0|S1|S2|s3|....       S = s's full pages below n, mapped into d (Reservation.alias)
    dest d       |S0|S1|S2|d3|....       d3 = d's own page, bytes below n copied from s3
                  ^ pages d already shares with s (same share id) are not touched

so a destination copies at most its partly filled last page. Pages d held
below that are unmapped (the pool frees a page only when no slot maps it).

Order. A slot's history may be needed by another destination while it is
itself overwritten (``a <- b`` and ``b <- a``). Moves run so that every
reader of a slot runs before the slot is overwritten; what is left then are
cycles, and each is broken by *staging* one member: its full pages and its
partly filled last page are mapped into a scratch reservation (no copy, no
new memory) and its reader later copies the partial page from there. The
staged pages get share ids, so the staged slot treats them as shared: it
writes its own new last page into a fresh page, never into the staged one.
So a remap copies exactly one partial page per destination that changes
(a crop ``d <- d`` onto a shared page stages that page the same way), and a
cycle holds one page per buffer more until its reader has copied.

All or nothing for capacity: the new pages every destination needs (its
partial page when it has none of its own there, or when the page it has is
staged or shared) are counted first, and :class:`OutOfPagesError` is raised
before anything changes. They are also made sure of before anything moves:
on the cache's own pool the ones missing are created (nobody else draws on
it under the cache's lock); on a shared pool, where another user may take
free pages at any time, they are committed into a scratch reservation and
mapped from there into place (one map more a new page). So running out never
stops a remap half way. A driver error during the moves (a failed map or
unmap: not expected) is not rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torch_vkv._ext import core
from torch_vkv.errors import OutOfPagesError

if TYPE_CHECKING:  # pragma: no cover
    from torch_vkv.cache import KVCache

__all__ = ["remap", "plan_moves"]


def plan_moves(sources: dict[int, int]) -> list[tuple[str, int, int]]:
    """The order of a parallel assignment ``d <- sources[d]`` (``d != sources[d]``).

    Returns ``("move", d, sources[d])`` and ``("stage", d, reader)`` entries:
    every move of ``d`` comes after all moves reading ``d``, except that of the
    one ``reader`` of a staged ``d``, which reads the staged history instead.
    Each cycle of the assignment gets exactly one ``stage``."""
    pending = dict(sources)
    readers: dict[int, int] = {}
    for s in pending.values():
        readers[s] = readers.get(s, 0) + 1
    ready = [d for d in pending if readers.get(d, 0) == 0]
    order: list[tuple[str, int, int]] = []
    while pending:
        if not ready:
            # Only cycles are left (every pending slot is read by exactly one
            # pending move, its cycle neighbour): stage one member.
            d = min(pending)
            reader = next(r for r, s in pending.items() if s == d)
            order.append(("stage", d, reader))
            readers[d] = 0
            ready.append(d)
        d = ready.pop()
        s = pending.pop(d)
        order.append(("move", d, s))
        readers[s] -= 1
        if readers[s] == 0 and s in pending:
            ready.append(s)
    return order


@dataclass
class _Staged:
    """Pages ``[lo, end)`` of a slot kept aside while the slot is overwritten:
    mapped into ``scratch`` (buffer ``i`` at page ``i * (end - lo)``), whose
    bytes ``view`` reads (plain uint8), with the share ids of pages ``[0, end)``.
    ``end`` is ``full`` plus the partly filled last page when there is one."""

    scratch: Any
    view: torch.Tensor | None
    lo: int
    end: int
    full: int
    ids: list[int]

    def page(self, buffer: int, page: int, page_size: int) -> torch.Tensor:
        """The bytes of staged page ``page`` (an index in the slot) of buffer ``buffer``."""
        at = (buffer * (self.end - self.lo) + page - self.lo) * page_size
        return self.view[at : at + page_size]


class _Remap:
    def __init__(self, cache: "KVCache", moves: dict[int, tuple[int, int]]) -> None:
        self.c = cache
        self.moves = moves  # destination -> (source, tokens)
        self.copied = 0
        # Unfenced unmaps (alias needs its target pages gone) must not overtake work queued
        # on the device: before the first one, and again after each copy this call queues.
        self.dirty = cache.device.type == "cuda"
        self.staged: dict[int, _Staged] = {}  # destination -> the staged history it reads
        self.spare: Any = None  # the new pages, taken before anything moves (reserve_pages)
        self.spare_next = 0
        self.order = plan_moves({d: s for d, (s, _) in moves.items() if s != d})

    # -- page arithmetic ------------------------------------------------------------
    def full(self, n: int) -> int:
        return n * self.c.bytes_per_token_buffer // self.c.page_size

    def end(self, n: int) -> int:
        """Pages holding bytes below ``n`` tokens: the full ones and the partly filled last one."""
        return -(-n * self.c.bytes_per_token_buffer // self.c.page_size)

    def rows(self, buffer: Any) -> torch.Tensor:
        """A buffer as ``[max_batch_size, bytes per slot]`` plain uint8 rows."""
        return buffer.as_subclass(torch.Tensor).view(self.c.max_batch_size, -1).view(torch.uint8)

    def first(self, slot: int, page: int = 0) -> int:
        return slot * self.c.pages_per_slot + page

    # -- capacity -----------------------------------------------------------------------
    def new_pages(self) -> int:
        """Pages (all buffers) the destinations will commit: each needs its own pages
        ``[full, pages_for(n))``; it keeps the own pages it holds there unless it
        shares a page at or past ``full`` (then they all go and are committed fresh),
        counting the pages a cycle stages as shared."""
        c = self.c
        shared_len = {d: len(c._shared_ids[d]) for d in self.moves}
        for d, (s, n) in self.moves.items():  # readers share their source's pages [0, full)
            if s in shared_len:
                shared_len[s] = max(shared_len[s], self.full(n))
        for kind, d, reader in self.order:  # a staged slot shares its reader's partial page too
            if kind == "stage":
                shared_len[d] = max(shared_len[d], self.end(self.moves[reader][1]))
        total = 0
        for d, (s, n) in self.moves.items():
            full, need = self.full(n), c._pages_for(n)
            if s == d and shared_len[d] <= full:
                continue  # a crop of its own pages: nothing to commit
            held = c._committed_pages[d]
            kept = full if shared_len[d] > full else max(held, full)
            total += max(0, need - kept)
        return total * len(c._buffers)

    def reserve_pages(self) -> None:
        """Makes sure every new page the destinations will need is there before anything
        changes, so that running out raises here with nothing changed, never half way through
        the moves. The cache's own pool: the pages the free ones, pending ones and freed slots
        cannot give are created now (a driver out of memory raises here); nobody else draws on
        the pool while the cache's lock is held. A shared pool (another user may take pages
        meanwhile): the new pages are committed into a scratch reservation now and
        :meth:`take` maps them into place (one map more a page)."""
        c = self.c
        wanted = self.new_pages()
        if not wanted:
            return
        available = c._available_pages(reclaim=True)
        if wanted > available:
            raise OutOfPagesError(
                f"out of physical pages: remapping slots {sorted(self.moves)} needs {wanted} new page(s) of "
                f"{c.page_size} bytes, {available} available including pages cached by freed slots "
                f"(budget {c.pool.max_pages} pages)",
                requested_pages=wanted,
                available_pages=available,
            )
        if c._owns_pool:
            s = c.pool.stats()
            short = wanted - (s["free_pages"] + s["pending_pages"] + sum(c._held_pages(f) for f in c._free_slots))
            if short > 0:
                c.pool._pool.prefill(s["created_pages"] + short)
            return
        spare = core().Reservation.create(c.pool._pool, wanted * c.page_size)
        c._reclaim_for(wanted, c._available_pages(reclaim=False), sorted(self.moves))
        spare.commit(0, wanted)  # all or nothing (OutOfPagesError: nothing mapped)
        self.spare, self.spare_next = spare, 0

    def take(self, d: int, have: int, need: int) -> None:
        """Backs pages ``[have, need)`` of ``d`` (its committed end) in every buffer: with pages
        :meth:`reserve_pages` took on a shared pool, else (or if they ran short: never expected,
        they are counted) a commit."""
        c = self.c
        count = (need - have) * len(c._reservations)
        if self.spare is None or self.spare_next + count > self.spare.num_pages:
            c._commit_plan({d: need})
            return
        for i, res in enumerate(c._reservations):
            res.alias(self.first(d, have), self.spare, self.spare_next + i * (need - have), need - have)
        self.spare_next += count
        c._set_committed(d, need)

    def release_spare(self) -> None:
        """Unmaps the scratch reservation: its pages that :meth:`take` mapped stay with their
        destinations, the others (none when the count was exact; all after a failure) go back."""
        if self.spare is not None:
            self.spare.decommit(0, self.spare.num_pages, None)  # never read through this address
            self.spare = None

    # -- steps ----------------------------------------------------------------------------
    def settle(self) -> None:
        if self.dirty:
            torch.cuda.current_stream(self.c.device).synchronize()
            self.dirty = False

    def share(self, slot: int, count: int) -> list[int]:
        """Share ids of ``slot``'s pages ``[0, count)``, giving ids to its own pages there."""
        c = self.c
        ids = c._shared_ids[slot]
        while len(ids) < count:
            ids.append(c._next_share_id)
            c._page_refs[c._next_share_id] = 1
            c._next_share_id += 1
        return ids[:count]

    def drop(self, slot: int, lo: int, hi: int) -> None:
        """Unmaps pages ``[lo, hi)`` of ``slot`` now and its share ids from ``lo`` on."""
        c = self.c
        c._unshare(slot, lo)
        if hi > lo:
            self.settle()
            for res in c._reservations:
                res.decommit(self.first(slot, lo), hi - lo, None)

    def stage(self, slot: int, reader: int) -> None:
        """Keeps ``slot``'s history for ``reader``, the one pending move that reads it."""
        c = self.c
        n = self.moves[reader][1]
        full, end = self.full(n), self.end(n)
        ids = self.share(slot, end)  # the partial page too: ``slot`` must not write it in place
        lo = min(full, _common(ids, c._shared_ids[reader]))  # pages reader maps already
        self.staged[reader] = self.keep(slot, lo, end, full, ids)

    def keep(self, slot: int, lo: int, end: int, full: int, ids: list[int]) -> _Staged:
        """Maps ``slot``'s pages ``[lo, end)`` (share ids ``ids``) into a scratch reservation."""
        c = self.c
        scratch, view = None, None
        if end > lo:
            span = end - lo
            scratch = core().Reservation.create(c.pool._pool, len(c._reservations) * span * c.page_size)
            view = torch.utils.dlpack.from_dlpack(scratch.dlpack())
            for i, res in enumerate(c._reservations):
                scratch.alias(i * span, res, self.first(slot, lo), span)
            for i in ids[lo:end]:
                c._page_refs[i] += 1
        return _Staged(scratch, view, lo, end, full, list(ids[:end]))

    def copy_tail(self, d: int, s: int, n: int, staged: _Staged | None) -> None:
        """Copies the bytes below ``n`` tokens of the partly filled last page into ``d``'s own
        page, from slot ``s`` or from ``staged``: the one copy a destination makes."""
        c = self.c
        lo_b, hi_b = self.full(n) * c.page_size, n * c.bytes_per_token_buffer
        if hi_b <= lo_b:
            return
        for i, b in enumerate(c._buffers):
            if staged is None:
                src = self.rows(b)[s, lo_b:hi_b]
            else:
                src = staged.page(i, self.full(n), c.page_size)[: hi_b - lo_b]
            self.rows(b)[d, lo_b:hi_b].copy_(src)
        self.copied += (hi_b - lo_b) * len(c._buffers)
        self.dirty = c.device.type == "cuda"

    def move(self, d: int) -> None:
        """Slot ``d`` takes its source's (or the staged) first ``n`` tokens."""
        c = self.c
        s, n = self.moves[d]
        full, need = self.full(n), c._pages_for(n)
        staged = self.staged.get(d)
        src_ids = staged.ids[:full] if staged is not None else self.share(s, full)
        ids = c._shared_ids[d]
        lo = _common(ids, src_ids)
        assert staged is None or lo >= staged.lo, (lo, staged.lo)  # d's ids only grew since staging
        held = c._committed_pages[d]
        if len(ids) > full:  # d shares pages at or past `full`: it must write there, so all go
            self.drop(d, lo, held)
            kept = full
        else:
            self.drop(d, lo, min(held, full))
            kept = max(held, full)
        if full > lo:
            for i, res in enumerate(c._reservations):
                if staged is None:
                    res.alias(self.first(d, lo), res, self.first(s, lo), full - lo)
                else:
                    span = staged.end - staged.lo
                    res.alias(self.first(d, lo), staged.scratch, i * span + lo - staged.lo, full - lo)
            for i in src_ids[lo:full]:
                c._page_refs[i] += 1
            c._shared_ids[d] = ids[:lo] + src_ids[lo:full]
        c._set_committed(d, kept)
        if need > kept:
            self.take(d, kept, need)
        self.copy_tail(d, s, n, staged)
        c._used_tokens[d] = n

    def own_tail(self, d: int) -> None:
        """``d <- d``: a crop to ``n`` tokens; a shared page at or past ``full`` is replaced
        by an own copy (copy on write), since ``d`` appends there next: the shared page
        stays mapped in a scratch reservation while ``d``'s fresh page is filled from it."""
        c = self.c
        n = self.moves[d][1]
        full, end = self.full(n), self.end(n)
        ids = c._shared_ids[d]
        if len(ids) > full:
            staged = self.staged[d] = self.keep(d, full, end, full, ids)
            self.drop(d, full, c._committed_pages[d])
            c._set_committed(d, full)
            need = c._pages_for(n)
            if need > full:
                self.take(d, full, need)
            self.copy_tail(d, d, n, staged)
        c._used_tokens[d] = n

    def release_staged(self) -> None:
        c = self.c
        for st in self.staged.values():
            if st.scratch is not None:
                self.settle()
                st.scratch.decommit(0, st.scratch.num_pages, None)
                for i in st.ids[st.lo : st.end]:
                    c._page_refs[i] -= 1
                    if c._page_refs[i] == 0:
                        del c._page_refs[i]
        self.staged.clear()

    def run(self) -> int:
        try:
            self.reserve_pages()
            for kind, d, other in self.order:
                if kind == "stage":
                    self.stage(d, other)
                else:
                    self.move(d)
            self.release_staged()  # before the crops: a crop stages under its own slot's key
            for d, (s, _) in self.moves.items():
                if s == d:
                    self.own_tail(d)
        finally:
            self.release_staged()
            self.release_spare()
        return self.copied


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two share-id lists: pages both slots already map."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def remap(cache: "KVCache", moves: dict[int, tuple[int, int]]) -> int:
    """Runs ``moves`` (destination -> (source, tokens)), already checked; returns bytes copied."""
    return _Remap(cache, moves).run()


