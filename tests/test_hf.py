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
    rows = cache.layers[0].cache_seqlens[:3].tolist()
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


def _expected_committed(cache: VirtualKVCache, rows: list[int]) -> int:
    """Bytes a per_layer cache commits for ``rows`` tokens per row: whole pages per buffer."""
    kv = cache.kv_cache
    per_buffer = sum(math.ceil(n * kv.bytes_per_token_buffer / kv.page_size) for n in rows)
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
    rows = cache.layers[0].cache_seqlens[:3].tolist() if impl == "vkv" else [cache.get_seq_length()] * 3
    assert stats["committed_bytes"] == _expected_committed(cache, rows)
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
    assert cache.memory_stats()["committed_bytes"] == _expected_committed(cache, [n + 50] * 2)


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
    rows = cache.layers[0].cache_seqlens[:batch].tolist()
    assert cache.get_seq_length() == ids.shape[1] + 39
    assert cache.memory_stats()["tokens"] == sum(rows)
    assert cache.memory_stats()["committed_bytes"] == _expected_committed(cache, rows)


# ---------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_cuda_generate_matches_dynamic_cache(impl):
    model = tiny_model("llama", impl, device="cuda", dtype=torch.float16)
    ids, mask = prompts(3, device="cuda")
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=16)
    cache = VirtualKVCache(model.config, 3, 256)
    out = generate(model, ids, mask, cache, max_new_tokens=16)
    # fp16 kernels differ in rounding: compare the first tokens exactly, the rest mostly.
    assert torch.equal(out[:, : ids.shape[1] + 4], ref[:, : ids.shape[1] + 4])
    assert (out == ref).float().mean() > 0.9
    assert cache.memory_stats()["committed_bytes"] <= 2 * 2 * 3 * cache.kv_cache.page_size


@pytest.mark.cuda
def test_cuda_generate_autocompile_cuda_graphs():
    """generate() auto-compiles (reduce-overhead: CUDA graphs) with a compileable
    cache on CUDA; commits happen before each captured step."""
    model = tiny_model("llama", "vkv", device="cuda", dtype=torch.float16)
    ids, mask = prompts(3, device="cuda")
    eager_cache = VirtualKVCache(model.config, 3, 4096)
    ref = generate(model, ids, mask, eager_cache, max_new_tokens=64, disable_compile=True)
    cache = VirtualKVCache(model.config, 3, 4096)
    assert cache.is_compileable
    out = generate(model, ids, mask, cache, max_new_tokens=64)
    assert (out == ref).float().mean() > 0.9
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
    assert cache.get_seq_length() == n + 50


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


@pytest.mark.cuda
def test_cuda_compiled_generate_crosses_pages():
    """2 KiB of K per token and layer: a 2 MiB page holds 1024 tokens, so the
    compiled (CUDA graph) steps cross a page boundary; the commit must come
    from prepare_step before the replay, or the kernel faults."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, pad_token_id=0, initializer_range=0.1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    model.set_attn_implementation("vkv")
    ids = torch.randint(3, 256, (2, 1000), device="cuda")
    eager = VirtualKVCache(model.config, 2, 1200)
    ref = generate(model, ids, None, eager, max_new_tokens=64, disable_compile=True)
    cache = VirtualKVCache(model.config, 2, 1200)
    out = generate(model, ids, None, cache, max_new_tokens=64)
    assert (out == ref).float().mean() > 0.9
    stats = cache.memory_stats()
    page = stats["page_size"]
    assert stats["committed_bytes"] == 2 * 2 * 2 * 2 * page  # 1063 tokens: 2 pages per layer, K/V and row
    assert cache.get_seq_length() == 1063


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_interleaved_layout(impl):
    """All layers of a token share pages: same tokens, finer commits."""
    model = tiny_model("llama", impl)
    ids, mask = prompts(3)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=20)
    cache = vcache(model, 3, layout="interleaved")
    assert torch.equal(generate(model, ids, mask, cache, max_new_tokens=20), ref)
    kv = cache.kv_cache
    rows = cache.layers[0].cache_seqlens[:3].tolist() if impl == "vkv" else [cache.get_seq_length()] * 3
    pages = sum(math.ceil(n * kv.bytes_per_token_buffer / kv.page_size) for n in rows)
    assert cache.memory_stats()["committed_bytes"] == pages * kv.page_size


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
