"""A stateful property test of KVCache against a plain Python model.

Random alloc / free / reserve / decommit / step / step_async over thousands of
steps. Invariants after every step: every active slot's need is committed,
committed memory never exceeds the budget, no page belongs to two slots, each
slot's data is intact, and every page is returned after close().
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from torch_vkv import KVCache, OutOfPagesError, OutOfSlotsError

PAGE = 16 << 10  # 16 KiB host pages keep the test fast
MAX_SEQ = 512


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(
        layout=st.sampled_from(["per_layer", "interleaved"]),
        budget_pages=st.integers(min_value=4, max_value=48),
    )
    def setup(self, layout, budget_pages):
        self.cache = KVCache(
            2, 2, 8, max_batch_size=4, max_seq_len=MAX_SEQ, dtype=torch.float32, device="cpu",
            layout=layout, page_size=PAGE, memory_budget=budget_pages * PAGE,
        )
        self.budget_pages = budget_pages
        self.active: dict[int, int] = {}  # slot -> tokens it needs (the model)
        self.marks: dict[int, float] = {}  # slot -> value written at its rows

    def _write(self, slot: int, n: int) -> None:
        mark = float(slot * 1000 + n)
        for layer in range(2):
            self.cache.key(layer)[slot, :n].fill_(mark)
            self.cache.value(layer)[slot, :n].fill_(-mark)
        self.marks[slot] = mark

    @rule()
    def alloc(self):
        try:
            slot = self.cache.alloc()
        except OutOfSlotsError:
            assert len(self.active) == 4
            return
        assert slot not in self.active
        self.active[slot] = 0
        self.marks.pop(slot, None)

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.active)))
        self.cache.free(slot)
        del self.active[slot]
        self.marks.pop(slot, None)

    @precondition(lambda self: self.active)
    @rule(data=st.data(), n=st.integers(min_value=0, max_value=MAX_SEQ))
    def reserve(self, data, n):
        slot = data.draw(st.sampled_from(sorted(self.active)))
        before = self.cache.memory_stats()["committed_bytes"]
        try:
            self.cache.reserve(slot, n)
        except OutOfPagesError:
            assert self.cache.memory_stats()["committed_bytes"] <= before  # only reclaim may shrink
            assert not self.cache.can_reserve(slot, n)
            return
        self.active[slot] = max(self.active[slot], n)
        self._write(slot, self.active[slot])

    @precondition(lambda self: self.active)
    @rule(data=st.data(), keep=st.integers(min_value=0, max_value=MAX_SEQ))
    def decommit(self, data, keep):
        slot = data.draw(st.sampled_from(sorted(self.active)))
        self.cache.decommit(slot, keep)
        self.active[slot] = min(self.active[slot], keep)
        if self.active[slot]:
            self._write(slot, self.active[slot])

    @precondition(lambda self: self.active)
    @rule(grow=st.lists(st.integers(min_value=0, max_value=64), min_size=4, max_size=4), use_async=st.booleans())
    def step(self, grow, use_async):
        want = {s: min(MAX_SEQ, self.active[s] + grow[s]) for s in self.active}
        try:
            if use_async:
                self.cache.step_async(want)
            else:
                self.cache.step(want)
        except OutOfPagesError:
            return
        for s, n in want.items():
            self.active[s] = n
            if n:
                self._write(s, n)
        if use_async and grow[0] % 2:
            self.cache.synchronize()

    @invariant()
    def committed_covers_need_and_fits_budget(self):
        if not hasattr(self, "cache"):
            return
        for slot, n in self.active.items():
            assert self.cache.committed_tokens(slot) >= n
        pool = self.cache.pool.stats()
        assert pool["mapped_pages"] + pool["pending_pages"] <= self.budget_pages
        stats = self.cache.memory_stats()
        assert stats["committed_bytes"] == pool["mapped_pages"] * PAGE

    @invariant()
    def no_page_belongs_to_two_slots(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        for res in c._reservations:
            owned = [0] * c.max_batch_size
            for first, count in res.committed_ranges():
                for page in range(first, first + count):
                    owned[page // c.pages_per_slot] += 1
            # each slot owns exactly the pages the manager thinks, all inside its row
            assert owned == list(c._committed_pages)

    @invariant()
    def data_intact(self):
        if not hasattr(self, "cache"):
            return
        for slot, n in self.active.items():
            if n and slot in self.marks:
                k = self.cache.key(1)[slot, :n]
                assert bool((k == self.marks[slot]).all()), f"slot {slot} lost its data"

    def teardown(self):
        if hasattr(self, "cache"):
            pool = self.cache.pool
            self.cache.close()
            assert pool.stats()["mapped_pages"] == 0 and pool.stats()["created_pages"] == 0


KVCacheMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=100, deadline=None, suppress_health_check=list(HealthCheck)
)
test_kvcache_state_machine = KVCacheMachine.TestCase
