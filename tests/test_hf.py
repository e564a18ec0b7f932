"""torch_vkv.hf: VirtualKVCache behaves like DynamicCache (generate, loops, batch ops, memory).

CPU tests use tiny random-weight models (tests/_hf_models.py); compiled and GPU
tests are in test_hf_compile.py, demo and bench in test_hf_demo_bench.py.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import torch_vkv.hf as vkv_hf  # noqa: E402
from torch_vkv.hf import forward_kwargs  # noqa: E402

from _hf_models import (  # noqa: E402
    FAMILIES, IMPLS, _expected_committed, _loop, _step, generate, prompts, tiny_model, vcache,
)

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generate_matches_dynamic_cache(family, impl, batch):
    model = tiny_model(family, impl)
    ids, mask = prompts(batch)
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = vcache(model, batch)
    out = generate(model, ids, mask, cache)
    assert torch.equal(out, ref)
    assert cache.mode == ("vkv" if impl == "vkv" else "padded")
    # DynamicCache under plain sdpa gives the same tokens as the vkv path too.
    if impl == "vkv":
        model.set_attn_implementation("sdpa")
        assert torch.equal(out, generate(model, ids, mask, DynamicCache(config=model.config)))
    # Same logical length as DynamicCache: prompt (padding included) + new tokens - 1.
    assert cache.get_seq_length() == ids.shape[1] + 12 - 1


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_beam_search_matches_dynamic_cache(impl):
    model = tiny_model("llama", impl)
    ids, mask = prompts(2)
    kw = dict(num_beams=3, max_new_tokens=8, num_return_sequences=3)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), **kw)
    out = generate(model, ids, mask, vcache(model, 6), **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_reuse_after_reset_and_continued_generation(impl):
    model = tiny_model("llama", impl)
    ids, mask = prompts(3)
    cache = vcache(model, 3)
    first = generate(model, ids, mask, cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_stats()["committed_bytes"] == 0
    assert torch.equal(generate(model, ids, mask, cache), first)
    # Continue from the returned cache, as with DynamicCache.
    ref_cache = DynamicCache(config=model.config)
    ref_first = generate(model, ids, mask, ref_cache)
    mask2 = torch.cat([mask, torch.ones_like(first[:, ids.shape[1]:])], 1)
    ref2 = generate(model, ref_first, mask2, ref_cache, max_new_tokens=5)
    out2 = generate(model, first, mask2, cache, max_new_tokens=5)
    assert torch.equal(out2, ref2)


@pytest.mark.parametrize("impl", IMPLS)
def test_crop_then_continue(impl):
    model = tiny_model("llama", impl)
    ids, _ = prompts(2, length=6)
    ids = ids.masked_fill(ids == 0, 5)
    ref, ref_cache = _loop(model, DynamicCache(config=model.config), ids, 40, crop_at=30, crop_by=4)
    out, cache = _loop(model, vcache(model, 2), ids, 40, crop_at=30, crop_by=4)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    assert cache.get_mask_sizes(1, 0) == ref_cache.get_mask_sizes(1, 0)
    cache.crop(0)  # a no-op, as with DynamicCache
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    # Cropping below a page boundary returns the page.
    cache.crop(-(cache.get_seq_length() - 10))
    assert cache.get_seq_length() == 10
    assert cache.memory_stats()["committed_bytes"] == _expected_committed(cache, [10, 10])


@pytest.mark.parametrize("impl", ["eager", "vkv"])
def test_batch_ops_match_dynamic_cache(impl):
    model = tiny_model("llama", impl)
    ids, _ = prompts(2, length=5)
    ids = ids.masked_fill(ids == 0, 7)
    caches = [DynamicCache(config=model.config), vcache(model, 6)]
    logits = []
    for cache in caches:
        with torch.no_grad():
            model(ids, **forward_kwargs(model, cache))
        cache.batch_repeat_interleave(3)  # 2 -> 6 rows
        cache.reorder_cache(torch.tensor([5, 4, 3, 2, 1, 0]))
        cache.batch_select_indices(torch.tensor([0, 2, 5]))
        tok = torch.tensor([[9], [10], [11]])
        _, lg = _step(model, cache, tok, torch.full((3, 1), 5))
        logits.append(lg)
        assert cache.get_seq_length() == 6
    torch.testing.assert_close(logits[1], logits[0])
    # Rows dropped by batch_select_indices hold no pages.
    stats = caches[1].memory_stats()
    assert stats["committed_bytes"] == _expected_committed(caches[1], [6, 6, 6])


def test_left_padding_squeezed_in_vkv_mode():
    model = tiny_model("llama", "vkv")
    ids, mask = prompts(3)
    cache = vcache(model, 3)
    generate(model, ids, mask, cache, max_new_tokens=4)
    rows = cache.lengths.rows()
    real = mask.sum(1).tolist()
    assert rows == [r + 3 for r in real]  # pads never stored: only real tokens
    assert cache.get_seq_length() == ids.shape[1] + 3  # the DynamicCache count
    assert cache.memory_stats()["tokens"] == sum(rows)


def test_right_padding_rejected_in_vkv_mode():
    model = tiny_model("llama", "vkv")
    ids, _ = prompts(2)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        with torch.no_grad():
            model(ids, attention_mask=mask, **forward_kwargs(model, vcache(model, 2)))


def test_capacity_errors():
    model = tiny_model("llama", "sdpa")
    ids, _ = prompts(3)
    with pytest.raises(ValueError, match="max_batch_size"):
        with torch.no_grad():
            model(ids, **forward_kwargs(model, vcache(model, 2)))
    with pytest.raises(ValueError, match="max_cache_len"):
        with torch.no_grad():
            model(ids, **forward_kwargs(model, vcache(model, 3, max_len=5)))


def test_registered_and_compileable_flag():
    from transformers import AttentionInterface

    vkv_hf.register()  # idempotent
    assert "vkv" in AttentionInterface._global_mapping
    model = tiny_model("llama", "sdpa")
    cache = vcache(model, 1)
    assert not cache.is_compileable  # padded mode: shapes grow, like DynamicCache
    model.set_attn_implementation("vkv")
    assert cache.is_compileable
    assert cache.get_max_length() == 96 and cache.max_batch_size == 1 and cache.max_cache_len == 96


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_memory_within_page_rounding(impl):
    model = tiny_model("llama", impl)
    ids, mask = prompts(3)
    ref_cache = DynamicCache(config=model.config)
    generate(model, ids, mask, ref_cache, max_new_tokens=40)
    cache = vcache(model, 3, max_len=256)
    generate(model, ids, mask, cache, max_new_tokens=40)
    stats = cache.memory_stats()
    rows = cache.lengths.rows() if impl == "vkv" else [cache.get_seq_length()] * 3
    assert stats["committed_bytes"] == _expected_committed(cache, rows, ahead=1)
    kv = cache.kv_cache
    dynamic = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in ref_cache.layers)
    one_page_each = kv.page_size * 2 * kv.num_layers * 3
    assert stats["committed_bytes"] <= dynamic + one_page_each
    assert stats["committed_bytes"] < stats["reserved_bytes"] / 2  # far below a static allocation


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_interleaved_layout(impl):
    """All layers of a token share pages: same tokens, finer commits."""
    model = tiny_model("llama", impl)
    ids, mask = prompts(3)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=20)
    cache = vcache(model, 3, layout="interleaved")
    assert torch.equal(generate(model, ids, mask, cache, max_new_tokens=20), ref)
    kv = cache.kv_cache
    rows = cache.lengths.rows() if impl == "vkv" else [cache.get_seq_length()] * 3
    pages = sum(math.ceil((n + 1) * kv.bytes_per_token_buffer / kv.page_size) for n in rows)  # + prefetch
    assert cache.memory_stats()["committed_bytes"] == pages * kv.page_size


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("hook", ["update", "prepare_step"])
def test_prefetch_next_page(prefetch, hook):
    """The step that fills a page exactly also commits the next one in the
    background (KVCache.step_async), so the step after it finds the page mapped;
    tokens are the same either way, and prefetch=False commits only what is used."""
    model = tiny_model("llama", "vkv")
    ids, _ = prompts(2, length=5)
    ids = ids.masked_fill(ids == 0, 7)
    cache = vcache(model, 2, prefetch=prefetch)
    kv = None
    with torch.no_grad():
        tok = model(ids, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        kv = cache.kv_cache
        per_page = kv.tokens_per_page  # 32
        for n in range(ids.shape[1] + 1, per_page + 2):
            if hook == "prepare_step":
                cache.prepare_step(1)
            pos = torch.full((2, 1), n - 1)
            tok = model(tok, **forward_kwargs(model, cache), position_ids=pos).logits[:, -1:].argmax(-1)
            kv.synchronize()
            backed = kv.committed_tokens(0)
            if n < per_page:
                assert backed == per_page, (n, backed)
            elif n == per_page:  # this step filled the page: the next one is prefetched
                assert backed == (2 * per_page if prefetch else per_page), (n, backed)
            else:
                assert backed == 2 * per_page, (n, backed)
    ref_cache = vcache(model, 2, prefetch=not prefetch)
    ref = _loop(model, ref_cache, ids, per_page + 1 - ids.shape[1])[0]
    out = _loop(model, cache.reset() or cache, ids, per_page + 1 - ids.shape[1])[0]
    assert torch.equal(out, ref)


def test_switching_attention_mid_sequence():
    """vkv -> sdpa on a cache holding vkv-layout rows raises (sdpa would read the
    full capacity); sdpa -> vkv falls back to plain SDPA over the padded rows."""
    model = tiny_model("llama", "vkv")
    ids, mask = prompts(2)
    cache = vcache(model, 2)
    with torch.no_grad():
        model(ids, attention_mask=mask, **forward_kwargs(model, cache))
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="reset"):
            model(ids[:, :1], **forward_kwargs(model, cache))
    cache.reset()
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = vcache(model, 2)
    with torch.no_grad():
        model(ids, attention_mask=mask, **forward_kwargs(model, cache))  # padded rows
    cache.reset()
    model.set_attn_implementation("sdpa")
    first = generate(model, ids, mask, cache, max_new_tokens=3)  # padded mode
    model.set_attn_implementation("vkv")
    mask2 = torch.cat([mask, torch.ones_like(first[:, ids.shape[1]:])], 1)
    out = generate(model, first, mask2, cache, max_new_tokens=9)  # vkv attention over padded rows
    assert torch.equal(out, ref)
