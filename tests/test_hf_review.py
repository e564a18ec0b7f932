"""Hugging Face adapter: regressions from the review of ``torch_vkv.hf`` (sliding windows, fallbacks).

Each test compares ``VirtualKVCache`` under ``"vkv"`` (or the ``"vkv"`` fallback) with ``DynamicCache``
under ``"eager"`` on a tiny random model, or checks that what ``"vkv"`` does not compute is refused
before anything runs.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _hf_models import PAGE, generate  # noqa: E402
from _subprocess import check_scenario  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from torch_vkv.hf import VirtualKVCache, forward_kwargs  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

W = 8  # sliding window; a host page holds 32 tokens of one layer's K
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, initializer_range=0.2)  # fmt: skip
ATOL = 1e-4

_MODELS: dict = {}


def mistral():
    if "mistral" not in _MODELS:
        torch.manual_seed(0)
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=W)).eval()
        model.generation_config.pad_token_id = 0
        _MODELS["mistral"] = model
    return _MODELS["mistral"]


def vkv_cache(model, batch, layout="per_layer", max_len=256):
    return VirtualKVCache(model.config, batch, max_len, page_size=PAGE, layout=layout)


def forward(model, ids, cache, **kw):
    with torch.no_grad():
        return model(ids, **forward_kwargs(model, cache), **kw).logits


def eager_second_part(model, ids, at):
    """Logits of ``ids[:, at:]`` after ``ids[:, :at]``, eager attention over a ``DynamicCache``;
    the model is left on ``"vkv"``."""
    model.set_attn_implementation("eager")
    ref_cache = DynamicCache(config=model.config)
    forward(model, ids[:, :at], ref_cache)
    ref = forward(model, ids[:, at:], ref_cache)
    model.set_attn_implementation("vkv")
    return ref


def ids_of(batch, length, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- 1. multi-token steps after the first one on sliding-window layers ------------------------------


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("prefill,step", [(33, 7), (20, 40), (31, 2)])
def test_window_multitoken_step_after_prefill_matches_eager(layout, prefill, step):
    """A step of several tokens after the prefill (chunked prefill, a chat turn, assisted decoding):
    its first query at L reads keys from L - W + 1, which the commit must not give back (it gave
    back the pages behind the step's end: wrong logits, or writes into pages given back)."""
    model = mistral()
    ids = ids_of(1, prefill + step)
    model.set_attn_implementation("eager")
    ref_cache = DynamicCache(config=model.config)
    forward(model, ids[:, :prefill], ref_cache)
    ref = forward(model, ids[:, prefill:], ref_cache)
    model.set_attn_implementation("vkv")
    cache = vkv_cache(model, 1, layout)
    forward(model, ids[:, :prefill], cache)
    out = forward(model, ids[:, prefill:], cache)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    nxt = torch.full((1, 1), 9)  # and a decode step after it
    model.set_attn_implementation("eager")
    ref = forward(model, nxt, ref_cache)
    model.set_attn_implementation("vkv")
    torch.testing.assert_close(forward(model, nxt, cache), ref, atol=ATOL, rtol=0)
    if layout == "per_layer":  # the pages behind the window are still given back
        tpp = cache.kv_cache.tokens_per_page
        assert cache.kv_cache.window_start(0)[0] == (prefill + step - W) // tpp * tpp


def test_prepare_step_twice_before_a_multitoken_step():
    """``prepare_step(n)`` twice (documented as harmless), then the step: the second commit
    must not trim the windows from the step's end."""
    model = mistral()
    ids = ids_of(1, 40)
    ref = eager_second_part(model, ids, 33)
    cache = vkv_cache(model, 1)
    forward(model, ids[:, :33], cache)
    cache.prepare_step(7)
    cache.prepare_step(7)
    torch.testing.assert_close(forward(model, ids[:, 33:], cache), ref, atol=ATOL, rtol=0)


def test_window_second_generate_turn_matches_eager():
    """A second ``generate()`` on the returned cache (a chat turn) on a sliding-window model."""
    model = mistral()
    ids, ext = ids_of(1, 6), ids_of(1, 7, seed=2)
    res = {}
    for impl, make in (("eager", lambda: DynamicCache(config=model.config)), ("vkv", lambda: vkv_cache(model, 1))):
        model.set_attn_implementation(impl)
        cache = make()
        a = generate(model, ids, torch.ones_like(ids), cache, max_new_tokens=28, min_new_tokens=28)
        b_in = torch.cat([a, ext], 1)
        res[impl] = generate(model, b_in, torch.ones_like(b_in), cache, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(res["vkv"], res["eager"])


def test_window_prompt_lookup_matches_eager():
    """Prompt-lookup decoding: a step of the candidate tokens, then ``crop`` back to the accepted
    ones (refused before as ``keep_tokens ... expected 0 or at least 40``)."""
    model = mistral()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13] * 4])
    kw = dict(max_new_tokens=40, min_new_tokens=40, prompt_lookup_num_tokens=10)
    res = {}
    for impl, make in (("eager", lambda: DynamicCache(config=model.config)), ("vkv", lambda: vkv_cache(model, 1))):
        model.set_attn_implementation(impl)
        res[impl] = generate(model, ids, torch.ones_like(ids), make(), **kw)
    assert torch.equal(res["vkv"], res["eager"])


def test_window_crop_past_the_last_step_is_refused_before_any_change():
    model = mistral()
    model.set_attn_implementation("vkv")
    cache = vkv_cache(model, 1)
    forward(model, ids_of(1, 70), cache)
    for _ in range(3):
        forward(model, torch.full((1, 1), 9), cache)
    rows, start = cache.lengths.rows(), int(cache.kv_cache.window_start(0)[0])
    assert start > 0
    with pytest.raises(ValueError, match="sliding window"):
        cache.crop(start + W - 1)
    assert cache.lengths.rows() == rows and cache.get_seq_length() == 73
    cache.crop(-1)  # back to where the last step started from: fine
    assert cache.get_seq_length() == 72


# -- 2. batch operations on windowed caches with rows of different lengths ---------------------------


def _padded_batch():
    ids = ids_of(2, 80)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    return ids * mask, mask


@pytest.mark.parametrize("op,rows", [("select", [1]), ("reorder", [1, 0]), ("repeat", [0, 0, 1, 1])])
@pytest.mark.parametrize("decode_first", [0, 3])
def test_window_batch_ops_with_ragged_rows_match_eager(op, rows, decode_first):
    """``batch_select_indices`` / ``reorder_cache`` / ``batch_repeat_interleave`` on a windowed cache
    whose rows differ in length (left padding squeezed out), also after decode steps that gave
    pages back (a row then takes a history its own windows already dropped: it starts over)."""
    model = mistral()
    ids, mask = _padded_batch()
    lg = {}
    for impl, make in (("eager", lambda: DynamicCache(config=model.config)), ("vkv", lambda: vkv_cache(model, 4))):
        model.set_attn_implementation(impl)
        cache, m = make(), mask
        forward(model, ids, cache, attention_mask=m)
        for t in range(decode_first):
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            forward(model, torch.full((2, 1), 9 + t), cache, attention_mask=m, position_ids=(m.cumsum(1) - 1)[:, -1:])
        if op == "select":
            cache.batch_select_indices(torch.tensor(rows))
        elif op == "reorder":
            cache.reorder_cache(torch.tensor(rows))
        else:
            cache.batch_repeat_interleave(2)
        m = torch.cat([m[rows], torch.ones(len(rows), 1, dtype=m.dtype)], 1)
        lg[impl] = forward(model, torch.full((len(rows), 1), 20), cache, attention_mask=m,
                           position_ids=(m.cumsum(1) - 1)[:, -1:])  # fmt: skip
        if impl == "vkv":
            kv = cache.kv_cache
            for b, r in enumerate(cache.lengths.rows()):
                assert int(kv.window_start(0)[b]) <= max(0, r - W)  # still given back behind the window
    torch.testing.assert_close(lg["vkv"], lg["eager"], atol=ATOL, rtol=0)


# -- 3. the "vkv" fallback (DynamicCache, no cache) applies windows and soft caps -------------------


def _gemma2_softcap():
    if "gemma2" not in _MODELS:
        torch.manual_seed(0)
        cfg = transformers.Gemma2Config(**COMMON, sliding_window=W, attn_logit_softcapping=5.0)
        _MODELS["gemma2"] = transformers.Gemma2ForCausalLM(cfg).eval()
    return _MODELS["gemma2"]


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
@pytest.mark.parametrize("with_cache", [True, False])
def test_fallback_applies_sliding_window_and_softcap(name, with_cache):
    model = mistral() if name == "mistral" else _gemma2_softcap()
    ids = ids_of(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    lg = {}
    for impl in ("eager", "vkv"):
        model.set_attn_implementation(impl)
        kw = forward_kwargs(model, DynamicCache(config=model.config)) if with_cache else dict(use_cache=False)
        with torch.no_grad():
            lg[impl] = model(ids, attention_mask=mask, **kw).logits
    torch.testing.assert_close(lg["vkv"][mask.bool()], lg["eager"][mask.bool()], atol=ATOL, rtol=0)


# -- 4. StaticCache under "vkv" is refused up-front --------------------------------------------------


def test_static_cache_under_vkv_is_refused():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval()
    model.generation_config.pad_token_id = 0
    model.set_attn_implementation("vkv")
    ids = ids_of(1, 10)
    for mask in (torch.ones_like(ids), None):
        with pytest.raises(TypeError, match="StaticCache"):
            generate(model, ids, mask, transformers.StaticCache(config=model.config, max_cache_len=64), max_new_tokens=3)


# -- 5. masks the "vkv" attention does not compute (Gemma 3 image tokens) are refused -----------------


def test_gemma3_bidirectional_image_tokens_are_refused():
    img, boi, eoi = 120, 121, 122
    text = transformers.Gemma3TextConfig(**COMMON, sliding_window=512,
                                         layer_types=["sliding_attention"] * 3 + ["full_attention"])  # fmt: skip
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=4)  # fmt: skip
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                    image_token_index=img, boi_token_index=boi, eoi_token_index=eoi)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[2, 5, 6, boi, img, img, img, img, eoi, 7, 8, 9]])
    pix = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("vkv")
    for cache in (VirtualKVCache(model.config, 1, 64, page_size=PAGE), DynamicCache(config=model.config)):
        with pytest.raises(NotImplementedError, match="image"):
            with torch.no_grad():
                model(input_ids=ids, pixel_values=pix, token_type_ids=(ids == img).long(),
                      attention_mask=torch.ones_like(ids), **forward_kwargs(model, cache))  # fmt: skip
        if isinstance(cache, VirtualKVCache):
            assert cache.mode is None and cache.get_seq_length() == 0  # refused before anything was stored
    text_ids = torch.tensor([[2, 5, 6, 7, 8, 9]])  # no image: plain causal, as eager
    lg = {}
    for impl in ("eager", "vkv"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            lg[impl] = model(input_ids=text_ids, token_type_ids=torch.zeros_like(text_ids),
                             **forward_kwargs(model, VirtualKVCache(model.config, 1, 64, page_size=PAGE))).logits  # fmt: skip
    torch.testing.assert_close(lg["vkv"], lg["eager"], atol=ATOL, rtol=0)


# -- 6. windows applied only through the mask (PhiMoE) ------------------------------------------------


def test_mask_only_window_is_applied_by_the_vkv_attention():
    base = {k: v for k, v in COMMON.items() if k != "head_dim"}
    torch.manual_seed(0)
    cfg = transformers.PhimoeConfig(**base, sliding_window=W, num_local_experts=2, num_experts_per_tok=1)
    model = transformers.PhimoeForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    ids = ids_of(1, 20)
    kw = dict(max_new_tokens=30, min_new_tokens=30)
    model.set_attn_implementation("eager")
    ref = generate(model, ids, torch.ones_like(ids), DynamicCache(config=model.config), **kw)
    model.set_attn_implementation("vkv")
    cache = vkv_cache(model, 1, max_len=128)
    assert torch.equal(generate(model, ids, torch.ones_like(ids), cache, **kw), ref)
    assert cache.kv_cache.window_start(0)[0] > 0
    assert torch.equal(generate(model, ids, torch.ones_like(ids), DynamicCache(config=model.config), **kw), ref)


@pytest.mark.parametrize("prepare", [2, 0])
def test_window_compiled_multitoken_step_matches_eager(prepare):
    """The compiled twin of the multi-token step: ``prepare_step(n)`` (here twice) commits before
    it, or, without it, the in-graph safety net; both trim from the step's start."""
    model = mistral()
    ids = ids_of(1, 40)
    ref = eager_second_part(model, ids, 33)
    cache = vkv_cache(model, 1)
    forward(model, ids[:, :33], cache)
    step = torch.compile(model.forward, fullgraph=True, backend="eager")
    for _ in range(prepare):
        cache.prepare_step(7)
    with torch.no_grad():
        out = step(ids[:, 33:], **forward_kwargs(model, cache)).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == 40


def test_window_layer_keys_never_read_the_rows_given_back():
    # layer.keys of a sliding layer copied rows [0, len) of the buffer, pages behind the window included: on
    # CUDA a read of an unmapped page is a fault. TORCH_VKV_DEBUG=1 makes such host pages unreadable, so the
    # child died there; now those rows are zeros and the last W - 1 match DynamicCache's.
    check_scenario(
        f"""
        import torch, transformers
        from transformers import DynamicCache
        from torch_vkv.hf import VirtualKVCache, generate_kwargs
        torch.manual_seed(0)
        cfg = transformers.MistralConfig(**{COMMON!r}, sliding_window={W})
        model = transformers.MistralForCausalLM(cfg).eval()
        model.generation_config.pad_token_id = 0
        ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
        keys = {{}}
        for impl, cache in (("eager", DynamicCache(config=cfg)), ("vkv", VirtualKVCache(cfg, 1, 256, page_size={PAGE}))):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), **generate_kwargs(cache), do_sample=False,
                               max_new_tokens=70, min_new_tokens=70)
            keys[impl] = cache.layers[0].keys
        e, v = keys["eager"], keys["vkv"]
        n = e.shape[2]
        assert v.shape[2] == 75 and torch.allclose(e, v[:, :, -n:], atol=1e-5)
        assert (v[:, :, : 75 - 32] == 0).all()  # behind the window: the pages went back
        """,
        env={"TORCH_VKV_DEBUG": "1", "TRITON_INTERPRET": ""},  # plain torch appends in the child
    )
