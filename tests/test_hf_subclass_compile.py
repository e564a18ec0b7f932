"""VirtualKVCache for library authors who subclass it, and for code that
torch.compiles the whole forward, prefill included (CPU)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from torch_vkv.hf import VirtualKVCache, forward_kwargs  # noqa: E402

from _hf_models import PAGE, generate, prompts, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_interpreted_triton")


class CountingCache(VirtualKVCache):
    """A subclass as a library would write one: keyword arguments to super().__init__,
    an attribute of its own, an overridden documented method that calls super()."""

    def __init__(self, config, max_batch_size, max_cache_len, *, tag="mine", **kw):
        super().__init__(config, max_batch_size=max_batch_size, max_cache_len=max_cache_len, **kw)
        self.tag = tag
        self.updates = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.updates += 1
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_subclass_generate_matches_dynamic_cache_and_keeps_its_type(impl):
    model = tiny_model("llama", impl)
    ids, mask = prompts(3, length=9)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=10)
    cache = CountingCache(model.config, 4, 64, tag="t", page_size=PAGE)
    out = generate(model, ids, mask, cache, max_new_tokens=10)
    assert torch.equal(out, ref)
    assert type(cache) is CountingCache and cache.tag == "t" and cache.updates == 2 * 10
    cache.reorder_cache(torch.tensor([2, 1, 0]))
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert type(cache) is CountingCache and cache.get_seq_length() == 9 + 9
    assert repr(cache).startswith("CountingCache("), repr(cache)
    cache.close()
    assert repr(cache).startswith("CountingCache(closed"), repr(cache)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_compiled_forward_with_compiled_prefill_and_lazily_built_cache(impl):
    """torch.compile(model.forward) used for the prefill too, on a cache built at
    its first update (no device/dtype given): the build and the eager step's
    commits used to be traced by dynamo, which failed with "Attempt to trace
    forbidden callable mark_static_address" (an AssertionError from dynamo); in
    vkv mode the failed prefill trace also left every later decode step split
    into a dozen graphs. Now the host work runs eagerly (one graph break), the
    logits match DynamicCache, and the vkv decode steps share one graph."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", impl)
    ids, _ = prompts(2, length=6)
    ids = ids.masked_fill(ids == 0, 7)
    cache = CountingCache(model.config, 2, 96, page_size=PAGE)  # no device/dtype: built lazily
    ref_cache = DynamicCache(config=model.config)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.forward, backend="eager")
    with torch.no_grad():
        logits = step(ids, **forward_kwargs(model, cache)).logits
        ref = model(ids, **forward_kwargs(model, ref_cache)).logits
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        tok = ref[:, -1:].argmax(-1)
        graphs_after_first_decode = None
        for i in range(40):  # 46 tokens: crosses the 32-token page boundary
            pos = torch.full((2, 1), 6 + i)
            cache.prepare_step(1)  # a no-op in padded mode
            logits = step(tok, **forward_kwargs(model, cache), position_ids=pos).logits
            ref = model(tok, **forward_kwargs(model, ref_cache), position_ids=pos).logits
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
            tok = ref[:, -1:].argmax(-1)
            if i == 0:
                graphs_after_first_decode = counters["stats"]["unique_graphs"]
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 46
    if impl == "vkv":  # the decode steps after the first add no graph: no recompiles
        assert counters["stats"]["unique_graphs"] == graphs_after_first_decode, dict(counters["stats"])
    cache.close()


@pytest.mark.cuda
def test_cuda_compiled_prefill_under_cuda_graphs_matches_dynamic_cache():
    """The CPU test above on CUDA with ``mode="reduce-overhead"``: the compiled prefill breaks the
    graph at the cache's eager host work (which marks the new buffers static before the compiled
    continuation uses them), so cudagraph trees must not copy a virtual buffer whole (an illegal
    address past the committed pages). Logits match DynamicCache over 40 decode steps."""
    model = tiny_model("llama", "vkv", device="cuda")
    ids, _ = prompts(2, length=6)
    ids = ids.masked_fill(ids == 0, 7).cuda()
    cache = CountingCache(model.config, 2, 96)  # built lazily, on the model's device
    ref_cache = DynamicCache(config=model.config)
    torch._dynamo.reset()
    step = torch.compile(model.forward, mode="reduce-overhead")
    with torch.no_grad():
        logits = step(ids, **forward_kwargs(model, cache)).logits
        ref = model(ids, **forward_kwargs(model, ref_cache)).logits
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        tok = ref[:, -1:].argmax(-1)
        for i in range(40):
            pos = torch.full((2, 1), 6 + i, device="cuda")
            cache.prepare_step(1)
            logits = step(tok, **forward_kwargs(model, cache), position_ids=pos).logits.clone()
            ref = model(tok, **forward_kwargs(model, ref_cache), position_ids=pos).logits
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            tok = ref[:, -1:].argmax(-1)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 46
    cache.close()
