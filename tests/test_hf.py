"""torch_vkv.hf: VirtualKVCache behaves like DynamicCache; the "vkv" attention; torch.compile.

CPU tests use tiny random-weight models (no downloads) and 4 KiB host pages,
so sequences cross page boundaries and every commit path runs. GPU tests are
marked ``cuda`` and skip cleanly without one.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import torch_vkv.hf as vkv_hf  # noqa: E402
import torch_vkv.hf.attention as vkv_attn  # noqa: E402
from torch_vkv.hf import VirtualKVCache  # noqa: E402

PAGE = 4096  # host page: 32 tokens of one layer's K (2 heads x 16 dims x fp32)
FAMILIES = ["llama", "qwen2", "mistral"]
IMPLS = ["eager", "sdpa", "vkv"]


def tiny_config(family: str = "llama", **kw):
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # well separated logits: no near-ties in greedy decoding
    )
    common.update(kw)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common)  # sliding_window 4096 by default: masks take that path
    raise ValueError(family)


_MODELS: dict = {}


def tiny_model(family: str = "llama", impl: str = "sdpa", device: str = "cpu", dtype=torch.float32):
    key = (family, device, dtype)
    if key not in _MODELS:
        torch.manual_seed(0)
        cfg = tiny_config(family)
        cls = {
            "llama": transformers.LlamaForCausalLM,
            "qwen2": transformers.Qwen2ForCausalLM,
            "mistral": transformers.MistralForCausalLM,
        }[family]
        _MODELS[key] = cls(cfg).to(device=device, dtype=dtype).eval()
    model = _MODELS[key]
    model.set_attn_implementation(impl)
    model.generation_config.pad_token_id = 0
    return model


def prompts(batch: int, length: int = 7, device: str = "cpu", seed: int = 1):
    """Left-padded prompts: row i has i*2 pads (batch 1: none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, : min(2 * i, length - 1)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def vcache(model, batch: int, max_len: int = 96, **kw) -> VirtualKVCache:
    kw.setdefault("page_size", PAGE)
    return VirtualKVCache(model.config, batch, max_len, **kw)


def generate(model, ids, mask, cache, **kw):
    kw.setdefault("max_new_tokens", 12)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False, **kw)


# ---------------------------------------------------------------------------------
# generate(): same tokens as DynamicCache
# ---------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------
# hand-written loops: crop, batch ops, reorder, mask sizes
# ---------------------------------------------------------------------------------


def _step(model, cache, tok, pos):
    with torch.no_grad():
        out = model(tok, past_key_values=cache, position_ids=pos, use_cache=True)
    return out.logits[:, -1:].argmax(-1), out.logits[:, -1]


def _loop(model, cache, ids, steps, *, crop_at=None, crop_by=0):
    """Greedy loop without padding; optionally crops ``crop_by`` tokens after step ``crop_at``."""
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    toks, n = [tok], ids.shape[1]
    for i in range(steps):
        pos = torch.full((ids.shape[0], 1), n)
        tok, _ = _step(model, cache, tok, pos)
        n += 1
        toks.append(tok)
        if i == crop_at:
            cache.crop(-crop_by)
            n -= crop_by
            tok = toks[-1 - crop_by]
    return torch.cat(toks, 1), cache


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
            model(ids, past_key_values=cache)
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
            model(ids, attention_mask=mask, past_key_values=vcache(model, 2))


def test_capacity_errors():
    model = tiny_model("llama", "sdpa")
    ids, _ = prompts(3)
    with pytest.raises(ValueError, match="max_batch_size"):
        with torch.no_grad():
            model(ids, past_key_values=vcache(model, 2))
    with pytest.raises(ValueError, match="max_cache_len"):
        with torch.no_grad():
            model(ids, past_key_values=vcache(model, 3, max_len=5))


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


# ---------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------


def _expected_committed(cache: VirtualKVCache, rows: list[int], ahead: int = 0) -> int:
    """Bytes a per_layer cache commits for ``rows`` tokens per row: whole pages per buffer.

    ``ahead=1`` after decode steps: the pre-step commit also prefetches what one
    more token needs (KVCache.step_async), so a row that ends exactly on a page
    boundary holds the next page too (pages of ``n + 1`` tokens)."""
    kv = cache.kv_cache
    per_buffer = sum(math.ceil((n + ahead if n else 0) * kv.bytes_per_token_buffer / kv.page_size) for n in rows)
    return per_buffer * kv.page_size * 2 * kv.num_layers


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


# ---------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------


def test_compiled_decode_no_graph_breaks_no_recompiles():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_model("llama", "vkv")
    ids, _ = prompts(2, length=5)
    ids = ids.masked_fill(ids == 0, 7)
    cache = vcache(model, 2, max_len=128)
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        model.set_attn_implementation("eager")
        model(ids, past_key_values=ref_cache)
        model.set_attn_implementation("vkv")
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.forward, fullgraph=True)
    n = ids.shape[1]
    with torch.no_grad():
        for i in range(50):  # 55 tokens: crosses the 32-token page boundary
            pos = torch.full((2, 1), n + i)
            cache.prepare_step(1)  # the pre-step commit hook (generate() calls it itself)
            logits = step(tok, past_key_values=cache, position_ids=pos).logits
            model.set_attn_implementation("eager")
            ref = model(tok, past_key_values=ref_cache, position_ids=pos).logits
            model.set_attn_implementation("vkv")
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            tok = logits[:, -1:].argmax(-1)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert cache.get_seq_length() == n + 50 == ref_cache.get_seq_length()
    assert cache.memory_stats()["committed_bytes"] == _expected_committed(cache, [n + 50] * 2, ahead=1)


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


# ---------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------


# Decisive comparisons. A bug in the cache (a wrong row, a stale length, a
# missed write) moves logits by O(their scale); rounding moves them by far less.
# So the GPU tests compare logits step by step against DynamicCache + sdpa in
# float32, within |a - b| <= atol * s + rtol * |b| where s = max(1, max |b|)
# of the row (the logits' scale: ~1-10 for the tiny models): atol = rtol = 1e-2
# for float32 models (our Triton kernels use TF32 dots), 6e-2 for float16.
# Greedy tokens must be equal, except where the reference's top two logits are
# within 2 * atol * s (a near-tie that rounding may flip); after such a flip
# the histories differ and the row is not compared further.
TOL = {torch.float32: dict(atol=1e-2, rtol=1e-2), torch.float16: dict(atol=6e-2, rtol=6e-2)}


def _close(a: torch.Tensor, b: torch.Tensor, dtype, what: str) -> None:
    tol = TOL[dtype]
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a.float(), b.float(), atol=tol["atol"] * scale, rtol=tol["rtol"],
                               msg=lambda m: f"{what} (logit scale {scale:.2f}): {m}")  # fmt: skip


def _ref_model():
    """The float32 reference: the weights of tiny_model("llama") (same seed and
    config), sdpa, a separate object (tiny_model's cached models stay untouched)."""
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(tiny_config("llama")).to(device="cuda", dtype=torch.float32).eval()
    ref.set_attn_implementation("sdpa")
    ref.generation_config.pad_token_id = 0
    return ref


def _assert_greedy_equivalent(ref, out, prompt_len: int, dtype, what: str):
    """``ref``/``out``: generate() results with ``output_logits``. Logits close while
    histories agree; a token may differ only at a near-tie of the reference."""
    tol = TOL[dtype]
    steps = len(ref.logits)
    assert len(out.logits) == steps, (len(out.logits), steps)
    worst, flips = 0.0, []
    for b in range(ref.sequences.shape[0]):
        for t in range(steps):
            a, r = out.logits[t][b].float(), ref.logits[t][b].float()
            worst = max(worst, (a - r).abs().max().item())
            _close(a, r, dtype, f"{what}: row {b}, step {t}")
            if out.sequences[b, prompt_len + t] != ref.sequences[b, prompt_len + t]:
                top2 = r.topk(2).values
                margin = (top2[0] - top2[1]).item()
                assert margin <= 2 * tol["atol"] * max(1.0, r.abs().max().item()), (
                    f"{what}: row {b}, step {t}: token {int(out.sequences[b, prompt_len + t])} vs reference "
                    f"{int(ref.sequences[b, prompt_len + t])} with a clear reference margin {margin:.4f}"
                )
                flips.append((b, t, margin))
                break
    print(f"{what}: max |dlogit| {worst:.2e} over {steps} steps; near-tie flips {flips}")
    return flips


def _generate_logits(model, ids, mask, cache, n, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False, max_new_tokens=n,
                              output_logits=True, return_dict_in_generate=True, **kw)  # fmt: skip


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
        ref_logits = ref_model(ids, attention_mask=mask, past_key_values=ref_cache).logits[:, -1]
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
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
            ref_logits = ref_model(tok, attention_mask=mask, position_ids=pos, past_key_values=ref_cache).logits[:, -1]
            cache.prepare_step(1)
            # No mask for the vkv step: new tokens are real, and the cache knows each row's length.
            logits = step(tok, position_ids=pos, past_key_values=cache).logits[:, -1].float()
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
def test_cuda_compiled_decode_reduce_overhead():
    from torch._dynamo.utils import counters

    model = tiny_model("llama", "vkv", device="cuda", dtype=torch.float16)
    ids, _ = prompts(2, length=5, device="cuda")
    ids = ids.masked_fill(ids == 0, 7)
    cache = VirtualKVCache(model.config, 2, 2048)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
    n = ids.shape[1]
    with torch.no_grad():
        for i in range(50):
            cache.prepare_step(1)
            logits = step(tok, past_key_values=cache, position_ids=torch.full((2, 1), n + i, device="cuda")).logits
            tok = logits[:, -1:].argmax(-1).clone()
    torch.cuda.synchronize()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0  # the step really ran as a CUDA graph
    assert cache.get_seq_length() == n + 50  # host lengths right after replays (which bump no version)


# ---------------------------------------------------------------------------------
# lengths after compiled steps, demo, bench (CPU smoke)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_steps_without_prepare_step(backend):
    """Compiled steps run without the hook still commit (the in-graph safety
    net, at the cost of a sync), cross pages safely, and leave get_seq_length()
    and memory_stats() right."""
    model = tiny_model("llama", "vkv")
    ids, _ = prompts(2, length=4)
    ids = ids.masked_fill(ids == 0, 7)
    cache = vcache(model, 2)
    ref_cache = DynamicCache(config=model.config)
    assert cache.memory_stats()["committed_bytes"] == 0  # nothing built yet
    step = torch.compile(model.forward, fullgraph=True, backend=backend)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        model.set_attn_implementation("sdpa")
        model(ids, past_key_values=ref_cache)
        model.set_attn_implementation("vkv")
        for _ in range(40):  # 44 tokens: crosses the 32-token page
            logits = step(tok, past_key_values=cache).logits
            model.set_attn_implementation("sdpa")
            ref = model(tok, past_key_values=ref_cache).logits
            model.set_attn_implementation("vkv")
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            tok = logits[:, -1:].argmax(-1)
    assert cache.get_seq_length() == 44
    assert cache.memory_stats()["tokens"] == 88
    assert cache.memory_stats()["committed_bytes"] == _expected_committed(cache, [44, 44])


@pytest.fixture
def keep_threads():
    """demo/bench set torch's CPU thread count for their run: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_runs_on_cpu(capsys, keep_threads):
    from torch_vkv.demo import main

    assert main(["--device", "cpu", "--batch", "2", "--prompt-len", "12", "--new-tokens", "6",
                 "--max-cache-len", "256"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "VirtualKVCache" in out and "StaticCache" in out and "DynamicCache" in out
    assert "same tokens from all three caches: yes" in out
    assert main(["--device", "cpu", "--no-transformers", "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--max-cache-len", "128"]) == 0  # fmt: skip
    assert "KVCache committed" in capsys.readouterr().out


def test_demo_without_transformers_says_so(capsys, keep_threads, monkeypatch):
    import sys

    from torch_vkv.demo import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert main(["--device", "cpu", "--batch", "2", "--prompt-len", "6", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "transformers is not installed" in out and "KVCache committed" in out


def test_bench_hf_tiny_smoke(tmp_path, keep_threads):
    import json

    from torch_vkv.bench.hf import main

    assert main(["--tiny", "--quick", "--device", "cpu", "--variants", "dynamic", "vkv", "--new-tokens", "4",
                 "--prompt", "16", "--batch", "2", "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "hf.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dynamic", "vkv"]
    assert all(r["same_tokens_as_dynamic"] == 1.0 for r in rows)
    assert rows[1]["kv_bytes"] > 0


def _page_crossing_model(dtype):
    """K of one token and layer: 16 heads x 64 dims = 2 KiB (fp16) / 4 KiB (fp32), so a
    2 MiB page holds 1024 / 512 tokens: a few dozen steps after the prompt cross a page."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=16, head_dim=64, max_position_embeddings=4096, pad_token_id=0, initializer_range=0.1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    model.set_attn_implementation("vkv")
    return model


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
        tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        model(ids, past_key_values=ref_cache)
        torch._dynamo.reset()
        counters.clear()
        monkeypatch.setattr(vkv_attn, "_attend", attend_with_break)
        step = torch.compile(model.forward, mode="reduce-overhead")
        for i in range(40):  # crosses token 1024
            pos = torch.full((2, 1), 1000 + i, device="cuda")
            cache.prepare_step(1)
            logits = step(tok, position_ids=pos, past_key_values=cache).logits[:, -1].clone()
            ref = model(tok, position_ids=pos, past_key_values=ref_cache).logits[:, -1]
            _close(logits, ref, torch.float16, f"step {i}")
            tok = ref.argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    assert sum(counters["graph_break"].values()) > 0  # the break really happened
    assert counters["inductor"]["cudagraph_skips"] == 0  # and both pieces ran as CUDA graphs
    assert cache.get_seq_length() == 1040


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
        tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        kv = cache.kv_cache
        per_page = kv.tokens_per_page  # 32
        for n in range(ids.shape[1] + 1, per_page + 2):
            if hook == "prepare_step":
                cache.prepare_step(1)
            tok = model(tok, past_key_values=cache, position_ids=torch.full((2, 1), n - 1)).logits[:, -1:].argmax(-1)
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


def test_demo_local_checkpoint(tmp_path, capsys, keep_threads):
    from torch_vkv.demo import main

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(tmp_path / "ckpt")
    assert main(["--model", str(tmp_path / "ckpt"), "--device", "cpu", "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--max-cache-len", "64"]) == 0  # fmt: skip
    assert str(tmp_path / "ckpt") in capsys.readouterr().out


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


def test_switching_attention_mid_sequence():
    """vkv -> sdpa on a cache holding vkv-layout rows raises (sdpa would read the
    full capacity); sdpa -> vkv falls back to plain SDPA over the padded rows."""
    model = tiny_model("llama", "vkv")
    ids, mask = prompts(2)
    cache = vcache(model, 2)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="reset"):
            model(ids[:, :1], past_key_values=cache)
    cache.reset()
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = vcache(model, 2)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)  # padded rows
    cache.reset()
    model.set_attn_implementation("sdpa")
    first = generate(model, ids, mask, cache, max_new_tokens=3)  # padded mode
    model.set_attn_implementation("vkv")
    mask2 = torch.cat([mask, torch.ones_like(first[:, ids.shape[1]:])], 1)
    out = generate(model, first, mask2, cache, max_new_tokens=9)  # vkv attention over padded rows
    assert torch.equal(out, ref)
