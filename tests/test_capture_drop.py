"""A cache or pool dropped while this thread captures a CUDA graph (a garbage collection during
``torch.compile``'s graph recording) is released after the capture, not inside it: its release
synchronizes the device and unmaps pages, which invalidates a capture ("operation failed due to a
previous error during capture", seen in ``generate()`` with a new ``VirtualKVCache`` per call).

The CPU tests stand in for a capture by patching ``_lifetime._capturing``; the CUDA test captures."""

from __future__ import annotations

import gc

import pytest
import torch

from torch_vkv import KVCache, PagePool
from torch_vkv import _lifetime


def _cache(pool, device="cpu"):
    cache = KVCache(2, 2, 64, max_batch_size=2, max_seq_len=4096, dtype=torch.float16, device=device, pool=pool)
    cache.reserve(cache.alloc(), 1024)
    return cache


def test_a_cache_dropped_during_a_capture_keeps_its_pages_until_it_ends(monkeypatch):
    pool = PagePool(device="cpu", max_bytes=64 << 20)
    cache = _cache(pool)
    mapped = pool.stats()["mapped_pages"]
    assert mapped > 0
    monkeypatch.setattr(_lifetime, "_capturing", lambda: True)
    del cache
    gc.collect()
    assert pool.stats()["mapped_pages"] == mapped  # nothing released inside the "capture"
    _lifetime.release_deferred()
    assert pool.stats()["mapped_pages"] == mapped  # still capturing: still kept
    monkeypatch.setattr(_lifetime, "_capturing", lambda: False)
    other = _cache(pool)  # making a cache releases what was kept
    assert pool.stats()["mapped_pages"] == other.memory_stats()["committed_bytes"] // other.page_size
    other.close()


def test_a_cache_in_a_reference_cycle_collected_during_a_capture(monkeypatch):
    pool = PagePool(device="cpu", max_bytes=64 << 20)
    cache = _cache(pool)
    cycle = {"cache": cache}
    cycle["self"] = cycle
    k = cache.key(0)
    k[0, :4].normal_()
    rows = k[0, :4].clone()
    del cache, k
    keep = _cache(pool)  # a cache that goes on running meanwhile
    keep.key(0)[0, :4] = rows
    monkeypatch.setattr(_lifetime, "_capturing", lambda: True)
    del cycle
    gc.collect()
    assert _lifetime._deferred  # kept
    monkeypatch.setattr(_lifetime, "_capturing", lambda: False)
    keep.reserve(0, 2048)  # a call into any cache releases what was kept, outside the capture
    assert not _lifetime._deferred
    assert torch.equal(keep.key(0)[0, :4], rows)
    assert pool.stats()["mapped_pages"] == keep.memory_stats()["committed_bytes"] // keep.page_size
    keep.close()


def test_outside_a_capture_a_dropped_cache_is_released_at_once():
    pool = PagePool(device="cpu", max_bytes=64 << 20)
    cache = _cache(pool)
    del cache
    assert pool.stats()["mapped_pages"] == 0 and not _lifetime._deferred


@pytest.mark.cuda
def test_cuda_a_cache_dropped_during_a_graph_capture_leaves_the_capture_valid():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pool = PagePool(device="cuda", max_bytes=256 << 20)
    cache = _cache(pool, device="cuda")
    cache.key(0)[0, :1024].normal_()
    mapped = pool.stats()["mapped_pages"]
    x = torch.randn(4096, device="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):  # as torch.compile's cudagraph trees capture
        y = x * 2
        del cache
        gc.collect()
        z = y + 1
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(z, x * 2 + 1)
    assert pool.stats()["mapped_pages"] == mapped
    _lifetime.release_deferred()
    torch.cuda.synchronize()
    assert pool.stats()["mapped_pages"] == 0
