"""torch_vkv.serving: sliding-window and soft-capped families in the engine.

Tiny random Mistral (every layer slides), Gemma 2 (soft cap, alternating
sliding layers), Gemma 3 (``layer_types``), Qwen2 and Qwen3
(``use_sliding_window`` with ``max_window_layers``): greedy engine outputs must
equal ``model.generate`` with a ``DynamicCache`` under ``"eager"`` attention
(transformers' reference masks) for generations several times longer than the
window, with prefill chunks that cross the window's edge, in every KV layout;
a first difference is accepted only at a near-tie (``assert_greedy_equal``).
With small host pages, a sliding layer's committed pages stay within the
window plus two pages over a long engine run. ``test_cuda_*`` repeat this on
the GPU.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_serving import _plain_torch_append, assert_greedy_equal  # noqa: E402,F401  (the fixture is autouse)

from torch_vkv.serving import Engine, SamplingParams  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

WINDOW = 16
PAGE = 4096  # host page: 8 tokens of one layer's K (2 KV heads x 64 dims x fp32)
VOCAB = 160
FAMILIES = ("mistral", "gemma2", "gemma3", "qwen2", "qwen3")
KV_CONFIGS = {
    "virtual-per_layer": dict(kv="virtual", layout="per_layer", page_size=PAGE),
    "virtual-interleaved": dict(kv="virtual", layout="interleaved", page_size=PAGE),
    "paged": dict(kv="paged", block_size=8),
}


def make_model(family: str, device: str = "cpu", dtype=torch.float32):
    """A 4-layer random model whose sliding layers see ``WINDOW`` tokens."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.2)  # fmt: skip
    if family == "mistral":
        cfg, cls = transformers.MistralConfig(**common, sliding_window=WINDOW), transformers.MistralForCausalLM
    elif family == "gemma2":  # default layer_types: sliding, full, sliding, full
        cfg = transformers.Gemma2Config(**common, sliding_window=WINDOW, attn_logit_softcapping=5.0)
        cls = transformers.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, sliding_window=WINDOW,
                                            layer_types=["sliding_attention"] * 3 + ["full_attention"])  # fmt: skip
        cls = transformers.Gemma3ForCausalLM
    else:  # layers >= max_window_layers slide
        conf = transformers.Qwen2Config if family == "qwen2" else transformers.Qwen3Config
        cfg = conf(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


_MODELS: dict = {}


def model_of(family: str):
    if family not in _MODELS:
        _MODELS[family] = make_model(family)
    return _MODELS[family]


def eager_reference(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of ``generate`` with a ``DynamicCache`` under ``"eager"``."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ids = torch.tensor([prompt], device=model.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, past_key_values=transformers.DynamicCache(config=model.config),
                                 eos_token_id=None, pad_token_id=0)  # fmt: skip
    finally:
        model.set_attn_implementation(impl)
    return out[0, len(prompt) :].tolist()


def check_engine(model, kv_kw: dict, *, chunk_size: int, max_tokens: int, device: str = "cpu", seed: int = 0, **kw):
    """Engine outputs of a few prompts (one shorter than the window, others longer) vs the eager reference."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, WINDOW + 7, 2 * WINDOW + 3)]
    args = dict(max_batch_size=4, max_seq_len=256, chunk_size=chunk_size, cuda_graphs=False, device=device)
    args.update(kv_kw)
    args.update(kw)
    with Engine(model, **args) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
        stats = engine.stats()
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the near-tie check's full forward: the reference's attention
    try:
        for prompt, out in zip(prompts, outs):
            want = eager_reference(model, prompt, max_tokens)
            assert_greedy_equal(model, prompt, out.token_ids, want)
    finally:
        model.set_attn_implementation(impl)
    return stats


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_eager_generate(family, kv):
    """Prefill chunks of 12 tokens cross the 16-token window's edge; 4x the window generated."""
    check_engine(model_of(family), KV_CONFIGS[kv], chunk_size=12, max_tokens=4 * WINDOW)


def test_engine_reads_windows_and_softcap_from_config():
    from torch_vkv.hf.cache import layer_windows

    for family, want in [("mistral", [WINDOW] * 4), ("gemma2", [WINDOW, None] * 2),
                         ("gemma3", [WINDOW] * 3 + [None]), ("qwen2", [None] + [WINDOW] * 3)]:  # fmt: skip
        model = model_of(family)
        assert layer_windows(model.config, 4) == want
        with Engine(model, max_batch_size=2, max_seq_len=64, cuda_graphs=False, device="cpu", page_size=PAGE) as e:
            assert e.sliding_window == want
            assert e.kv.cache.sliding_window == want  # per_layer: the cache gives pages back
        with Engine(model, max_batch_size=2, max_seq_len=64, cuda_graphs=False, device="cpu", kv="paged") as e:
            assert e.sliding_window == want and not e.kv.gives_back_windows
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
    with Engine(llama, max_batch_size=2, max_seq_len=64, cuda_graphs=False, device="cpu") as e:
        assert e.sliding_window == [None, None] and e.stats()["window_committed_bytes"] == 0


def test_softcap_and_window_reach_attention(monkeypatch):
    """The serving attention gets each layer's window and Gemma 2's soft cap from the model."""
    import torch_vkv.serving.runner as runner

    seen = []
    real = runner.attention

    def spy(*args, **kw):
        seen.append((kw.get("window_left"), kw.get("softcap")))
        return real(*args, **kw)

    monkeypatch.setattr(runner, "attention", spy)
    with Engine(model_of("gemma2"), max_batch_size=1, max_seq_len=64, cuda_graphs=False, device="cpu") as e:
        e.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    assert seen[:4] == [(WINDOW - 1, 5.0), (None, 5.0), (WINDOW - 1, 5.0), (None, 5.0)]


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_layers_committed_pages_bounded(family):
    """Small host pages (8 tokens): during a long run (12x the window), every
    sliding layer of every running request holds at most the window plus two
    pages; a global layer holds every token; the engine's
    ``window_committed_bytes`` is what the sliding buffers hold."""
    model = model_of(family)
    with Engine(model, max_batch_size=3, max_seq_len=512, chunk_size=32, cuda_graphs=False, device="cpu",
                page_size=PAGE) as engine:  # fmt: skip
        cache = engine.kv.cache
        tpp = int(cache.tokens_per_page)
        assert tpp == 8
        limit = -(-WINDOW // tpp) + 2
        windows = engine.sliding_window
        rng = random.Random(3)
        for n in (4, 40, 70):
            engine.add_request([rng.randrange(3, VOCAB) for _ in range(n)], SamplingParams(max_tokens=12 * WINDOW,
                                                                                         temperature=0.0))  # fmt: skip
        worst = 0
        while engine.has_unfinished_requests():
            before = {r.request_id: r.num_computed_tokens for r in engine.scheduler.running}
            engine.step()
            running = engine.scheduler.running
            for layer, w in enumerate(windows):
                start = cache.window_start(layer)
                for r in running:
                    held = cache.pages_for_tokens(cache.committed_tokens(r.slot)) - int(start[r.slot]) // tpp
                    if w is None:
                        assert start[r.slot] == 0 and cache.committed_tokens(r.slot) >= r.num_computed_tokens
                    elif before.get(r.request_id) == r.num_computed_tokens - 1:  # a decode step (one new token)
                        worst = max(worst, held)
                        assert held <= limit, (layer, r.request_id, r.num_computed_tokens, held)
            sliding = sum(w is not None for w in windows)
            expect = 0
            for r in running:
                keep = cache.pages_for_tokens(cache.committed_tokens(r.slot))
                for layer, w in enumerate(windows):
                    if w is not None:
                        expect += 2 * (keep - int(cache.window_start(layer)[r.slot]) // tpp)
            if sliding:
                # freed slots' windowed pages are given back at once, so only running requests hold any
                assert engine.stats()["window_committed_bytes"] == expect * cache.page_size
        assert worst == limit or worst == limit - 1  # the bound is reached: pages really are given back


def test_preempted_sliding_request_recomputes_exactly():
    """A budget too small for three long requests forces preemptions of requests
    whose sliding layers gave pages back; outputs still equal the reference."""
    model = model_of("gemma3")
    stats = check_engine(model, KV_CONFIGS["virtual-per_layer"], chunk_size=16, max_tokens=3 * WINDOW,
                         memory_budget=110 * PAGE, seed=5)  # fmt: skip
    assert stats["num_preemptions"] > 0


# ----------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["virtual-per_layer", "paged"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_greedy_equals_eager_generate(family, kv):
    """The same on the GPU, float32 (2 MiB pages: windows span a fraction of a page,
    so this checks the attention's window and soft cap, not the page give-back)."""
    model = make_model(family, device="cuda")
    kw = {k: v for k, v in KV_CONFIGS[kv].items() if k != "page_size"}
    check_engine(model, kw, chunk_size=12, max_tokens=4 * WINDOW, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_cuda_graphs_sliding_families(family):
    """Decode steps replayed from CUDA graphs carry the window and soft cap too."""
    model = make_model(family, device="cuda")
    check_engine(model, dict(kv="virtual"), chunk_size=12, max_tokens=4 * WINDOW, device="cuda", cuda_graphs=True)
