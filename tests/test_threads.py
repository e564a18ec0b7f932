"""KVCache, PagePool and PagedKVCache used from several threads at once.

Each thread owns its slots: it allocates, commits (``commit``, ``step``,
``step_async``), writes K/V rows it committed, checks them in every layer,
decommits, reclaims and frees, while other threads do the same on the same
cache (and on a second cache sharing the pool). Afterwards the page tables,
the cache's counts and the pool's counts must agree. Runs in a subprocess: a
crash (the SIGSEGV this once caused) fails the test instead of killing pytest.
"""

from __future__ import annotations

import pytest

from _subprocess import run_script as run_python

WORKLOAD = r"""
import random, sys, threading, traceback
import numpy as np
import torch
from torch_vkv import KVCache, OutOfPagesError, OutOfSlotsError, PagePool

layout, num_threads, requests, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
L, B, S = 2, 6, 256
pool = PagePool(device, page_size=4096 if device == "cpu" else None)
PAGE = pool.page_size
# Short of memory: commits reclaim, and fail at times.
pool.set_max_bytes((100 if device == "cpu" else 60) * PAGE)
H, D = (2, 8) if device == "cpu" else (64, 128)  # a full slot: 16 pages of 4 KiB, or of 2 MiB on CUDA
caches = [
    KVCache(L, H, D, max_batch_size=B, max_seq_len=S, dtype=torch.float32, device=device, layout=layout, pool=pool)
    for _ in range(2)
]
errors = []

def check(cache, slot, n, mark, where):
    for layer in range(L):
        k, v = cache.key(layer)[slot, :n], cache.value(layer)[slot, :n]
        if not (bool((k == mark).all()) and bool((v == -mark).all())):
            errors.append(f"{where}: slot {slot} layer {layer} lost rows [0, {n}) of mark {mark}")

def worker(tid):
    rng = random.Random(tid)
    cache = caches[tid % 2]
    try:
        for it in range(requests):
            try:
                slot = cache.alloc()
            except OutOfSlotsError:
                continue
            mark, n = float(tid * 10000 + it), 0
            for _ in range(rng.randint(1, 8)):
                target = min(S, n + rng.randint(1, 64))
                op = rng.random()
                try:
                    if op < 0.4:
                        cache.step_async({slot: target})
                    elif op < 0.7:
                        cache.commit(slot, target)
                    else:
                        lens = np.zeros(B, dtype=np.int64)
                        lens[slot] = target
                        cache.step(lens)
                except OutOfPagesError:
                    break
                for layer in range(L):  # write only the rows this thread's commit backed
                    cache.key(layer)[slot, n:target] = mark
                    cache.value(layer)[slot, n:target] = -mark
                n = target
                check(cache, slot, n, mark, f"thread {tid} after commit")
                r = rng.random()
                if r < 0.2:
                    stats = cache.memory_stats()
                    assert stats["used_bytes"] <= stats["committed_bytes"] + stats["cached_bytes"], stats
                elif r < 0.3:
                    n = min(n, rng.randint(0, n))
                    cache.decommit(slot, n)
                elif r < 0.35:
                    cache.reclaim()
                elif r < 0.45:
                    cache.synchronize()
                    assert cache.committed_tokens(slot) >= n
            check(cache, slot, n, mark, f"thread {tid} before free")
            cache.free(slot)
    except Exception:
        errors.append(f"thread {tid}: " + traceback.format_exc())

threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, "\n".join(errors[:5])

mapped = 0
for cache in caches:
    cache.synchronize()
    assert cache.active_slots == [] and cache.memory_stats()["used_bytes"] == 0
    for res in cache._reservations:  # each slot owns exactly the pages the manager counts, in its row
        owned = [0] * B
        for first, count in res.committed_ranges():
            for page in range(first, first + count):
                owned[page // cache.pages_per_slot] += 1
        assert owned == list(cache._committed_pages), (owned, cache._committed_pages)
    mapped += int(cache._committed_pages.sum()) * len(cache._reservations)
    assert cache.memory_stats()["committed_bytes"] == sum(cache._committed_pages) * len(cache._reservations) * PAGE
if device == "cuda":  # decommits are fenced by CUDA events: let them pass, then reap the pending pages
    torch.cuda.synchronize()
    pool.reap()
s = pool.stats()
assert s["mapped_pages"] == mapped and s["pending_pages"] == 0, (s, mapped)
assert s["created_pages"] <= pool.max_pages
for cache in caches:
    cache.close()
assert pool.stats()["mapped_pages"] == 0
print("ok", s["map_calls"])
"""


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_threads_share_a_cache_and_a_pool(device, layout):
    out = run_python(WORKLOAD, layout, "6", "40", device, timeout=300)
    assert out.startswith("ok")


DAEMON_AT_EXIT = """
import threading, time
import torch
from torch_vkv import KVCache
cache = KVCache(2, 2, 16, max_batch_size=4, max_seq_len=4096, dtype=torch.float32, device="cpu", page_size=64 << 10)
slot = cache.alloc()
def hammer(call):
    n = 0
    while True:  # never returns: the interpreter exits with this thread inside the C++ core
        n = n % 4000 + 64
        call(n)
calls = [lambda n: cache.pool.stats(), lambda n: (cache.commit(slot, n), cache.decommit(slot, 0)),
         lambda n: cache.committed_tokens(slot), lambda n: cache.step_async([n, 0, 0, 0])]
for call in calls:
    threading.Thread(target=hammer, args=(call,), daemon=True).start()
time.sleep(0.3)
print("exit")
"""


@pytest.mark.parametrize("attempt", range(3))
def test_daemon_threads_inside_the_core_at_exit(attempt):
    # A daemon thread that takes the GIL back after a call into the core while the interpreter
    # finalizes is ended by pthread_exit; its unwinding left pybind11's gil_scoped_release
    # destructor and std::terminate() aborted the process ("terminate called without an active
    # exception"). The core now takes the GIL back outside any destructor: the process exits 0.
    assert run_python(DAEMON_AT_EXIT, timeout=120).strip() == "exit"
