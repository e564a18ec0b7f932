"""KVCache.fork / PagedKVCache.fork: shared prefix pages across slots (CPU host backend, small pages)."""

from __future__ import annotations

import pytest
import torch

from torch_vkv import KVCache, OutOfPagesError, OutOfSlotsError, PagedKVCache, PagePool

L, H, D = 2, 2, 8  # 32 bytes per token and buffer in float16: 128 tokens per 4 KiB page per_layer, 32 interleaved
LAYOUTS = ("per_layer", "interleaved")


def make(layout="per_layer", *, batch=4, seq=1024, budget=None, page_size=4096, heads=H, dim=D, margin=0, pool=None):
    kw = dict(max_batch_size=batch, max_seq_len=seq, dtype=torch.float16, device="cpu", layout=layout,
              margin_tokens=margin)  # fmt: skip
    if pool is None:
        kw.update(page_size=page_size, memory_budget=budget)
    else:
        kw.update(pool=pool)
    return KVCache(L, heads, dim, **kw)


def fill(cache, slot, lo, hi, seed):
    """Random K and V in rows [lo, hi) of ``slot``, every layer."""
    g = torch.Generator().manual_seed(seed)
    for l in range(cache.num_layers):
        for view in (cache.key(l), cache.value(l)):
            view[slot, lo:hi] = torch.randn((hi - lo,) + tuple(view.shape[2:]), generator=g).to(view.dtype)


def rows(cache, slot, lo, hi):
    """Clones of K and V rows [lo, hi) of ``slot`` in every layer (exact comparison: no arithmetic)."""
    return [v[slot, lo:hi].clone() for l in range(cache.num_layers) for v in (cache.key(l), cache.value(l))]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def source(cache, n, seed=0):
    s = cache.alloc()
    cache.commit(s, n)
    fill(cache, s, 0, n, seed)
    return s


def pool_state(cache):
    s = cache.pool.stats()
    return {k: s[k] for k in ("created_pages", "free_pages", "mapped_pages", "pending_pages")}


def cache_state(cache):
    m = cache.memory_stats()
    keep = ("committed_bytes", "used_bytes", "cached_bytes", "shared_pages", "active_slots")
    return {k: m[k] for k in keep}, cache.num_free_slots, cache.active_slots, pool_state(cache)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [0, 1, 31, 32, 128, 200, 256, 300])
def test_fork_reads_the_source_prefix(layout, n):
    with make(layout) as c:
        s = source(c, 300)
        before = rows(c, s, 0, 300)
        f = c.fork(s, n)
        assert f != s and sorted(c.active_slots) == sorted([s, f])
        assert c.committed_tokens(f) >= n
        assert same(rows(c, f, 0, n), rows(c, s, 0, n))
        assert same(rows(c, s, 0, 300), before)  # the source is untouched


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fork_maps_full_pages_and_grows_by_at_most_one_page_per_buffer(layout):
    with make(layout) as c:
        s = source(c, 500)
        nb = 1 if layout == "interleaved" else 2 * L
        before = c.memory_stats()
        for n in (450, 256):
            c.fork(s, n)
            after = c.memory_stats()
            assert 0 <= after["committed_bytes"] - before["committed_bytes"] <= nb * c.page_size
            assert after["committed_bytes"] == c.pool.stats()["mapped_pages"] * c.page_size
            before = after
        # Shared: the full pages below 450 tokens of the source (the 256-token fork shares a subset).
        full = 450 * c.bytes_per_token_buffer // c.page_size
        assert c.memory_stats()["shared_pages"] == full * nb


def test_fork_copies_a_token_that_straddles_the_page_boundary():
    # 3 heads x 5 x 2 bytes = 30 bytes per token: a page boundary cuts tokens in two.
    with make("per_layer", heads=3, dim=5) as c:
        assert isinstance(c.tokens_per_page, float)
        s = source(c, 700)
        for n in (137, 273, 274, 700):
            f = c.fork(s, n)
            assert same(rows(c, f, 0, n), rows(c, s, 0, n))
            c.free(f)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_writes_past_the_shared_prefix_leave_the_other_slot_intact(layout):
    with make(layout) as c:
        s = source(c, 300)
        n = 200
        f = c.fork(s, n)
        src_before, fork_prefix = rows(c, s, 0, 300), rows(c, f, 0, n)
        # The fork appends past the prefix (its partial page is its own).
        c.commit(f, 400)
        fill(c, f, n, 400, seed=1)
        assert same(rows(c, s, 0, 300), src_before)
        fork_after = rows(c, f, 0, 400)
        # The source rewrites its own rows past the prefix and appends.
        c.commit(s, 500)
        fill(c, s, n, 500, seed=2)
        assert same(rows(c, f, 0, 400), fork_after)
        assert same(rows(c, f, 0, n), fork_prefix)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_freeing_the_source_keeps_the_fork_across_reclamation(layout):
    with make(layout) as probe:
        per_slot = probe.pages_for_tokens(1024) * len(probe._reservations)  # pages of one full slot
    # Budget: two full slots. The source and its fork hold about one; the rest is forced through reclamation.
    with make(layout, batch=4, budget=2 * per_slot * 4096) as c:
        s = source(c, 1000)
        f = c.fork(s, 900)
        expect = rows(c, f, 0, 900)
        c.free(s)
        assert same(rows(c, f, 0, 900), expect)
        c.reclaim()
        assert same(rows(c, f, 0, 900), expect)
        assert c.memory_stats()["shared_pages"] == 0
        # Another slot takes the pages the pool has left, the source's own included ...
        other, third = c.alloc(), c.alloc()
        c.commit(other, 1024)
        fill(c, other, 0, 1024, seed=5)
        assert not c.can_commit(third, 1024)
        # ... and, once freed, keeps them cached until a commit must reclaim them.
        c.free(other)
        assert c.memory_stats()["cached_bytes"] > 0
        c.commit(third, 1024)
        fill(c, third, 0, 1024, seed=6)
        assert c.committed_tokens(other) == 0
        assert same(rows(c, f, 0, 900), expect)
        with pytest.raises(OutOfPagesError):
            c.commit(c.alloc(), 1024)
        assert same(rows(c, f, 0, 900), expect)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_freed_slot_never_keeps_pages_another_slot_maps(layout):
    with make(layout) as c:
        s = source(c, 600)
        f = c.fork(s, 512)
        expect = rows(c, f, 0, 512)
        c.free(s)  # holds shared pages: gives every page back at once
        assert c.memory_stats()["cached_bytes"] == 0
        again = c.alloc()  # may be the old source slot: writing from row 0 must not reach the fork
        c.commit(again, 600)
        fill(c, again, 0, 600, seed=9)
        assert same(rows(c, f, 0, 512), expect)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forks_of_forks_and_crops_below_the_prefix(layout):
    with make(layout, batch=5) as c:
        s = source(c, 700)
        a = c.fork(s, 650)
        b = c.fork(a, 400)
        d = c.fork(s, 690)
        expect = {x: rows(c, x, 0, n) for x, n in ((a, 650), (b, 400), (d, 690))}
        keep = c.tokens_for_pages(1)  # a crop to a page boundary inside the shared prefix
        c.decommit(a, keep)  # drops a's own mappings of the shared pages past it only
        c.commit(a, 650)  # fresh pages: a writes past what it still shares
        fill(c, a, keep, 650, seed=3)
        for x, n in ((b, 400), (d, 690)):
            assert same(rows(c, x, 0, n), expect[x])
        c.free(s)
        c.reclaim()
        for x, n in ((b, 400), (d, 690)):
            assert same(rows(c, x, 0, n), expect[x])
        for x in (a, b, d):
            c.free(x)
        c.reclaim()
        assert c.memory_stats()["committed_bytes"] == 0 and c.memory_stats()["shared_pages"] == 0
        assert c.pool.stats()["mapped_pages"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fork_into_a_warm_freed_slot(layout):
    with make(layout, batch=2) as c:
        s = source(c, 300)
        w = c.alloc()
        c.commit(w, 900)
        fill(c, w, 0, 900, seed=4)
        c.free(w)  # keeps its pages: the fork reuses what lies past the prefix
        f = c.fork(s, 280)
        assert f == w
        assert same(rows(c, f, 0, 280), rows(c, s, 0, 280))
        assert c.memory_stats()["committed_bytes"] == c.pool.stats()["mapped_pages"] * c.page_size


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_of_slots_and_out_of_pages_change_nothing(layout):
    with make(layout, batch=2) as c:
        s = source(c, 300)
        c.alloc()
        state = cache_state(c)
        with pytest.raises(OutOfSlotsError):
            c.fork(s, 100)
        assert cache_state(c) == state
    with make(layout, batch=3, margin=0) as probe:
        nb = len(probe._reservations)
        need = probe.pages_for_tokens(300) * nb
    with make(layout, batch=3, budget=need * 4096) as c:
        s = source(c, 300)  # takes the whole budget
        state = cache_state(c)
        before = rows(c, s, 0, 300)
        with pytest.raises(OutOfPagesError):
            c.fork(s, 299)  # a partial last page to copy
        assert cache_state(c) == state
        assert same(rows(c, s, 0, 300), before)
        full = 256 if layout == "per_layer" else 288  # whole pages only: costs nothing
        f = c.fork(s, full)
        assert same(rows(c, f, 0, full), rows(c, s, 0, full))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_page_back_after_free_reclaim_and_close(layout):
    pool = PagePool("cpu", page_size=4096)
    c = make(layout, batch=4, pool=pool)
    s = source(c, 500)
    f = c.fork(s, 400)
    g = c.fork(f, 300)
    c.commit(g, 800)
    for x in (f, s, g):
        c.free(x)
    c.reclaim()
    st = pool.stats()
    assert st["mapped_pages"] == 0 and st["free_pages"] == st["created_pages"] > 0
    s = source(c, 500)
    c.fork(s, 450)
    c.close()  # with shared pages still mapped
    st = pool.stats()
    assert st["mapped_pages"] == 0 and st["pending_pages"] == 0 and st["free_pages"] == st["created_pages"]
    pool.trim()
    assert pool.stats()["created_pages"] == 0


def test_fork_checks_its_arguments():
    with make() as c:
        s = source(c, 100)
        with pytest.raises(ValueError, match="num_tokens: expected an int <= 100"):
            c.fork(s, 101)
        with pytest.raises(ValueError, match="slot"):
            c.fork(3, 1)  # not active
        with pytest.raises(TypeError):
            c.fork(s, 1.5)
    w = KVCache(L, H, D, max_batch_size=2, max_seq_len=1024, dtype=torch.float16, device="cpu", page_size=4096,
                sliding_window=256)  # fmt: skip
    with w:
        s = w.alloc()
        w.commit(s, 100)
        with pytest.raises(ValueError, match="sliding_window"):
            w.fork(s, 50)


def test_fork_with_a_margin_commits_the_margin_rows():
    with make("per_layer", margin=64) as c:
        s = source(c, 250)
        f = c.fork(s, 250)
        assert c.committed_tokens(f) >= 250 + 64
        assert same(rows(c, f, 0, 250), rows(c, s, 0, 250))
        assert torch.isfinite(c.key(0)[f, 250:314].float()).all()


def racing(cache, other):
    """After ``cache``'s next availability check, ``other`` (same pool) takes every page the pool has:
    another user of a shared pool between a fork's check and its commits."""
    real = cache._available_pages

    def check(*, reclaim):
        n = real(reclaim=reclaim)
        cache._available_pages = real
        t = other.alloc()
        other.commit(t, other.tokens_for_pages(other.pool.available() // len(other._reservations)))
        assert other.pool.available() == 0
        return n

    cache._available_pages = check


def warm_fork_setup(layout, race):
    """A fork into a warm freed slot (2 pages a buffer, its margin) of a prefix of 1 full page whose
    partial page and margin need 4 pages: 1 of the slot's pages is replaced by the prefix, 2 more
    are needed past its 2: one is moved from the replaced one, one is committed fresh, the only
    page a buffer the pool has free."""
    pool = PagePool("cpu", page_size=4096)
    probe = make(layout, batch=2, pool=pool)
    T = probe.tokens_per_page
    probe.close()
    c = make(layout, batch=2, pool=pool, margin=T + T // 4)
    other = make(layout, batch=2, pool=pool)
    nb = len(c._reservations)
    s = source(c, 3 * T)
    w = c.alloc()
    c.commit(w, 1)
    fill(c, w, 0, 1, seed=9)
    c.free(w)
    assert c._committed_pages[w] == 2
    pool.set_max_bytes((pool.stats()["mapped_pages"] + nb) * 4096)
    if race:
        racing(c, other)
    return c, other, s, w, 2 * T - 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_fork_that_runs_out_after_its_check_keeps_the_freed_slots_pages(layout):
    """Another user of a shared pool takes the pages between the fork's check and its commit:
    OutOfPagesError, and the freed slot the fork picked keeps its cached pages (the prefix cache
    of a serving engine, warm slots of alloc()): nothing changed."""
    c, other, s, w, n = warm_fork_setup(layout, race=True)
    state = cache_state(c)
    with pytest.raises(OutOfPagesError):
        c.fork(s, n)
    assert cache_state(c)[:3] == state[:3] and c._committed_pages[w] == 2  # the pool's counts: other's commit
    T = c.tokens_per_page
    f = c.fork(s, T)  # a whole page: its margin's page is w's replaced one, moved; no page from the pool
    assert f == w and same(rows(c, f, 0, T), rows(c, s, 0, T))
    other.close()
    c.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_warm_fork_moves_the_replaced_pages_past_the_prefix(layout):
    """The same fork without the race fits: the pages the prefix replaces feed the new pages first,
    so only one page a buffer is taken from the pool, and the rows are the source's."""
    c, other, s, w, n = warm_fork_setup(layout, race=False)
    nb = len(c._reservations)
    mapped = c.pool.stats()["mapped_pages"]
    f = c.fork(s, n)
    assert f == w and c.committed_tokens(f) >= n + c.margin_tokens
    assert c.pool.stats()["mapped_pages"] == mapped + nb  # 1 fresh a buffer: the replaced page moved
    assert same(rows(c, f, 0, n), rows(c, s, 0, n))
    assert torch.isfinite(c.key(0)[f, n : n + c.margin_tokens].float()).all()
    assert c.memory_stats()["committed_bytes"] == c.pool.stats()["mapped_pages"] * 4096
    other.close()
    c.close()


class _FlakyAlias:
    """A reservation whose alias of ``[first, ...)`` fails once (a driver error)."""

    def __init__(self, res, fail_at):
        self.res, self.fail_at = res, fail_at

    def __getattr__(self, name):
        return getattr(self.res, name)

    def alias(self, first, src, src_first, count):
        if first == self.fail_at:
            self.fail_at = None
            raise RuntimeError("cuMemMap failed: CUDA_ERROR_UNKNOWN (simulated)")
        return self.res.alias(first, getattr(src, "res", src), src_first, count)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_fork_whose_prefix_alias_fails_gives_the_freed_slot_its_pages_back(layout):
    """A driver error mapping the prefix, after the slot's replaced pages were unmapped: the slot
    gets pages of its own back where it had them (same count, fresh rows), the source is intact,
    the pool maps exactly what the cache counts, and the next fork works."""
    with make(layout, batch=2) as c:
        T = c.tokens_per_page
        s = source(c, 3 * T + 5)
        w = c.alloc()
        c.commit(w, 2 * T)
        c.free(w)
        before = rows(c, s, 0, 3 * T + 5)
        state = cache_state(c)
        # The last buffer's prefix alias fails, after the others' succeeded.
        c._reservations[-1:] = [_FlakyAlias(c._reservations[-1], w * c.pages_per_slot)]
        with pytest.raises(RuntimeError, match="simulated"):
            c.fork(s, 3 * T + 1)
        assert cache_state(c) == state
        assert same(rows(c, s, 0, 3 * T + 5), before)
        f = c.fork(s, 3 * T + 1)
        assert f == w and same(rows(c, f, 0, 3 * T + 1), rows(c, s, 0, 3 * T + 1))
        assert c.memory_stats()["committed_bytes"] == c.pool.stats()["mapped_pages"] * c.page_size


# ------------------------------------------------------------------ paged


def make_paged(num_blocks=32, batch=4, block=16):
    return PagedKVCache(L, H, D, num_blocks=num_blocks, max_batch_size=batch, max_seq_len=256, page_size=block,
                        dtype=torch.float32, device="cpu")  # fmt: skip


def paged_rows(c, slot, n):
    """K and V of tokens [0, n) of ``slot`` in every layer, gathered through the block table."""
    pos = torch.arange(n)
    blocks = c.block_table[slot, pos // c.page_size].long()
    return [c.kv[l, kv, blocks, pos % c.page_size].clone() for l in range(L) for kv in (0, 1)]


def paged_fill(c, slot, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(lo, hi)
    blocks = c.block_table[slot, pos // c.page_size].long()
    for l in range(L):
        for kv in (0, 1):
            c.kv[l, kv, blocks, pos % c.page_size] = torch.randn(hi - lo, H, D, generator=g)


@pytest.mark.parametrize("n", [0, 5, 16, 40, 48])
def test_paged_fork_shares_full_blocks_and_copies_the_last(n):
    c = make_paged()
    s = c.alloc()
    c.commit(s, 50)
    paged_fill(c, s, 0, 50, seed=0)
    free_before = c.pool.num_free
    f = c.fork(s, n)
    assert c.pool.num_free == free_before - (1 if n % 16 else 0)
    assert c.memory_stats()["shared_pages"] == n // 16
    assert same(paged_rows(c, f, n), paged_rows(c, s, n))
    src = paged_rows(c, s, 50)
    c.commit(f, 100)
    paged_fill(c, f, n, 100, seed=1)
    assert same(paged_rows(c, s, 50), src)
    fork_rows = paged_rows(c, f, 100)
    c.free(s)
    o = c.alloc()
    c.commit(o, 256)  # takes the source's own blocks back
    paged_fill(c, o, 0, 256, seed=2)
    assert same(paged_rows(c, f, 100), fork_rows)


def test_paged_fork_failures_change_nothing_and_blocks_come_back():
    c = make_paged(num_blocks=4, batch=2)
    s = c.alloc()
    c.commit(s, 60)  # all 4 blocks
    with pytest.raises(OutOfPagesError):
        c.fork(s, 40)
    assert c.pool.num_free == 0 and c.num_free_slots == 1 and c.memory_stats()["shared_pages"] == 0
    f = c.fork(s, 48)  # whole blocks only: no new block
    with pytest.raises(OutOfSlotsError):
        c.fork(s, 16)
    with pytest.raises(ValueError, match="num_tokens"):
        c.fork(s, 65)
    assert c.memory_stats()["shared_pages"] == 3
    c.free(s)
    assert c.pool.num_free == 1
    c.free(f)
    assert c.pool.num_free == 4 and c.memory_stats()["shared_pages"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(4))
def test_random_forks_frees_crops_and_reclaims_keep_every_slot_intact(layout, seed):
    """Random alloc / append / fork / crop / free / reclaim against a model of each slot's rows, under a
    budget tight enough that commits fail and reclaim: every active slot reads what was written; the pool
    maps exactly the pages ``committed_bytes`` counts; every page is back after ``close()``."""
    import random

    rng = random.Random(seed)
    pool = PagePool("cpu", page_size=4096)
    pool.set_max_bytes(48 * 4096)
    c = make(layout, batch=6, seq=512, pool=pool)
    model: dict[int, list[torch.Tensor]] = {}  # active slot -> its rows [0, used) in every buffer

    def append(slot, n):
        used = model[slot][0].shape[0] if slot in model else 0
        try:
            c.commit(slot, n)
        except OutOfPagesError:
            return
        fill(c, slot, used, n, seed=rng.randrange(1 << 30))
        model[slot] = rows(c, slot, 0, n)

    for _ in range(60):
        op = rng.choice(["alloc", "append", "append", "fork", "fork", "crop", "free", "reclaim"])
        active = sorted(model)
        if op == "alloc" and c.num_free_slots:
            s = c.alloc()
            model[s] = rows(c, s, 0, 0)
            append(s, rng.randrange(1, 300))
        elif op == "append" and active:
            s = rng.choice(active)
            append(s, min(512, model[s][0].shape[0] + rng.randrange(1, 100)))
        elif op == "fork" and active:
            s = rng.choice(active)
            n = rng.randrange(0, model[s][0].shape[0] + 1)
            before = cache_state(c)
            try:
                f = c.fork(s, n)
            except (OutOfSlotsError, OutOfPagesError):
                assert cache_state(c) == before
            else:
                model[f] = [r[:n].clone() for r in model[s]]
        elif op == "crop" and active:
            s = rng.choice(active)
            keep = min(model[s][0].shape[0], c.tokens_for_pages(rng.randrange(0, 4)))  # a page boundary
            c.decommit(s, keep)
            model[s] = [r[:keep] for r in model[s]]
        elif op == "free" and active:
            s = rng.choice(active)
            c.free(s)
            del model[s]
        elif op == "reclaim":
            c.reclaim()
        for s, want in model.items():
            assert same(rows(c, s, 0, want[0].shape[0]), want), (op, s)
        assert c.memory_stats()["committed_bytes"] == pool.stats()["mapped_pages"] * c.page_size
    c.close()
    st = pool.stats()
    assert st["mapped_pages"] == 0 and st["pending_pages"] == 0 and st["free_pages"] == st["created_pages"]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_fork_shares_pages_and_survives_free_reclaim_and_warm_reuse(layout):
    # 2 MiB pages: per_layer 8 heads x 128 x 2 bytes = 2 KiB a token, 1024 tokens per page.
    # Two slots, so the fork's only free slot is the warm one (fork prefers a slot without pages).
    c = KVCache(2, 8, 128, max_batch_size=2, max_seq_len=4096, dtype=torch.float16, device="cuda", layout=layout)
    with c:
        s = source(c, 3000)
        w = c.alloc()
        c.commit(w, 4096)
        fill(c, w, 0, 4096, seed=1)
        c.free(w)  # warm: the fork below replaces its first pages (unmapped once the stream is done)
        before = c.memory_stats()["committed_bytes"]
        f = c.fork(s, 2500)
        assert f == w
        assert c.memory_stats()["shared_pages"] > 0
        assert c.memory_stats()["committed_bytes"] <= before
        expect = rows(c, f, 0, 2500)
        assert same(expect, rows(c, s, 0, 2500))
        c.commit(f, 3500)
        fill(c, f, 2500, 3500, seed=2)
        assert same(rows(c, f, 0, 2500), expect)
        c.free(s)
        c.reclaim()
        other = c.alloc()
        c.commit(other, 4096)
        fill(c, other, 0, 4096, seed=3)
        torch.cuda.synchronize()
        assert same(rows(c, f, 0, 2500), expect)
