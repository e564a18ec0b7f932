"""Models the engine's attention would not compute as the model does are refused when the ``Engine``
is built, where serving them gave other tokens or failed mid-request:

* a learned absolute position table (GPT-2's ``wpe``, OPT's ``embed_positions``) shorter than
  ``max_seq_len``: a position past it was an ``IndexError`` in the middle of serving (on CUDA a
  device-side assert, and the process's CUDA context is lost); RoPE models keep any ``max_seq_len``;
* a model that does not call its attention through transformers' ``AttentionInterface`` (GPT-Neo,
  Bloom): it stayed on ``eager`` and attended across the packed requests (other tokens);
* ALiBi (Falcon ``alibi=True``), chunked attention past one chunk, attention sinks."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the engine serves transformers models")

from torch_vkv.hf.compat import position_limit  # noqa: E402
from torch_vkv.serving import Engine, SamplingParams  # noqa: E402


def _gpt2(n_positions=64):
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=n_positions, vocab_size=100,
                                  bos_token_id=1, eos_token_id=2)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def _opt(max_pos=64):
    cfg = transformers.OPTConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, ffn_dim=64,
                                 word_embed_proj_dim=32, max_position_embeddings=max_pos, vocab_size=100,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return transformers.OPTForCausalLM(cfg).eval()


def _llama(max_pos=64):
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                                   intermediate_size=64, max_position_embeddings=max_pos, vocab_size=100,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_position_limit_reads_learned_tables_only():
    assert position_limit(_gpt2(64)) == 64
    assert position_limit(_opt(64)) == 64  # its table has 66 rows (an offset of 2)
    assert position_limit(_llama(64)) is None  # RoPE: no table


@pytest.mark.parametrize("make", [_gpt2, _opt])
def test_engine_refuses_max_seq_len_past_the_position_table(make, no_interpreted_triton):
    model = make()
    with pytest.raises(ValueError, match=r"max_seq_len: expected at most 64 \(the model's learned position table.*got 65"):
        Engine(model, max_batch_size=2, max_seq_len=65, device="cpu")
    engine = Engine(model, max_batch_size=2, max_seq_len=64, device="cpu")
    try:  # a request that runs to the end of the table: every position has its row
        engine.add_request(list(range(3, 60)), SamplingParams(max_tokens=50, ignore_eos=True), request_id="a")
        done = []
        while engine.has_unfinished_requests():
            done += [o for o in engine.step() if o.finished]
        (out,) = done
        assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64
        assert out.outputs[0].finish_reason == "length"
    finally:
        engine.close()


def test_rope_models_take_any_max_seq_len(no_interpreted_triton):
    engine = Engine(_llama(64), max_batch_size=1, max_seq_len=200, device="cpu")
    try:
        engine.add_request(list(range(3, 100)), SamplingParams(max_tokens=4, ignore_eos=True), request_id="a")
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.close()


def _neo():
    cfg = transformers.GPTNeoConfig(num_layers=2, num_heads=2, hidden_size=32, max_position_embeddings=128,
                                    vocab_size=100, attention_types=[[["global", "local"], 1]], window_size=16,
                                    bos_token_id=1, eos_token_id=2)  # fmt: skip
    return transformers.GPTNeoForCausalLM(cfg).eval()


def test_engine_refuses_a_model_without_the_attention_interface(no_interpreted_triton):
    model = _neo()
    with pytest.raises(ValueError, match=r"model: expected a transformers model that calls its attention through "
                                         r"AttentionInterface.*GPTNeoForCausalLM, which keeps attn_implementation='eager'"):
        Engine(model, max_batch_size=2, max_seq_len=64, device="cpu")
    assert model.config._attn_implementation == "eager"
    engine = Engine(_llama(), max_batch_size=1, max_seq_len=64, device="cpu")  # the registry is left clean
    engine.close()


def test_engine_refuses_a_model_whose_layers_drop_the_batch_kwarg(no_interpreted_triton):
    """A model whose layers do not pass the forward's keyword arguments on to the attention
    (StableLM in transformers 5) built an Engine, then failed at the first step with "runs only
    inside torch_vkv.serving.Engine: expected the 'vkv_serving_batch' keyword argument". It is
    refused at construction now, with the model left as it was."""
    from torch_vkv.serving.runner import CTX_KWARG

    model = _llama()
    model.set_attn_implementation("sdpa")
    layer = model.model.layers[1]
    forward = layer.forward

    def dropping(*args, **kwargs):
        kwargs.pop(CTX_KWARG, None)
        return forward(*args, **kwargs)

    layer.forward = dropping
    with pytest.raises(ValueError, match=r"model: expected a transformers causal LM whose layers pass the forward's "
                                         r"keyword arguments on to the attention.*LlamaForCausalLM, whose attention "
                                         r"got no 'vkv_serving_batch'"):
        Engine(model, max_batch_size=2, max_seq_len=64, device="cpu")
    assert model.config._attn_implementation == "sdpa"
    del layer.forward  # the model's own forward again: served
    with Engine(model, max_batch_size=1, max_seq_len=64, device="cpu") as engine:
        out = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert len(out[0].token_ids) >= 1


def test_engine_refuses_alibi_chunked_attention_and_sinks(no_interpreted_triton):
    cfg = transformers.FalconConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, vocab_size=100,
                                    alibi=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    with pytest.raises(NotImplementedError, match=r"Engine does not add ALiBi"):
        Engine(transformers.FalconForCausalLM(cfg).eval(), max_batch_size=1, max_seq_len=64, device="cpu")
    chunked = _llama(256)
    chunked.config.attention_chunk_size = 32
    with pytest.raises(ValueError, match=r"max_seq_len: expected at most attention_chunk_size=32 with Engine.*got 64"):
        Engine(chunked, max_batch_size=1, max_seq_len=64, device="cpu")
    Engine(chunked, max_batch_size=1, max_seq_len=32, device="cpu").close()  # one chunk: plain causal attention
    sinks = _llama()
    sinks.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(NotImplementedError, match=r"attention sinks.*LlamaAttention \(model.layers.1.self_attn\)"):
        Engine(sinks, max_batch_size=1, max_seq_len=64, device="cpu")


def test_serving_attention_refuses_sinks_passed_at_call_time():
    """A model that hands its sinks to the attention call without a ``sinks`` attribute on the module
    (which :func:`check_servable` looks for) still gets an error, not other tokens."""
    from torch_vkv.serving.runner import CTX_KWARG, serving_attention_forward

    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 1, 3, 8)
    module = torch.nn.Module()
    module.layer_idx = 0
    with pytest.raises(NotImplementedError, match="does not compute attention sinks"):
        serving_attention_forward(module, q, k, k, None, scaling=1.0, dropout=0.0, s_aux=torch.zeros(2),
                                  **{CTX_KWARG: object()})  # fmt: skip
