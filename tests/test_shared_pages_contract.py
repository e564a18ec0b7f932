"""Issue 12 (shared pages) as a new user reads it: every name and behaviour the issue
and docs/design.md, docs/serving.md, docs/hf.md state, through the public API only.

KVCache.fork / PagedKVCache.fork (slot type, errors with nothing changed, shared pages
counted once, pages back only when no slot maps them), Engine prefix caching (on by
default, hit stats), SamplingParams(n=...) and beam search with VirtualKVCache.
CPU host backend with 4 KiB pages; tiny random models.
"""

from __future__ import annotations

import random

import pytest
import torch

from torch_vkv import KVCache, OutOfPagesError, OutOfSlotsError, PagedKVCache

L, H, D = 2, 2, 8  # float32: 64 bytes per token and buffer -> 64 tokens per 4 KiB page (per_layer)
PAGE = 4096
VOLATILE = ("commit_seconds", "decommit_seconds")  # timings: not state


def kv_cache(layout="per_layer", *, batch=3, budget=None, **kw):
    return KVCache(L, H, D, max_batch_size=batch, max_seq_len=512, dtype=torch.float32, device="cpu",
                   layout=layout, page_size=PAGE, memory_budget=budget, **kw)  # fmt: skip


def write(cache, slot, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    for layer in range(cache.num_layers):
        for view in (cache.key(layer), cache.value(layer)):
            view[slot, lo:hi] = torch.randn((hi - lo, H, D), generator=g)


def read(cache, slot, lo, hi):
    return [v[slot, lo:hi].clone() for layer in range(cache.num_layers) for v in (cache.key(layer), cache.value(layer))]


def equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def state(cache):
    stats = {k: v for k, v in cache.memory_stats().items() if k not in VOLATILE}
    return stats, cache.active_slots, cache.num_free_slots


def filled(cache, n, seed=0):
    slot = cache.alloc()
    cache.commit(slot, n)
    write(cache, slot, 0, n, seed)
    return slot


# ------------------------------------------------------------------ KVCache.fork


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_fork_returns_an_int_slot_reading_the_source_and_writes_stay_private(layout):
    with kv_cache(layout) as c:
        src = filled(c, 200)
        f = c.fork(src, 150)
        assert type(f) is int and f != src and f in c.active_slots
        assert equal(read(c, f, 0, 150), read(c, src, 0, 150))
        prefix = read(c, src, 0, 150)
        c.commit(f, 220)  # appends past the shared prefix, in either slot
        write(c, f, 150, 220, seed=1)
        c.commit(src, 260)
        write(c, src, 200, 260, seed=2)
        assert equal(read(c, f, 0, 150), prefix) and equal(read(c, src, 0, 150), prefix)
        assert not equal(read(c, f, 150, 200), read(c, src, 150, 200))


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_a_shared_page_counts_once_and_a_fork_costs_at_most_one_page_per_buffer(layout):
    with kv_cache(layout) as c:
        nb = 2 * L if layout == "per_layer" else 1
        src = filled(c, 300)
        before = c.memory_stats()
        assert before["shared_pages"] == 0
        f = c.fork(src, 300)
        after = c.memory_stats()
        full = 300 // c.tokens_per_page
        assert after["shared_pages"] == full * nb
        grown = after["committed_bytes"] - before["committed_bytes"]
        assert 0 < grown <= nb * c.page_size  # the partial last page only
        assert after["committed_bytes"] == c.pool.stats()["mapped_pages"] * c.page_size  # physical pages, once
        assert after["used_bytes"] == 2 * 300 * c.bytes_per_token
        c.free(f)
        assert c.memory_stats()["shared_pages"] == 0


def test_fork_out_of_slots_changes_nothing():
    with kv_cache(batch=2) as c:
        src = filled(c, 100)
        c.alloc()
        before = state(c)
        with pytest.raises(OutOfSlotsError):
            c.fork(src, 100)
        assert state(c) == before


def test_fork_out_of_pages_changes_nothing():
    with kv_cache(budget=(4 + 1) * 2 * L * PAGE) as c:  # the source's 4 pages per buffer, one spare
        src = filled(c, 250)  # 3 full pages + a partial one
        other = filled(c, 10, seed=1)  # takes the spare page
        before, data = state(c), read(c, src, 0, 250)
        with pytest.raises(OutOfPagesError):
            c.fork(src, 250)  # needs a page per buffer for the partial last page
        assert state(c) == before and equal(read(c, src, 0, 250), data)
        c.free(other)  # its page is cached by the freed slot: the fork reclaims it
        f = c.fork(src, 250)
        assert equal(read(c, f, 0, 250), data)


def test_fork_checks_its_arguments():
    with kv_cache() as c:
        src = filled(c, 100)
        before = state(c)
        with pytest.raises(ValueError, match="num_tokens"):
            c.fork(src, 101)  # more than the source holds
        with pytest.raises(ValueError, match="num_tokens"):
            c.fork(src, -1)
        with pytest.raises(TypeError):
            c.fork(src, 1.5)
        with pytest.raises(TypeError):
            c.fork(src, True)
        with pytest.raises(ValueError):
            c.fork(2, 10)  # not an active slot
        assert state(c) == before
    with kv_cache(sliding_window=64) as c:
        with pytest.raises(ValueError, match="sliding_window"):
            c.fork(filled(c, 100), 64)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_a_page_returns_to_the_pool_only_when_no_slot_maps_it(layout):
    with kv_cache(layout, batch=3, budget=24 * 2 * L * PAGE) as c:
        src = filled(c, 320)
        f = c.fork(src, 300)
        keep = read(c, f, 0, 300)
        c.free(src)  # the fork still maps the shared pages
        c.reclaim()  # deferred reclamation never takes them
        assert equal(read(c, f, 0, 300), keep)
        # Other slots force reclamation of everything the pool can give back ...
        a = c.alloc()
        c.commit(a, 512)
        write(c, a, 0, 512, seed=5)
        c.free(a)
        b = c.alloc()
        c.commit(b, 512)
        write(c, b, 0, 512, seed=6)
        assert equal(read(c, f, 0, 300), keep)  # ... never the fork's pages
        for s in (f, b):
            c.free(s)
        c.reclaim()
        assert c.memory_stats()["committed_bytes"] == 0 and c.pool.stats()["mapped_pages"] == 0
    # close() releases every mapping, shared pages included.
    c = kv_cache(layout)
    s = filled(c, 300)
    c.fork(c.fork(s, 200), 150)
    c.close()
    assert c.pool.stats()["mapped_pages"] == 0


# ------------------------------------------------------------- PagedKVCache.fork


def paged(num_blocks=8, batch=3):
    return PagedKVCache(L, H, D, num_blocks=num_blocks, max_batch_size=batch, max_seq_len=128,
                        page_size=16, dtype=torch.float32, device="cpu")  # fmt: skip


def paged_rows(p, slot, n):
    blocks = p.block_table[slot, : p.pages_for_tokens(n)].long()
    return p.kv[:, :, blocks].flatten(2, 3)[:, :, :n].clone()


def paged_filled(p, n):
    slot = p.alloc()
    p.commit(slot, n)
    blocks = p.block_table[slot, : p.pages_for_tokens(n)].long()
    p.kv[:, :, blocks] = torch.randn_like(p.kv[:, :, blocks])
    return slot


def test_paged_fork_shares_full_blocks_and_copies_the_partial_one():
    p = paged()
    src = paged_filled(p, 40)  # 2 full blocks + 8 rows
    before = p.memory_stats()
    f = p.fork(src, 40)
    after = p.memory_stats()
    assert type(f) is int and f != src
    assert torch.equal(paged_rows(p, f, 40), paged_rows(p, src, 40))
    assert after["shared_pages"] == 2
    assert after["committed_bytes"] - before["committed_bytes"] == p.bytes_per_page  # the partial block only
    assert p.block_table[f, 2] != p.block_table[src, 2]
    p.free(src)
    assert p.memory_stats()["shared_pages"] == 0 and p.memory_stats()["free_pages"] == 8 - 3
    p.free(f)
    assert p.memory_stats()["free_pages"] == 8


def test_paged_fork_errors_change_nothing():
    p = paged(num_blocks=3, batch=3)
    src = paged_filled(p, 40)  # all 3 blocks
    before = p.memory_stats()
    with pytest.raises(OutOfPagesError):
        p.fork(src, 40)
    assert p.memory_stats() == before
    f = p.fork(src, 32)  # on a block boundary: no new block
    assert p.memory_stats()["shared_pages"] == 2
    p.alloc()
    before = p.memory_stats()
    with pytest.raises(OutOfSlotsError):
        p.fork(f, 16)
    assert p.memory_stats() == before
    with pytest.raises(ValueError, match="num_tokens"):
        p.fork(src, 49)


# ---------------------------------------------------------------------- engine

transformers = pytest.importorskip("transformers")

from test_serving import _plain_torch_append, engine_for, greedy, model_of  # noqa: E402

from torch_vkv.serving import SamplingParams, completion_seed  # noqa: E402

__all__ = ["_plain_torch_append"]  # the autouse fixture, re-exported so pytest applies it here


@pytest.mark.parametrize("kv", ["virtual-interleaved", "virtual-per_layer", "paged"])
def test_prefix_caching_is_on_by_default_and_reports_hits(kv):
    """Hits are whole blocks (a page of the layout; paged: block_size tokens) of the cached prompt."""
    model = model_of("llama")
    with engine_for(model, kv) as e:  # prefix_caching not passed: on by default
        stats = e.stats()
        assert stats["prefix_caching"] is True
        assert stats["prefix_hit_tokens"] == 0 and stats["prefix_hit_rate"] == 0.0
        block = e.prefix_block_tokens
        assert block == (16 if kv == "paged" else e.kv.cache.tokens_per_page)
        rng = random.Random(0)
        system = [rng.randrange(3, 150) for _ in range(3 * block)]
        first = system + [5, 6, 7]
        second = system + [8, 9]
        out1 = e.generate([first], greedy(3), use_tqdm=False)[0]
        out2 = e.generate([second], greedy(3), use_tqdm=False)[0]
        stats = e.stats()
    assert stats["prefix_hit_tokens"] == 3 * block  # the whole system prompt's full blocks
    assert stats["prefix_query_tokens"] == len(first) + len(second)
    assert stats["prefix_hit_rate"] == pytest.approx(3 * block / (len(first) + len(second)))
    with engine_for(model, kv, prefix_caching=False) as e:
        off = [o.token_ids for o in e.generate([first, second], greedy(3), use_tqdm=False)]
        assert e.stats()["prefix_caching"] is False and e.stats()["prefix_hit_tokens"] == 0
    assert off == [out1.token_ids, out2.token_ids]


@pytest.mark.parametrize("kv", ["virtual-interleaved", "paged"])
def test_n_completions_with_indices_each_reproducible_by_seed(kv):
    model = model_of("llama")
    prompt = list(range(3, 40))
    params = SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=11)
    with engine_for(model, kv) as e:
        out = e.generate([prompt], params, use_tqdm=False)[0]
        computed = e.stats()["num_computed_tokens"]
        assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 5 for c in out.outputs) and out.finished
        assert out.token_ids == out.outputs[0].token_ids
        # The prompt is prefilled once: then 3 x 4 decode tokens (each completion's first
        # token comes from the prompt's logits).
        assert computed == len(prompt) + 3 * 4
    singles = []
    for i in range(3):
        with engine_for(model, kv, prefix_caching=False) as e:
            one = SamplingParams(n=1, max_tokens=5, temperature=1.0, seed=completion_seed(11, i))
            singles.append(e.generate([prompt], one, use_tqdm=False)[0].token_ids)
    assert [c.token_ids for c in out.outputs] == singles


@pytest.mark.parametrize("n, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                                      ("2", TypeError)])  # fmt: skip
def test_bad_n_is_a_clear_error(n, error):
    with pytest.raises(error, match="n"):
        SamplingParams(n=n)


def test_n_above_max_batch_size_is_refused():
    with engine_for(model_of("llama"), "virtual-interleaved", max_batch_size=2) as e:
        with pytest.raises(ValueError, match="max_batch_size"):
            e.add_request([3, 4, 5], SamplingParams(n=3))
        assert not e.has_unfinished_requests()


# ---------------------------------------------------------------- beam search


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_beam_search_with_virtual_kv_cache_equals_dynamic_cache(layout):
    from torch_vkv.hf import VirtualKVCache, generate_kwargs

    model = model_of("llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 150, (2, 90), generator=g)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, num_beams=3, num_return_sequences=3, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, **generate_kwargs(transformers.DynamicCache(config=model.config)), **kw)
        cache = VirtualKVCache(model.config, max_batch_size=6, max_cache_len=128, layout=layout, page_size=PAGE)
        out = model.generate(ids, **generate_kwargs(cache), **kw)
    assert torch.equal(out, ref)
    stats = cache.memory_stats()
    assert stats["shared_pages"] > 0 and stats["batch_copied_bytes"] > 0
    cache.close()


def test_batch_ops_share_pages_instead_of_copying_rows():
    from torch_vkv.hf import VirtualKVCache, forward_kwargs

    model = model_of("llama")
    cache = VirtualKVCache(model.config, max_batch_size=4, max_cache_len=128, page_size=PAGE)
    ids = torch.randint(3, 150, (2, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids, **forward_kwargs(model, cache))
    keys = [cache.layers[0].keys[b, :, :70].clone() for b in range(2)]
    cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
    assert [cache.layers[0].keys[b, :, :70].equal(keys[b // 2]) for b in range(4)] == [True] * 4
    stats = cache.memory_stats()
    assert stats["shared_pages"] > 0
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))
    assert [cache.layers[0].keys[b, :, :70].equal(keys[(3 - b) // 2]) for b in range(4)] == [True] * 4
    cache.batch_select_indices(torch.tensor([1]))  # old row 1: a copy of prompt 1
    assert cache.layers[0].keys[0, :, :70].equal(keys[1])
    assert cache.memory_stats()["shared_pages"] == 0
    cache.close()
