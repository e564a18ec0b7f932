"""Caches on one GPU leave the calling thread's current device alone (the C++
core binds its device's context for each call and gives the thread back the
one it had). Needs two GPUs: skipped with fewer."""

from __future__ import annotations

import gc

import pytest
import torch

from torch_vkv import KVCache

pytestmark = pytest.mark.cuda


def _needs_two_gpus() -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs (a cache on one, the thread's current device on the other)")


def test_a_cache_on_another_gpu_leaves_the_current_device_alone():
    _needs_two_gpus()
    torch.cuda.set_device(0)
    torch.empty(1, device="cuda:0")
    cache = KVCache(2, 2, 64, max_batch_size=2, max_seq_len=4096, dtype=torch.float16, device="cuda:1")
    assert torch.cuda.current_device() == 0, "building the cache switched the thread to cuda:1"
    slot = cache.alloc()
    cache.step({slot: 100})
    assert torch.cuda.current_device() == 0, "a step switched the thread to cuda:1"
    assert torch.empty(1, device="cuda").device.index == 0
    cache.decommit(slot, 0)
    cache.close()
    del cache
    gc.collect()
    assert torch.cuda.current_device() == 0, "close() or the destructor switched the thread to cuda:1"


def test_a_cache_call_inside_a_device_guard_keeps_the_guard():
    _needs_two_gpus()
    torch.cuda.set_device(0)
    cache = KVCache(2, 2, 64, max_batch_size=2, max_seq_len=4096, dtype=torch.float16, device="cuda:0")
    slot = cache.alloc()
    with torch.cuda.device(1):
        cache.step({slot: 100})
        assert torch.empty(1, device="cuda").device.index == 1, "a cuda:0 cache call moved the block to cuda:0"
    cache.close()
