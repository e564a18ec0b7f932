"""``KVCache.prewarm`` (eager allocation) and the serving engine's use of it.

Host backend, 4 KiB pages. The cache: 2 layers, 2 KV heads, head_dim 16,
float32, so a token of one buffer is 128 bytes and a page holds 32 tokens of
each of the 4 ``per_layer`` buffers (8 tokens of the one ``interleaved`` buffer).
"""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from torch_vkv import KVCache
from torch_vkv._checks import ArgumentTypeError

PAGE = 4096


def make_cache(layout: str = "per_layer", **kw) -> KVCache:
    args = dict(max_batch_size=4, max_seq_len=256, dtype=torch.float32, device="cpu", layout=layout, page_size=PAGE)
    args.update(kw)
    return KVCache(2, 2, 16, **args)


def committed_pages(cache: KVCache) -> int:
    return cache.memory_stats()["committed_bytes"] // cache.page_size


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_prewarm_backs_the_slot_alloc_hands_out_next(layout):
    with make_cache(layout) as cache:
        buffers = 4 if layout == "per_layer" else 1
        pages = cache.pages_for_tokens(100)
        assert cache.prewarm(100) == pages * buffers
        assert committed_pages(cache) == pages * buffers and cache.memory_stats()["used_bytes"] == 0
        assert cache.prewarm(100) == 0  # already backed: nothing to do
        slot = cache.alloc()
        assert cache.committed_tokens(slot) >= 100
        before = committed_pages(cache)
        cache.step({slot: 100})  # the request's first chunk: no new page
        assert committed_pages(cache) == before
        # The K/V written there read back (the pages are the slot's own).
        k = torch.randn(100, 2, 16)
        cache.key(0)[slot, :100] = k
        torch.testing.assert_close(cache.key(0)[slot, :100], k)


def test_prewarm_limits_slots_pages_and_whole_page_groups():
    with make_cache() as cache:  # per_layer: a page group is 4 pages (one in each buffer)
        assert cache.prewarm(256, max_pages=3) == 0  # less than one page per buffer
        assert cache.prewarm(256, max_pages=9) == 8  # two whole groups
        assert cache.prewarm(256, num_slots=2, max_pages=8) == 8  # the same (warmest) slot grows first
        warm = sorted(int(cache._committed_pages[s]) for s in range(4))
        assert warm == [0, 0, 0, 4]
        assert cache.prewarm(64, num_slots=2) == 2 * 4  # the second slot of alloc's order gets 64 tokens too
        assert sorted(int(cache._committed_pages[s]) for s in range(4)) == [0, 0, 2, 4]
        assert [cache.committed_tokens(cache.alloc()) for _ in range(2)] == [128, 64]  # alloc's order


def test_prewarm_takes_only_free_pages_and_its_pages_stay_reclaimable():
    # A 12-page budget: 3 page groups of the per_layer layout.
    with make_cache(memory_budget=12 * PAGE) as cache:
        a = cache.alloc()
        cache.step({a: 64})  # 2 groups = 8 pages in use
        assert cache.prewarm(256, keep_free_pages=1) == 0  # 4 free, 1 kept: not a whole group
        assert cache.prewarm(256) == 4  # the last group
        assert cache.available_pages() == 4  # the prewarmed pages still count (reclaimable)
        cache.free(a)  # a's 8 pages stay with it (deferred reclamation)
        assert cache.prewarm(256) == 0  # nothing free: it never reclaims a's pages
        b = cache.alloc()  # a: the warmest free slot
        assert b == a and cache.committed_tokens(b) == 64
        cache.step({b: 96})  # needs a third group: reclaimed from the prewarmed slot
        assert cache.committed_tokens(b) == 96 and committed_pages(cache) == 12


def test_prewarm_checks_its_arguments():
    with make_cache() as cache:
        with pytest.raises(ArgumentTypeError, match="num_tokens"):
            cache.prewarm("100")
        with pytest.raises(ValueError, match="num_tokens: expected"):
            cache.prewarm(257)
        with pytest.raises(ValueError, match="max_pages: expected"):
            cache.prewarm(10, max_pages=-1)
        with pytest.raises(ValueError, match="keep_free_pages: expected"):
            cache.prewarm(10, keep_free_pages=-2)
        assert cache.prewarm(0) == 0 and cache.prewarm(10, num_slots=0) == 0
        for _ in range(4):
            cache.alloc()
        assert cache.prewarm(10) == 0  # no free slot
    with pytest.raises(RuntimeError, match="closed"):
        cache.prewarm(10)


def test_alloc_with_num_tokens_takes_the_tightest_warm_slot():
    """``alloc(num_tokens)``: the free slot backing ``num_tokens`` with the fewest
    pages to spare (a warm slot far larger than the request would hold its
    pages out of reach while the request runs); none backs it, or no
    ``num_tokens``: the slot holding the most pages."""
    with make_cache() as cache:  # 32 tokens a page
        slots = [cache.alloc() for _ in range(4)]
        cache.step({slots[0]: 64, slots[1]: 128, slots[2]: 32})  # 2, 4 and 1 pages
        for s in slots:
            cache.free(s)
        assert cache.alloc(40) == slots[0]  # 2 pages back 40 tokens; 4 would spare more
        assert cache.alloc(200) == slots[1]  # nobody backs 200: the warmest
        assert cache.alloc(0) == slots[3]  # any slot backs 0 tokens: the coldest
        assert cache.alloc() == slots[2]
        with pytest.raises(ValueError, match="num_tokens: expected"):
            cache.alloc(-1)
        with pytest.raises(ArgumentTypeError, match="num_tokens"):
            cache.alloc(1.5)


# ------------------------------------------------------------------ the engine's policy


def test_first_chunks_follow_the_queue_within_one_iterations_tokens_and_free_slots():
    from types import SimpleNamespace

    from torch_vkv.serving.prewarm import first_chunks

    queue = [SimpleNamespace(num_tokens=n) for n in (30, 50, 100, 7)]
    assert first_chunks(queue, max_tokens=64, free_slots=8) == [30, 34]  # the second request's first chunk
    assert first_chunks(queue, max_tokens=1000, free_slots=8) == [30, 50, 100, 7]
    assert first_chunks(queue, max_tokens=1000, free_slots=2) == [30, 50]
    assert first_chunks(queue, max_tokens=20, free_slots=8) == [20]
    assert first_chunks([], max_tokens=64, free_slots=8) == []
    assert first_chunks(queue, max_tokens=64, free_slots=0) == []


def _manager(**kw):
    from torch_vkv.serving.kv import KVManager

    args = dict(num_layers=2, num_kv_heads=2, head_dim=16, num_slots=4, max_seq_len=256, dtype=torch.float32,
                device=torch.device("cpu"), layout="per_layer", page_size=PAGE, memory_budget=64 * PAGE)
    args.update(kw)
    return KVManager("virtual", **args)


def _warm_free_slots(kv) -> list[int]:
    cache = kv.cache
    return sorted((cache.committed_tokens(s) for s in cache._free_slots), reverse=True)


def test_manager_prewarm_backs_several_slots_only_within_its_seconds():
    """``seconds=None`` (and 0) back one slot, as far as ``PREWARM_PAGES`` goes;
    with time to spare the next slots of alloc's order follow, and the pages
    are whole page groups of free pool pages, each slot at most ``num_tokens``."""
    kv = _manager()
    try:
        group = 4  # a page group: one page in each of the 4 per_layer buffers
        assert kv.prewarm(64, num_slots=3) == 2 * group  # 64 tokens = 2 pages a buffer, one slot only
        assert _warm_free_slots(kv) == [64, 0, 0, 0]
        assert kv.prewarm(64, num_slots=3, seconds=0.0) == 0  # the first slot is warm; no time for the next
        assert kv.prewarm(64, num_slots=3, seconds=60.0) == 2 * 2 * group
        assert _warm_free_slots(kv) == [64, 64, 64, 0]
        assert kv.prewarm(40, num_slots=4, seconds=60.0) == 2 * group  # 40 tokens: 2 pages of 32
        assert _warm_free_slots(kv) == [64, 64, 64, 64] and kv.prewarm_seconds > 0
        assert kv.prewarm(64, num_slots=4, seconds=60.0) == 0  # nothing left to do
    finally:
        kv.close()


def test_manager_prewarm_sizes_each_slot_and_fit_trims_only_when_memory_is_short():
    kv = _manager(memory_budget=32 * PAGE)  # 32 pool pages: 8 page groups of 32 tokens
    try:
        assert kv.prewarm([32, 96], seconds=60.0) == (3 + 1) * 4  # the largest first: 3 pages and 1 a buffer
        assert _warm_free_slots(kv) == [96, 32, 0, 0]
        small = kv.alloc(30)
        assert kv.cache.committed_tokens(small) == 32  # the tightest fit, not the warmest
        assert kv.fit(small, 10) == 0  # memory does not limit the batch: the pages stay
        kv.free(small)

        def lens(**by_slot):
            seq = np.zeros(kv.num_slots, dtype=np.int64)
            for s, n in by_slot.values():
                seq[s] = n
            return seq

        a, b = kv.alloc(), kv.alloc()
        kv.grow(lens(a=(a, 128), b=(b, 96)))  # 16 + 12 of the 32 pages
        kv.free(a)  # its 16 pages stay with the freed slot, reclaimable
        again = kv.alloc(20)  # the only free slot backing 20 tokens: a's
        assert again == a and kv.cache.committed_tokens(again) == 128
        assert kv.fit(again, 40) == 0  # memory does not limit the batch (the scheduler says): kept
        kv.memory_bound = True  # as the scheduler sets it when a waiting request finds too little memory
        assert kv.prewarm(32, seconds=60.0) == 0  # eager allocation pauses
        assert kv.fit(again, 40) == 2 * 4  # memory is short: pages past 40 tokens (2 a buffer) go back
        assert kv.cache.committed_tokens(again) == 64 and kv._covered[again] == 64
        assert kv.fit(again, 40) == 0
    finally:
        kv.close()


def test_manager_prewarm_keeps_a_share_of_the_pool_free():
    kv = _manager(memory_budget=20 * PAGE)  # 20 pool pages, 5 page groups; 5% kept free: 1 page
    try:
        assert kv.prewarm(256, num_slots=4, seconds=60.0) == 16  # one slot, 4 groups: a fifth would leave none free
        assert kv.cache.available_pages() == 20  # prewarmed pages stay reclaimable
    finally:
        kv.close()


# ------------------------------------------------------------------ engine


transformers = pytest.importorskip("transformers")


@pytest.fixture
def _plain_append(no_interpreted_triton):
    """Whole models on the CPU append with plain torch (conftest)."""


@pytest.mark.usefixtures("_plain_append")
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_engine_prewarms_the_next_requests_slot_while_a_step_runs(layout):
    """After a step, the free slot the next request gets already backs a first
    chunk, so that request's admission commits no page in the host's critical
    path; outputs are unchanged (greedy, against generate())."""
    from test_serving import assert_greedy_equal, greedy, model_of, random_prompts, reference

    from torch_vkv.serving import Engine

    model = model_of("llama")
    prompts = random_prompts(random.Random(11), 2, lo=20, hi=40)
    with Engine(model, max_batch_size=4, max_seq_len=256, chunk_size=64, cuda_graphs=False, device="cpu",
                layout=layout, page_size=PAGE) as engine:  # fmt: skip
        cache = engine.kv.cache
        first = engine.add_request(prompts[0], greedy(8))
        engine.step()
        nxt = max(cache._free_slots, key=lambda s: int(cache._committed_pages[s]))
        assert cache.committed_tokens(nxt) >= 64 and engine.stats()["kv_prewarm_seconds"] > 0
        engine.add_request(prompts[1], greedy(8))
        engine.step()  # admits the second request into the prewarmed slot: its prompt is already backed
        second = [r for r in engine.scheduler.running if r.request_id != first][0]
        assert second.slot == nxt and len(prompts[1]) <= 64
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[o.request_id] = o
    for p, o in zip(prompts, (outs[first], outs[second.request_id])):
        assert_greedy_equal(model, p, o.token_ids, reference(model, p, 8))


@pytest.mark.usefixtures("_plain_append")
def test_engine_prewarm_off_leaves_free_slots_cold():
    from test_serving import greedy, model_of

    from torch_vkv.serving import Engine

    with pytest.raises(TypeError, match="prewarm: expected a bool, got 1"):
        Engine(model_of("llama"), max_batch_size=2, max_seq_len=64, cuda_graphs=False, device="cpu", prewarm=1)
    with Engine(model_of("llama"), max_batch_size=4, max_seq_len=256, chunk_size=64, cuda_graphs=False, device="cpu",
                page_size=PAGE, prewarm=False) as engine:  # fmt: skip
        engine.add_request([5, 6, 7], greedy(4))
        engine.step()
        cache = engine.kv.cache
        assert all(int(cache._committed_pages[s]) == 0 for s in cache._free_slots)
        assert engine.stats()["kv_prewarm_seconds"] == 0


@pytest.mark.usefixtures("_plain_append")
def test_engine_step_survives_a_failed_background_prefetch_that_prewarm_joins(monkeypatch):
    """The engine's eager allocation runs right after the step's ``step_async``
    and joins its background prefetch first; a prefetch that failed (the CUDA
    driver out of memory: simulated here, the slot table raises it at the
    join, its pages rolled back) raised out of ``Engine.step``, although the
    engine promises that running out of memory never does. It is the prefetch
    skipped: the step's tokens stay ``generate()``'s."""
    from test_serving import assert_greedy_equal, greedy, model_of, random_prompts, reference

    from torch_vkv import OutOfPagesError
    from torch_vkv.serving import Engine

    model = model_of("llama")
    prompts = random_prompts(random.Random(4), 2, lo=5, hi=20)
    with Engine(model, max_batch_size=4, max_seq_len=256, chunk_size=64, cuda_graphs=False, device="cpu",
                page_size=PAGE) as engine:  # fmt: skip
        cache = engine.kv.cache
        failed = []

        def failing_join():  # the first join that prewarm makes
            if not failed and sys._getframe(1).f_code.co_name == "prewarm":
                failed.append(True)
                raise OutOfPagesError("out of physical pages: the prefetch's commit failed")
            cache._slots.join()

        monkeypatch.setattr(cache, "_join_async", failing_join)
        outs = engine.generate(prompts, greedy(6), use_tqdm=False)
        assert failed
    for p, o in zip(prompts, outs):
        assert_greedy_equal(model, p, o.token_ids, reference(model, p, 6))


@pytest.mark.usefixtures("_plain_append")
def test_engine_prewarms_every_slot_the_next_iteration_admits(monkeypatch):
    """With requests waiting, the step before their admission backs one free
    slot for each first chunk the next iteration admits (time permitting:
    here plenty), and those requests get exactly those slots; greedy outputs
    stay ``generate()``'s."""
    from test_serving import assert_greedy_equal, greedy, model_of, random_prompts, reference

    from torch_vkv.serving import Engine
    from torch_vkv.serving.prewarm import Prewarmer

    monkeypatch.setattr(Prewarmer, "expected_seconds", lambda self, batch: 60.0)
    model = model_of("llama")
    prompts = [p[:20] for p in random_prompts(random.Random(5), 4, lo=20, hi=30)]
    with Engine(model, max_batch_size=4, max_seq_len=256, chunk_size=64, cuda_graphs=False, device="cpu",
                page_size=PAGE, prefix_caching=False) as engine:  # fmt: skip
        cache = engine.kv.cache
        ids = [engine.add_request(prompts[0] * 3, greedy(5))]  # 60 tokens: the first step admits it and 4 more
        ids += [engine.add_request(p, greedy(5)) for p in prompts[1:]]
        engine.step()
        assert len(engine.scheduler.waiting) == 2  # 20 + 20 tokens: both fit the next step's 64
        warm = {s for s in cache._free_slots if cache.committed_tokens(s) >= 20}
        assert len(warm) == 2
        outs = {}
        seen = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[o.request_id] = o
            seen.update({r.request_id: r.slot for r in engine.scheduler.running})
        assert {seen[i] for i in ids[2:]} == warm
    for p, i in zip([prompts[0] * 3] + prompts[1:], ids):
        assert_greedy_equal(model, p, outs[i].token_ids, reference(model, p, 5))


@pytest.mark.usefixtures("_plain_append")
def test_engine_prewarms_no_more_slots_than_the_batch_has_room_for(monkeypatch):
    """A full batch admits nobody next iteration: eager allocation backs one
    slot ahead (for whoever starts first), not one per waiting request."""
    from test_serving import greedy, model_of

    from torch_vkv.serving import Engine
    from torch_vkv.serving.prewarm import Prewarmer

    monkeypatch.setattr(Prewarmer, "expected_seconds", lambda self, batch: 60.0)
    # Prefix caching's parking slots: free slots beyond the batch's two.
    with Engine(model_of("llama"), max_batch_size=2, max_seq_len=256, chunk_size=64, cuda_graphs=False,
                device="cpu", page_size=PAGE) as engine:  # fmt: skip
        assert engine.kv.cache.num_free_slots > 2
        for i in range(5):
            engine.add_request([5 + i] * 10, greedy(4))
        engine.step()
        assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 3
        cache = engine.kv.cache
        assert sum(cache.committed_tokens(s) > 0 for s in cache._free_slots) == 1
        outs = engine.generate([[9] * 10], greedy(4), use_tqdm=False)  # the rest still runs to the end
        assert len(outs[0].token_ids) == 4


@pytest.mark.usefixtures("_plain_append")
def test_scheduler_says_when_memory_limits_the_batch():
    """``KVManager.memory_bound`` follows the last plan: True while a waiting
    request found too little memory (eager allocation then pauses), False when
    the queue drains; the outputs are ``generate()``'s either way."""
    from test_serving import assert_greedy_equal, greedy, model_of, random_prompts, reference

    from torch_vkv.serving import Engine

    model = model_of("llama")
    prompts = random_prompts(random.Random(8), 3, lo=60, hi=64)
    # 16 pages of 4 KiB: a page group (4 pages) backs 32 tokens; a prompt of about 62 tokens takes 2 groups, so
    # two start and the third waits for memory (and the two preempt each other once their outputs need a third).
    with Engine(model, max_batch_size=4, max_seq_len=256, chunk_size=256, cuda_graphs=False, device="cpu",
                page_size=PAGE, memory_budget=16 * PAGE, prefix_caching=False) as engine:  # fmt: skip
        ids = [engine.add_request(p, greedy(8)) for p in prompts]
        engine.step()
        assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 1
        assert engine.kv.memory_bound
        outs, seen_free = {}, False
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[o.request_id] = o
            seen_free |= not engine.scheduler.waiting and not engine.kv.memory_bound
        assert seen_free
    for p, i in zip(prompts, ids):
        assert_greedy_equal(model, p, outs[i].token_ids, reference(model, p, 8))


def _warm_scheduler(budget_pages: int):
    """An ``interleaved`` manager (4 KiB pages: 8 tokens of all layers; ``budget_pages``
    pool pages) whose one warm free slot holds 25 pages (200 tokens), as a finished
    request or eager allocation leaves it, and a scheduler over it."""
    from torch_vkv.serving.scheduler import Scheduler

    kv = _manager(layout="interleaved", memory_budget=budget_pages * PAGE)
    warm = kv.alloc()
    seq = np.zeros(kv.num_slots, dtype=np.int64)
    seq[warm] = 200
    kv.cache.step(seq)  # no prefetch past 200 tokens
    kv.free(warm)
    assert _warm_free_slots(kv) == [200, 0, 0, 0]
    return kv, Scheduler(kv, max_batch_size=4, chunk_size=512)


def _request(request_id: str, prompt_tokens: int, max_tokens: int):
    from torch_vkv.serving import SamplingParams
    from torch_vkv.serving.request import Request

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(request_id, [1] * prompt_tokens, params, seed=0, eos_token_ids=(), arrival_time=0.0)


def test_admission_takes_back_a_warm_slots_pages_past_its_request_when_the_next_one_needs_them():
    """Two requests of 120 tokens (15 pages each) and 35 pool pages, 25 of them in a
    warm free slot. The admission estimate counts the warm pages as available (35 - 15
    leaves 20 for the second request), as paged's freed blocks would be. The first
    request takes the warm slot (it backs its 120 tokens); the second, a cold slot,
    then needs 15 fresh pages of the 10 free: the first slot's 10 pages past its
    tokens (which hold no K/V) go back, and both run, as they would with paged blocks."""
    kv, sched = _warm_scheduler(35)
    try:
        a, b = _request("a", 120, 80), _request("b", 120, 80)  # each can reach 200 tokens
        sched.add(a)
        sched.add(b)
        batch = sched.schedule(0.0)
        assert [r.request_id for r in batch.requests] == ["a", "b"] and batch.num_new_tokens == [120, 120]
        assert not sched.waiting and sched.num_preemptions == 0
        kv.synchronize()
        # Each slot holds its 120 tokens, and the next token's page where the background prefetch found one.
        assert all(120 <= kv.cache.committed_tokens(r.slot) <= 128 for r in (a, b))
        assert kv.cache.memory_stats()["committed_bytes"] <= 35 * PAGE
    finally:
        kv.close()


def test_pages_past_a_running_requests_tokens_go_back_before_anybody_is_preempted():
    """Request a runs in the warm slot (25 pages for its 121 tokens after the first
    step: 9 spare, kept while memory allows); b, in a cold slot, has the pool's last
    free page. b's next token needs a page: a's spare pages go back instead of b being
    preempted (its K/V recomputed)."""
    kv, sched = _warm_scheduler(30)
    try:
        a, b = _request("a", 120, 80), _request("b", 40, 8)
        sched.add(a)
        sched.add(b)
        batch = sched.schedule(0.0)
        assert [r.request_id for r in batch.requests] == ["a", "b"]
        assert kv.cache.committed_tokens(a.slot) == 200  # the warm slot's pages stay: memory allowed it
        for r, n in zip(batch.requests, batch.num_new_tokens):
            r.num_computed_tokens += n
            r.append_token(2, 0.0, kv.max_seq_len)
        batch = sched.schedule(0.0)  # a: token 121 (page 16 of 25); b: token 41, a 6th page
        assert [r.request_id for r in batch.requests] == ["a", "b"] and batch.num_new_tokens == [1, 1]
        assert sched.num_preemptions == 0 and not sched.waiting
        kv.synchronize()
        assert kv.cache.committed_tokens(a.slot) == 128 and kv.cache.committed_tokens(b.slot) >= 41
        assert kv.cache.memory_stats()["committed_bytes"] <= 30 * PAGE
    finally:
        kv.close()
