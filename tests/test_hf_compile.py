"""torch_vkv.hf under torch.compile and CUDA graphs (CPU tests, and GPU tests marked ``cuda``)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import torch_vkv.hf.attention as vkv_attn  # noqa: E402
from torch_vkv.hf import VirtualKVCache, forward_kwargs  # noqa: E402

from _hf_models import (  # noqa: E402
    _assert_greedy_equivalent, _close, _expected_committed, _generate_logits, _page_crossing_model, _ref_model,
    generate, prefill_with_sdpa_twin, prompts, tiny_model, vcache,
)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_compiled_decode_no_graph_breaks_no_recompiles(layout):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_model("llama", "vkv")
    ids, _ = prompts(2, length=5)
    ids = ids.masked_fill(ids == 0, 7)
    cache = vcache(model, 2, max_len=128, layout=layout)
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        tok = model(ids, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        model.set_attn_implementation("eager")
        model(ids, **forward_kwargs(model, ref_cache))
        model.set_attn_implementation("vkv")
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.forward, fullgraph=True)
    n = ids.shape[1]
    with torch.no_grad():
        for i in range(50):  # 55 tokens: crosses the 32-token page boundary
            pos = torch.full((2, 1), n + i)
            cache.prepare_step(1)  # the pre-step commit hook (generate() calls it itself)
            logits = step(tok, **forward_kwargs(model, cache), position_ids=pos).logits
            model.set_attn_implementation("eager")
            ref = model(tok, **forward_kwargs(model, ref_cache), position_ids=pos).logits
            model.set_attn_implementation("vkv")
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            tok = logits[:, -1:].argmax(-1)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert cache.get_seq_length() == n + 50 == ref_cache.get_seq_length()
    assert cache.memory_stats()["committed_bytes"] == _expected_committed(cache, [n + 50] * 2, ahead=1)
    assert cache.memory_stats()["used_bytes"] == 2 * (n + 50) * cache.kv_cache.bytes_per_token


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_compiled_step_mutates_only_static_inputs(layout):
    """Why interleaved steps ran without CUDA graphs on the GPU, checked on the CPU.

    Inductor runs a graph as a CUDA graph only if every input it mutates is
    static (cudagraph_utils.check_for_mutation). Interleaved layer views all
    alias one buffer; passed as separate inputs, AOTAutograd merges them into
    a synthetic base and drops every static index ("skipping cudagraphs due to
    mutated inputs (65 instances)" for Llama-3-8B). Here inductor's inner
    compiler records what it is given, for both layouts."""
    import torch._inductor.compile_fx as cfx

    model = tiny_model("llama", "vkv")
    ids, _ = prompts(2, length=5)
    ids = ids.masked_fill(ids == 0, 7)
    cache = vcache(model, 2, max_len=128, layout=layout)
    seen = []

    def inner(gm, example_inputs, **kwargs):
        out = cfx.compile_fx_inner(gm, example_inputs, **kwargs)
        kv_inputs = {i for i, t in enumerate(example_inputs)
                     if isinstance(t, torch.Tensor) and tuple(t.shape) in kv_shapes}  # fmt: skip
        seen.append((set(out.mutated_input_idxs), set(kwargs.get("static_input_idxs") or ()), kv_inputs))
        return out

    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True,
                         backend=lambda gm, ex: cfx.compile_fx(gm, ex, inner_compile=inner))  # fmt: skip
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        tok = model(ids, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        kv = cache.kv_cache  # inputs over the virtual K/V, by shape (the inputs are fake tensors here)
        B, S, H, D = kv.key(0).shape
        kv_shapes = {(B, S, H, D), (B, H, S, D), (B, S, kv.num_layers, 2, H, D)}
        for i in range(3):
            cache.prepare_step(1)
            tok = step(tok, **forward_kwargs(model, cache), position_ids=torch.full((2, 1), 5 + i)).logits
            tok = tok[:, -1:].argmax(-1)
    assert len(seen) == 1
    mutated, static, kv_inputs = seen[0]
    # K/V (2 per layer, or the one interleaved buffer), cache_seqlens, seq_length_t
    assert len(mutated) == (2 * 2 + 2 if layout == "per_layer" else 1 + 2), mutated
    assert mutated <= static, f"mutated inputs {sorted(mutated)} not all static {sorted(static)}"
    # Any input over the virtual K/V is static (a non-static one is copied whole before each replay).
    assert len(kv_inputs) == (4 if layout == "per_layer" else 1) and kv_inputs <= static, (kv_inputs, static)
    assert cache.get_seq_length() == 8


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_compiled_settles_lengths_without_syncs(batch):
    """generate()'s own compilation path (forced on the CPU): prepare_step runs
    from get_mask_sizes before every compiled step, so 40 steps cross pages
    safely; batch 1 passes no attention mask (transformers may drop it)."""
    from transformers import CompileConfig

    model = tiny_model("llama", "vkv")
    ids, mask = prompts(batch)
    if batch == 1:
        mask = None
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=40)
    cc = CompileConfig(fullgraph=True, backend="eager")
    cc._compile_all_devices = True
    cache = vcache(model, batch)
    out = generate(model, ids, mask, cache, max_new_tokens=40, compile_config=cc)
    assert torch.equal(out, ref)
    rows = cache.lengths.rows()
    assert cache.get_seq_length() == ids.shape[1] + 39
    assert cache.memory_stats()["tokens"] == sum(rows)
    assert cache.memory_stats()["committed_bytes"] == _expected_committed(cache, rows, ahead=1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_cuda_generate_matches_dynamic_cache(impl, dtype):
    """generate() with VirtualKVCache (vkv: auto-compiled with CUDA graphs) against
    DynamicCache + sdpa in float32: logits within TOL, same tokens but at near-ties;
    in float32 with sdpa (padded mode, no compile) the tokens are exactly equal."""
    model = tiny_model("llama", impl, device="cuda", dtype=dtype)
    ids, mask = prompts(3, device="cuda")
    ref = _generate_logits(_ref_model(), ids, mask, DynamicCache(config=model.config), 24)
    cache = VirtualKVCache(model.config, 3, 256)
    out = _generate_logits(model, ids, mask, cache, 24)
    flips = _assert_greedy_equivalent(ref, out, ids.shape[1], dtype, f"generate {impl} {dtype}")
    if impl == "sdpa" and dtype == torch.float32:
        assert not flips and torch.equal(out.sequences, ref.sequences)
    assert cache.get_seq_length() == ids.shape[1] + 23
    assert cache.memory_stats()["committed_bytes"] <= 2 * 2 * 3 * cache.kv_cache.page_size


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "reduce_overhead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_teacher_forced_logits(dtype, compiled):
    """Step by step, both caches fed the reference's tokens (teacher forcing): every
    step's logits of the vkv model (eager, or compiled with CUDA graphs and
    prepare_step) within TOL of DynamicCache + sdpa in float32. Left-padded batch of 3."""
    model = tiny_model("llama", "vkv", device="cuda", dtype=dtype)
    ref_model = _ref_model()
    ids, mask = prompts(3, device="cuda")
    cache = VirtualKVCache(model.config, 3, 256)
    ref_cache = DynamicCache(config=model.config)
    n = ids.shape[1]  # the prefill uses positions 0..n-1 (as both models see them)
    with torch.no_grad():
        ref_logits = ref_model(ids, attention_mask=mask, **forward_kwargs(ref_model, ref_cache)).logits[:, -1]
        logits = model(ids, attention_mask=mask, **forward_kwargs(model, cache)).logits[:, -1]
        _close(logits, ref_logits, dtype, "prefill")
        step = model.forward
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
        worst = 0.0
        for i in range(40):
            tok = ref_logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = torch.full((3, 1), n + i, device="cuda")
            ref_kw = forward_kwargs(ref_model, ref_cache)
            ref_logits = ref_model(tok, attention_mask=mask, position_ids=pos, **ref_kw).logits[:, -1]
            cache.prepare_step(1)
            # No mask for the vkv step: new tokens are real, and the cache knows each row's length.
            logits = step(tok, position_ids=pos, **forward_kwargs(model, cache)).logits[:, -1].float()
            worst = max(worst, (logits - ref_logits).abs().max().item())
            _close(logits, ref_logits, dtype, f"step {i}")
    print(f"teacher-forced {dtype} compiled={compiled}: max |dlogit| {worst:.2e}")
    assert cache.get_seq_length() == ref_cache.get_seq_length() == n + 40


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_generate_autocompile_cuda_graphs(dtype):
    """generate() auto-compiles (reduce-overhead: CUDA graphs) with a compileable
    cache on CUDA; commits happen before each captured step. Same logits as the
    eager VirtualKVCache run and as DynamicCache + sdpa float32, within TOL."""
    model = tiny_model("llama", "vkv", device="cuda", dtype=dtype)
    ids, mask = prompts(3, device="cuda")
    eager_cache = VirtualKVCache(model.config, 3, 4096)
    eager = _generate_logits(model, ids, mask, eager_cache, 64, disable_compile=True)
    ref = _generate_logits(_ref_model(), ids, mask, DynamicCache(config=model.config), 64)
    cache = VirtualKVCache(model.config, 3, 4096)
    assert cache.is_compileable
    out = _generate_logits(model, ids, mask, cache, 64)
    _assert_greedy_equivalent(ref, eager, ids.shape[1], dtype, f"eager vkv {dtype}")
    _assert_greedy_equivalent(ref, out, ids.shape[1], dtype, f"auto-compiled vkv {dtype}")
    _assert_greedy_equivalent(eager, out, ids.shape[1], dtype, f"auto-compiled vs eager vkv {dtype}")
    assert cache.get_seq_length() == eager_cache.get_seq_length() == ids.shape[1] + 63
    assert cache.memory_stats()["tokens"] == eager_cache.memory_stats()["tokens"]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_cuda_generate_autocompile_new_cache_each_call(layout):
    """generate()'s own compilation (CUDA graphs) with a fresh VirtualKVCache per call: the
    second and third calls compile nothing (a new cache re-records the graphs at its addresses,
    it does not recompile), inductor skips no CUDA graph, and every call gives the first call's
    tokens."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", "vkv", device="cuda", dtype=torch.float16)
    ids, mask = prompts(3, device="cuda")
    torch._dynamo.reset()
    counters.clear()
    outs, graphs = [], []
    for _ in range(3):
        outs.append(generate(model, ids, mask, VirtualKVCache(model.config, 3, 1024, layout=layout), max_new_tokens=24))
        graphs.append(counters["stats"]["unique_graphs"])
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 3, (graphs, dict(counters["recompiles"]))  # no recompile
    assert counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.cuda
def test_cuda_compiled_decode_reduce_overhead():
    from torch._dynamo.utils import counters

    model = tiny_model("llama", "vkv", device="cuda", dtype=torch.float16)
    ids, _ = prompts(2, length=5, device="cuda")
    ids = ids.masked_fill(ids == 0, 7)
    cache = VirtualKVCache(model.config, 2, 2048)
    with torch.no_grad():
        tok = model(ids, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
    n = ids.shape[1]
    with torch.no_grad():
        for i in range(50):
            cache.prepare_step(1)
            pos = torch.full((2, 1), n + i, device="cuda")
            logits = step(tok, **forward_kwargs(model, cache), position_ids=pos).logits
            tok = logits[:, -1:].argmax(-1).clone()
    torch.cuda.synchronize()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0  # the step really ran as a CUDA graph
    assert cache.get_seq_length() == n + 50  # host lengths right after replays (which bump no version)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_steps_without_prepare_step(backend, layout):
    """Compiled steps run without the hook still commit (the in-graph safety
    net, at the cost of a sync), cross pages safely, and leave get_seq_length()
    and memory_stats() right."""
    model = tiny_model("llama", "vkv")
    ids, _ = prompts(2, length=4)
    ids = ids.masked_fill(ids == 0, 7)
    cache = vcache(model, 2, layout=layout)
    ref_cache = DynamicCache(config=model.config)
    assert cache.memory_stats()["committed_bytes"] == 0  # nothing built yet
    step = torch.compile(model.forward, fullgraph=True, backend=backend)
    tok = prefill_with_sdpa_twin(model, cache, ref_cache, ids)
    with torch.no_grad():
        for _ in range(40):  # 44 tokens: crosses the 32-token page
            logits = step(tok, **forward_kwargs(model, cache)).logits
            model.set_attn_implementation("sdpa")
            ref = model(tok, **forward_kwargs(model, ref_cache)).logits
            model.set_attn_implementation("vkv")
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            tok = logits[:, -1:].argmax(-1)
    assert cache.get_seq_length() == 44
    assert cache.memory_stats()["tokens"] == 88
    if layout == "per_layer":
        assert cache.memory_stats()["committed_bytes"] == _expected_committed(cache, [44, 44])
    assert cache.memory_stats()["used_bytes"] == 88 * cache.kv_cache.bytes_per_token


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_compiled_generate_crosses_pages(dtype):
    """generate()'s own compilation (CUDA graphs) crosses a page boundary, with
    max_cache_len far past the committed pages (so any read or copy of the whole
    row capacity faults): the commit comes from the pre-step hook before the
    replay. Logits against DynamicCache + sdpa of the same dtype (this model's logits
    are large, so a float32 reference would mostly measure float16 rounding)."""
    model = _page_crossing_model(dtype)
    per_page = 2 * 1024 * 1024 // (16 * 64 * torch.empty((), dtype=dtype).element_size())
    prompt = per_page - 24  # 40 new tokens: the 25th crosses into the second page
    ids = torch.randint(3, 256, (2, prompt), device="cuda")
    ref_model = _page_crossing_model(dtype)
    ref_model.set_attn_implementation("sdpa")
    ref = _generate_logits(ref_model, ids, None, DynamicCache(config=ref_model.config), 40)
    cache = VirtualKVCache(model.config, 2, 3 * per_page)
    out = _generate_logits(model, ids, None, cache, 40)
    _assert_greedy_equivalent(ref, out, prompt, dtype, f"crossing pages {dtype}")
    stats = cache.memory_stats()
    assert stats["page_size"] == 2 * 1024 * 1024 and stats["tokens_per_page"] == per_page
    assert stats["committed_bytes"] == 2 * 2 * 2 * 2 * stats["page_size"]  # 2 pages per layer, K/V and row
    assert cache.get_seq_length() == prompt + 39


@pytest.mark.cuda
def test_cuda_graph_break_inside_vkv_attention_is_safe(monkeypatch):
    """A graph break inside the vkv attention (generate() compiles with
    fullgraph=False, so one would be silent) must not turn the virtual K/V into
    non-static CUDA-graph inputs: cudagraph trees would copy their whole capacity,
    uncommitted pages included (an illegal memory access). The attention gets the
    marked buffers themselves, never slices of them."""
    from torch._dynamo.utils import counters

    model = _page_crossing_model(torch.float16)
    ids = torch.randint(3, 256, (2, 1000), device="cuda")
    cache = VirtualKVCache(model.config, 2, 4096)  # 4 pages per row reserved; 1 committed at first
    ref_cache = VirtualKVCache(model.config, 2, 4096)
    real_attend = vkv_attn._attend

    def attend_with_break(*args, **kwargs):
        torch._dynamo.graph_break()
        return real_attend(*args, **kwargs)

    with torch.no_grad():
        tok = model(ids, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        model(ids, **forward_kwargs(model, ref_cache))
        torch._dynamo.reset()
        counters.clear()
        monkeypatch.setattr(vkv_attn, "_attend", attend_with_break)
        step = torch.compile(model.forward, mode="reduce-overhead")
        for i in range(40):  # crosses token 1024
            pos = torch.full((2, 1), 1000 + i, device="cuda")
            cache.prepare_step(1)
            logits = step(tok, position_ids=pos, **forward_kwargs(model, cache)).logits[:, -1].clone()
            ref = model(tok, position_ids=pos, **forward_kwargs(model, ref_cache)).logits[:, -1]
            _close(logits, ref, torch.float16, f"step {i}")
            tok = ref.argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    assert sum(counters["graph_break"].values()) > 0  # the break really happened
    assert counters["inductor"]["cudagraph_skips"] == 0  # and both pieces ran as CUDA graphs
    assert cache.get_seq_length() == 1040


@pytest.mark.cuda
def test_cuda_flash_attention_2_padded_mode():
    pytest.importorskip("flash_attn")
    model = tiny_model("llama", "flash_attention_2", device="cuda", dtype=torch.float16)
    ids, mask = prompts(3, device="cuda")
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=16)
    cache = VirtualKVCache(model.config, 3, 256)
    out = generate(model, ids, mask, cache, max_new_tokens=16)
    assert cache.mode == "padded"
    assert torch.equal(out, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_cuda_compiled_decode_runs_as_one_cuda_graph(layout):
    """The compiled decode step runs as a CUDA graph in both layouts: inductor
    must not skip CUDA graphs (``cudagraph_or_error`` turns a skip into an
    error; the skip counter must stay 0), and the step must be one graph."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", "vkv", device="cuda", dtype=torch.float16)
    ids, _ = prompts(2, length=5, device="cuda")
    ids = ids.masked_fill(ids == 0, 7)
    cache = VirtualKVCache(model.config, 2, 2048, layout=layout)
    ref_cache = VirtualKVCache(model.config, 2, 2048, layout=layout)
    patch = {"triton.cudagraph_or_error": True} if hasattr(torch._inductor.config.triton, "cudagraph_or_error") else {}
    with torch.no_grad():
        tok = model(ids, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        model(ids, **forward_kwargs(model, ref_cache))
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
        with torch._inductor.config.patch(patch):
            for i in range(20):
                pos = torch.full((2, 1), 5 + i, device="cuda")
                cache.prepare_step(1)
                logits = step(tok, position_ids=pos, **forward_kwargs(model, cache)).logits[:, -1].clone()
                ref = model(tok, position_ids=pos, **forward_kwargs(model, ref_cache)).logits[:, -1]
                _close(logits, ref, torch.float16, f"{layout} step {i}")
                tok = ref.argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert cache.get_seq_length() == 25


def test_generate_compiled_again_with_a_cache_of_another_size():
    """One model, generate() compiled three times with caches of different max_cache_len: the
    buffer sizes stay static (a recompile), never dynamic; dynamic sizes made dynamo's guard
    creation fail ("sources must not be empty for symbol s45", torch 2.11 on an H200 and 2.13)."""
    from transformers import CompileConfig

    model = tiny_model("llama", "vkv")
    ids, mask = prompts(3)
    cc = CompileConfig(fullgraph=True, mode="default")  # inductor: backend="eager" never builds these guards
    cc._compile_all_devices = True
    torch._dynamo.reset()
    runs = [(max_len, steps, generate(model, ids, mask, VirtualKVCache(model.config, 3, max_len),
                                      max_new_tokens=steps, compile_config=cc))
            for max_len, steps in [(256, 24), (4096, 64), (512, 30)]]  # fmt: skip
    for max_len, steps, out in runs:
        ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=steps)
        assert torch.equal(out, ref), max_len


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_generate_compiled_with_a_new_cache_each_call_compiles_once(layout):
    """A server's pattern: a fresh VirtualKVCache per generate() call, one compiled model. The
    decode step compiles once: nothing of a cache's identity reaches dynamo's guards (an int
    handle of the commit safety net did, so every new cache recompiled, and after dynamo's
    recompile limit (8) the step silently ran eagerly)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = tiny_model("llama", "vkv")
    ids, mask = prompts(2)
    cc = CompileConfig(fullgraph=True, mode="default")
    cc._compile_all_devices = True  # generate() compiles on CUDA only, unless told
    torch._dynamo.reset()
    counters.clear()
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=6)
    for _ in range(3):
        out = generate(model, ids, mask, VirtualKVCache(model.config, 2, 256, layout=layout), max_new_tokens=6,
                       compile_config=cc)  # fmt: skip
        assert torch.equal(out, ref)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_aot_eager_is_refused_with_a_clear_error_not_a_fault(layout):
    """``torch.compile(backend="aot_eager")`` runs the functionalized write on a
    copy of the whole K/V buffer and copies it back, uncommitted pages included:
    a segfault on the host backend before the check. The compiled step now raises
    a RuntimeError naming the backend, the cache keeps working eagerly, and
    inductor still compiles it. In a child process: a regression would crash."""
    from _subprocess import check_scenario

    check_scenario(f"""
        import torch
        from _hf_models import prompts, tiny_model, vcache
        from torch_vkv.hf import forward_kwargs
        model = tiny_model("llama", "vkv")
        ids, _ = prompts(2, length=4)
        ids = ids.masked_fill(ids == 0, 7)
        cache = vcache(model, 2, layout={layout!r})
        with torch.no_grad():
            tok = model(ids, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
            step = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
            try:
                step(tok, **forward_kwargs(model, cache))
            except RuntimeError as e:
                assert "aot_eager" in str(e) and "inductor" in str(e), str(e)
            else:
                raise AssertionError("aot_eager compiled a step over a virtual KV cache")
            assert cache.get_seq_length() == 4
            torch._dynamo.reset()
            step = torch.compile(model.forward, fullgraph=True)  # inductor: in place, accepted
            for _ in range(3):
                tok = step(tok, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
            assert cache.get_seq_length() == 7, cache.get_seq_length()
    """, timeout=600)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_step_that_does_not_fit_the_cache_is_refused(backend):
    """A compiled step checked what an eager one checks. Before, silently wrong:
    a step with fewer rows than the cache's batch advanced only those rows on the
    device while the host added the tokens to every row (host [5], device [5, 4]),
    and a step with more rows started row 2 from nothing; a 3-token step after
    prepare_step(1) left the host 2 tokens behind the device (an under-commit);
    and steps without prepare_step ran past max_cache_len with their writes
    dropped. Now the safety-net op checks the batch when the step runs (ValueError), a step of
    other than the announced tokens is read back and committed like an
    unannounced one, and a step past max_cache_len raises, lengths unchanged."""
    model = tiny_model("llama", "vkv")
    ids, _ = prompts(2, length=4)
    ids = ids.masked_fill(ids == 0, 7)
    cache = vcache(model, 4, max_len=10)
    ref_cache = DynamicCache(config=model.config)
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, backend=backend)
    tok = prefill_with_sdpa_twin(model, cache, ref_cache, ids)
    with torch.no_grad():

        def lengths_are(n):
            assert cache.lengths.rows() == [n, n] and cache.get_seq_length() == n
            assert cache.lengths.cache_seqlens.tolist() == [n, n, 0, 0]

        for bad in (tok[:1], torch.cat([tok, tok[:1]])):
            for prepare in (False, True):
                if prepare:
                    cache.prepare_step(1)
                with pytest.raises(ValueError, match="batch size of key_states: expected 2"):
                    step(bad, **forward_kwargs(model, cache))
                lengths_are(4)
        cache.prepare_step(1)
        three = torch.cat([tok, tok + 1, tok + 2], 1)  # 3 new tokens after announcing 1
        logits = step(three, **forward_kwargs(model, cache)).logits
        lengths_are(7)
        model.set_attn_implementation("sdpa")
        ref = model(three, **forward_kwargs(model, ref_cache)).logits
        model.set_attn_implementation("vkv")
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        assert cache.memory_stats()["used_bytes"] == 14 * cache.kv_cache.bytes_per_token
        for _ in range(3):  # no prepare_step: the safety net commits up to max_cache_len ...
            step(tok, **forward_kwargs(model, cache))
        lengths_are(10)
        with pytest.raises(ValueError, match="max_cache_len=10, got 11"):  # ... and refuses the step past it
            step(tok, **forward_kwargs(model, cache))
        lengths_are(10)
