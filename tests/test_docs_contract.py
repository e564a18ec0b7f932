"""Small checks that the documented API (README.md, docs/*.md) is what the code does: names,
signatures and behaviour a user reads there. Fast, CPU only."""

from __future__ import annotations

import pytest
import torch

from torch_vkv import KVCache, PagedKVCache


def test_completion_output_is_built_as_documented():
    # docs/serving.md: RequestOutput.outputs is a list of CompletionOutput(index, token_ids, finish_reason).
    from torch_vkv.serving import CompletionOutput, RequestMetrics, RequestOutput

    ids = [5, 6, 7]
    c = CompletionOutput(0, ids, "length")
    ids.append(8)  # a snapshot: later changes of the caller's list do not reach it
    assert c.index == 0 and c.token_ids == [5, 6, 7] and c.finish_reason == "length" and c.text == ""
    assert len(c) == 3
    kw = CompletionOutput(index=1, token_ids=(1, 2), finish_reason=None)
    assert kw.token_ids == [1, 2] and kw.finish_reason is None
    assert CompletionOutput(0, [5, 6, 7], "length") == c
    assert "token_ids=[5, 6, 7]" in repr(c)
    out = RequestOutput("r", [1], [c], True, RequestMetrics(0.0))
    assert out.token_ids == [5, 6, 7] and out.finish_reason == "length"


def test_kvcache_release_is_an_alias_of_free_like_the_paged_cache():
    # docs/attention.md: PagedKVCache speaks KVCache's vocabulary, reserve/can_reserve/release as aliases.
    for cache in (
        KVCache(1, 1, 16, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu", page_size=4096),
        PagedKVCache(1, 1, 16, num_blocks=8, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu"),
    ):
        slot = cache.alloc()
        assert cache.can_reserve(slot, 32)
        cache.reserve(slot, 32)
        assert cache.num_free_slots == 1
        cache.release(slot)
        assert cache.num_free_slots == 2
        if isinstance(cache, KVCache):
            cache.close()


def test_available_backends_lists_only_what_runs_on_the_device():
    """``available_backends(device)``: backends that can run on ``device`` in this process, so none
    for a CUDA device the process cannot use, and on the CPU at least ``sdpa``."""
    from torch_vkv import available_backends

    assert "sdpa" in available_backends("cpu")
    if not torch.cuda.is_available():
        assert available_backends("cuda") == [] and available_backends() == []
    assert available_backends(f"cuda:{max(torch.cuda.device_count(), 1) + 7}") == []


def test_alloc_refuses_more_tokens_than_a_slot_holds():
    cache = KVCache(num_layers=1, max_batch_size=2, max_seq_len=64, num_kv_heads=1, head_dim=8, device="cpu",
                    dtype=torch.float32)  # fmt: skip
    try:
        with pytest.raises(ValueError, match=r"num_tokens.*64.*got 65"):
            cache.alloc(65)
        assert cache.num_free_slots == 2  # the refused call took no slot
        slot = cache.alloc(64)
        cache.free(slot)
    finally:
        cache.close()
