"""Prefix caching, parallel sampling (``n > 1``) and preemption of shared pages in ``torch_vkv.serving``.

Tiny random models (``test_serving``'s), 4 KiB host pages: a block of the
prefix cache is 32 tokens for virtual per_layer (128 bytes of one layer's K or
V per token), 8 for virtual interleaved (512 bytes of all layers' K and V per
token), 16 for paged (``block_size``). ``SHARING_EXAMPLES`` sets the examples
of the state machine (default 6).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("transformers")

from test_serving import (  # noqa: E402
    KV_CONFIGS, PAGE, VOCAB, _plain_torch_append, assert_greedy_equal, engine_for, greedy, model_of, reference,
)  # fmt: skip

from torch_vkv.serving import SamplingParams, completion_seed  # noqa: E402
from torch_vkv.serving.prefix import PrefixIndex, block_keys  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

__all__ = ["_plain_torch_append"]  # the autouse fixture, re-exported so pytest applies it here

BLOCK = {"virtual-per_layer": 32, "virtual-interleaved": 8, "paged": 16}


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB - 1) for _ in range(n)]


def serve(engine, prompts, params) -> list:
    return engine.generate(prompts, params, use_tqdm=False)


def test_block_tokens_are_the_layout_pages():
    model = model_of("llama")
    for kv, b in BLOCK.items():
        with engine_for(model, kv) as e:
            assert e.prefix_block_tokens == b
            if kv != "paged":
                assert e.kv.cache.tokens_per_page == b


# ------------------------------------------------------------ prefix caching


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_prefix_caching_same_tokens_as_off(kv):
    """Greedy outputs with caching on equal caching off (and generate()), for
    prompts sharing a system prompt, a repeated prompt, and a prompt that is
    exactly a cached prefix (its last token is recomputed)."""
    model = model_of("llama")
    rng = random.Random(kv)
    system = tokens(rng, 3 * BLOCK[kv] + 5)
    prompts = [system + tokens(rng, rng.randint(1, 12)) for _ in range(4)]
    prompts += [prompts[1], system[: 2 * BLOCK[kv]], system[:7]]
    runs = {}
    for caching in (False, True):
        with engine_for(model, kv, prefix_caching=caching, max_batch_size=2, chunk_size=48) as e:
            runs[caching] = [o.token_ids for o in serve(e, prompts, greedy(4))]
            stats = e.stats()
        assert stats["prefix_caching"] is caching
        assert (stats["prefix_hit_tokens"] > 0) is caching
    assert runs[True] == runs[False]
    for p, got in zip(prompts, runs[True]):
        assert_greedy_equal(model, p, got, reference(model, p, 4))


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_prefix_hit_counts(kv):
    """Hits are the full blocks of the longest cached prefix, at most the prompt minus its last token."""
    B = BLOCK[kv]
    rng = random.Random(1)
    a = tokens(rng, 3 * B + 5)
    with engine_for(model_of("llama"), kv, max_batch_size=2) as e:
        def hits_of(prompt: list[int]) -> tuple[int, int]:
            h0, q0, c0 = (e.stats()[k] for k in ("prefix_hit_tokens", "prefix_query_tokens", "num_computed_tokens"))
            serve(e, [prompt], greedy(2))
            s = e.stats()
            assert s["prefix_query_tokens"] - q0 == len(prompt)
            return s["prefix_hit_tokens"] - h0, s["num_computed_tokens"] - c0

        assert hits_of(a) == (0, len(a) + 1)  # cold: the prompt, then one decode
        fork = a[: 2 * B + 3] + [(a[2 * B + 3] + 1) % (VOCAB - 1)] + a[2 * B + 4 :]  # differs in block 2
        assert hits_of(fork) == (2 * B, len(a) - 2 * B + 1)
        assert hits_of(a) == (3 * B, len(a) - 3 * B + 1)  # the finished request's blocks stayed cached
        assert hits_of(a[: 3 * B]) == (3 * B - 1, 2)  # a whole cached prompt: its last token is recomputed
        assert hits_of(a[: B - 1]) == (0, B)  # shorter than a block: nothing to share
        assert hits_of([(a[0] + 1) % (VOCAB - 1)] + a[1:]) == (0, len(a) + 1)  # a chain: block 0 differs
        s = e.stats()
        assert s["prefix_hit_rate"] == pytest.approx(s["prefix_hit_tokens"] / s["prefix_query_tokens"])
        assert s["prefix_cached_slots"] >= 1


def test_running_requests_share_their_computed_blocks():
    """A request admitted while another still decodes forks the running slot's prompt pages."""
    B = BLOCK["paged"]
    rng = random.Random(2)
    system = tokens(rng, 2 * B)
    p1, p2 = system + tokens(rng, 4), system + tokens(rng, 6)
    with engine_for(model_of("llama"), "paged", max_batch_size=2) as e:
        e.add_request(p1, greedy(20), request_id="a")
        e.step()  # a's prompt computed, its blocks indexed
        e.add_request(p2, greedy(3), request_id="b")
        e.step()
        assert e.stats()["prefix_hit_tokens"] == 2 * B
        assert e.kv.cache.memory_stats()["shared_pages"] == 2
        outs = {}
        while e.has_unfinished_requests():
            outs.update({o.request_id: o for o in e.step() if o.finished})
    for rid, p, n in (("a", p1, 20), ("b", p2, 3)):
        assert_greedy_equal(model_of("llama"), p, outs[rid].token_ids, reference(model_of("llama"), p, n))


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_requests_arriving_together_share_the_prefix(kv):
    """Requests queued together: the second waits one step for the first one's prompt blocks
    instead of computing them again alongside, then forks them."""
    B = BLOCK[kv]
    rng = random.Random(8)
    system = tokens(rng, 2 * B)
    prompts = [system + tokens(rng, 3), system + tokens(rng, 5), system + tokens(rng, 2)]
    with engine_for(model_of("llama"), kv, chunk_size=256) as e:
        outs = serve(e, prompts, greedy(3))
        stats = e.stats()
    assert stats["prefix_hit_tokens"] == 2 * 2 * B
    assert stats["num_computed_tokens"] == sum(len(p) for p in prompts) - 4 * B + 3 * 2
    for p, o in zip(prompts, outs):
        assert_greedy_equal(model_of("llama"), p, o.token_ids, reference(model_of("llama"), p, 3))


def test_prefix_index_lru_and_verification():
    idx = PrefixIndex(4)
    a, b = list(range(12)), list(range(8)) + [99, 98, 97, 96]
    idx.add(2, [-1] * 12, block_keys(a, 4))  # a's keys over other tokens: what a hash collision looks like
    idx.add(3, a, block_keys(a, 4))
    idx.add(5, b, block_keys(b, 4))
    assert idx.lookup(a, block_keys(a, 4)) == (3, 12)  # slot 2 came first, its tokens differ: skipped
    assert idx.lookup(b[:10], block_keys(b[:10], 4)) == (3, 8)  # slots 3 and 5 hold blocks 0-1; 3 came first
    assert idx.lookup([7] * 12, block_keys([7] * 12, 4)) == (None, 0)
    idx.remove(3)
    assert idx.lookup(a, block_keys(a, 4)) == (5, 8)  # the longest verified prefix left
    idx.remove(2)
    idx.add(3, a, block_keys(a, 4))
    idx.park(3), idx.park(5), idx.touch(3)
    assert idx.parked == [5, 3] and idx.lru() == 5 and idx.lru(exclude=5) == 3
    idx.remove(5)
    assert idx.lookup(b, block_keys(b, 4)) == (3, 8) and idx.parked == [3]  # blocks 0-1 are a's too


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_eviction_least_recently_used_first(kv):
    """Parked slots are evicted when memory is needed, least recently used first."""
    B = BLOCK[kv]
    rng = random.Random(3)
    pa, pb, big = tokens(rng, 2 * B + 1), tokens(rng, 2 * B + 1), tokens(rng, 5 * B)
    # The big request takes 6 blocks (5 * B + 3 tokens) and the parked slots hold 4 distinct ones
    # (a's 2, b's 2; the third shares a's): a budget of 8 (per_layer: 9 of 4 buffers' pages) evicts b only.
    budget = {"paged": 8 * 16 * 512, "virtual-per_layer": 4 * 8 * PAGE, "virtual-interleaved": 9 * PAGE}[kv]
    model = model_of("llama")
    with engine_for(model, kv, memory_budget=budget, max_batch_size=2, max_seq_len=6 * B + 8) as e:
        serve(e, [pa], greedy(2))
        serve(e, [pb], greedy(2))
        serve(e, [pa], greedy(2))  # a hit in a's slot: b is now the least recently used
        h = e.stats()["prefix_hit_tokens"]
        assert h == 2 * B
        parked = e.kv.prefix.parked
        assert len(parked) == 3
        out = serve(e, [big], greedy(3))[0]  # needs memory: evicts b's slot first
        assert parked[0] not in e.kv.prefix.parked
        serve(e, [pb], greedy(2))
        assert e.stats()["prefix_hit_tokens"] == h  # b was evicted: a miss
        assert e.stats()["committed_bytes"] <= budget
    assert_greedy_equal(model, big, out.token_ids, reference(model, big, 3))


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_prefix_caching_under_preemption(kv):
    """A small budget forces preemptions of requests that share cached pages; outputs are unchanged."""
    model = model_of("qwen2")
    rng = random.Random(7)
    system = tokens(rng, 40)
    prompts = [system + tokens(rng, rng.randint(4, 16)) for _ in range(6)]
    budget = 12 * 16 * 512 if kv == "paged" else 24 * PAGE
    with engine_for(model, kv, memory_budget=budget, max_batch_size=6, chunk_size=48) as e:
        for i, p in enumerate(prompts):
            e.add_request(p, greedy(24), request_id=f"r{i}")
        final, committed = {}, []
        while e.has_unfinished_requests():
            final.update({o.request_id: o for o in e.step() if o.finished})
            committed.append(e.stats()["committed_bytes"])
        stats = e.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_hit_tokens"] > 0
    assert max(committed) <= budget
    for i, p in enumerate(prompts):
        assert_greedy_equal(model, p, final[f"r{i}"].token_ids, reference(model, p, 24))


# --------------------------------------------------------- parallel sampling


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_parallel_sampling(kv):
    """n completions, each the tokens of an n=1 request seeded completion_seed(seed, i);
    the prompt is prefilled once."""
    rng = random.Random(4)
    prompt = tokens(rng, 37)
    params = SamplingParams(n=4, max_tokens=7, temperature=1.0, top_k=40, seed=11)
    with engine_for(model_of("llama"), kv, prefix_caching=False) as e:
        out = serve(e, [prompt], params)[0]
        assert e.stats()["num_computed_tokens"] == len(prompt) + 4 * (7 - 1)
        assert e.stats()["num_generated_tokens"] == 4 * 7
        alone = [serve(e, [prompt], SamplingParams(max_tokens=7, temperature=1.0, top_k=40,
                                                   seed=completion_seed(11, i)))[0] for i in range(4)]  # fmt: skip
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert [c.token_ids for c in out.outputs] == [a.token_ids for a in alone]
    assert all(c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different streams
    assert completion_seed(11, 0) == 11 and len({completion_seed(11, i) for i in range(8)}) == 8


def test_parallel_sampling_streams_one_output_per_request():
    with engine_for(model_of("llama"), "paged") as e:
        e.add_request([1, 2, 3], SamplingParams(n=3, max_tokens=3, seed=0), request_id="x")
        e.add_request([4, 5], greedy(2), request_id="y")
        steps = []
        while e.has_unfinished_requests():
            steps.append([(o.request_id, [len(c) for c in o.outputs], o.finished) for o in e.step()])
    assert steps[0] == [("x", [1, 1, 1], False), ("y", [1], False)]
    assert steps[-1] == [("x", [3, 3, 3], True)]


def test_parallel_sampling_stop_at_first_token_and_abort():
    model = model_of("llama")
    prompt = [3, 1, 4, 1, 5]
    first = reference(model, prompt, 1)[0]
    with engine_for(model, "virtual-interleaved") as e:
        # Greedy: every completion samples `first`, a stop token: all finish at once, none forks.
        out = serve(e, [prompt], SamplingParams(n=3, max_tokens=5, temperature=0.0, stop_token_ids=(first,)))[0]
        assert [c.token_ids for c in out.outputs] == [[first]] * 3
        assert {c.finish_reason for c in out.outputs} == {"stop"}
        rid = e.add_request(prompt, SamplingParams(n=3, max_tokens=50, seed=1))
        e.step(), e.step()
        assert e.stats()["num_running"] == 3
        assert e.abort(rid)
        final = e.step()
        assert [o.request_id for o in final] == [rid] and final[0].finished
        assert [c.finish_reason for c in final[0].outputs] == ["abort"] * 3
        assert e.stats()["num_running"] == 0 and not e.has_unfinished_requests()
        assert e.kv.cache.memory_stats()["active_slots"] == len(e.kv.prefix.parked)


def test_preempting_a_forked_sequence_releases_only_its_references():
    """Preempting one of n completions drops its slot's mappings; the others keep the shared
    prompt pages, and every completion still equals its n=1 twin."""
    model = model_of("llama")
    prompt = tokens(random.Random(5), 70)  # 2 full pages of 32 tokens per buffer (per_layer) + 6 tokens
    params = SamplingParams(n=3, max_tokens=12, temperature=0.8, seed=3)
    with engine_for(model, "virtual-per_layer", prefix_caching=False, chunk_size=128) as e:
        rid = e.add_request(prompt, params)
        e.step()  # prefill + first tokens: completions 1, 2 fork the prompt's pages
        cache = e.kv.cache
        assert cache.memory_stats()["shared_pages"] == 2 * 4  # 2 pages in each of 4 buffers
        before = cache.memory_stats()["committed_bytes"]
        youngest = e.scheduler.running[-1]
        e.scheduler.preempt(youngest)
        after = cache.memory_stats()
        assert after["shared_pages"] == 2 * 4  # still mapped by completions 0 and 1
        assert after["committed_bytes"] <= before
        while e.has_unfinished_requests():
            outs = [o for o in e.step() if o.finished]
        assert e.stats()["num_preemptions"] == 1
        alone = [serve(e, [prompt], SamplingParams(max_tokens=12, temperature=0.8, seed=completion_seed(3, i)))[0]
                 for i in range(3)]  # fmt: skip
    assert outs[0].request_id == rid
    assert [c.token_ids for c in outs[0].outputs] == [a.token_ids for a in alone]


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_parallel_sampling_small_budget(kv):
    """n=4 under a budget that cannot hold all completions: forks wait or preempt; results unchanged."""
    model = model_of("qwen2")
    prompt = tokens(random.Random(6), 40)
    budget = 10 * 16 * 512 if kv == "paged" else 20 * PAGE
    params = SamplingParams(n=4, max_tokens=30, temperature=1.0, seed=9)
    with engine_for(model, kv, memory_budget=budget, max_batch_size=4, chunk_size=48) as e:
        out = serve(e, [prompt], params)[0]
        stats = e.stats()
    with engine_for(model, kv, max_batch_size=4) as e:
        alone = [serve(e, [prompt], SamplingParams(max_tokens=30, temperature=1.0, seed=completion_seed(9, i)))[0]
                 for i in range(4)]  # fmt: skip
    assert stats["num_preemptions"] > 0
    assert [c.token_ids for c in out.outputs] == [a.token_ids for a in alone]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_parallel_sampling_in_a_budget_for_one_sequence(kv, prefix_caching):
    """``add_request`` accepts an n > 1 request whose one sequence fits the
    budget alone; every such request is served. Admission used to ask for the
    prompt's pages plus one page group per fork at once, more than the budget
    holds, so the request was never admitted and was aborted with a
    RuntimeWarning. Alone it is admitted now: forks that find no page wait in
    the queue and run when memory frees."""
    import warnings

    model = model_of("llama")
    prompt = tokens(random.Random(8), 39)
    with engine_for(model, kv) as probe:  # the budget: exactly the pages of prompt + max_tokens
        budget = probe.kv.pages_for(len(prompt) + 8) * probe.kv.page_bytes
        alone = [serve(probe, [prompt], SamplingParams(max_tokens=8, seed=completion_seed(1, i)))[0].token_ids
                 for i in range(3)]  # fmt: skip
    with engine_for(model, kv, memory_budget=budget, max_batch_size=4, prefix_caching=prefix_caching) as e:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no request aborted as unschedulable
            out = serve(e, [prompt], SamplingParams(n=3, max_tokens=8, seed=1))[0]
    assert [c.finish_reason for c in out.outputs] == ["length"] * 3
    assert [c.token_ids for c in out.outputs] == alone


def test_parallel_sampling_errors():
    with engine_for(model_of("llama"), "paged", max_batch_size=2) as e:
        with pytest.raises(ValueError, match="params.n: expected at most max_batch_size=2"):
            e.add_request([1, 2], SamplingParams(n=3))
        assert not e.has_unfinished_requests()
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        SamplingParams(n=0)
    with pytest.raises(TypeError, match="prefix_caching"):
        engine_for(model_of("llama"), "paged", prefix_caching=1)
    assert SamplingParams(n=3).n == 3
    assert torch.is_grad_enabled()  # the engine's inference mode does not leak


# ------------------------------------------------- random sequences, sharing

from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import invariant, rule  # noqa: E402
from test_serving_property import MAX_SEQ_LEN, EngineMachine  # noqa: E402

SYSTEM = [(7 * i + 3) % (VOCAB - 1) for i in range(33)]  # a block in every layout (per_layer: 32 tokens)


class SharingMachine(EngineMachine):
    """``test_serving_property``'s machine, plus requests that share a system
    prompt, some with ``n > 1``: under random budgets, aborts and preemptions
    the budget holds, every output is complete, greedy ones equal generate(),
    and ``reclaim()`` at the end finds every page back (no reference leaks)."""

    @rule(suffix_len=st.integers(1, 8), max_tokens=st.integers(1, 7), n=st.integers(1, 3), greedy=st.booleans())
    def add_shared(self, suffix_len, max_tokens, n, greedy):
        prompt = SYSTEM + [self.rng.randrange(VOCAB - 1) for _ in range(suffix_len)]
        rid = f"s{len(self.params)}"
        n = min(n, self.engine.max_batch_size)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, seed=len(self.params), n=n)
        assert self.engine.add_request(prompt, params, request_id=rid) == rid
        self.params[rid] = (prompt, params)
        self.live.add(rid)

    @invariant()
    def memory_within_budget_and_pages_owned_once(self):  # pages are shared here: the budget only
        if self.engine is not None:
            assert self.engine.stats()["committed_bytes"] <= self.budget

    def teardown(self):
        super().teardown()
        for rid, out in self.done.items():
            prompt, params = self.params[rid]
            assert len(out.outputs) == params.n and [c.index for c in out.outputs] == list(range(params.n))
            if rid not in self.aborted:
                want = min(params.max_tokens, MAX_SEQ_LEN - len(prompt))
                assert all(len(c.token_ids) == want for c in out.outputs)


SharingMachine.TestCase.settings = settings(
    EngineMachine.TestCase.settings, max_examples=int(os.environ.get("SHARING_EXAMPLES", "6"))
)
TestSharingMachine = SharingMachine.TestCase
