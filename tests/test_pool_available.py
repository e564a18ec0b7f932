"""``PagePool.available()``: the lock-free count of pages a commit can have now.

Checked against what the pool does, never against a restatement of its formula
(a test that mirrors the implementation cannot catch its bugs): in every
situation built here (pages free, creatable within the budget, pending a fence,
over the budget after a shrink, shared by two ranges), ``available()`` pages
can be committed one by one into a fresh range, one more is refused with
``OutOfPagesError``, the refusal is real (once every fence has completed no
page is free and none may be created), and giving the pages back gives the
count back. The count is an atomic that every locked section publishes, so it
must be exact after any sequence of operations (exceptions included), and
stay within the budget while another thread commits and decommits.
"""

from __future__ import annotations

import contextlib
import random
import threading

import pytest
import torch

from torch_vkv import KVCache, OutOfPagesError, PagePool
from torch_vkv._ext import core

from conftest import small_page


def _pool(max_pages: int) -> PagePool:
    wrapper = PagePool("cpu", page_size=small_page("cpu"))
    wrapper._pool.set_max_pages(max_pages)
    return wrapper


@contextlib.contextmanager
def _held_fences(wrapper: PagePool):
    """Decommits with a stream stay pending (mapped) until their fence is waited for or released."""
    core().hold_fences(wrapper._backend, True)
    try:
        yield
    finally:
        core().hold_fences(wrapper._backend, False)


def _check_exact(wrapper: PagePool, others=(), held: bool = False) -> int:
    """Shows that ``available()`` is exactly what a commit can have now, and returns it.

    Commits that many pages one by one into a fresh range (each must succeed: no over-count), then one more,
    which must fail; once every fence has completed, no page is free and none may be created (so the refusal
    was no under-count). Decommitting the pages gives the count back, and ``others`` (reservations on the pool)
    keep their committed pages throughout. Completes every fence; they are held again afterwards if ``held``.
    """
    C = core()
    pool = wrapper._pool
    n = pool.available()
    assert n == wrapper.available()
    assert 0 <= n <= pool.stats()["max_pages"]  # the budget bounds what a commit can have
    before = [r.committed_ranges() for r in others]
    probe = C.Reservation.create(pool, (n + 1) * wrapper.page_size)
    for i in range(n):
        try:
            assert probe.commit(i, 1) == 1
        except OutOfPagesError as e:
            raise AssertionError(f"available() said {n} pages, page {i + 1} was refused: {pool.stats()}") from e
    with pytest.raises(OutOfPagesError) as info:
        probe.commit(n, 1)
    refused = (info.value.requested_pages, info.value.available_pages)
    del info  # its traceback holds this frame (and `others`) in a cycle: the reservations would outlive the test
    assert refused == (1, 0)
    C.hold_fences(wrapper._backend, False)
    pool.reap()
    s = pool.stats()
    assert s["pending_pages"] == 0 and s["free_pages"] == 0, f"available() said {n}: more was left, {s}"
    assert s["created_pages"] >= s["max_pages"], f"available() said {n}: pages could still be created, {s}"
    C.hold_fences(wrapper._backend, held)
    assert probe.decommit(0, n, None) == n
    assert probe.committed_ranges() == []
    assert pool.available() == n, pool.stats()
    assert [r.committed_ranges() for r in others] == before
    return n


def test_free_and_creatable_pages():
    wrapper = _pool(10)
    pool = wrapper._pool
    pool.prefill(4)
    r = core().Reservation.create(pool, 8 * wrapper.page_size)
    r.commit(0, 3)
    assert _check_exact(wrapper, [r]) == 7  # 1 free, 6 creatable
    assert _check_exact(wrapper, [r]) == 7  # the probe's pages went back free: the same count


def test_pending_pages_count():
    wrapper = _pool(10)
    r = core().Reservation.create(wrapper._pool, 8 * wrapper.page_size)
    r.commit(0, 8)
    with _held_fences(wrapper):
        assert r.decommit(2, 5, 1234) == 5  # pending: a commit elsewhere waits for their fence
        assert wrapper._pool.stats()["pending_pages"] == 5
        assert _check_exact(wrapper, [r], held=True) == 7  # 2 creatable, 5 pending
    assert r.committed_ranges() == [(0, 2), (7, 1)]


@pytest.mark.parametrize("fenced", [True, False])
def test_over_budget_after_a_shrink(fenced):
    # 12 pages in use and a budget cut to 8: the first 4 pages given back are destroyed, not handed out.
    wrapper = _pool(12)
    pool = wrapper._pool
    r = core().Reservation.create(pool, 12 * wrapper.page_size)
    r.commit(0, 12)
    pool.set_max_pages(8)
    assert pool.stats()["created_pages"] == 12
    stream = 1234 if fenced else None
    with _held_fences(wrapper):
        assert _check_exact(wrapper, [r], held=True) == 0
        r.decommit(0, 3, stream)  # 3 of the 4 over the budget
        assert _check_exact(wrapper, [r], held=True) == 0
        assert pool.stats()["created_pages"] == 9
        r.decommit(3, 3, stream)  # the 4th, then 2 within the budget
        assert _check_exact(wrapper, [r], held=True) == 2
        assert pool.stats()["created_pages"] == 8


@pytest.mark.parametrize(
    ("decommits", "expected"),
    [
        ((("a", 0, 4),), 4),  # a's mappings pending, b still maps the pages: unmapping frees nothing
        ((("b", 1, 2),), 4),  # the same the other way round
        ((("a", 0, 4), ("b", 1, 2)), 6),  # pages 1 and 2: every mapping pending, free once reaped
        ((("a", 0, 4), ("b", 0, 4)), 8),
    ],
)
def test_shared_pending_pages(decommits, expected):
    wrapper = _pool(8)
    C = core()
    a = C.Reservation.create(wrapper._pool, 4 * wrapper.page_size)
    b = C.Reservation.create(wrapper._pool, 4 * wrapper.page_size)
    a.commit(0, 4)
    b.alias(0, a, 0, 4)  # one physical page at two addresses: 4 pages in use, 4 creatable
    with _held_fences(wrapper):
        for name, first, count in decommits:
            {"a": a, "b": b}[name].decommit(first, count, 1234)
        assert _check_exact(wrapper, [a, b]) == expected


def test_shared_pending_pages_over_budget():
    # 8 pages mapped twice, the budget cut to 6: of the 3 pages whose every mapping is pending, 2 are destroyed.
    wrapper = _pool(8)
    C = core()
    a = C.Reservation.create(wrapper._pool, 8 * wrapper.page_size)
    b = C.Reservation.create(wrapper._pool, 8 * wrapper.page_size)
    a.commit(0, 8)
    b.alias(0, a, 0, 8)
    wrapper._pool.set_max_pages(6)
    with _held_fences(wrapper):
        a.decommit(0, 8, 1234)
        b.decommit(2, 3, 1234)
        assert _check_exact(wrapper, [a, b]) == 1
    assert wrapper._pool.stats()["created_pages"] == 6


@pytest.mark.parametrize("seed", range(6))
def test_available_is_exact_through_random_operations(seed):
    rng = random.Random(seed)
    C = core()
    wrapper = PagePool("cpu", page_size=small_page("cpu"))
    pool = wrapper._pool
    pool.set_max_pages(12)
    n = 8  # pages per reservation
    res = [C.Reservation.create(pool, n * wrapper.page_size) for _ in range(3)]
    held = False
    src = dst = None
    assert _check_exact(wrapper, res) == 12
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
                    held = rng.random() < 0.5
                    C.hold_fences(wrapper._backend, held)
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
                # change nothing, and the count it published must still be exact (checked next, now and then).
                pass
            assert pool.available() == wrapper.available() <= pool.stats()["max_pages"], f"step {step}, op {op}"
            # Not after every step: the check completes every fence, and pending pages should pile up too.
            if rng.random() < 0.3:
                _check_exact(wrapper, res, held=held)
    finally:
        C.hold_fences(wrapper._backend, False)
    _check_exact(wrapper, res)
    del res, r, src, dst  # every reservation's destructor gives its pages back, and publishes the count
    assert _check_exact(wrapper) == pool.stats()["max_pages"]


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
    _check_exact(wrapper, res)


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
        assert cache.available_pages() == pool.available()  # no freed slot holds pages yet
        _check_exact(pool)
        cache.free(a)
        assert cache.available_pages() == before  # the freed slot's pages count again
    finally:
        cache.close()
