"""``PagePool.available()``: the lock-free count of pages a commit can have now.

It reads an atomic that every locked section of the pool publishes, so it must
equal the counters ``stats()`` reads under the mutex whenever no other thread is
inside the pool, after any sequence of operations (exceptions included), and
stay within the budget while another thread commits and decommits.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from torch_vkv import KVCache, OutOfPagesError, PagePool
from torch_vkv._ext import core

from conftest import small_page


def _expected(pool) -> int:
    s = pool.stats()
    excess = s["created_pages"] - s["max_pages"]  # > 0 after a shrink: that many released pages are destroyed
    if excess <= 0:
        return s["free_pages"] - excess + s["pending_pages"]
    return s["free_pages"] + max(0, s["pending_pages"] - excess)


@pytest.mark.parametrize("seed", range(6))
def test_available_matches_stats_through_random_operations(seed):
    rng = random.Random(seed)
    C = core()
    wrapper = PagePool("cpu", page_size=small_page("cpu"))
    pool = wrapper._pool
    pool.set_max_pages(12)
    n = 8  # pages per reservation
    res = [C.Reservation.create(pool, n * wrapper.page_size) for _ in range(3)]
    assert pool.available() == 12 == _expected(pool)
    try:
        for step in range(400):
            op = rng.randrange(9)
            r = rng.choice(res)
            first = rng.randrange(n)
            count = rng.randint(1, n - first)
            try:
                if op <= 2:
                    r.commit(first, count)
                elif op <= 4:  # with a "stream": pending until the fence is reaped (held or not)
                    r.decommit(first, count, 1234 if rng.random() < 0.6 else None)
                elif op == 5:
                    pool.set_max_pages(rng.randint(0, 16))
                elif op == 6:
                    pool.trim(rng.randint(0, 3))
                elif op == 7:
                    C.hold_fences(wrapper._backend, rng.random() < 0.5)
                    pool.reap()
                else:
                    choice = rng.randrange(3)
                    if choice == 0:
                        pool.prefill(rng.randint(0, 12))
                    elif choice == 1:  # an alias maps a page twice: still the same identity
                        src, dst = rng.sample(res, 2)
                        committed = src.committed_ranges()
                        if committed:
                            f, c = committed[0]
                            try:
                                dst.alias(f, src, f, c)
                            except ValueError:  # a target page is mapped (committed or pending)
                                pass
                    else:  # dropping a reservation releases everything it holds
                        i = rng.randrange(len(res))
                        res[i] = C.Reservation.create(pool, n * wrapper.page_size)
            except OutOfPagesError:
                # Expected now and then: a random commit asks for more pages than the pool can have. It must
                # change nothing, and the count it published must still match the counters (asserted next).
                pass
            assert pool.available() == _expected(pool) == wrapper.available(), f"step {step}, op {op}, {pool.stats()}"
    finally:
        C.hold_fences(wrapper._backend, False)
    del res
    pool.reap()
    assert pool.available() == _expected(pool)


def test_available_within_budget_while_another_thread_commits():
    """One thread commits and decommits (ordered and not, fences held and not,
    releasing the GIL in the core) while this one reads ``available()`` many
    times: every read is a value some locked section published, so within
    ``[0, max_pages]`` (no aliases, a fixed budget)."""
    C = core()
    wrapper = PagePool("cpu", page_size=small_page("cpu"))
    pool = wrapper._pool
    max_pages = 24
    pool.set_max_pages(max_pages)
    n = 16
    res = [C.Reservation.create(pool, n * wrapper.page_size) for _ in range(2)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(1)
        try:
            i = 0
            while not stop.is_set():
                r = res[i % 2]
                first = rng.randrange(n)
                count = rng.randint(1, n - first)
                try:
                    r.commit(first, count)
                except OutOfPagesError:
                    pass
                first = rng.randrange(n)
                r.decommit(first, rng.randint(1, n - first), 77 if i % 3 else None)
                if i % 50 == 0:
                    C.hold_fences(wrapper._backend, (i // 50) % 2 == 0)
                if i % 7 == 0:
                    pool.reap()
                i += 1
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    reads = []
    try:
        for _ in range(200_000):
            reads.append(pool.available())
    finally:
        stop.set()
        t.join()
        C.hold_fences(wrapper._backend, False)
    assert not errors, errors
    assert min(reads) >= 0 and max(reads) <= max_pages, (min(reads), max(reads))
    assert len(set(reads)) > 1  # the writer really ran meanwhile
    assert pool.available() == _expected(pool)


def test_cache_available_pages_reads_the_pool_snapshot():
    """``KVCache.available_pages()`` (now lock-free) still adds up as before."""
    pool = PagePool("cpu", page_size=small_page("cpu"))
    cache = KVCache(
        num_layers=1, max_batch_size=2, max_seq_len=256, num_kv_heads=1, head_dim=64,
        dtype=torch.float16, pool=pool, device="cpu",
    )
    try:
        pool.set_max_bytes(64 * pool.page_size)
        before = cache.available_pages()
        a = cache.alloc()
        cache.step({a: 200})
        assert cache.available_pages() < before
        assert cache.available_pages() == _expected(pool._pool)  # no freed slot holds pages yet
        cache.free(a)
        assert cache.available_pages() == before  # the freed slot's pages count again
    finally:
        cache.close()
