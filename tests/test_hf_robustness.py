"""VirtualKVCache robustness: arguments checked at construction, the model
checked against the cache, no copies, a clear error after close(), and the
transformers cache keyword (``cache=`` / ``past_key_values=``)."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch_vkv.hf.compat as compat  # noqa: E402
from torch_vkv.hf import VirtualKVCache, cache_keyword, forward_kwargs, generate_kwargs  # noqa: E402

from _hf_models import PAGE, generate, prompts, tiny_config, tiny_model, vcache  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

BAD_ARGS = [
    (dict(layout="rows"), ValueError, "layout"),
    (dict(layout=None), ValueError, "layout"),
    (dict(memory_budget=-1), ValueError, "memory_budget"),
    (dict(memory_budget="1GB"), TypeError, "memory_budget"),
    (dict(page_size=0), ValueError, "page_size"),
    (dict(page_size=4096.0), TypeError, "page_size"),
    (dict(page_size=123), ValueError, "page_size"),  # not a multiple of the OS page: caught here, not at generate()
    (dict(margin_tokens=-2), ValueError, "margin_tokens"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(device="not a device"), TypeError, "device"),
    (dict(device=3.5), TypeError, "device"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(dtype="float16"), TypeError, "dtype"),
    (dict(prefetch="yes"), TypeError, "prefetch"),
]


@pytest.mark.parametrize("kwargs, exc, name", BAD_ARGS, ids=[f"{a}" for a, _, _ in BAD_ARGS])
def test_bad_arguments_fail_at_construction(kwargs, exc, name):
    with pytest.raises(exc, match=f"{name}: expected"):
        VirtualKVCache(tiny_config(), 2, 64, **kwargs)


def test_bad_sizes_and_config():
    with pytest.raises(ValueError, match="max_batch_size: expected"):
        VirtualKVCache(tiny_config(), 0, 64)
    with pytest.raises(TypeError, match="max_cache_len: expected"):
        VirtualKVCache(tiny_config(), 1, True)
    with pytest.raises(TypeError, match="config: expected"):
        VirtualKVCache(object(), 1, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_cuda_device_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="device: expected 'cpu'"):
        VirtualKVCache(tiny_config(), 1, 64, device="cuda")


def test_page_size_on_cuda_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to build a CUDA cache (the CPU case is the test above)")
    with pytest.raises(ValueError, match="page_size: expected None on CUDA"):
        VirtualKVCache(tiny_config(), 1, 64, device="cuda", page_size=PAGE)


def test_model_with_more_layers_than_the_cache():
    model = tiny_model("llama", "vkv")  # 2 layers
    cache = VirtualKVCache(tiny_config(num_hidden_layers=1), 2, 64, page_size=PAGE)
    ids, _ = prompts(2)
    with pytest.raises(ValueError, match=r"layer_idx: expected an int in \[0, 1\).*1 layers"):
        with torch.no_grad():
            model(ids, **forward_kwargs(model, cache))


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_model_with_other_heads_after_reset(impl):
    model = tiny_model("llama", impl)
    cache = vcache(model, 2)
    ids, mask = prompts(2)
    generate(model, ids, mask, cache, max_new_tokens=2)
    cache.reset()
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(tiny_config(num_key_value_heads=4)).eval()
    other.set_attn_implementation(impl)
    with pytest.raises(ValueError, match=r"key_states: expected \[batch, 2, new_tokens, 16\].*got \(2, 4, 7, 16\)"):
        with torch.no_grad():
            other(ids, **forward_kwargs(other, cache))


def test_update_takes_numpy_layer_indices_and_refuses_bools():
    """``layer_idx`` is checked as every other int: a NumPy int is a layer (it was refused
    with "expected an int in [0, 2), got np.int64(0)"), a bool is not (True was layer 1)."""
    cache = vcache(tiny_model("llama", "sdpa"), 1)
    k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    keys, values = cache.update(k, v, np.int64(0))
    assert torch.equal(keys, k) and torch.equal(values, v)
    with pytest.raises(ValueError, match=r"layer_idx: expected an int in \[0, 2\).*got True"):
        cache.update(k, v, True)
    cache.close()


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_update_takes_key_states_of_any_strides(impl):
    """K/V whose head_dim is not the innermost stride are stored like any others (vkv
    mode refused them with an internal "k_new/v_new stride(-1): expected 1")."""
    cache = vcache(tiny_model("llama", impl), 1)
    k = torch.randn(1, 16, 3, 2).transpose(1, 3)  # [1, 2, 3, 16], head_dim stride 6
    v = torch.randn(1, 3, 16, 2).permute(0, 3, 1, 2)  # [1, 2, 3, 16], head_dim stride 2
    cache.update(k, v, 0)
    cache.update(k, v, 1)
    for layer in cache.layers:
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    cache.close()


def test_integer_key_states_are_refused_naming_them():
    """With dtype=None the cache takes the first key_states' dtype: integer K/V failed in
    KVCache's constructor as "dtype: expected a floating-point torch.dtype", an argument the
    user never passed."""
    cache = vcache(tiny_model("llama", "sdpa"), 1)
    k = torch.zeros(1, 2, 3, 16, dtype=torch.long)
    match = r"key_states/value_states dtype: expected floating-point, got \(torch.int64, torch.int64\)"
    with pytest.raises(TypeError, match=match):
        cache.update(k, k, 0)
    assert cache.kv_cache is None  # nothing built
    cache.close()


def test_no_copies_no_pickling():
    cache = vcache(tiny_model("llama", "vkv"), 1)
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="VirtualKVCache cannot be"):
            attempt(cache)


def test_close_then_use_raises_runtime_error():
    """In a subprocess: before the fix, layers[0].keys after close() read unmapped memory (SIGSEGV)."""
    code = textwrap.dedent(
        """
        import sys, torch, transformers
        sys.path.insert(0, "tests")
        from _hf_models import generate, prompts, tiny_model, vcache
        model = tiny_model("llama", sys.argv[1])
        cache = vcache(model, 2)
        ids, mask = prompts(2)
        generate(model, ids, mask, cache, max_new_tokens=3)
        cache.close()
        cache.close()  # idempotent
        assert "closed" in repr(cache)
        for what in ("keys", "values"):
            try:
                getattr(cache.layers[0], what)
            except RuntimeError as e:
                assert "closed" in str(e), e
            else:
                raise AssertionError(what + " after close() did not raise")
        calls = (cache.memory_stats, cache.reset, lambda: generate(model, ids, mask, cache), cache.get_seq_length,
                 lambda: cache.crop(-1), lambda: cache.get_mask_sizes(1), cache.get_query_offset,
                 lambda: cache.reorder_cache(torch.tensor([1, 0])), lambda: cache.batch_repeat_interleave(2),
                 lambda: cache.batch_select_indices(torch.tensor([0])), cache.get_max_length)
        for call in calls:
            try:
                call()
            except RuntimeError as e:
                assert "VirtualKVCache is closed" in str(e), e
            else:
                raise AssertionError("no RuntimeError after close()")
        print("OK")
        """
    )
    for impl in ("sdpa", "vkv"):
        r = subprocess.run([sys.executable, "-c", code, impl], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (impl, r.returncode, r.stderr[-2000:])


def test_used_bytes_follow_the_tokens():
    """memory_stats() reports KVCache's own used_bytes (never overwritten): it
    equals the tokens stored after growth, crops inside a page and batch ops."""
    model = tiny_model("llama", "vkv")
    cache = vcache(model, 4)
    ids, mask = prompts(3)
    generate(model, ids, mask, cache, max_new_tokens=5)
    per_token = cache.kv_cache.bytes_per_token

    def check():
        stats = cache.memory_stats()
        assert stats["tokens"] == sum(cache.lengths.rows())
        assert stats["used_bytes"] == stats["tokens"] * per_token, stats

    check()
    cache.crop(-1)  # stays inside the pages: nothing decommitted, counts still drop
    check()
    cache.batch_select_indices(torch.tensor([2, 0]))
    check()
    cache.reset()
    check()


def test_cache_keyword_follows_the_installed_transformers(monkeypatch):
    from transformers.generation import utils

    model = tiny_model("llama", "sdpa")
    names = list(getattr(utils, "ALL_CACHE_NAMES", ()))
    assert generate_kwargs(1) == {("cache" if "cache" in names else "past_key_values"): 1}
    assert cache_keyword(model) in ("cache", "past_key_values")
    # transformers 5.17 (our GPU machine): no "cache" anywhere.
    monkeypatch.setattr(utils, "ALL_CACHE_NAMES", ["past_key_values", "cache_params", "state"])
    compat._generate_keyword.cache_clear()
    try:
        assert generate_kwargs(1) == {"past_key_values": 1}
    finally:
        monkeypatch.undo()
        compat._generate_keyword.cache_clear()

    class OldModel:
        def forward(self, input_ids, past_key_values=None):
            pass

    class NewModel:
        def forward(self, input_ids, cache=None):
            pass

    assert forward_kwargs(OldModel(), 1) == {"past_key_values": 1}
    assert forward_kwargs(NewModel(), 1) == {"cache": 1}


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_no_future_warning_from_our_code_paths(impl):
    model = tiny_model("llama", impl)
    ids, mask = prompts(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = vcache(model, 2)
        generate(model, ids, mask, cache, max_new_tokens=3)
        cache.reset()
        with torch.no_grad():
            model(ids, attention_mask=mask, **forward_kwargs(model, cache))
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []


@pytest.mark.parametrize("impl", ["sdpa", "vkv"])
def test_batch_op_indices_must_be_integer_rows(impl):
    """reorder_cache / batch_select_indices took any tensor through int(): a bool
    beam_idx [True, False, True] reordered to rows [1, 0, 1], a float 1.5 became
    row 1, and a bool mask shorter than the batch dropped the rows past it, all
    silently (DynamicCache's index_select / indexing raise). Now: integer rows,
    or for batch_select_indices a bool mask of one entry per row."""
    model = tiny_model("llama", impl)
    ids, mask = prompts(3)
    cache = vcache(model, 4)
    generate(model, ids, mask, cache, max_new_tokens=2)
    rows = cache.lengths.rows()
    bad = [
        (lambda: cache.reorder_cache(torch.tensor([True, False, True])), TypeError, "beam_idx: expected"),
        (lambda: cache.reorder_cache(torch.tensor([0.0, 1.5, 2.0])), TypeError, "beam_idx: expected"),
        (lambda: cache.reorder_cache(torch.tensor([[0, 1, 2]])), ValueError, "beam_idx: expected a 1-D"),
        (lambda: cache.batch_select_indices(torch.tensor([True, False])), ValueError,
         r"indices: expected a bool mask of 3 entries"),
        (lambda: cache.batch_select_indices([0.0, 2.0]), TypeError, "indices: expected"),
        # The range named is the one accepted: -1 is the last row (it said "[0, 3)" and took -1).
        (lambda: cache.reorder_cache(torch.tensor([-4, 0, 1])), ValueError, r"expected an int in \[-3, 3\).*got -4"),
        (lambda: cache.batch_select_indices([3]), ValueError, r"expected an int in \[-3, 3\).*got 3"),
        # uint8 is a mask to torch (DynamicCache indexes with it); it was read as the rows 1, 0, 1.
        (lambda: cache.reorder_cache(torch.tensor([1, 0, 1], dtype=torch.uint8)), TypeError, "beam_idx: expected"),
        (lambda: cache.batch_select_indices(torch.tensor([1, 0], dtype=torch.uint8)), ValueError,
         r"indices: expected a bool mask of 3 entries"),
    ]  # fmt: skip
    for call, exc, match in bad:
        with pytest.raises(exc, match=match):
            call()
        assert cache.lengths.rows() == rows  # nothing changed
    cache.reorder_cache([2, 1, 0])  # lists of ints and int tensors of any integer dtype stay accepted
    cache.batch_select_indices(torch.tensor([1, 1, 1], dtype=torch.uint8))  # a uint8 mask keeps rows 0, 1, 2
    assert cache.lengths.rows() == [rows[2], rows[1], rows[0]]
    cache.batch_select_indices(torch.tensor([True, False, True]))
    assert cache.lengths.rows() == [rows[2], rows[0]]
    cache.reorder_cache(torch.tensor([1, 0], dtype=torch.int32))
    assert cache.lengths.rows() == [rows[0], rows[2]]
    cache.reorder_cache(torch.tensor([-1, 0]))
    assert cache.lengths.rows() == [rows[2], rows[0]]


@pytest.mark.parametrize("impl", ["eager", "sdpa", "vkv"])
def test_cache_dtype_other_than_the_models_is_a_clear_error(impl):
    """A cache built with dtype=torch.float16 for a float32 model stored the
    step's keys cast to float16 and then failed inside the attention with
    torch's or the kernel's message ("Expected query, key, and value to have the
    same dtype", "k_cache.dtype: expected q.dtype"), which names neither the cache
    nor the fix. Now update() says so first, and stores nothing."""
    model = tiny_model("llama", impl)
    ids, mask = prompts(2)
    cache = vcache(model, 2, dtype=torch.float16)
    match = r"key_states.dtype: expected torch.float16 \(the cache's dtype.*got torch.float32"
    with pytest.raises(TypeError, match=match):
        generate(model, ids, mask, cache, max_new_tokens=2)
    assert cache.get_seq_length() == 0 and cache.memory_stats()["committed_bytes"] == 0
