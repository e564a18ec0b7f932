"""Acceptance tests of issues 15 (sliding windows, soft caps) and 9 (the serving
engine's contract), written from the issue texts as a new user would call the API.

Issue 15: ``attention(..., window_left=, softcap=)`` against a float64 reference
written here from the issue's formulas, ``KVCache(sliding_window=)`` (an int, a
list with ``None`` for global layers, bad values, the interleaved layout,
``memory_stats()``), ``VirtualKVCache`` windows from a Gemma 3 config.
Issue 9: ``Engine``'s keywords and defaults, ``SamplingParams`` ranges,
``add_request`` errors, ``abort``, ``finish_reason``, ``stats()``, ``close()``,
``RequestOutput`` and its ``metrics``, seeded sampling alone and in a batch,
preemption under a small budget. Tiny random models (``_hf_models``), CPU.
"""

from __future__ import annotations

import inspect
import math
import time

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from _hf_models import PAGE, tiny_config, tiny_model  # noqa: E402
from test_serving import _plain_torch_append  # noqa: E402,F401  (autouse: no Triton interpreter for whole models)
from test_serving_window import WINDOW, eager_reference, model_of  # noqa: E402

from torch_vkv import KVCache  # noqa: E402
from torch_vkv.attention import attention, select_backend  # noqa: E402
from torch_vkv.attention.selection import supports  # noqa: E402
from torch_vkv.hf import VirtualKVCache, generate_kwargs  # noqa: E402
from torch_vkv.serving import CompletionOutput, Engine, RequestMetrics, RequestOutput, SamplingParams  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

H, H_KV, D = 4, 2, 16


# ----------------------------------------------------------------- issue 15: attention
def reference(q, k, v, lens, cu, *, window_left=None, softcap=None):
    """float64, one query at a time: query ``j`` of request ``r`` sits at ``p = len - n + j`` and
    sees keys ``[p - window_left, p]``; scores pass ``softcap * tanh(score / softcap)``."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r in range(len(lens)):
        n, L = int(cu[r + 1] - cu[r]), int(lens[r])
        for j in range(n):
            p = L - n + j
            lo = 0 if window_left is None else max(0, p - window_left)
            for h in range(H):
                kk = k[r, lo : p + 1, h // (H // H_KV)].double()
                vv = v[r, lo : p + 1, h // (H // H_KV)].double()
                s = kk @ q[cu[r] + j, h].double() / math.sqrt(D)
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                out[cu[r] + j, h] = torch.softmax(s, 0) @ vv
    return out


def case(lens, n_new, S=48, seed=0):  # flex: rows a multiple of 16
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(len(lens), S, H_KV, D, generator=g), torch.randn(len(lens), S, H_KV, D, generator=g)
    q = torch.randn(sum(n_new), H, D, generator=g)
    cu = torch.tensor([0, *np.cumsum(n_new).tolist()], dtype=torch.int32)
    return q, k, v, torch.tensor(lens, dtype=torch.int32), cu


@pytest.mark.parametrize("backend", ["auto", "sdpa", "flex"])
@pytest.mark.parametrize("window_left", [0, 3, 12, 29, 30, 200])  # context 30: smaller, equal (29 = p), larger
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_window_left_and_softcap_match_the_issue_formulas(backend, window_left, softcap):
    q, k, v, lens, cu = case([30, 17], [6, 1])
    # Rows behind every query's window poisoned: a backend that read them would return NaN.
    for r, (L, n) in enumerate(((30, 6), (17, 1))):
        k[r, L:], v[r, L:] = float("nan"), float("nan")
        first = max(0, L - n - window_left)
        k[r, :first], v[r, :first] = float("nan"), float("nan")
    out = attention(q, k, v, lens, cu_seqlens_q=cu, backend=backend, window_left=window_left, softcap=softcap)
    want = reference(q, k, v, lens, cu, window_left=window_left, softcap=softcap)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "flex"])
@pytest.mark.parametrize("window_left", [0, 7, 19, 20, 64])  # contexts 20 and 9
def test_decode_with_a_window_and_softcap(backend, window_left):
    q, k, v, lens, cu = case([20, 9], [1, 1])
    out = attention(q, k, v, lens, backend=backend, window_left=window_left, softcap=3.0)  # cu_seqlens_q=None: decode
    want = reference(q, k, v, lens, cu, window_left=window_left, softcap=3.0)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_window_at_least_the_context_is_full_attention():
    q, k, v, lens, cu = case([30], [4])
    full = attention(q, k, v, lens, cu_seqlens_q=cu, backend="sdpa")
    for wl in (29, 30, 1000):  # the first query (p = 26) already sees everything from 29 on
        torch.testing.assert_close(attention(q, k, v, lens, cu_seqlens_q=cu, backend="sdpa", window_left=wl), full)
    assert not torch.allclose(attention(q, k, v, lens, cu_seqlens_q=cu, backend="sdpa", window_left=5), full)


def test_auto_never_picks_a_backend_without_softcap():
    q, k, v, lens, _ = case([9], [1])
    for decode in (True, False):
        assert supports(select_backend(q, k, v, decode=decode, softcap=True), softcap=True)
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, lens, backend="torch_fa2", softcap=30.0)
    with pytest.raises(ValueError, match="window_left"):
        attention(q, k, v, lens, backend="sdpa", window_left=-1)


# ----------------------------------------------------------------- issue 15: KVCache
def kv_cache(windows, *, layers=4, layout="per_layer", **kw):
    """128-byte token rows per buffer (2 heads x 16 dims x fp32): 32 tokens per 4 KiB page."""
    return KVCache(layers, H_KV, D, max_batch_size=2, max_seq_len=2048, dtype=torch.float32, device="cpu",
                   page_size=PAGE, layout=layout, sliding_window=windows, **kw)  # fmt: skip


def grow(cache, slot, upto, step=1):
    """A prefill of 500 tokens, then decode steps up to ``upto`` tokens."""
    cache.step({slot: 500})
    for n in range(500 + step, upto + 1, step):
        cache.step({slot: n})


def test_sliding_window_int_and_list():
    with kv_cache(64) as c:
        assert c.sliding_window == [64] * 4
    with kv_cache([64, None, 32, None]) as c:
        assert c.sliding_window == [64, None, 32, None]
    with kv_cache(None) as c:
        assert c.sliding_window == [None] * 4


@pytest.mark.parametrize(
    "windows, exc, match",
    [
        ([64, None], ValueError, r"sliding_window: expected an int or a list of 4 entries \(one per layer\), got \[64, None\]"),
        (-8, ValueError, "sliding_window: expected an int >= 1, got -8"),
        ([64, None, -1, None], ValueError, r"sliding_window\[2\]: expected an int >= 1, got -1"),
        (0, ValueError, "sliding_window: expected an int >= 1, got 0"),
        ("64", TypeError, "sliding_window"),
    ],
)
def test_bad_sliding_window_is_a_clear_error(windows, exc, match):
    with pytest.raises(exc, match=match):
        kv_cache(windows)


def test_memory_stats_report_what_windowed_layers_hold():
    with kv_cache([64, None, 64, None]) as c:
        s = c.alloc()
        grow(c, s, 1000, step=50)
        stats = c.memory_stats()
        page, tpp = c.page_size, c.tokens_per_page
        # 2 windowed layers x K and V: the window plus two pages each; the global layers keep every token.
        window_bound = 4 * (math.ceil(64 / tpp) + 2 + math.ceil(50 / tpp)) * page
        assert 0 < stats["window_committed_bytes"] <= window_bound
        assert stats["committed_bytes"] - stats["window_committed_bytes"] >= 4 * math.ceil(1000 / tpp) * page
        assert c.window_start(0)[s] > 0 and c.window_start(1)[s] == 0


def test_interleaved_keeps_a_page_while_any_layer_needs_it():
    """Issue 15: the interleaved layout shares pages across layers, so it keeps a page
    while any layer needs it: with a global layer nothing is given back; when every
    layer slides, pages behind the largest window go."""
    with kv_cache([64, None, 64, None], layout="interleaved") as c:
        assert c.sliding_window == [64, None, 64, None]
        s = c.alloc()
        grow(c, s, 1000, step=50)
        stats = c.memory_stats()
        assert stats["window_committed_bytes"] == 0
        assert stats["committed_bytes"] >= 1000 * c.bytes_per_token
        assert all(c.window_start(l)[s] == 0 for l in range(4))
    with kv_cache([64, 32, 64, 32], layout="interleaved") as c:
        s, n = c.alloc(), 0
        for length in [500, *range(501, 700)]:
            c.step({s: length})
            for layer in range(4):  # row p of layer l holds p + l
                c.key(layer)[s, n:length] = torch.arange(n, length, dtype=torch.float32)[:, None, None] + layer
            n = length
        stats = c.memory_stats()
        tpp = c.tokens_per_page  # interleaved: a page holds every layer of a token
        assert 0 < stats["window_committed_bytes"] == stats["committed_bytes"]
        assert stats["committed_bytes"] <= (math.ceil(64 / tpp) + 2) * c.page_size
        start = int(c.window_start(1)[s])
        assert 0 < start <= n - 64  # the rows the largest window still reads are kept, in every layer
        for layer in range(4):
            want = torch.arange(start, n, dtype=torch.float32) + layer
            assert torch.equal(c.key(layer)[s, start:n, 0, 0], want), layer


def test_virtual_kv_cache_sets_windows_from_gemma3_layer_types():
    model = model_of("gemma3")  # layer_types: 3 sliding layers, then a global one
    model.set_attn_implementation("vkv")
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    cache = VirtualKVCache(model.config, max_batch_size=1, max_cache_len=256, page_size=PAGE)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=100, min_new_tokens=100,
                             do_sample=False, **generate_kwargs(cache))  # fmt: skip
    assert out[0, 6:].tolist() == eager_reference(model, ids[0].tolist(), 100)
    kv = cache.kv_cache
    assert kv.sliding_window == [WINDOW] * 3 + [None]
    per_window_layer = (math.ceil(WINDOW / kv.tokens_per_page) + 2) * kv.page_size * 2  # K and V
    stats = kv.memory_stats()
    assert 0 < stats["window_committed_bytes"] <= 3 * per_window_layer
    assert kv.window_start(0)[0] > 0 and kv.window_start(3)[0] == 0


# ----------------------------------------------------------------- issue 9: the engine
def test_engine_keywords_and_defaults_as_the_issue_lists():
    sig = inspect.signature(Engine)
    params = sig.parameters
    assert list(params)[0] == "model"
    want = dict(kv="virtual", layout="per_layer", memory_budget=None, page_size=None, block_size=16, chunk_size=512,
                attention_backend="auto", cuda_graphs=True, device=None, dtype=None)  # fmt: skip
    for name in ("max_batch_size", "max_seq_len", *want):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert params["max_batch_size"].default is inspect.Parameter.empty
    assert params["max_seq_len"].default is inspect.Parameter.empty
    assert {n: params[n].default for n in want} == want
    with pytest.raises(TypeError):
        Engine(tiny_model("llama"), 4, 64)  # keyword-only


def test_sampling_params_defaults_and_ranges():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, tuple(p.stop_token_ids), p.ignore_eos, p.seed) == (
        16, 1.0, 1.0, -1, (), False, None)  # fmt: skip
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1)  # the edges that are allowed
    SamplingParams(top_k=-1, top_p=1e-6)
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.01), dict(top_p=-0.5), dict(max_tokens=0),
                dict(max_tokens=-3), dict(top_k=-2)):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", impl="sdpa")


def reference_greedy(model, prompt, n):
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, **generate_kwargs(transformers.DynamicCache(config=model.config)))  # fmt: skip
    return out[0, len(prompt) :].tolist()


def engine(model, **kw):
    args = dict(max_batch_size=4, max_seq_len=64, page_size=PAGE, chunk_size=16)
    args.update(kw)
    if args.get("kv") == "paged":
        args.pop("page_size")
    return Engine(model, **args)


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(layout="interleaved"), dict(kv="paged", block_size=8)])
def test_bad_requests_raise_and_the_engine_then_serves_a_valid_one(llama, kw):
    prompt = [5, 17, 99, 3, 42, 8, 77, 21, 64, 30]
    want = reference_greedy(llama, prompt, 12)
    with engine(llama, **kw) as e:
        assert e.device == torch.device("cpu") and e.dtype == torch.float32
        for bad, match in (([], "prompt_token_ids"), ([7] * 64, "max_seq_len"), ([7] * 70, "max_seq_len"),
                           ([3, 128], "128"), ([-1, 4], "-1")):  # fmt: skip
            with pytest.raises(ValueError, match=match):
                e.add_request(bad, greedy(4))
        assert not e.has_unfinished_requests()
        (out,) = e.generate([prompt], greedy(12), use_tqdm=False)
    assert out.token_ids == want and out.finish_reason == "length"


def test_outputs_fields_streaming_and_metrics(llama):
    prompt = [9, 8, 7, 6, 5]
    with engine(llama) as e:
        t0 = time.monotonic()
        rid = e.add_request(prompt, greedy(6), request_id="r0")
        assert rid == "r0" and isinstance(e.add_request([4, 4], greedy(2)), str)
        seen = []
        while e.has_unfinished_requests():
            for out in e.step():
                assert isinstance(out, RequestOutput)
                if out.request_id == "r0":
                    seen.append(out)
    for a, b in zip(seen, seen[1:]):  # cumulative: each output extends the last
        assert b.token_ids[: len(a.token_ids)] == a.token_ids and len(b.token_ids) == len(a.token_ids) + 1
    assert [o.finish_reason for o in seen] == [None] * (len(seen) - 1) + ["length"]
    assert [o.finished for o in seen] == [False] * (len(seen) - 1) + [True]
    last = seen[-1]
    assert last.prompt_token_ids == prompt and len(last.outputs) == 1
    c = last.outputs[0]
    assert isinstance(c, CompletionOutput) and c.token_ids == last.token_ids and c.finish_reason == last.finish_reason
    assert last.token_ids == reference_greedy(llama, prompt, 6)
    m = last.metrics
    assert isinstance(m, RequestMetrics)
    assert t0 <= m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time <= time.monotonic()
    assert len(m.token_times) == 6 and m.token_times[0] == m.first_token_time
    assert m.token_times == sorted(m.token_times) and m.token_times[-1] <= m.finished_time


def test_finish_reasons_stop_eos_ignore_eos_and_max_seq_len(llama):
    prompt = [11, 12, 13, 14, 15]
    free = reference_greedy(llama, prompt, 10)
    stop = free[3]
    cut = free[: free.index(stop) + 1]
    eos = llama.generation_config.eos_token_id
    try:
        with engine(llama, max_seq_len=12) as e:
            out = e.generate([prompt], greedy(10, stop_token_ids=[stop]), use_tqdm=False)[0]
            assert out.finish_reason == "stop" and out.token_ids == cut  # the stop token is the last one
            capped = e.generate([prompt], greedy(100), use_tqdm=False)[0]  # prompt + output <= max_seq_len
            assert capped.finish_reason == "length" and len(prompt) + len(capped.token_ids) == 12
        llama.generation_config.eos_token_id = [stop, 127]  # EOS from generation_config, a list
        with engine(llama) as e:
            out = e.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)[0]
            assert out.finish_reason == "stop" and out.token_ids == cut
            out = e.generate([prompt], greedy(10), use_tqdm=False)[0]  # ignore_eos
            assert out.finish_reason == "length" and out.token_ids == free
    finally:
        llama.generation_config.eos_token_id = eos


def test_abort_finishes_with_abort_and_the_next_step_returns_it(llama):
    want = reference_greedy(llama, [5, 6, 7], 5)
    with engine(llama) as e:
        a = e.add_request([1, 2, 3, 4], greedy(40))
        b = e.add_request([5, 6, 7], greedy(5))
        for _ in range(3):
            e.step()
        assert e.abort(a) is True
        stats = e.stats()
        assert stats["num_running"] + stats["num_waiting"] == 1
        outs = {o.request_id: o for o in e.step()}
        assert outs[a].finished and outs[a].finish_reason == "abort" and 0 < len(outs[a].token_ids) < 40
        assert e.abort(a) is False  # already finished: nothing to do
        while e.has_unfinished_requests():
            for o in e.step():
                assert o.request_id != a
                final = o
        assert final.request_id == b and final.token_ids == want
        assert e.stats()["used_bytes"] == 0


def test_stats_keys(llama):
    with engine(llama, max_batch_size=2) as e:
        for p in ([3, 4, 5], [6, 7], [8, 9, 10, 11]):
            e.add_request(p, greedy(3))
        e.step()
        s = e.stats()
        assert {"num_running", "num_waiting", "num_preemptions", "committed_bytes", "used_bytes"} <= set(s)
        assert s["num_running"] == 2 and s["num_waiting"] == 1 and s["num_preemptions"] == 0
        assert 0 < s["used_bytes"] <= s["committed_bytes"]
        while e.has_unfinished_requests():
            e.step()
        assert e.stats()["num_running"] == e.stats()["num_waiting"] == 0


def test_close_and_context_manager(llama, tmp_path):
    e = engine(llama)
    e.close()
    e.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        e.add_request([1, 2], greedy(2))
    llama.save_pretrained(tmp_path)  # a local checkpoint path is a model too
    with engine(str(tmp_path)) as e2:
        assert e2.dtype == torch.float32
        (out,) = e2.generate([[3, 4, 5]], [greedy(4)], use_tqdm=False)
        assert out.token_ids == reference_greedy(llama, [3, 4, 5], 4)
    with pytest.raises(RuntimeError, match="closed"):
        e2.add_request([1, 2], greedy(2))
    assert llama.config._attn_implementation == "sdpa"  # the model's own attention is back


def test_generate_keeps_prompt_order_with_a_list_of_params(llama):
    prompts = [[20 + i] * (3 + 4 * i) for i in range(4)]
    with engine(llama, max_batch_size=2, chunk_size=8) as e:
        outs = e.generate(prompts, [greedy(2 + i) for i in range(4)], use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.token_ids) for o in outs] == [2, 3, 4, 5]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_engine_serves_sliding_families_with_the_window_given_back(family):
    model = model_of(family)
    prompt = [(7 * i) % 150 + 3 for i in range(2 * WINDOW + 5)]
    with Engine(model, max_batch_size=2, max_seq_len=256, page_size=PAGE, chunk_size=24) as e:
        assert e.sliding_window == [WINDOW if i % 2 == 0 else None for i in range(4)] if family == "gemma2" else \
            [WINDOW] * 3 + [None]  # fmt: skip
        rid = e.add_request(prompt, greedy(4 * WINDOW))
        while e.has_unfinished_requests():
            for o in e.step():
                if o.finished:
                    out = o
            if e.has_unfinished_requests():
                window_bytes = e.stats()["window_committed_bytes"]
    assert out.request_id == rid and out.token_ids == eager_reference(model, prompt, 4 * WINDOW)
    assert window_bytes > 0


def test_seeded_sampling_is_reproducible_alone_or_in_a_batch_and_top_k_0_disables(llama):
    p = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    with engine(llama) as e:
        alone = e.generate([[5, 6, 7]], p, use_tqdm=False)[0].token_ids
        batch = e.generate([[9, 9, 9, 9], [5, 6, 7], [1]], [SamplingParams(max_tokens=5, seed=3), p, p],
                           use_tqdm=False)  # fmt: skip
        no_k = e.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=11,
                                                      ignore_eos=True, top_k=0), use_tqdm=False)[0]  # fmt: skip
    assert batch[1].token_ids == alone and no_k.token_ids == alone


def test_small_budget_preempts_and_every_request_ends_with_the_same_tokens(llama):
    prompts = [[10 + i, 20 + i, 30 + i, 40 + i, 50 + i] for i in range(4)]
    want = [reference_greedy(llama, p, 40) for p in prompts]
    # A page group (K and V of both layers) is 4 pages of 32 tokens: 3 groups hold one 45-token request.
    with engine(llama, max_seq_len=96, memory_budget=12 * PAGE, prefix_caching=False) as e:
        outs = e.generate(prompts, greedy(40), use_tqdm=False)
        stats = e.stats()
    assert stats["num_preemptions"] > 0 and stats["committed_bytes"] <= 12 * PAGE
    assert [o.token_ids for o in outs] == want
