"""KVCache.remap: slots take other slots' histories by mapping pages (beam search's reorder), CPU host backend."""

from __future__ import annotations

import random

import pytest
import torch

from torch_vkv import KVCache, OutOfPagesError, PagePool
from torch_vkv._remap import plan_moves

from test_cache_fork import LAYOUTS, fill, make, pool_state, rows, same


def history(cache, n_by_slot):
    return {s: rows(cache, s, 0, n) for s, n in n_by_slot.items()}


def full_batch(layout="per_layer", batch=4, n=300, **kw):
    c = make(layout, batch=batch, **kw)
    for s in range(batch):
        assert c.alloc() == s
        c.commit(s, n)
        fill(c, s, 0, n, seed=s)
    return c


def page_bytes(c, n):
    """Bytes of the partly filled last page below ``n`` tokens, all buffers."""
    b = n * c.bytes_per_token_buffer
    return (b % c.page_size) * len(c._reservations)


def test_plan_orders_readers_first_and_stages_one_slot_per_cycle():
    order = plan_moves({1: 0, 2: 0, 3: 1})  # 1 is read by 3 before 1 is overwritten
    moves = [d for k, d, _ in order if k == "move"]
    assert moves.index(3) < moves.index(1) and not [e for e in order if e[0] == "stage"]
    order = plan_moves({0: 1, 1: 0, 2: 3, 3: 2})  # two swaps
    assert sum(k == "stage" for k, _, _ in order) == 2
    order = plan_moves({0: 1, 1: 2, 2: 0, 3: 0})  # a 3-cycle with a tree reader of 0
    stages = [e for e in order if e[0] == "stage"]
    assert len(stages) == 1
    moves = [d for k, d, _ in order if k == "move"]
    assert moves.index(3) < moves.index(0) or stages[0][1] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("beam_idx", [[0, 0, 1, 2], [1, 0, 2, 3], [1, 0, 3, 2], [3, 0, 1, 2], [2, 2, 2, 2], [0, 1, 2, 3]])
def test_reorder_reads_every_source_as_it_was_and_copies_one_partial_page_per_moved_row(layout, beam_idx):
    n = 300  # 2 full pages + a partial one per_layer (128 tokens a page)
    c = full_batch(layout, n=n)
    before = history(c, {s: n for s in range(4)})
    copied = c.remap(range(4), beam_idx, [n] * 4)
    for d, s in enumerate(beam_idx):
        assert same(rows(c, d, 0, n), before[s])
    # Strict: one partial page per row that changes, cycles included (staged by mapping).
    moved = sum(d != s for d, s in enumerate(beam_idx))
    assert copied == moved * page_bytes(c, n)
    assert c.memory_stats()["used_bytes"] == 4 * n * c.bytes_per_token
    assert c.memory_stats()["committed_bytes"] == c.pool.stats()["mapped_pages"] * c.page_size  # scratch gone
    c.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_pages_after_a_reorder_and_nothing_to_do_the_next_time(layout):
    n = 300
    c = full_batch(layout, n=n)
    full = n * c.bytes_per_token_buffer // c.page_size
    c.remap(range(4), [0, 0, 0, 0], [n] * 4)  # every beam from beam 0: the prompt pages are shared
    stats = c.memory_stats()
    assert stats["shared_pages"] == full * len(c._reservations)
    # committed: the shared full pages once, plus each row's own partial page
    assert stats["committed_bytes"] == (full + 4 * (c.pages_for_tokens(n) - full)) * len(c._reservations) * c.page_size
    maps = c.pool.stats()["map_calls"]
    before = history(c, {s: n for s in range(4)})
    # Rows that already share their source's full pages only copy the partial page.
    assert c.remap(range(4), [1, 0, 3, 2], [n] * 4) == 4 * page_bytes(c, n)
    # Full pages are not remapped; each of the 2 cycles maps its staged partial page into a
    # scratch range and commits the staged slot a fresh one (one map each per buffer).
    assert c.pool.stats()["map_calls"] == maps + 2 * 2 * len(c._reservations)
    for d, s in enumerate([1, 0, 3, 2]):
        assert same(rows(c, d, 0, n), before[s])
    c.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_appends_after_a_reorder_leave_the_other_beams_intact(layout):
    n = 256  # ends on a page boundary per_layer: nothing to copy
    c = full_batch(layout, n=n)
    assert c.remap(range(4), [2, 2, 2, 2], [n] * 4) == page_bytes(c, n) * 4
    prefix = rows(c, 2, 0, n)
    for s in range(4):
        c.commit(s, n + 50)
        fill(c, s, n, n + 50, seed=10 + s)
    for s in range(4):
        assert same(rows(c, s, 0, n), prefix)
    tails = history(c, {s: n + 50 for s in range(4)})
    assert all(not same(tails[0], tails[s]) for s in (1, 2, 3))
    c.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pages_come_back_after_free_reclaim_crop_and_close(layout):
    n = 300
    c = full_batch(layout, n=n)
    c.remap(range(4), [0, 0, 1, 1], [n] * 4)
    c.remap([0], [0], [100])  # crop into the shared prefix: the page at the new end becomes its own
    keep = rows(c, 1, 0, n)
    c.commit(0, 140)
    fill(c, 0, 100, 140, seed=99)
    assert same(rows(c, 1, 0, n), keep)  # the crop's writes did not reach the sharers
    for s in range(4):
        c.free(s)
    c.reclaim()
    assert c.memory_stats()["committed_bytes"] == 0 and c.pool.stats()["mapped_pages"] == 0
    assert not c._page_refs
    c.close()
    assert pool_state(c)["created_pages"] == 0


def test_ragged_sources_and_destinations():
    c = make("per_layer", batch=4)
    lens = [40, 500, 260, 0]
    for s, n in enumerate(lens):
        c.alloc()
        c.commit(s, n)
        fill(c, s, 0, n, seed=s)
    before = history(c, dict(enumerate(lens)))
    # 0 <- 1 (0 grows past its pages), 1 <- 2, 2 <- 0 (a cycle), 3 <- 1, part of it
    c.remap([0, 1, 2, 3], [1, 2, 0, 1], [500, 260, 40, 300])
    for d, s, n in zip([0, 1, 2, 3], [1, 2, 0, 1], [500, 260, 40, 300]):
        assert same(rows(c, d, 0, n), [t[:n] for t in before[s]])
    c.close()


@pytest.mark.parametrize("shared_pool", [False, True])
def test_random_remaps_keep_every_row_and_the_page_counts(shared_pool):
    """Random remaps (cycles, repeats, crops): rows, used and committed bytes. On a shared pool the
    new pages are taken up front into a scratch reservation: its count is never short (no commit
    during the moves)."""
    rng = random.Random(0)
    for layout in LAYOUTS:
        c = make(layout, batch=5, margin=7, pool=PagePool("cpu", page_size=4096) if shared_pool else None)
        if shared_pool:
            c._commit_plan = lambda plan: pytest.fail(f"a commit during the moves: {plan}")
        used = []
        for s in range(5):
            c.alloc()
            used.append(rng.randrange(0, 600))
            c.commit(s, used[s])
            fill(c, s, 0, used[s], seed=s)
        for it in range(25):
            snap = history(c, dict(enumerate(used)))
            dsts = rng.sample(range(5), rng.randrange(1, 6))
            srcs = [rng.randrange(5) for _ in dsts]
            ns = [rng.randrange(used[s] + 1) if rng.random() < 0.3 else used[s] for s in srcs]
            c.remap(dsts, srcs, ns)
            for d, s, n in zip(dsts, srcs, ns):
                assert same(rows(c, d, 0, n), [t[:n] for t in snap[s]]), (layout, it)
                used[d] = n
            for s in set(range(5)) - set(dsts):
                assert same(rows(c, s, 0, used[s]), snap[s])
            for s in range(5):
                n = min(1000, used[s] + rng.randrange(80))
                c.commit(s, n)
                fill(c, s, used[s], n, seed=100 * it + s)
                used[s] = n
            assert c.memory_stats()["committed_bytes"] == c.pool.stats()["mapped_pages"] * c.page_size
            assert c.memory_stats()["used_bytes"] == sum(used) * c.bytes_per_token
        c.close()
        assert c.pool.stats()["mapped_pages"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_remap_that_runs_out_after_its_check_changes_nothing(layout):
    """Another user of a shared pool takes the pages between the remap's check and its moves: the
    new pages are taken before anything moves, so OutOfPagesError leaves every destination as it
    was (a destination that needs no new page included); the same remap works once pages are back."""
    from test_cache_fork import racing

    pool = PagePool("cpu", page_size=4096)
    c, other = make(layout, pool=pool), make(layout, pool=pool)
    T = c.tokens_per_page
    s = c.alloc()
    c.commit(s, 3 * T + 5)
    fill(c, s, 0, 3 * T + 5, seed=1)
    d1, d2 = c.alloc(), c.alloc()  # no pages: d1 needs a new partial page, d2 (whole pages) none
    nb = len(c._reservations)
    pool.set_max_bytes((pool.stats()["mapped_pages"] + nb) * 4096)
    racing(c, other)
    state = (c.memory_stats(), c.seq_lens.tolist(), [c.committed_tokens(x) for x in (s, d1, d2)])
    snap = rows(c, s, 0, 3 * T + 5)
    with pytest.raises(OutOfPagesError):
        c.remap([d1, d2], [s, s], [2 * T + 3, 2 * T])  # d2 moves first (plan order), then d1 commits
    stats = c.memory_stats()
    for key in ("committed_bytes", "used_bytes", "shared_pages", "cached_bytes"):
        assert stats[key] == state[0][key], key
    assert c.seq_lens.tolist() == state[1] and [c.committed_tokens(x) for x in (s, d1, d2)] == state[2]
    assert c._shared_ids[d1] == c._shared_ids[d2] == [] and same(rows(c, s, 0, 3 * T + 5), snap)
    other.close()
    c.remap([d1, d2], [s, s], [2 * T + 3, 2 * T])
    assert same(rows(c, d1, 0, 2 * T + 3), [t[: 2 * T + 3] for t in snap])
    assert same(rows(c, d2, 0, 2 * T), [t[: 2 * T] for t in snap])
    assert c.memory_stats()["committed_bytes"] == pool.stats()["mapped_pages"] * 4096  # the scratch is gone
    c.close()
    assert pool.stats()["mapped_pages"] == 0


def test_out_of_pages_changes_nothing():
    c = make("per_layer", batch=4, budget=40 * 4096)  # 40 pages; the set-up below maps 36
    for s in range(2):
        c.alloc()
        c.commit(s, 300)  # 3 pages x 4 buffers each
        fill(c, s, 0, 300, seed=s)
    for s in range(2):
        c.alloc()
    c.commit(2, 256)
    fill(c, 2, 0, 256, seed=2)
    c.commit(3, 128)
    state, snap = pool_state(c), history(c, {0: 300, 1: 300, 2: 256})
    free = c.pool.stats()["max_pages"] - c.pool.stats()["mapped_pages"]
    # 2 <- 0 and 3 <- 1 need a partial page each (4 buffers): more than what is left
    assert free < 8
    with pytest.raises(OutOfPagesError):
        c.remap([2, 3], [0, 1], [300, 300])
    assert pool_state(c) == state and same(history(c, {0: 300, 1: 300, 2: 256})[2], snap[2])
    c.close()


def test_remap_checks_its_arguments():
    c = full_batch(n=10)
    with pytest.raises(ValueError, match="distinct"):
        c.remap([0, 0], [1, 2], [5, 5])
    with pytest.raises(ValueError, match="one length"):
        c.remap([0, 1], [1], [5, 5])
    with pytest.raises(ValueError, match="source slot 1 has 10 tokens"):
        c.remap([0], [1], [11])
    with pytest.raises(TypeError):
        c.remap(0, [1], [5])
    c.free(3)
    with pytest.raises(ValueError, match="slot"):
        c.remap([3], [0], [5])
    c.close()
    w = KVCache(2, 2, 8, max_batch_size=2, max_seq_len=256, dtype=torch.float16, device="cpu",
                page_size=4096, sliding_window=64)  # fmt: skip
    w.alloc(), w.alloc()
    with pytest.raises(ValueError, match="sliding_window"):
        w.remap([0], [1], [0])
    w.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_crop_onto_a_shared_page_copies_its_rows_once(layout):
    c = full_batch(layout, n=300)
    c.remap(range(4), [0, 0, 0, 0], [300] * 4)  # page 0 is shared by every row
    keep = rows(c, 0, 0, 300)
    n = 100  # inside shared page 0 (128 tokens per_layer, 32 interleaved: page 3)
    assert c.remap([1], [1], [n]) == page_bytes(c, n)  # the one partial page, once: no copy aside
    assert same(rows(c, 1, 0, n), [t[:n] for t in keep])
    c.commit(1, n + 20)
    fill(c, 1, n, n + 20, seed=7)
    assert same(rows(c, 0, 0, 300), keep)  # the crop's own page took the write
    assert c.memory_stats()["committed_bytes"] == c.pool.stats()["mapped_pages"] * c.page_size
    c.close()


def test_a_swap_needs_one_spare_page_per_buffer_and_changes_nothing_without_it():
    """A cycle keeps the staged slot's partial page mapped until its reader copied it,
    so the staged slot writes its new last page into a fresh page: one per buffer."""
    nb = 4  # 2 layers x K, V
    c = make("per_layer", batch=2, budget=3 * 2 * nb * 4096)  # exactly the 3 pages x 2 slots set up below
    for s in range(2):
        c.alloc()
        c.commit(s, 300)
        fill(c, s, 0, 300, seed=s)
    state, snap = pool_state(c), history(c, {0: 300, 1: 300})
    with pytest.raises(OutOfPagesError) as e:
        c.remap([0, 1], [1, 0], [300, 300])
    assert e.value.requested_pages == nb
    after = history(c, {0: 300, 1: 300})
    assert pool_state(c) == state and same(after[0], snap[0]) and same(after[1], snap[1])
    assert c.memory_stats()["shared_pages"] == 0 and not c._page_refs
    c.close()
    c = make("per_layer", batch=2, budget=(3 * 2 + 1) * nb * 4096)
    for s in range(2):
        c.alloc()
        c.commit(s, 300)
        fill(c, s, 0, 300, seed=s)
    snap = history(c, {0: 300, 1: 300})
    assert c.remap([0, 1], [1, 0], [300, 300]) == 2 * page_bytes(c, 300)
    assert same(rows(c, 0, 0, 300), snap[1]) and same(rows(c, 1, 0, 300), snap[0])
    assert c.pool.stats()["mapped_pages"] == 3 * 2 * nb  # the staged page went back
    c.close()
