"""Host copies attached to metadata tensors (``torch_vkv.attention.host_values``): the contract,
FlashInfer's prefill planned from them through a stand-in (CPU), and the engine attaching them."""

from __future__ import annotations

import importlib

import pytest
import torch

import torch_vkv
from torch_vkv.attention import attach_host_values, host_values, metadata_tensor

fib = importlib.import_module("torch_vkv.attention.flashinfer_backend")


def test_metadata_tensor_keeps_its_values_and_the_public_names():
    t = metadata_tensor([5, 0, 17])
    assert t.dtype == torch.int32 and t.tolist() == [5, 0, 17]
    assert host_values(t) == (5, 0, 17)
    assert metadata_tensor([1, 2], dtype=torch.int64).dtype == torch.int64
    assert torch_vkv.metadata_tensor is metadata_tensor and torch_vkv.attach_host_values is attach_host_values


def test_views_copies_and_plain_tensors_have_none():
    t = metadata_tensor([3, 4, 5, 6])
    assert host_values(t[1:]) is None and host_values(t.clone()) is None
    assert host_values(torch.tensor([1, 2])) is None and host_values(None) is None


def test_an_in_place_write_makes_the_copy_stale():
    t = metadata_tensor([3, 4])
    t.add_(1)  # outside inference mode the version counter moves
    assert host_values(t) is None
    u = metadata_tensor([3, 4])
    u.set_(torch.tensor([9, 9], dtype=torch.int32))  # new storage
    assert host_values(u) is None


def test_inference_tensors_keep_their_copy():
    with torch.inference_mode():
        t = metadata_tensor([7, 8])
        assert t.is_inference() and host_values(t) == (7, 8)


@pytest.mark.parametrize("tensor, values, match", [
    (torch.zeros(3, dtype=torch.int32), [1, 2], "expected 3 values.*got 2"),
    (torch.zeros(2, 2, dtype=torch.int32), [1, 2, 3, 4], "1-D integer tensor, got a torch.int32 tensor of shape"),
    (torch.zeros(2), [1, 2], "1-D integer tensor, got a torch.float32"),
    (torch.zeros(2, dtype=torch.bool), [1, 0], "1-D integer tensor, got a torch.bool"),
    ([1, 2], [1, 2], "1-D integer tensor, got a list"),
])  # fmt: skip
def test_bad_input_is_a_clear_error(tensor, values, match):
    with pytest.raises(ValueError, match=match):
        attach_host_values(tensor, values)


@pytest.mark.parametrize("values, got", [([1, 2.5], "2.5"), (["3"], "'3'"), (7, "7")])
def test_non_integer_values_are_refused_not_truncated(values, got):
    with pytest.raises(TypeError, match=f"expected a sequence of ints, got {got}"):
        metadata_tensor(values)
    with pytest.raises(TypeError, match="attach_host_values: expected a sequence of ints"):
        attach_host_values(torch.zeros(2, dtype=torch.int32), [1, 2.0])


def test_numpy_and_tensor_ints_are_ints():
    import numpy as np

    t = metadata_tensor(np.array([4, 5], dtype=np.int64))
    assert host_values(t) == (4, 5) and all(type(v) is int for v in host_values(t))
    assert host_values(metadata_tensor([torch.tensor(6), np.int32(7)])) == (6, 7)


def test_metadata_on_host_trusts_the_attached_copies_and_reads_the_rest():
    """White box: with every part known, the backend plans from the host copies (the device is not
    read, here shown by copies that differ from the contents); one unknown part reads them all back."""
    a = attach_host_values(torch.tensor([1, 2], dtype=torch.int32), [10, 20])
    b = metadata_tensor([0, 3, 5])
    assert fib.metadata_on_host([a, b]) == [10, 20, 0, 3, 5]
    assert fib.metadata_on_host([torch.tensor([1, 2], dtype=torch.int32), b]) == [1, 2, 0, 3, 5]


def test_flashinfer_prefill_from_host_copies_matches_the_reference(monkeypatch):
    """FlashInfer's ragged prefill through the stand-in of test_attention_flashinfer, metadata built
    with metadata_tensor: the same output as from plain tensors, and no read of the metadata tensors."""
    from test_attention_flashinfer import _FakeRagged, reference

    from _layouts import make_cache, poison
    from torch_vkv.attention import append_kv, deps

    fake = type("fi", (), {"BatchPrefillWithRaggedKVCacheWrapper": _FakeRagged})
    monkeypatch.setattr(deps, "flashinfer_module", lambda: fake)
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 16)
    monkeypatch.setattr(fib, "_prefill_backend", lambda device: "fa2")
    monkeypatch.setattr(fib, "_RAGGED", {})
    monkeypatch.setattr(fib, "_WORKSPACE", {})
    H, H_kv, D, S = 4, 2, 64, 40
    k, v = make_cache("per_layer", 3, S, H_kv, D, dtype=torch.float32, device="cpu", seed=3)
    lengths, news, slots = [30, 12], [6, 12], [2, 0]
    poison(k, v, lengths, slots)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(news), H, D, generator=g)
    k_new, v_new = torch.randn(sum(news), H_kv, D, generator=g), torch.randn(sum(news), H_kv, D, generator=g)
    cu = [0, news[0], sum(news)]
    lens_t, cu_t, slots_t = metadata_tensor(lengths), metadata_tensor(cu), metadata_tensor(slots)
    append_kv(k, v, k_new, v_new, lens_t, cu_seqlens_q=cu_t, slots=slots_t)
    calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(tuple(self.shape)) or real_tolist(self))
    out = fib.flashinfer_attention(q, k, v, lens_t, cu_t, slots_t, None, True, 0.125, 12, 0, -1, 0.0)
    assert calls and (7,) not in calls  # the stand-in read its indptrs; the metadata (2 + 3 + 2) was not read back
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    plain = fib.flashinfer_attention(q, k, v, lens_t.clone(), cu_t.clone(), slots_t.clone(), None, True, 0.125, 12,
                                     0, -1, 0.0)  # fmt: skip
    ref = reference(q, k, v, lens_t, cu_t, slots_t, scale=0.125)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, plain, atol=0, rtol=0)


def test_engine_prefill_metadata_carries_exact_host_copies(monkeypatch):
    """Every prefill step's cache_seqlens / cu_seqlens_q / slots hold host copies equal to their contents."""
    transformers = pytest.importorskip("transformers")
    from torch_vkv.serving import Engine, SamplingParams
    from torch_vkv.serving import runner

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    seen = []
    real = runner.attention

    def spy(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=None, slots=None, **kw):
        if cu_seqlens_q is not None:
            for t in (cache_seqlens, cu_seqlens_q, slots):
                seen.append((host_values(t), tuple(t.tolist())))
        return real(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots, **kw)

    monkeypatch.setattr(runner, "attention", spy)
    engine = Engine(model, max_batch_size=4, max_seq_len=256, chunk_size=48, device="cpu", page_size=4096,
                    attention_backend="sdpa")  # fmt: skip
    prompts = [[int(x) for x in torch.randint(1, 128, (n,))] for n in (70, 9, 33)]
    engine.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(seen) >= 9  # chunked prompts: several prefill steps, three tensors each
    for host, device in seen:
        assert host == device


@pytest.mark.cuda
def test_cuda_engine_prefill_through_auto_matches_triton_call_by_call(monkeypatch):
    """The engine's long prefill chunks on the GPU: with host copies attached, ``auto`` may take
    FlashInfer's FA3 (Hopper, FlashInfer importable); every prefill call's output equals the same
    call through ``triton`` within bf16 tolerance (wrong host copies would attend other rows)."""
    transformers = pytest.importorskip("transformers")
    from torch_vkv.attention import attention as attend
    from torch_vkv.attention import deps, select_backend
    from torch_vkv.attention.selection import FLASHINFER_PREFILL_MIN_TOKENS
    from torch_vkv.serving import Engine, SamplingParams
    from torch_vkv.serving import runner

    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=16384)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    checked = []

    chosen = []

    def spy(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=None, slots=None, **kw):
        out = attend(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots, **kw)
        if cu_seqlens_q is not None:
            known = all(host_values(t) is not None for t in (cache_seqlens, cu_seqlens_q, slots))
            chosen.append(select_backend(q, k_cache, v_cache, decode=False, host_metadata=known))
            ref = attend(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, slots=slots,
                         **dict(kw, backend="triton"))  # fmt: skip
            checked.append((q.shape[0], (out.float() - ref.float()).abs().max().item()))
        return out

    monkeypatch.setattr(runner, "attention", spy)
    engine = Engine(model, max_batch_size=2, max_seq_len=12288, chunk_size=FLASHINFER_PREFILL_MIN_TOKENS,
                    device="cuda")  # fmt: skip
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (9000, 300)]
    engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    assert any(n >= FLASHINFER_PREFILL_MIN_TOKENS for n, _ in checked)  # the large chunk was seen
    if deps.has_flashinfer() and deps.cuda_capability(torch.cuda.current_device())[0] == 9:
        assert "flashinfer" in chosen  # and FlashInfer's FA3 ran it
    for n, err in checked:
        assert err < 2e-2, f"prefill of {n} query rows differs from triton by {err}"


def _spy_hf_prefill(monkeypatch, check):
    """Wraps the HF adapter's attention call: ``check(q, k_cache, v_cache, lens, cu, **kw)`` on every
    multi-token (prefill) call, before the call itself."""
    from torch_vkv.hf import attention as hf_attention

    real = hf_attention._attend

    def spy(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, scale, max_seqlen_q, **kw):
        if cu_seqlens_q is not None:
            check(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, scale=scale, max_seqlen_q=max_seqlen_q, **kw)
        return real(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, scale, max_seqlen_q, **kw)

    monkeypatch.setattr(hf_attention, "_attend", spy)


def test_hf_generate_prefill_metadata_carries_exact_host_copies(monkeypatch):
    """``generate()`` with a VirtualKVCache (attn 'vkv'): every prefill call's cache_seqlens and
    cu_seqlens_q carry host copies equal to their contents, left padding included."""
    pytest.importorskip("transformers")
    import torch_vkv.hf as vkv_hf

    seen = []
    _spy_hf_prefill(monkeypatch, lambda q, k, v, lens, cu, **kw: seen.extend(
        (host_values(t), tuple(t.tolist())) for t in (lens, cu)))  # fmt: skip
    from _hf_models import generate, prompts, tiny_model

    model = tiny_model("llama", "vkv")
    for batch in (1, 3):  # batch 3: rows 1 and 2 are left-padded
        ids, mask = prompts(batch)
        cache = vkv_hf.VirtualKVCache(model.config, batch, 96, page_size=4096)
        generate(model, ids, mask, cache, max_new_tokens=3)
    assert len(seen) == 2 * 2 * 2  # two generate() calls, two layers, two tensors per prefill call
    for host, device in seen:
        assert host == device


@pytest.mark.cuda
def test_cuda_hf_long_prompt_prefill_through_auto_matches_triton(monkeypatch):
    """``generate()`` on a long prompt (at least FLASHINFER_PREFILL_MIN_TOKENS tokens) on the GPU: the
    adapter's metadata carry host copies, so ``auto`` may take FlashInfer's FA3 (Hopper, FlashInfer
    importable); every prefill call equals the same call through ``triton`` within bf16 tolerance."""
    transformers = pytest.importorskip("transformers")
    import torch_vkv.hf as vkv_hf
    from torch_vkv.attention import attention as attend
    from torch_vkv.attention import deps, select_backend
    from torch_vkv.attention.selection import FLASHINFER_PREFILL_MIN_TOKENS

    chosen, checked = [], []

    def check(q, k, v, lens, cu, **kw):
        known = host_values(lens) is not None and host_values(cu) is not None
        chosen.append(select_backend(q, k, v, decode=False, host_metadata=known))
        out = attend(q, k, v, lens, cu_seqlens_q=cu, causal=True, **kw)
        ref = attend(q, k, v, lens, cu_seqlens_q=cu, causal=True, backend="triton", **kw)
        checked.append((q.shape[0], (out.float() - ref.float()).abs().max().item()))

    _spy_hf_prefill(monkeypatch, check)
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=8192)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation("vkv")
    model.generation_config.pad_token_id = 0
    n = FLASHINFER_PREFILL_MIN_TOKENS + 300
    ids = torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(2)).cuda()
    cache = vkv_hf.VirtualKVCache(model.config, 1, n + 8)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **vkv_hf.generate_kwargs(cache),
                             max_new_tokens=3, do_sample=False)  # fmt: skip
    assert out.shape == (1, n + 3)
    assert [q for q, _ in checked] == [n, n]  # one prefill call per layer, the whole prompt
    if deps.has_flashinfer() and deps.cuda_capability(torch.cuda.current_device())[0] == 9:
        assert set(chosen) == {"flashinfer"}
    for rows, err in checked:
        assert err < 2e-2, f"prefill of {rows} query rows differs from triton by {err}"
