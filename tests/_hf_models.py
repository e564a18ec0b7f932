"""Shared set-up of the torch_vkv.hf tests: tiny random-weight models (no
downloads), left-padded prompts, 4 KiB host pages (so sequences cross page
boundaries and every commit path runs), and the GPU comparison rules."""

from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_vkv.hf import VirtualKVCache, forward_kwargs, generate_kwargs  # noqa: E402

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
        return model.generate(ids, attention_mask=mask, **generate_kwargs(cache), do_sample=False, **kw)


def _step(model, cache, tok, pos):
    with torch.no_grad():
        out = model(tok, **forward_kwargs(model, cache), position_ids=pos, use_cache=True)
    return out.logits[:, -1:].argmax(-1), out.logits[:, -1]


def _loop(model, cache, ids, steps, *, crop_at=None, crop_by=0):
    """Greedy loop without padding; optionally crops ``crop_by`` tokens after step ``crop_at``."""
    with torch.no_grad():
        out = model(ids, **forward_kwargs(model, cache), use_cache=True)
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


def prefill_with_sdpa_twin(model, cache, ref_cache, ids):
    """Prefills ``cache`` with ``model`` as it is (its "vkv" attention) and ``ref_cache``
    with the same model under sdpa; returns the first greedy tokens ``[B, 1]``."""
    with torch.no_grad():
        tok = model(ids, **forward_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        model.set_attn_implementation("sdpa")
        model(ids, **forward_kwargs(model, ref_cache))
        model.set_attn_implementation("vkv")
    return tok


def _expected_committed(cache: VirtualKVCache, rows: list[int], ahead: int = 0) -> int:
    """Bytes the cache commits for ``rows`` tokens per row: whole pages per buffer
    (2 per layer in per_layer, one in interleaved), from KVCache's own arithmetic.

    ``ahead=1`` after decode steps: the pre-step commit also prefetches what one
    more token needs (KVCache.step_async), so a row that ends exactly on a page
    boundary holds the next page too (pages of ``n + 1`` tokens)."""
    kv = cache.kv_cache
    buffers = 2 * kv.num_layers if kv.layout == "per_layer" else 1
    return sum(kv.pages_for_tokens(n + ahead if n else 0) for n in rows) * kv.page_size * buffers


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
        return model.generate(ids, attention_mask=mask, **generate_kwargs(cache), do_sample=False, max_new_tokens=n,
                              output_logits=True, return_dict_in_generate=True, **kw)  # fmt: skip


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
