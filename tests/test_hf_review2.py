"""Second review of the Hugging Face adapter, as a new user of the documented API: each test
here failed before its fix (or pins a behaviour the review checked and the docs now state)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_vkv.hf import VirtualKVCache  # noqa: E402

from _hf_models import generate, prompts, tiny_config, tiny_model  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")


# -- max_cache_len past the address space ------------------------------------------------------------
# tiny_config: 2 layers x K and V x 2 KV heads x 16 dims = 128 elements a token; with 2 rows the
# 128 TiB address space holds 2**47 // (2 * 128 * itemsize) tokens a row.
FITS_NO_DTYPE = 2**47 // (2 * 128 * 1)  # the smallest floating dtype (1 byte)
FITS_FLOAT32 = 2**47 // (2 * 128 * 4)


def test_max_cache_len_that_no_dtype_fits_is_refused_at_construction_naming_it():
    """Was accepted (device and dtype default to the first update's), then the first generate()
    raised 'max_seq_len: ...', an argument the user never passed."""
    with pytest.raises(ValueError, match=rf"max_cache_len: expected at most {FITS_NO_DTYPE} tokens .* got {10**12}"):
        VirtualKVCache(tiny_config("llama"), 2, 10**12)
    with pytest.raises(ValueError, match=rf"max_cache_len: expected at most {FITS_FLOAT32} tokens .* got {2 * 10**11}"):
        VirtualKVCache(tiny_config("llama"), 2, 2 * 10**11, dtype=torch.float32)


def test_max_cache_len_that_the_models_dtype_does_not_fit_is_refused_naming_it():
    """Without a dtype, the size is known at the first update: the error names max_cache_len and
    the cache stays empty and usable."""
    model = tiny_model("llama", "sdpa")  # float32
    cache = VirtualKVCache(model.config, 2, 2 * 10**11)  # fits a 1-byte dtype, not float32
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match=rf"max_cache_len: expected at most {FITS_FLOAT32} tokens .* got {2 * 10**11}"):
        generate(model, ids, mask, cache, max_new_tokens=2)
    assert cache.kv_cache is None and cache.mode is None and cache.get_seq_length() == 0
