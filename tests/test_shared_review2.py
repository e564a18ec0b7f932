"""Review of shared pages (fork, remap, shared pools, prefix caching with n > 1): cases the other files miss.

CPU host backend, 4 KiB pages (``test_cache_fork``'s helpers); engine cases use tiny random models
(``test_serving``'s) with plain torch appends.
"""

from __future__ import annotations

import random

import pytest
import torch

from test_cache_fork import fill, make, rows, same, source

from torch_vkv import KVCache, OutOfPagesError, PagePool

LAYOUTS = ("per_layer", "interleaved")


# ------------------------------------------------------------ engine: prefix caching + n > 1, tight budget


@pytest.mark.parametrize("kv", ["virtual-per_layer", "virtual-interleaved", "paged"])
def test_prefix_caching_and_n_completions_under_a_tight_budget_equal_each_completion_alone(kv, no_interpreted_triton):
    """Requests sharing a system prompt, some with n > 1, in a budget that forces preemption and eviction of
    cached prefixes: every completion equals the same (prompt, seed) run alone as an n=1 request."""
    pytest.importorskip("transformers")
    from test_serving import PAGE, VOCAB, engine_for, model_of

    from torch_vkv.serving import SamplingParams, completion_seed

    model = model_of("llama")
    rng = random.Random(kv)
    system = [rng.randrange(VOCAB - 1) for _ in range(37)]
    prompts = [system + [rng.randrange(VOCAB - 1) for _ in range(rng.randint(1, 20))] for _ in range(5)]
    params = [SamplingParams(n=n, max_tokens=14, temperature=1.0, seed=10 + i)
              for i, n in enumerate((3, 1, 2, 1, 4))]  # fmt: skip
    budget = {"virtual-per_layer": 16 * PAGE, "virtual-interleaved": 13 * PAGE, "paged": 8 * 16 * 512}[kv]
    with engine_for(model, kv, memory_budget=budget, max_batch_size=6, chunk_size=48) as e:
        outs = e.generate(prompts, params, use_tqdm=False)
        stats = e.stats()
    alone = []
    with engine_for(model, kv, max_batch_size=2, prefix_caching=False) as e:
        for p, sp in zip(prompts, params):
            alone.append([e.generate([p], SamplingParams(max_tokens=14, temperature=1.0,
                                                         seed=completion_seed(sp.seed, i)), use_tqdm=False)[0].token_ids
                          for i in range(sp.n)])  # fmt: skip
    assert stats["prefix_hit_tokens"] > 0
    assert stats["num_preemptions"] > 0, stats
    assert [[c.token_ids for c in o.outputs] for o in outs] == alone


# ------------------------------------------------------------ writes into a shared prefix


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_write_into_a_shared_prefix_is_refused_and_changes_no_slot(layout):
    """Shared pages are read-only: a write through ``key(l)`` / ``value(l)`` into rows of a page that another
    slot maps (the fork, or its source) raised nothing and changed the other slot's data. It is refused with
    ValueError naming the first writable row; rows past the prefix stay writable; once the sharing ends (the
    other slot freed, or the slot cropped below the page) the rows are the slot's own again."""
    with make(layout) as c:
        s = source(c, 300)
        before = rows(c, s, 0, 300)
        f = c.fork(s, 300)
        tpp = c.tokens_per_page
        shared = 300 // tpp * tpp  # rows in pages both slots map
        for slot in (f, s):
            for view in (c.key(0), c.value(c.num_layers - 1)):
                with pytest.raises(ValueError, match=f"rows written in slot {slot}: expected rows >= {shared}"):
                    view[slot, shared - 1 : shared + 2] = 1
                with pytest.raises(ValueError, match="shares with another slot"):
                    view[slot, 0:10] += 1  # checked when indexed, before the add writes
        assert same(before, rows(c, s, 0, 300)) and same(before, rows(c, f, 0, 300))
        c.key(0)[f, shared:300] = 7  # the fork's own last page
        assert same(before, rows(c, s, 0, 300))
        c.free(f)  # s is alone again: its pages are its own
        c.key(0)[s, 0:5] = 3
        assert bool((c.key(0)[s, 0:5] == 3).all())
        g = c.fork(s, 300)
        c.decommit(g, tpp)  # g keeps page 0 (shared) only
        with pytest.raises(ValueError, match="shares with another slot"):
            c.key(0)[g, 0] = 1
        c.decommit(g, 0)
        c.commit(g, 10)
        c.key(0)[g, 0:10] = 5  # a page of its own now
        assert bool((c.key(0)[s, 0:5] == 3).all())
