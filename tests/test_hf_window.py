"""Hugging Face: sliding-window and soft-capped models under ``attn_implementation="vkv"``.

Greedy ``generate()`` with ``VirtualKVCache`` under ``"vkv"`` must give exactly
``DynamicCache``'s tokens under ``"eager"`` for Mistral (``sliding_window``),
Gemma 2 (soft cap + alternating sliding layers) and Gemma 3 (``layer_types``),
tiny random configs, for generations ten times longer than the window; the
sliding layers' committed pages stay within the window plus two pages.
Prompts are not padded: the vkv attention squeezes left padding out, so a padded
row's window counts real tokens where eager's counts padding positions too.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _hf_models import generate, vcache  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from torch_vkv.hf.cache import layer_windows  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

WINDOW = 8
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, initializer_range=0.2)  # fmt: skip


def family(name):
    if name == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=WINDOW), transformers.MistralForCausalLM
    if name == "gemma2":
        cfg = transformers.Gemma2Config(**COMMON, sliding_window=WINDOW, attn_logit_softcapping=5.0)
        return cfg, transformers.Gemma2ForCausalLM
    cfg = transformers.Gemma3TextConfig(**COMMON, sliding_window=WINDOW,
                                        layer_types=["sliding_attention"] * 3 + ["full_attention"])  # fmt: skip
    return cfg, transformers.Gemma3ForCausalLM


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_greedy_generate_matches_eager_dynamic_cache(name):
    cfg, cls = family(name)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    model.set_attn_implementation("eager")
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=10 * WINDOW)
    model.set_attn_implementation("vkv")
    cache = vcache(model, 2, max_len=128)
    out = generate(model, ids, mask, cache, max_new_tokens=10 * WINDOW)
    assert torch.equal(out, ref)
    kv = cache.kv_cache
    windows = layer_windows(model.config, 4)
    assert kv.sliding_window == windows and any(w is not None for w in windows)
    limit = -(-WINDOW // kv.tokens_per_page) + 2
    for l, w in enumerate(windows):
        g = kv._buffer_group[2 * l]
        for slot in range(2):
            held = kv._committed_pages[slot] - (0 if g < 0 else int(kv._first_pages[g, slot]))
            if w is None:
                assert held * kv.tokens_per_page >= out.shape[1] - 1
            else:
                assert held <= limit, (l, slot, held)
    stats = kv.memory_stats()
    assert 0 < stats["window_committed_bytes"] <= stats["committed_bytes"]  # == when every layer slides


def test_layer_windows_from_configs():
    assert layer_windows(transformers.LlamaConfig(**COMMON), 4) == [None] * 4
    assert layer_windows(family("mistral")[0], 4) == [WINDOW] * 4
    assert layer_windows(family("gemma3")[0], 4) == [WINDOW] * 3 + [None]
    qwen = transformers.Qwen2Config(**COMMON, use_sliding_window=False, sliding_window=WINDOW)
    assert layer_windows(qwen, 4) == [None] * 4


def test_eager_mode_keeps_every_page():
    """eager/sdpa read every row of the cache: no pages are given back in padded mode."""
    cfg, cls = family("gemma3")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = vcache(model, 1, max_len=128)
    generate(model, ids, torch.ones_like(ids), cache, max_new_tokens=5 * WINDOW)
    assert cache.kv_cache.sliding_window == [None] * 4


def test_beam_search_over_sliding_layers_matches_eager_dynamic_cache():
    """reorder_cache copies only the rows each sliding layer still holds (the rest were given back)."""
    cfg, cls = family("gemma3")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    kw = dict(num_beams=3, num_return_sequences=1, max_new_tokens=6 * WINDOW)
    model.set_attn_implementation("eager")
    ref = generate(model, ids, mask, DynamicCache(config=model.config), **kw)
    model.set_attn_implementation("vkv")
    cache = vcache(model, 3, max_len=128)
    assert torch.equal(generate(model, ids, mask, cache, **kw), ref)
    assert cache.kv_cache.window_start(0).max() > 0
