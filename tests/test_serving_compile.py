"""``Engine(compile=True)``: decode-only iterations through ``torch.compile``.

The compiled decode must give the engine's eager tokens (greedy: ``generate()``'s,
up to near-ties, as in ``test_serving.py``), compile once for every batch size
above one (dynamo marks the batch dimension dynamic from the first call), and
write the K/V in place (no copy of the cache around the custom op). CPU tests
use inductor's C++ backend; the CUDA tests capture the compiled step in graphs.
"""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.test_serving import (  # noqa: E402
    KV_CONFIGS,
    NEAR_TIE_GPU,
    _cuda_kv,
    assert_greedy_equal,
    engine_for,
    greedy,
    make_model,
    model_of,
    random_prompts,
    reference,
)
from torch_vkv.serving import Engine, SamplingParams  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_torch_append(no_interpreted_triton):
    """Whole models on the CPU append with plain torch (conftest)."""


@pytest.fixture
def fresh_dynamo():
    """Counters and caches of this test's compiles only."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_compiled_decode_equals_generate_and_compiles_once_for_batches_above_one(kv, fresh_dynamo):
    model = model_of("llama")
    rng = random.Random(f"compile-{kv}")
    prompts = random_prompts(rng, 4, lo=5, hi=40)
    # Different lengths: the decode batch shrinks 4 -> 3 -> 2 -> 1 as requests finish.
    max_tokens = [3, 6, 9, 12]
    with engine_for(model, kv, max_batch_size=4, chunk_size=256, compile=True) as engine:
        assert engine.runner.compiled
        outs = engine.generate(prompts, [greedy(m) for m in max_tokens], use_tqdm=False)
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.finish_reason == "length"
        assert_greedy_equal(model, p, o.token_ids, reference(model, p, m))
    # Batches 4, 3 and 2 share one graph; batch 1 is its own (dynamo specialises size-1 dimensions).
    assert fresh_dynamo["stats"]["unique_graphs"] == 2, dict(fresh_dynamo["stats"])


def test_compiled_decode_writes_the_cache_in_place(fresh_dynamo):
    """The compiled step's K/V land in the engine's own cache rows: the next
    (eager) prefill-free decode reads them, and the tokens equal an eager
    engine's throughout; the cache's storage is never replaced."""
    model = model_of("qwen2")
    prompts = random_prompts(random.Random(5), 3, lo=10, hi=30)
    runs = []
    for compile in (False, True):
        with engine_for(model, "virtual-per_layer", max_batch_size=3, compile=compile) as engine:
            key0 = engine.kv.key(0)
            ptr = key0.data_ptr()
            runs.append([o.token_ids for o in engine.generate(prompts, greedy(10), use_tqdm=False)])
            assert engine.kv.key(0) is key0 and key0.data_ptr() == ptr
    assert runs[0] == runs[1]


def test_a_second_engine_reuses_the_compiled_step(fresh_dynamo):
    """The compiled step takes no engine-specific tensor (the K/V are reached
    through the runner's key, whose address dynamo does not guard): a second
    engine of the same configuration compiles nothing new, and a closed
    engine's step is refused, not run on freed memory."""
    model = model_of("llama")
    prompts = random_prompts(random.Random(9), 3, lo=5, hi=20)
    runs = []
    for _ in range(2):
        with engine_for(model, "paged", max_batch_size=3, compile=True) as engine:
            runs.append([o.token_ids for o in engine.generate(prompts, greedy(6), use_tqdm=False)])
            key = engine.runner._key
        graphs = fresh_dynamo["stats"]["unique_graphs"]
        if len(runs) == 1:
            first = graphs
    assert runs[0] == runs[1] and graphs == first, (first, graphs)
    from torch_vkv.serving.runner import decode_layer

    x = torch.zeros(1, 4, 16)
    with pytest.raises(RuntimeError, match="after its engine was closed"):
        decode_layer(x, x[:, :2], x[:, :2], torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                     None, key, 0, "sdpa", None, -1, 0.0)  # fmt: skip


WINDOW_CASES = [
    pytest.param(f, kv, marks=[] if (f, kv) in {("gemma2", "virtual-per_layer"), ("qwen3", "paged")} else [pytest.mark.slow])
    for f in ("mistral", "gemma2", "gemma3", "qwen3") for kv in KV_CONFIGS
]  # fmt: skip


@pytest.mark.parametrize("family, kv", WINDOW_CASES)
def test_compiled_sliding_and_softcapped_families_equal_eager_generate(family, kv, fresh_dynamo):
    """Windows and Gemma 2's soft cap reach the compiled step's attention
    (``decode_layer``): 4x the window generated, as ``test_serving_window``."""
    from tests.test_serving_window import KV_CONFIGS as WINDOW_KV
    from tests.test_serving_window import WINDOW, check_engine
    from tests.test_serving_window import model_of as window_model

    check_engine(window_model(family), WINDOW_KV[kv], chunk_size=12, max_tokens=4 * WINDOW, compile=True)
    assert fresh_dynamo["stats"]["unique_graphs"] >= 1  # the decode steps did run compiled


@pytest.mark.parametrize("kv", ["virtual-interleaved", "paged"])
def test_compiled_engine_preempts_and_samples_n_like_the_eager_one(kv, fresh_dynamo):
    """Preemption under a small budget (recomputed prompts, freed and reused
    slots) and parallel sampling (forked slots) with compiled decode steps:
    greedy outputs equal ``generate()``'s, and seeded ``n=2`` samples equal
    the eager engine's (the same noise; a token may differ only where the
    compiled logits' float32 rounding flips a near-tie)."""
    model = model_of("qwen2")
    prompts = random_prompts(random.Random(7), 6, lo=45, hi=60)
    budget = 12 * 16 * 512 if kv == "paged" else 24 * 4096  # as test_preemption_small_budget: 2-3 requests fit
    with engine_for(model, kv, memory_budget=budget, max_batch_size=8, chunk_size=48, compile=True) as engine:
        outs = engine.generate(prompts, greedy(24), use_tqdm=False)
        assert engine.stats()["num_preemptions"] > 0
    for p, o in zip(prompts, outs):
        assert_greedy_equal(model, p, o.token_ids, reference(model, p, 24))
    sample = [SamplingParams(max_tokens=12, temperature=0.9, seed=i, n=2) for i in range(3)]
    runs = []
    for compile in (False, True):
        with engine_for(model, kv, max_batch_size=8, compile=compile) as engine:
            runs.append([[c.token_ids for c in o.outputs] for o in engine.generate(prompts[:3], sample, use_tqdm=False)])
    same = sum(a == b for x, y in zip(*runs) for a, b in zip(x, y))
    assert same >= 5, runs  # 6 completions; at most one diverging at a near-tie


def test_a_failing_compile_warns_and_serves_eagerly(monkeypatch, fresh_dynamo):
    """A compile that fails (here: a backend that raises, as inductor does
    without a C++ compiler) does not fail the requests: one RuntimeWarning
    naming the failure, then eager decode steps with the eager tokens."""
    import torch_vkv.serving.runner as runner_mod

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    real = torch.compile
    monkeypatch.setattr(runner_mod.torch, "compile", lambda fn, **kw: real(fn, backend=broken_backend, **kw))
    model = model_of("llama")
    prompts = random_prompts(random.Random(3), 3, lo=5, hi=30)
    with pytest.warns(RuntimeWarning, match="torch.compile of the decode step failed.*no C\\+\\+ compiler found"):
        with engine_for(model, max_batch_size=3, compile=True) as engine:
            outs = engine.generate(prompts, greedy(5), use_tqdm=False)
            assert engine.runner.compiled is False
    for p, o in zip(prompts, outs):
        assert_greedy_equal(model, p, o.token_ids, reference(model, p, 5))


def test_the_recompile_limit_warns_and_serves_eagerly(monkeypatch, fresh_dynamo):
    """Every engine of a process runs one compiled function, so dynamo's
    recompile limit counts the graphs of all their models and batch shapes.
    Past it a ``fullgraph`` compile raises ``FailOnRecompileLimitHit``, which
    is no ``TorchDynamoException``: it failed the step (here: the batch of 1,
    the second graph, with the limit at 1). It warns and serves eagerly too."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model = model_of("llama")
    prompts = random_prompts(random.Random(3), 2, lo=5, hi=30)
    max_tokens = [3, 8]  # a batch of 2, then of 1
    with pytest.warns(RuntimeWarning, match="torch.compile of the decode step failed.*recompile_limit"):
        with engine_for(model, max_batch_size=2, compile=True) as engine:
            outs = engine.generate(prompts, [greedy(m) for m in max_tokens], use_tqdm=False)
            assert engine.runner.compiled is False
    for p, m, o in zip(prompts, max_tokens, outs):
        assert_greedy_equal(model, p, o.token_ids, reference(model, p, m))


@pytest.mark.parametrize("kv", ["virtual-per_layer", "paged"])
def test_compiled_flex_backend_on_the_cpu_equals_generate(kv, fresh_dynamo):
    """``attention_backend="flex"`` in a compiled step on the CPU: its eager
    ``flex_attention`` inside ``decode_layer`` failed (``NotImplementedError``
    / "NYI: querying is_contiguous inside of vmap") under the custom-op
    aliasing check that AOTAutograd runs around a compiled graph's first call,
    which failed the step. The tokens are ``generate()``'s, compiled."""
    model = model_of("llama")
    prompts = random_prompts(random.Random(5), 2, lo=5, hi=30)
    with engine_for(model, kv, max_batch_size=2, compile=True, attention_backend="flex") as engine:
        outs = engine.generate(prompts, greedy(4), use_tqdm=False)
        assert engine.runner.compiled
    for p, o in zip(prompts, outs):
        assert_greedy_equal(model, p, o.token_ids, reference(model, p, 4))
    assert fresh_dynamo["stats"]["unique_graphs"] >= 1


def test_compile_flag_is_checked():
    with pytest.raises(TypeError, match="compile: expected a bool, got 'yes'"):
        engine_for(model_of("llama"), compile="yes")
    with engine_for(model_of("llama")) as engine:
        assert engine.runner.compiled is False  # off by default


@pytest.mark.cuda
@pytest.mark.parametrize("kv", list(KV_CONFIGS))
def test_cuda_compiled_graphs_equal_generate(kv, fresh_dynamo):
    """Compiled decode captured in CUDA graphs (fp32): greedy outputs equal
    generate()'s up to near-ties (the last requests decode alone, in the
    size-2 graph), dynamo compiled one graph, and the graphed logits equal
    the eager forward's for one padded decode batch."""
    model = make_model("llama", device="cuda")
    rng = random.Random(41)
    prompts = random_prompts(rng, 11, lo=5, hi=200)
    params = [greedy(rng.randint(1, 40)) for _ in prompts]
    with Engine(model, max_batch_size=8, max_seq_len=512, chunk_size=2048, device="cuda", compile=True,
                **_cuda_kv(kv)) as e:  # fmt: skip
        assert e.runner.graph_sizes == [2, 4, 8]  # one compiled graph: a batch of 1 replays the size-2 graph
        outs = e.generate(prompts, params, use_tqdm=False)
        for p in prompts[:5]:  # at most 1000 prompt tokens: one prefill iteration
            e.add_request(p, greedy(4))
        e.step()  # prefill all five; the next batch is decode-only
        batch = e.scheduler.schedule(0.0)
        assert batch.decode_only and len(batch.requests) == 5
        with torch.inference_mode():
            graphed = e.runner.execute(batch)[0].float().clone()
            saved, e.runner._graphs = e.runner._graphs, {}
            try:
                eager = e.runner._forward  # the uncompiled forward of the same batch
                e.runner._decode_fn = eager
                plain = e.runner.execute(batch)[0].float()
            finally:
                e.runner._graphs = saved
    torch.testing.assert_close(graphed, plain, atol=1e-3, rtol=1e-3)
    assert fresh_dynamo["stats"]["unique_graphs"] == 1, dict(fresh_dynamo["stats"])
    for p, q, o in zip(prompts, params, outs):
        assert_greedy_equal(model, p, o.token_ids, reference(model, p, q.max_tokens), NEAR_TIE_GPU)


def test_serve_command_compile_flag_reaches_the_engine(monkeypatch, tmp_path):
    """``python -m torch_vkv serve --compile`` builds its engine with ``compile=True`` (off without it);
    ``--no-prewarm`` turns eager allocation off (on by default)."""
    cli = pytest.importorskip("torch_vkv.serving.server.cli", reason="the server extra (fastapi, uvicorn) is not installed")
    seen = []

    class Stop(Exception):
        pass

    def fake_llm(model, tokenizer=None, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(cli, "LLM", fake_llm)
    (tmp_path / "config.json").write_text("{}")  # a checkpoint folder to the parser; the fake LLM never loads it
    model = str(tmp_path)
    for argv, want in ((["--model", model, "--compile"], True), (["--model", model], False)):
        with pytest.raises(Stop):
            cli.main(argv)
        assert seen[-1]["compile"] is want and seen[-1]["prewarm"] is True
    with pytest.raises(Stop):
        cli.main(["--model", model, "--no-prewarm"])
    assert seen[-1]["prewarm"] is False
