"""KVCache: the vAttention cache manager, on the host backend and on CUDA."""

from __future__ import annotations

import gc

import pytest
import torch

import torch_vkv
from torch_vkv import KVCache, OutOfPagesError, OutOfSlotsError

from conftest import small_page

LAYOUTS = ["per_layer", "interleaved"]


def make_cache(device: str, layout: str = "per_layer", **kw) -> KVCache:
    args = dict(
        num_layers=2,
        num_kv_heads=2,
        head_dim=16,
        max_batch_size=4,
        max_seq_len=300,
        dtype=torch.float16,
        device=device,
        layout=layout,
        page_size=small_page(device),
    )
    args.update(kw)
    L, H, D = args.pop("num_layers"), args.pop("num_kv_heads"), args.pop("head_dim")
    return KVCache(L, H, D, **args)


def fill(cache: KVCache, slot: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in range(cache.num_layers):
        for t in (cache.key(layer), cache.value(layer)):
            t[slot, :n].copy_(torch.randn(n, cache.num_kv_heads, cache.head_dim, generator=g).to(t.dtype))


def checksum(cache: KVCache, slot: int, n: int) -> list[float]:
    return [
        float(t[slot, :n].double().sum())
        for layer in range(cache.num_layers)
        for t in (cache.key(layer), cache.value(layer))
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shapes_addresses_and_reserve(device, layout):
    with make_cache(device, layout) as cache:
        k0 = cache.key(0)
        assert k0.shape == (4, 300, 2, 16) and k0.dtype == torch.float16 and k0.stride(-1) == 1
        assert type(k0[0]) is torch.Tensor  # ops on the views return plain tensors
        ptrs = [cache.key(l).data_ptr() for l in range(2)] + [cache.value(l).data_ptr() for l in range(2)]
        slot = cache.alloc()
        cache.reserve(slot, 10)
        assert cache.committed_tokens(slot) >= 10
        assert torch.isfinite(cache.key(1)[slot, :10].float()).all()  # newly committed rows are finite
        cache.reserve(slot, 250)
        assert cache.committed_tokens(slot) >= 250
        fill(cache, slot, 250, seed=0)
        assert ptrs == [cache.key(l).data_ptr() for l in range(2)] + [cache.value(l).data_ptr() for l in range(2)]
        stats = cache.memory_stats()
        assert stats["used_bytes"] == 250 * cache.bytes_per_token
        assert stats["used_bytes"] <= stats["committed_bytes"] <= stats["reserved_bytes"]
        per_buffer = 2 * cache.num_layers if layout == "per_layer" else 1
        # committed stays within one page per buffer of what is used
        assert stats["committed_bytes"] - stats["used_bytes"] < per_buffer * stats["page_size"]


def test_tokens_per_page_by_layout():
    per_layer = make_cache("cpu", "per_layer", page_size=2 << 20, num_layers=32, num_kv_heads=8, head_dim=128)
    inter = make_cache("cpu", "interleaved", page_size=2 << 20, num_layers=32, num_kv_heads=8, head_dim=128)
    # Llama-3-8B shapes in fp16 on 2 MiB pages: 1024 tokens a page per layer,
    # 16 tokens a page when all 32 layers of a token share the page.
    assert per_layer.tokens_per_page == 1024 and inter.tokens_per_page == 16
    assert per_layer.memory_stats()["tokens_per_page"] == 1024
    per_layer.close()
    inter.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_data_survives_commits_and_decommits_of_other_slots(device, layout):
    with make_cache(device, layout) as cache:
        a, b = cache.alloc(), cache.alloc()
        cache.reserve(a, 200)
        fill(cache, a, 200, seed=1)
        want = checksum(cache, a, 200)
        for n in (50, 300, 120):
            cache.reserve(b, n)
            fill(cache, b, n, seed=n)
            cache.decommit(b, 0)
        cache.free(b)
        c = cache.alloc()
        cache.step({a: 260, c: 299})
        assert checksum(cache, a, 200) == want


def test_step_async_prefetches_next_step(device):
    with make_cache(device, max_seq_len=4000) as cache:
        slots = [cache.alloc() for _ in range(3)]
        lens = [0] * cache.max_batch_size
        for i, s in enumerate(slots):
            lens[s] = 1 + i
        # cross several page boundaries where pages are small, stay inside max_seq_len
        for _ in range(min(3 * int(cache.tokens_per_page) + 5, cache.max_seq_len - 4)):
            cache.step_async(lens, lookahead_tokens=1)
            for s in slots:
                # this step's rows are backed before step_async returns
                assert cache.committed_tokens(s) >= lens[s]
                cache.key(0)[s, lens[s] - 1].fill_(1.0)
            cache.synchronize()
            for s in slots:
                assert cache.committed_tokens(s) >= lens[s] + 1  # next step's rows too
                lens[s] += 1
        if 3 * cache.tokens_per_page < cache.max_seq_len:  # several page boundaries crossed
            assert cache.memory_stats()["commit_calls"] > 3


def test_out_of_pages_changes_nothing_and_keeps_other_data(device):
    with make_cache(device) as probe:
        tpp, nb = int(probe.tokens_per_page), 2 * probe.num_layers
    with make_cache(device, max_seq_len=3 * tpp, memory_budget=2 * nb * (small_page(device) or 2 << 20)) as cache:
        a, b = cache.alloc(), cache.alloc()
        cache.reserve(a, tpp)  # one page per buffer; one more per buffer is left
        fill(cache, a, tpp, seed=3)
        want = checksum(cache, a, tpp)
        before = cache.memory_stats()
        with pytest.raises(OutOfPagesError, match="needs .* new page") as info:
            cache.step({a: 2 * tpp, b: 2 * tpp})  # needs 3 more pages per buffer
        assert isinstance(info.value, torch_vkv.KVCacheCapacityError)
        # what was asked (3 pages per buffer) and what was free (1 per buffer)
        assert info.value.requested_pages == 3 * nb and info.value.available_pages == nb
        after = cache.memory_stats()
        assert after["committed_bytes"] == before["committed_bytes"]
        assert cache.committed_tokens(b) == 0 and cache.committed_tokens(a) == tpp
        assert checksum(cache, a, tpp) == want
        assert not cache.can_reserve(b, 2 * tpp)
        assert cache.can_reserve(b, 1)
        cache.reserve(b, 1)  # what fits still works


def test_freed_slot_keeps_pages_until_needed(device):
    with make_cache(device, max_seq_len=1000) as probe:
        one_slot = probe._pages_for(1000) * 2 * probe.num_layers
    with make_cache(device, max_seq_len=1000) as cache:
        cache.pool.set_max_bytes(one_slot * cache.page_size)  # memory for one full slot only
        a = cache.alloc()
        cache.reserve(a, 1000)
        cache.free(a)
        stats = cache.memory_stats()
        assert stats["cached_bytes"] == stats["committed_bytes"] > 0  # deferred reclamation
        again = cache.alloc()
        assert again == a and cache.committed_tokens(a) == 1000  # warm slot preferred
        cache.free(a)
        b = cache.alloc()
        assert b == a
        cache.free(b)
        # force another slot: take a cold one by allocating all
        slots = [cache.alloc() for _ in range(cache.max_batch_size)]
        cold = next(s for s in slots if s != a)
        cache.free(a)
        cache.reserve(cold, 1000)  # takes the pages the freed slot held
        assert cache.committed_tokens(a) == 0 and cache.committed_tokens(cold) == 1000


def test_slots_and_bad_inputs(device):
    with make_cache(device) as cache:
        slots = [cache.alloc() for _ in range(4)]
        assert sorted(slots) == [0, 1, 2, 3]
        with pytest.raises(OutOfSlotsError, match="all 4 slots"):
            cache.alloc()
        cache.free(2)
        with pytest.raises(ValueError, match="not freed since"):
            cache.free(2)  # double free
        with pytest.raises(ValueError, match=r"slot: expected an int <= 3, got 4"):
            cache.reserve(4, 1)
        with pytest.raises(ValueError, match="not freed since"):
            cache.reserve(2, 1)
        with pytest.raises(ValueError, match=r"expected an int >= 0, got -1"):
            cache.reserve(0, -1)
        with pytest.raises(ValueError, match=r"expected an int <= 300, got 301"):
            cache.reserve(0, 301)
        with pytest.raises(TypeError, match="slot: expected an int"):
            cache.reserve("0", 1)
        with pytest.raises(ValueError, match="4 entries"):
            cache.step([1, 2])
        with pytest.raises(ValueError, match=r"layer: expected an int <= 1"):
            cache.key(2)
    with pytest.raises(RuntimeError, match="closed"):
        cache.alloc()
    with pytest.raises(TypeError, match="dtype"):
        make_cache(device, dtype=torch.int32)
    with pytest.raises(ValueError, match="layout"):
        make_cache(device, layout="paged")
    with pytest.raises(ValueError, match="max_batch_size: expected an int >= 1, got 0"):
        make_cache(device, max_batch_size=0)
    with pytest.raises(ValueError, match="device"):
        make_cache("meta")


def test_close_and_gc_return_every_page(device):
    cache = make_cache(device)
    pool = cache.pool
    s = cache.alloc()
    cache.reserve(s, 300)
    assert pool.stats()["mapped_pages"] > 0
    cache.close()
    cache.close()  # idempotent
    st = pool.stats()
    assert st["mapped_pages"] == 0 and st["created_pages"] == 0
    cache2 = make_cache(device)
    pool2 = cache2.pool
    cache2.reserve(cache2.alloc(), 100)
    del cache2
    gc.collect()
    assert pool2.stats()["mapped_pages"] == 0


def test_several_caches_share_one_pool(device):
    pool = torch_vkv.PagePool(device, page_size=small_page(device))
    a = make_cache(device, pool=pool, page_size=None)
    b = make_cache(device, pool=pool, page_size=None, layout="interleaved")
    sa, sb = a.alloc(), b.alloc()
    a.reserve(sa, 100)
    b.reserve(sb, 100)
    fill(a, sa, 100, 5)
    fill(b, sb, 100, 6)
    want = checksum(a, sa, 100)
    b.close()
    assert checksum(a, sa, 100) == want
    a.close()
    assert pool.stats()["mapped_pages"] == 0


@pytest.mark.cuda
def test_cuda_close_returns_driver_memory():
    from torch_vkv._ext import core

    torch.cuda.init()
    # The driver's free memory is the device's: other processes (the suite's parallel workers) allocate and
    # free meanwhile, so a measurement they disturbed is taken again (up to 5 times).
    for attempt in range(5):
        free0, _ = core().device_memory_info(0)
        cache = KVCache(4, 8, 128, max_batch_size=8, max_seq_len=8192, dtype=torch.bfloat16, device="cuda")
        for _ in range(8):
            cache.reserve(cache.alloc(), 8192)
        free1, _ = core().device_memory_info(0)
        committed = cache.memory_stats()["committed_bytes"]
        cache.close()
        del cache
        gc.collect()
        free2, _ = core().device_memory_info(0)
        if free0 - free1 >= committed and abs(free2 - free0) <= 64 << 20:
            break
    assert free0 - free1 >= committed, (attempt, free0, free1, committed)
    assert abs(free2 - free0) <= 64 << 20, (attempt, free0, free2)


@pytest.mark.cuda
def test_cuda_graph_replays_after_more_pages_are_committed():
    cache = KVCache(1, 2, 64, max_batch_size=2, max_seq_len=65536, dtype=torch.float32, device="cuda")
    slot = cache.alloc()
    cache.reserve(slot, 16)  # one page: the graph is captured over a mostly uncommitted buffer
    assert cache.committed_tokens(slot) < 65536
    k = cache.key(0)
    n = torch.tensor(16, device="cuda")  # the length lives on the device
    positions = torch.arange(k.shape[1], device="cuda")
    out = torch.zeros((), device="cuda", dtype=torch.float64)

    def body():
        # Gather rows min(pos, n - 1): only committed rows are ever read.
        rows = k[slot].index_select(0, torch.minimum(positions, n - 1))
        out.copy_((rows.double().sum(dim=(1, 2)) * (positions < n)).sum())

    k[slot, :16].normal_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for length in (16, 5000, 65536):
        cache.reserve(slot, length)  # pages mapped after capture, at addresses the graph already holds
        k[slot, :length].normal_()
        n.fill_(length)
        g.replay()
        torch.cuda.synchronize()
        ref = k[slot, :length].double().sum()
        assert torch.allclose(out, ref, rtol=1e-9, atol=1e-6), (length, float(out), float(ref))
    cache.close()


@pytest.mark.cuda
def test_cuda_decommit_while_kernel_reads_does_not_fault():
    cache = KVCache(1, 8, 128, max_batch_size=2, max_seq_len=16384, dtype=torch.float16, device="cuda")
    slot = cache.alloc()
    cache.reserve(slot, 16384)
    k = cache.key(0)
    k[slot].normal_()
    big = torch.randn(8192, 8192, device="cuda")
    for _ in range(20):
        big = big @ big / 100  # ~ tens of ms of queued work
    total = k[slot].float().sum()  # queued after the matmuls: reads the slot
    cache.free(slot)
    cache.reclaim()  # the unmap waits for the read to finish
    torch.cuda.synchronize()
    assert torch.isfinite(total)
    assert cache.memory_stats()["committed_bytes"] == 0
    cache.close()


def test_margin_rows_are_committed_and_finite(device):
    with make_cache(device, max_seq_len=4000, margin_tokens=300) as cache:
        slot = cache.alloc()
        cache.reserve(slot, 1000)
        # a kernel reading a 300-row tile past the last token finds committed, finite rows
        assert cache.committed_tokens(slot) >= 1300
        assert torch.isfinite(cache.key(0)[slot, 1000:1300].float()).all()
        assert torch.isfinite(cache.value(1)[slot, 1000:1300].float()).all()
        # the margin never reaches past the slot's own row
        cache.reserve(slot, 4000)
        assert cache.committed_tokens(slot) == 4000


@pytest.mark.parametrize("layout", LAYOUTS)
def test_commit_vocabulary_and_page_arithmetic(device, layout):
    """``commit``/``can_commit`` are the verbs; ``reserve``/``can_reserve``
    stay as aliases; ``pages_for_tokens``/``tokens_for_pages`` are inverses."""
    with make_cache(device, layout, margin_tokens=3) as cache:
        a, b = cache.alloc(), cache.alloc()
        assert cache.can_commit(a, 40) and cache.can_reserve(a, 40)
        cache.commit(a, 40)
        cache.reserve(b, 41)
        assert cache.committed_tokens(a) >= 40 and cache.committed_tokens(b) >= 41
        stats = cache.memory_stats()
        assert stats["committed_bytes"] == (
            (cache.pages_for_tokens(40) + cache.pages_for_tokens(41))
            * cache.page_size * (2 * cache.num_layers if layout == "per_layer" else 1)
        )
        assert cache.pages_for_tokens(0) == 0 and cache.tokens_for_pages(0) == 0
        for n in (1, 17, 100, 299, 300):
            p = cache.pages_for_tokens(n)
            assert cache.tokens_for_pages(p) >= n  # p pages back n tokens ...
            assert p == 1 or cache.tokens_for_pages(p - 1) < n  # ... and p - 1 do not
            assert cache.pages_for_tokens(cache.tokens_for_pages(p)) <= p
        assert cache.tokens_for_pages(cache.pages_per_slot) == cache.max_seq_len
        with pytest.raises(ValueError, match="num_pages"):
            cache.tokens_for_pages(-1)


@pytest.mark.parametrize("call", ["commit", "step", "step_async"])
def test_failed_commit_changes_nothing_used_bytes_included(device, call):
    """Issue 8: after a failed ``reserve(slot, 400)`` ``used_bytes`` said 400 tokens."""
    page = small_page(device) or 2 << 20
    with make_cache(device, max_seq_len=1000) as probe:
        tpp, nb = int(probe.tokens_per_page), 2 * probe.num_layers
    with make_cache(device, max_seq_len=4 * tpp, memory_budget=2 * nb * page) as cache:
        a, b = cache.alloc(), cache.alloc()
        cache.commit(a, tpp // 2)
        fill(cache, a, tpp // 2, seed=7)
        want = checksum(cache, a, tpp // 2)
        before = cache.memory_stats()
        args = {"commit": (b, 3 * tpp), "step": ({a: 3 * tpp},), "step_async": ({a: tpp, b: 3 * tpp},)}[call]
        with pytest.raises(OutOfPagesError):
            getattr(cache, call)(*args)
        after = cache.memory_stats()
        for key in ("used_bytes", "committed_bytes", "cached_bytes", "active_slots"):
            assert after[key] == before[key], key
        assert after["used_bytes"] == (tpp // 2) * cache.bytes_per_token
        assert cache.committed_tokens(a) == tpp and cache.committed_tokens(b) == 0
        assert checksum(cache, a, tpp // 2) == want
        cache.commit(b, tpp)  # what fits still works, and counts
        assert cache.memory_stats()["used_bytes"] == (tpp // 2 + tpp) * cache.bytes_per_token


def test_closing_a_cache_on_a_shared_pool_returns_only_its_pages(device):
    """Issue 8: closing one cache on a pre-filled shared pool trimmed the pool (128 pages -> 16)."""
    page = small_page(device) or 2 << 20
    pool = torch_vkv.PagePool(device, page_size=small_page(device), prefill_bytes=128 * page)
    a = make_cache(device, pool=pool, page_size=None)
    b = make_cache(device, pool=pool, page_size=None)
    sa, sb = a.alloc(), b.alloc()
    a.commit(sa, 300)
    b.commit(sb, 300)
    fill(a, sa, 300, seed=8)
    want = checksum(a, sa, 300)
    a_pages = a.memory_stats()["committed_bytes"] // page
    s = pool.stats()
    assert s["created_pages"] == 128 and s["mapped_pages"] == 2 * a_pages
    b.close()  # b's pages go back to the free list; nothing is destroyed
    s = pool.stats()
    assert s["created_pages"] == 128 and s["mapped_pages"] == a_pages and s["free_pages"] == 128 - a_pages
    assert checksum(a, sa, 300) == want
    a.close()
    assert pool.stats()["created_pages"] == 128 and pool.stats()["free_pages"] == 128
    assert pool.trim() == 128  # the pool's owner decides when pages go back to the driver
    # A cache that made its own pool returns its pages to the driver on close.
    own = make_cache(device)
    own.commit(own.alloc(), 300)
    own_pool = own.pool
    own.close()
    assert own_pool.stats()["created_pages"] == 0
