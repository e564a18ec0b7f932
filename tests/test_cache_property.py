"""A stateful property test of KVCache against a plain Python model.

Random alloc / free / commit (and its alias reserve) / decommit / reclaim /
step / step_async / synchronize / prewarm, with seq_lens as a mapping, a list, an
int64 / int32 / strided array or a CPU tensor (the arrays and the tensor take
the C++ slot table's fast path, csrc/slots.h), random lookaheads, and the
page-sharing operations fork (a new slot) and remap (slots take other slots'
histories at once, beam search's reorder). The model keeps, per active slot, the tokens it uses and the value
written at every row of every layer's K and V. Checked after every step:

* every active slot's used rows are committed, and hold what was written, in
  ALL layers of K and V;
* ``used_bytes`` equals the model's tokens times ``bytes_per_token``;
* committed memory fits the budget and matches the pool's count; no page
  belongs to two slots;
* a failed commit / step / fork / remap changes nothing (``used_bytes``,
  committed rows and data included); ``alloc`` prefers a freed slot that
  still holds pages;
* shared pages: every reference count is positive and equals the number of
  slots mapping the page, so no page returns to the pool while a slot maps it
  (the data check above reads every shared row after every free, reclaim and
  deferred reclamation);
* ``close()`` returns every page.

``test_kvcache_state_machine`` is sized to run in well under a minute; the
``slow`` variant runs longer scenarios (``TORCH_VKV_SLOW_TESTS=1``).
"""

from __future__ import annotations

import os
from collections import Counter

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from torch_vkv import KVCache, OutOfPagesError, OutOfSlotsError

PAGE = 4096  # small host pages: 64 tokens a page per layer, 16 interleaved
L, H, D, B, MAX_SEQ = 2, 2, 8, 4, 512


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(
        layout=st.sampled_from(["per_layer", "interleaved"]),
        budget_pages=st.integers(min_value=8, max_value=160),
        first=st.lists(st.integers(min_value=0, max_value=MAX_SEQ // 2), min_size=0, max_size=B),
    )
    def setup(self, layout, budget_pages, first):
        self.cache = KVCache(
            L, H, D, max_batch_size=B, max_seq_len=MAX_SEQ, dtype=torch.float32, device="cpu",
            layout=layout, page_size=PAGE, memory_budget=budget_pages * PAGE,
        )  # fmt: skip
        self.budget_pages = budget_pages
        self.used: dict[int, int] = {}  # active slot -> tokens it uses (the model)
        self.ref = torch.zeros(B, L, 2, MAX_SEQ)  # value written at each row of each layer's K and V
        self.mark = 0
        # Start with some requests already admitted, so fewer examples begin idle.
        for n in first:
            slot = self.cache.alloc()
            self.used[slot] = 0
            self._commit_or_nothing({slot: n}, lambda: self.cache.commit(slot, n))

    # -- helpers ------------------------------------------------------------
    def _write(self, slot: int, start: int, stop: int) -> None:
        """Writes fresh values at rows [start, stop) of every layer's K and V."""
        if stop <= start:
            return
        self.mark += 1
        for layer in range(L):
            for kv, t in enumerate((self.cache.key(layer), self.cache.value(layer))):
                value = float(self.mark * 8 + layer * 2 + kv)
                t[slot, start:stop] = value
                self.ref[slot, layer, kv, start:stop] = value

    def _snapshot(self):
        stats = self.cache.memory_stats()
        rows = [self.cache.committed_tokens(s) for s in range(B)]
        return stats["used_bytes"], stats["committed_bytes"], rows

    def _commit_or_nothing(self, want: dict[int, int], call) -> bool:
        """Runs ``call`` (which commits ``want``); on success updates the model
        and writes the new rows, on OutOfPagesError checks nothing changed."""
        before = self._snapshot()
        try:
            call()
        except OutOfPagesError:
            assert self._snapshot() == before, "a failed commit changed the cache"
            assert not self.cache.can_step(want)
            return False
        for slot, n in want.items():
            old = self.used[slot]
            self.used[slot] = max(old, n)
            self._write(slot, old, self.used[slot])
        return True

    # -- rules ----------------------------------------------------------------
    @rule()
    def alloc(self):
        free = [s for s in range(B) if s not in self.used]
        warmest = max((self.cache.committed_tokens(s) for s in free), default=0)
        try:
            slot = self.cache.alloc()
        except OutOfSlotsError:
            assert not free
            return
        assert slot in free and self.cache.committed_tokens(slot) == warmest  # warm slots are reused first
        self.used[slot] = 0

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.used)))
        self.cache.free(slot)
        del self.used[slot]

    @precondition(lambda self: self.used)
    @rule(data=st.data(), n=st.integers(min_value=0, max_value=MAX_SEQ), alias=st.booleans())
    def commit(self, data, n, alias):
        slot = data.draw(st.sampled_from(sorted(self.used)))
        call = self.cache.reserve if alias else self.cache.commit
        if self._commit_or_nothing({slot: n}, lambda: call(slot, n)):
            assert self.cache.can_commit(slot, n)  # backed now: nothing more to commit

    @precondition(lambda self: self.used)
    @rule(data=st.data(), keep=st.integers(min_value=0, max_value=MAX_SEQ))
    def decommit(self, data, keep):
        slot = data.draw(st.sampled_from(sorted(self.used)))
        if self.cache._shared_ids[slot]:
            # The fork contract: a crop into shared pages must not write there next;
            # remap onto itself gives the slot its own copy of the page at the new end.
            keep = min(keep, self.used[slot])
            if not self._or_nothing(lambda: self.cache.remap([slot], [slot], [keep])):
                keep -= keep % (PAGE // self.cache.bytes_per_token_buffer)  # no page for a copy: end on a boundary
        self.cache.decommit(slot, keep)
        self.used[slot] = min(self.used[slot], keep)
        assert self.cache.committed_tokens(slot) >= self.used[slot]

    @rule()
    def reclaim(self):
        self.cache.reclaim()
        assert self.cache.memory_stats()["cached_bytes"] == 0
        assert all(self.cache.committed_tokens(s) == 0 for s in range(B) if s not in self.used)

    @precondition(lambda self: self.used)
    @rule(
        grow=st.lists(st.integers(min_value=0, max_value=96), min_size=B, max_size=B),
        form=st.sampled_from(["mapping", "list", "array", "array32", "strided", "tensor"]),
        use_async=st.booleans(),
        sync=st.booleans(),
        lookahead=st.sampled_from([0, 1, 1, 1, 17, 200]),
    )
    def step(self, grow, form, use_async, sync, lookahead):
        want = {s: min(MAX_SEQ, self.used[s] + grow[s]) for s in self.used}
        dense = [want.get(s, 0) for s in range(B)]
        seq_lens = {
            "mapping": want,
            "list": dense,
            "array": np.array(dense, dtype=np.int64),
            "array32": np.array(dense, dtype=np.int32),
            "strided": np.repeat(np.array(dense, dtype=np.int64), 2)[::2],
            "tensor": torch.tensor(dense, dtype=torch.int32),
        }[form]
        if use_async:
            call = lambda lens: self.cache.step_async(lens, lookahead_tokens=lookahead)  # noqa: E731
        else:
            call = self.cache.step
        ok = self._commit_or_nothing({s: n for s, n in want.items() if n}, lambda: call(seq_lens))
        if ok and use_async and sync:
            self.cache.synchronize()

    def _or_nothing(self, call) -> bool:
        before, ref = self._snapshot(), self.ref.clone()
        try:
            call()
        except (OutOfPagesError, OutOfSlotsError):
            assert self._snapshot() == before, "a failed fork/remap changed the cache"
            self.data_intact_in_every_layer()
            return False
        return True

    @precondition(lambda self: self.used)
    @rule(data=st.data(), part=st.floats(min_value=0, max_value=1))
    def fork(self, data, part):
        slot = data.draw(st.sampled_from(sorted(self.used)))
        n = int(self.used[slot] * part)
        out = []
        if self._or_nothing(lambda: out.append(self.cache.fork(slot, n))):
            new = out[0]
            assert new not in self.used
            self.used[new] = n
            self.ref[new] = 0
            self.ref[new, :, :, :n] = self.ref[slot, :, :, :n]

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def remap(self, data):
        active = sorted(self.used)
        dsts = data.draw(st.lists(st.sampled_from(active), min_size=1, max_size=len(active), unique=True))
        srcs = [data.draw(st.sampled_from(active)) for _ in dsts]
        ns = [data.draw(st.integers(min_value=0, max_value=self.used[s])) for s in srcs]
        if self._or_nothing(lambda: self.cache.remap(dsts, srcs, ns)):
            old = self.ref.clone()
            for d, s, n in zip(dsts, srcs, ns):
                self.ref[d, :, :, :n] = old[s, :, :, :n]
                self.used[d] = n

    @rule(n=st.integers(min_value=0, max_value=MAX_SEQ), num_slots=st.integers(min_value=0, max_value=B),
          max_pages=st.none() | st.integers(min_value=0, max_value=24), keep=st.integers(min_value=0, max_value=16))
    def prewarm(self, n, num_slots, max_pages, keep):
        """Eager allocation grows free slots only, from free pool pages only, within its limits."""
        c = self.cache
        used, _, rows = self._snapshot()  # joins the prefetch: the pool's count below is settled
        pool = c.pool.stats()
        free_pages = pool["free_pages"] + pool["max_pages"] - pool["created_pages"] + pool["pending_pages"]
        pages = c._committed_pages.copy()
        got = c.prewarm(n, num_slots=num_slots, max_pages=max_pages, keep_free_pages=keep)
        after_used, _, after_rows = self._snapshot()
        assert after_used == used and all(after_rows[s] == rows[s] for s in self.used)
        assert got == int((c._committed_pages - pages).sum()) * len(c._buffers)
        assert got <= max(0, free_pages - keep) and (max_pages is None or got <= max_pages)
        grown = [s for s in range(B) if c._committed_pages[s] > pages[s]]
        assert not set(grown) & set(self.used) and len(grown) <= num_slots
        assert all(c._committed_pages[s] <= c.pages_for_tokens(n) for s in grown)  # up to n tokens, no more

    # -- invariants -------------------------------------------------------------
    @invariant()
    def counts_agree(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        stats = c.memory_stats()
        assert stats["used_bytes"] == sum(self.used.values()) * c.bytes_per_token
        assert stats["active_slots"] == len(self.used) and c.active_slots == sorted(self.used)
        for slot, n in self.used.items():
            assert c.committed_tokens(slot) >= n
        pool = c.pool.stats()
        assert pool["mapped_pages"] + pool["pending_pages"] <= self.budget_pages
        assert stats["committed_bytes"] == pool["mapped_pages"] * PAGE
        for res in c._reservations:
            owned = [0] * B
            for first, count in res.committed_ranges():
                for page in range(first, first + count):
                    owned[page // c.pages_per_slot] += 1
            # each slot owns exactly the pages the manager thinks, all inside its row
            assert owned == list(c._committed_pages)
        # the slot table's covered tokens follow its committed pages
        assert list(c._covered_tokens) == [c.tokens_for_pages(int(p)) for p in c._committed_pages]

    @invariant()
    def shared_pages_counted(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        refs = dict(c._page_refs)
        assert all(r > 0 for r in refs.values()), "a page reference count went to zero or below"
        mapped_by = Counter(i for s in range(B) for i in c._shared_ids[s])
        assert refs == dict(mapped_by), "reference counts differ from the slots mapping each page"
        for s in range(B):  # shared pages are committed, at the front of the slot's row
            assert len(c._shared_ids[s]) <= c._committed_pages[s]
        for s in set(range(B)) - set(self.used):  # a freed slot keeps only pages of its own
            assert all(refs[i] == 1 for i in c._shared_ids[s])

    @invariant()
    def data_intact_in_every_layer(self):
        if not hasattr(self, "cache"):
            return
        for slot, n in self.used.items():
            if not n:
                continue
            for layer in range(L):
                for kv, t in enumerate((self.cache.key(layer), self.cache.value(layer))):
                    got = t[slot, :n]
                    want = self.ref[slot, layer, kv, :n, None, None].expand_as(got)
                    assert torch.equal(got, want), f"slot {slot} layer {layer} {'KV'[kv]} lost its data"

    def teardown(self):
        if hasattr(self, "cache"):
            pool = self.cache.pool
            self.cache.close()
            assert pool.stats()["mapped_pages"] == 0 and pool.stats()["created_pages"] == 0


KVCacheMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=80, deadline=None, suppress_health_check=list(HealthCheck)
)
test_kvcache_state_machine = KVCacheMachine.TestCase


class SlowKVCacheMachine(KVCacheMachine):
    pass


SlowKVCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=150, deadline=None, suppress_health_check=list(HealthCheck)
)
test_kvcache_state_machine_long = pytest.mark.slow(
    pytest.mark.skipif(
        os.environ.get("TORCH_VKV_SLOW_TESTS") != "1",
        reason="the long variant (minutes on the CPU) runs with TORCH_VKV_SLOW_TESTS=1",
    )(SlowKVCacheMachine.TestCase)
)
