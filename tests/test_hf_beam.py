"""Beam search over VirtualKVCache: pages remapped, not rows copied (torch_vkv.hf.batch_ops), CPU."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from torch_vkv.hf import forward_kwargs  # noqa: E402

from _hf_models import _step, generate, prompts, tiny_model, vcache  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

PROMPT = 70  # > 2 pages of 32 tokens per_layer (4 KiB host pages): the prompt has full pages to share
NEW = 6


def _beam(model, cache, num_beams, batch=2):
    ids, mask = prompts(batch, length=PROMPT)
    kw = dict(num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=NEW)
    return generate(model, ids, mask, cache, **kw)


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_beam_search_gives_the_sequences_of_dynamic_cache(impl, layout, num_beams):
    model = tiny_model("llama", impl)
    ref = _beam(model, DynamicCache(config=model.config), num_beams)
    cache = vcache(model, 2 * num_beams, max_len=128, layout=layout)
    out = _beam(model, cache, num_beams)
    assert torch.equal(out, ref)
    kv = cache.kv_cache
    stats = cache.memory_stats()
    # Each reorder copies at most the partial last page of each row, cycles of the
    # permutation included (staged by mapping): never whole rows.
    rows = 2 * num_beams
    partial = kv.page_size * len(kv._reservations)
    assert stats["batch_copied_bytes"] <= NEW * rows * partial
    # The beams share their prompt's full pages: less than a private copy of every row.
    private = rows * kv.pages_for_tokens(PROMPT + NEW) * partial
    assert stats["shared_pages"] > 0 and stats["committed_bytes"] < private
    cache.close()


def test_copying_path_gives_the_same_sequences_and_copies_whole_rows():
    model = tiny_model("llama", "sdpa")
    remap, copy = vcache(model, 6, max_len=128), vcache(model, 6, max_len=128)
    copy._copy_batch_ops = True
    assert torch.equal(_beam(model, remap, 3), _beam(model, copy, 3))
    by_remap, by_copy = remap.memory_stats(), copy.memory_stats()
    assert by_copy["batch_copied_bytes"] > 5 * by_remap["batch_copied_bytes"]
    assert by_copy["shared_pages"] == 0 and by_remap["committed_bytes"] < by_copy["committed_bytes"]


def test_reorder_keeps_untouched_rows_and_crop_after_sharing():
    model = tiny_model("llama", "sdpa")
    ids, _ = prompts(4, length=PROMPT)
    ids = ids.masked_fill(ids == 0, 5)
    cache = vcache(model, 4, max_len=128)
    with torch.no_grad():
        model(ids, **forward_kwargs(model, cache))
    layer = cache.layers[0]
    before = [layer.keys[b].clone() for b in range(4)]
    sums = [float(layer.values[b].double().sum()) for b in range(4)]
    cache.reorder_cache(torch.tensor([0, 0, 2, 1]))
    assert torch.equal(layer.keys[0], before[0]) and torch.equal(layer.keys[2], before[2])
    assert torch.equal(layer.keys[1], before[0]) and torch.equal(layer.keys[3], before[1])
    assert [float(layer.values[b].double().sum()) for b in (0, 2)] == [sums[0], sums[2]]
    assert cache.memory_stats()["shared_pages"] > 0
    # A crop into the shared prefix gives each row its own end page: a step's writes stay private.
    cache.crop(40)
    _step(model, cache, torch.tensor([[9], [10], [11], [12]]), torch.full((4, 1), 40))
    for b, src in enumerate([0, 0, 2, 1]):
        assert torch.equal(layer.keys[b][:, :40], before[src][:, :40])
    assert not torch.equal(layer.keys[0][:, 40], layer.keys[1][:, 40])
    cache.close()


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_that_fills_every_page_runs_without_a_budget(impl, layout, num_beams):
    """Without memory_budget a cache may hold a static allocation's worth: when the
    beams' rows reach the last page of max_cache_len, every page is committed, and a
    reorder cycle still needs its spare page per buffer (staging). It used to raise
    OutOfPagesError ("budget 16 pages") where DynamicCache just ran."""
    model = tiny_model("llama", impl)
    ids, mask = prompts(2, length=9)
    kw = dict(num_beams=num_beams, max_new_tokens=10)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), **kw)
    # 32 tokens: exactly one 4 KiB page per row and buffer in per_layer, four in interleaved.
    cache = vcache(model, 2 * num_beams, max_len=32, layout=layout)
    assert torch.equal(generate(model, ids, mask, cache, **kw), ref)
    # The spare is a ceiling for the moment of a reorder, not memory kept.
    assert cache.memory_stats()["committed_bytes"] <= cache.memory_stats()["reserved_bytes"]
    cache.close()
