"""Hugging Face: model families beyond Llama/Qwen2/Mistral.

Families ``VirtualKVCache`` serves give ``DynamicCache``'s tokens; those it
cannot serve (layers without per-token K/V, layers of different K/V shapes,
attention features the ``"vkv"`` attention does not compute) are refused
with an error that names what was expected and what was given, never run to
different tokens or an obscure traceback. Tiny random models, float32, CPU.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _hf_models import generate, prompts, vcache  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from torch_vkv.hf import VirtualKVCache  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

T = transformers
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2)  # fmt: skip


def _model(cls, cfg, impl):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.set_attn_implementation(impl)
    return model


def _same_as_dynamic_cache(model, impl, batch=3, ref_impl=None, max_len=96, **kw):
    ids, mask = prompts(batch)
    model.set_attn_implementation(ref_impl or ("eager" if impl == "vkv" else impl))
    ref = generate(model, ids, mask, DynamicCache(config=model.config), **kw)
    model.set_attn_implementation(impl)
    out = generate(model, ids, mask, vcache(model, batch * kw.get("num_beams", 1), max_len), **kw)
    assert torch.equal(out, ref)


# -- layers VirtualKVCache cannot hold: refused when the cache is built ----------------------------------


def _hybrid_configs():
    yield "qwen3_next", lambda: T.Qwen3NextConfig(
        **BASE, head_dim=16, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"])  # fmt: skip
    yield "lfm2", lambda: T.Lfm2Config(**BASE, layer_types=["conv", "full_attention"])
    yield "jamba", lambda: T.JambaConfig(**BASE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                         num_experts=2, mamba_d_state=8, mamba_expand=2)  # fmt: skip
    yield "recurrent_gemma", lambda: T.RecurrentGemmaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, lru_width=64, attention_window_size=16, block_types=["recurrent", "attention"])  # fmt: skip


@pytest.mark.parametrize("name,make", list(_hybrid_configs()), ids=[n for n, _ in _hybrid_configs()])
def test_layers_without_per_token_kv_are_refused_naming_them(name, make):
    """Linear-attention, convolution and recurrent layers were accepted, and generate() then failed in
    transformers ("Cannot get conv state for non linear attention layer 0 of type VirtualKVLayer") or in
    the cache ("key_states of layer 1: expected the batch and new tokens of layer 0's update")."""
    cfg = make()
    with pytest.raises(ValueError, match=r"config\.layer_types: expected only attention layers.*not supported: \['"):
        VirtualKVCache(cfg, 1, 16)


def test_layers_of_different_kv_shapes_are_refused_naming_them():
    """Gemma 4's global layers have their own head_dim: the config raised transformers'
    AmbiguousGlobalPerLayerAttributeError from the cache's constructor."""
    cfg = T.Gemma4TextConfig(**BASE, head_dim=16, global_head_dim=32, sliding_window=8)
    with pytest.raises(ValueError, match=r"one num_key_value_heads and head_dim in every layer.*\(2, 16\), \(2, 32\)"):
        VirtualKVCache(cfg, 1, 16)


def test_keys_and_values_of_other_shapes_are_refused_when_the_cache_is_built():
    """DeepSeek V3 caches its MLA latent as keys and its rope key as values, MiMo-V2 values narrower
    than keys: the cache was built and the first update failed ('tensors of one shape'), or with
    equal dims it failed on head_dim read from the config (the latent's width is not head_dim)."""
    mla = T.DeepseekV3Config(**{**BASE, "num_key_value_heads": 4}, q_lora_rank=None, kv_lora_rank=16,
                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"K and V of one shape .* got multi-head latent attention \(kv_lora_rank=16\)"):
        VirtualKVCache(mla, 1, 16)
    mimo = T.MiMoV2FlashConfig(**BASE)
    with pytest.raises(ValueError, match=r"got keys of head_dim 192, values of v_head_dim 128"):
        VirtualKVCache(mimo, 1, 16)


@pytest.mark.parametrize("impl", ["eager", "vkv"])
def test_gemma4_with_one_kv_shape_matches_dynamic_cache(impl):
    cfg = T.Gemma4TextConfig(**BASE, head_dim=16, global_head_dim=16, sliding_window=8)
    _same_as_dynamic_cache(_model(T.Gemma4ForCausalLM, cfg, impl), impl, max_new_tokens=20)


# -- attention the "vkv" attention does not compute: refused under "vkv", exact under eager/sdpa -------------


def _gpt_oss():
    cfg = T.GptOssConfig(**BASE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    return T.GptOssForCausalLM, cfg


def _granite_swa():
    return T.GraniteSWAForCausalLM, T.GraniteSWAConfig(**BASE, sliding_window=8)


@pytest.mark.parametrize("make", [_gpt_oss, _granite_swa], ids=["gpt_oss", "granite_swa"])
def test_attention_sinks_are_refused_under_vkv(make):
    """gpt-oss and GraniteSWA pass their learned sinks as ``s_aux``; the vkv attention dropped them
    (and so did its plain-SDPA fallback): other tokens than DynamicCache's, silently."""
    cls, cfg = make()
    model = _model(cls, cfg, "eager")
    _same_as_dynamic_cache(model, "eager", batch=2, max_new_tokens=6)
    ids, mask = prompts(2)
    model.set_attn_implementation("vkv")
    for cache in (vcache(model, 2), DynamicCache(config=model.config)):
        with pytest.raises(NotImplementedError, match=r"does not compute attention sinks: expected no 's_aux'"):
            generate(model, ids, mask, cache, max_new_tokens=2)


def _falcon_alibi():
    cfg = T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)  # fmt: skip
    return _model(T.FalconForCausalLM, cfg, "sdpa")


@pytest.mark.parametrize("batch", [1, 3])
def test_alibi_is_refused_under_vkv_before_anything_is_stored(batch):
    """Falcon with ``alibi=True`` adds its biases to the attention mask, which the vkv attention does
    not read: batch 1 was an AttributeError in Falcon ('NoneType' object has no attribute 'dtype'),
    a batch other tokens than DynamicCache's."""
    model = _falcon_alibi()
    _same_as_dynamic_cache(model, "sdpa", batch=batch, max_new_tokens=6)
    ids, mask = prompts(batch)
    model.set_attn_implementation("vkv")
    cache = vcache(model, batch)
    with pytest.raises(NotImplementedError, match=r"ALiBi.*expected a model without ALiBi \(config.alibi=False\)"):
        generate(model, ids, mask, cache, max_new_tokens=2)
    assert cache.mode is None and cache.get_seq_length() == 0


def _llama4(chunk):
    cfg = T.Llama4TextConfig(**BASE, head_dim=16, attention_chunk_size=chunk, num_local_experts=2,
                             intermediate_size_mlp=128, no_rope_layers=[1, 0], interleave_moe_layer_step=2)  # fmt: skip
    return _model(T.Llama4ForCausalLM, cfg, "vkv")


def test_chunked_attention_past_one_chunk_is_refused_under_vkv():
    """Llama 4's chunked layers attend within chunks of ``attention_chunk_size`` tokens; the vkv
    attention attended to every token: other tokens than DynamicCache's once a row passed a chunk."""
    model = _llama4(8)
    _same_as_dynamic_cache(model, "sdpa", batch=2, max_new_tokens=12)  # padded mode: the mask chunks
    ids, mask = prompts(2)
    model.set_attn_implementation("vkv")
    cache = vcache(model, 2, 96)
    with pytest.raises(ValueError, match=r"max_cache_len: expected at most attention_chunk_size=8 .* got 96"):
        generate(model, ids, mask, cache, max_new_tokens=2)
    assert cache.mode is None
    with pytest.raises(ValueError, match=r"positions of this step \(no VirtualKVCache\): expected at most .* got 9"):
        generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=4)  # 7 + 2 tokens


def test_chunked_attention_within_one_chunk_matches_dynamic_cache():
    _same_as_dynamic_cache(_llama4(32), "vkv", batch=2, max_len=32, max_new_tokens=12)


def test_a_4d_mask_is_refused_under_vkv():
    """A 4-D mask reaches the attention as it is (transformers does not rebuild it); vkv ignored it."""
    from _hf_models import tiny_model
    from torch_vkv.hf import forward_kwargs

    model = tiny_model("llama", "vkv")
    ids, _ = prompts(1)
    mask4 = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"attention_mask: expected None or the 2-D padding mask .* got a 4-D"):
        model(ids, attention_mask=mask4, **forward_kwargs(model, vcache(model, 1)))


# -- families VirtualKVCache serves: DynamicCache's tokens under "vkv" (left-padded batch, beams) ------------


def _families():
    common = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    yield "qwen3", T.Qwen3ForCausalLM, T.Qwen3Config(**BASE, head_dim=16)
    yield "phi3", T.Phi3ForCausalLM, T.Phi3Config(**BASE, sliding_window=8)
    yield "gpt2", T.GPT2LMHeadModel, T.GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    yield "opt", T.OPTForCausalLM, T.OPTConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        word_embed_proj_dim=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        init_std=0.2)  # fmt: skip
    yield "gpt_neox", T.GPTNeoXForCausalLM, T.GPTNeoXConfig(**common, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=128)  # fmt: skip
    yield "falcon_mqa", T.FalconForCausalLM, T.FalconConfig(**common, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, multi_query=True)  # fmt: skip
    yield "gemma3n_shared_kv", T.Gemma3nForCausalLM, T.Gemma3nTextConfig(
        **{**BASE, "num_hidden_layers": 4}, head_dim=16, num_kv_shared_layers=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128, laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4)  # fmt: skip


@pytest.mark.parametrize("name,cls,cfg", list(_families()), ids=[f[0] for f in _families()])
def test_family_under_vkv_matches_dynamic_cache(name, cls, cfg):
    model = _model(cls, cfg, "vkv")
    _same_as_dynamic_cache(model, "vkv", batch=3, max_new_tokens=20)
    _same_as_dynamic_cache(model, "vkv", batch=2, max_new_tokens=8, num_beams=3)
