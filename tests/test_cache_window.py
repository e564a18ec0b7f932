"""KVCache(sliding_window=...): the pages behind a layer's window are given back.

Host backend with small pages (4 KiB: 32 rows of a [2 heads x 16] fp32 row), so
a long generation crosses many pages; on CUDA the same tests run with the
driver's granularity. Every step writes a value per (layer, slot, position);
the rows inside each window (and every row of a global layer) are checked
against those values, so a decommit that took a live page is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _subprocess import run_python
from torch_vkv import KVCache
from torch_vkv.errors import OutOfPagesError

H, D = 2, 16


def make(device, windows, *, layers=4, batch=3, max_seq_len=2048, **kw):
    page = 4096 if device == "cpu" else None
    return KVCache(layers, H, D, max_batch_size=batch, max_seq_len=max_seq_len, dtype=torch.float32,
                   device=device, page_size=page, sliding_window=windows, **kw)  # fmt: skip


def value(layer, slot, pos):
    """The value written at (layer, slot, pos): unique, exactly representable in fp32."""
    return float(layer * 1_000_000 + slot * 10_000 + pos)


def write(cache, slot, start, stop):
    pos = torch.arange(start, stop, dtype=torch.float32, device=cache.device)
    for l in range(cache.num_layers):
        rows = (l * 1_000_000 + slot * 10_000 + pos)[:, None, None].expand(-1, H, D)
        cache.key(l)[slot, start:stop] = rows
        cache.value(l)[slot, start:stop] = -rows


def check_rows(cache, slot, length):
    """Rows a layer still needs hold what was written: all rows of a global layer, the last W of a windowed one."""
    for l, w in enumerate(cache.sliding_window):
        lo = 0 if w is None else max(0, length - w)
        want = torch.arange(lo, length, dtype=torch.float32, device=cache.device) + l * 1_000_000 + slot * 10_000
        k = cache.key(l)[slot, lo:length]
        v = cache.value(l)[slot, lo:length]
        assert torch.equal(k[:, 0, 0], want) and torch.equal(k.amin((1, 2)), k.amax((1, 2))), (l, slot, length)
        assert torch.equal(v[:, 0, 0], -want), (l, slot, length)


def window_pages(cache, w):
    """At most: the window's rows (and a step's new tokens, <= 3 here) over pages, plus two pages."""
    return -(-w // cache.tokens_per_page) + 2


def held_per_buffer(cache, layer, slot):
    g = cache._buffer_group[2 * layer]
    first = 0 if g < 0 else int(cache._first_pages[g, slot])
    return cache._committed_pages[slot] - first


@pytest.mark.parametrize("async_", [False, True], ids=["step", "step_async"])
def test_long_generation_keeps_a_window_of_pages(device, async_):
    windows = [None, 40, None, 100]
    cache = make(device, windows, margin_tokens=3)
    slots = [cache.alloc() for _ in range(3)]
    lens = np.zeros(3, dtype=np.int64)
    prompt = np.array([70, 5, 130])
    rng = np.random.default_rng(0)
    for it in range(260):
        new = prompt if it == 0 else rng.integers(1, 4, size=3)  # chunked decode: 1-3 tokens a step
        need = np.zeros(cache.max_batch_size, dtype=np.int64)
        for i, s in enumerate(slots):
            need[s] = min(cache.max_seq_len, lens[i] + new[i])
        (cache.step_async if async_ else cache.step)(need)
        cache.synchronize()
        for i, s in enumerate(slots):
            write(cache, s, int(lens[i]), int(need[s]))
            lens[i] = need[s]
            check_rows(cache, s, int(lens[i]))
            for l, w in enumerate(windows):
                if w is not None and it > 0:  # (the prompt step holds the whole prompt)
                    assert held_per_buffer(cache, l, s) <= window_pages(cache, w), (it, l, s)
    # Long past every window: the windowed layers really gave pages back.
    tpp = cache.tokens_per_page
    for i, s in enumerate(slots):
        assert lens[i] > 4 * 100
        assert held_per_buffer(cache, 0, s) >= lens[i] // tpp
        assert held_per_buffer(cache, 1, s) <= window_pages(cache, 40)
    stats = cache.memory_stats()
    per_layer = [sum(held_per_buffer(cache, l, s) for s in slots) * 2 * cache.page_size for l in range(4)]
    assert stats["committed_bytes"] == sum(per_layer)
    assert stats["window_committed_bytes"] == per_layer[1] + per_layer[3]
    if lens.min() > 8 * tpp:  # host pages of 32 rows; a 2 MiB CUDA page holds 16384 rows, more than max_seq_len
        assert stats["window_committed_bytes"] < stats["committed_bytes"] // 4
    cache.close()


def test_failed_step_changes_nothing():
    cache = make("cpu", 16, layers=2, batch=2, memory_budget=4 * 8 * 4096)
    s = cache.alloc()
    cache.step({s: 100})
    write(cache, s, 0, 100)
    cache.step({s: 120})
    write(cache, s, 100, 120)
    before = (cache.memory_stats(), cache._first_pages.copy(), list(cache._committed_pages))
    with pytest.raises(OutOfPagesError):
        cache.step({s: 2000})
    after = (cache.memory_stats(), cache._first_pages.copy(), list(cache._committed_pages))
    for key in ("committed_bytes", "used_bytes", "window_committed_bytes", "free_pages"):
        assert before[0][key] == after[0][key], key
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
    check_rows(cache, s, 120)
    cache.close()


def test_windowed_pages_are_returned_to_the_pool_and_reused():
    """Memory use of an all-windowed cache stays flat however long the sequence."""
    cache = make("cpu", 32, layers=2, batch=1, max_seq_len=8192, memory_budget=4 * 6 * 4096)
    s = cache.alloc()
    for L in range(1, 8192, 5):
        cache.step({s: L})  # would need 4 * 64 pages without the window
        write(cache, s, max(0, L - 5), L)
    check_rows(cache, s, 8191)
    assert cache.memory_stats()["committed_bytes"] <= 4 * 3 * 4096
    cache.close()


def test_free_of_a_slot_whose_window_moved_gives_back_its_pages_and_the_next_request_starts_clean():
    code = """
    import torch
    from test_cache_window import make, write, check_rows
    cache = make("cpu", [8, None], layers=2, batch=1)
    s = cache.alloc()
    for L in range(1, 300, 3):
        cache.step({s: L})
        write(cache, s, max(0, L - 3), L)
    cache.free(s)
    assert cache.memory_stats()["committed_bytes"] == 0
    s = cache.alloc()
    cache.step({s: 45})
    write(cache, s, 0, 45)  # rows 0.. of the windowed layer are committed again (no segfault)
    cache.step({s: 50})  # 45 - 8 rows behind: page 0 (32 rows) given back again
    write(cache, s, 45, 50)
    check_rows(cache, s, 50)
    cache.free(s)
    moved = cache.memory_stats()["committed_bytes"]
    s = cache.alloc()
    cache.step({s: 20})  # the window stays inside page 0: nothing given back
    cache.free(s)
    print("ok", moved, cache.memory_stats()["committed_bytes"] > 0)
    """
    res = run_python(code)
    assert res.returncode == 0, res.stderr
    assert "ok 0 True" in res.stdout, res.stdout


def test_crop_keeps_what_the_window_needs():
    cache = make("cpu", [None, 20], layers=2, batch=1)
    s = cache.alloc()
    for L in range(1, 200, 2):
        cache.step({s: L})
        write(cache, s, max(0, L - 2), L)
    first_row = int(cache._first_pages[0, s]) * cache.tokens_per_page
    assert first_row > 0
    with pytest.raises(ValueError, match=f"keep_tokens of slot {s}: expected 0 or at least {first_row + 20}"):
        cache.decommit(s, first_row + 19)
    cache.decommit(s, first_row + 20)  # a rollback the window allows
    check_rows(cache, s, first_row + 20)
    cache.decommit(s, 0)
    assert cache.memory_stats()["committed_bytes"] == 0 and cache._first_pages[0, s] == 0
    cache.close()


@pytest.mark.parametrize(
    "windows, layout, exc, match",
    [
        (0, "per_layer", ValueError, "sliding_window: expected an int >= 1, got 0"),
        ([4, None], "per_layer", ValueError, "sliding_window: expected an int or a list of 4 entries"),
        ([4, None, 0, None], "per_layer", ValueError, r"sliding_window\[2\]: expected an int >= 1"),
        (2.5, "per_layer", TypeError, "sliding_window: expected an int"),
        ([True, None, None, None], "per_layer", TypeError, r"sliding_window\[0\]: expected an int"),
        ([4, None], "interleaved", ValueError, "sliding_window: expected an int or a list of 4 entries"),
        # past int64 it reached the slot table as a pybind11 "incompatible constructor arguments"
        (1 << 63, "per_layer", ValueError, "sliding_window: expected an int <= 9223372036854775807"),
        ([None, 1 << 63, None, None], "per_layer", ValueError, r"sliding_window\[1\]: expected an int <= 9"),
    ],
)
def test_bad_sliding_window(windows, layout, exc, match):
    with pytest.raises(exc, match=match):
        make("cpu", windows, layout=layout)


def test_no_window_is_the_plain_cache():
    cache = make("cpu", None)
    assert cache.sliding_window == [None] * 4
    s = cache.alloc()
    cache.step({s: 500})
    stats = cache.memory_stats()
    assert stats["window_committed_bytes"] == 0
    assert stats["committed_bytes"] == cache._committed_pages[s] * 8 * cache.page_size
    cache.close()


@pytest.mark.parametrize(
    "windows,layout,trims",
    [(None, "per_layer", False), ([None, 8, None, 8], "per_layer", True), (8, "interleaved", True),
     ([None, 8, None, 8], "interleaved", False)],  # interleaved with a global layer: a page goes once no layer needs it
)
def test_trims_windows_says_whether_pages_behind_a_window_go_back(windows, layout, trims):
    """The public read-only answer the Hugging Face adapter asks (it read the private _windowed)."""
    cache = make("cpu", windows, layout=layout)
    assert cache.trims_windows is trims
    with pytest.raises(AttributeError):
        cache.trims_windows = not trims
    cache.close()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_over_a_windowed_cache_equals_full_history_reference(backend):
    """Decode over the cache after its windowed layer gave pages back, against the reference on
    the full history (kept aside): the window never needed the decommitted rows."""
    from torch_vkv.attention import attention
    from torch_vkv.triton_kernels import attention_reference

    W = 24
    cache = make("cpu", [W, None], layers=2, batch=2)
    slots = [cache.alloc() for _ in range(2)]
    full_k = torch.randn(2, 400, H, D)
    full_v = torch.randn(2, 400, H, D)
    lens = [0, 0]
    for it in range(120):
        for i, s in enumerate(slots):
            lens[i] += 3 if i == 0 else 2
        cache.step({s: lens[i] for i, s in enumerate(slots)})
        for i, s in enumerate(slots):
            cache.key(0)[s, : lens[i]][-3 if i == 0 else -2 :] = full_k[i, lens[i] - (3 if i == 0 else 2) : lens[i]]
            cache.value(0)[s, : lens[i]][-3 if i == 0 else -2 :] = full_v[i, lens[i] - (3 if i == 0 else 2) : lens[i]]
    assert cache._first_pages[0].min() > 2
    q = torch.randn(2, 4, D)
    seq = torch.tensor(lens, dtype=torch.int32)
    sl = torch.tensor(slots, dtype=torch.int32)
    got = attention(q, cache.key(0), cache.value(0), seq, slots=sl, backend=backend, window_left=W - 1, softcap=5.0)
    want = attention_reference(q, full_k, full_v, seq, window_left=W - 1, softcap=5.0)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=2e-4)
    cache.close()


def test_repr_of_a_windowed_layer_shows_the_rows_it_still_holds():
    """committed_rows() counts leading rows (0 once a window gave the first
    pages back); the view's repr says which rows the slot still holds and
    prints them, reading committed memory only."""
    c = KVCache(2, 2, 16, max_batch_size=3, max_seq_len=256, dtype=torch.float32, device="cpu", page_size=4096,
                sliding_window=[40, None])  # fmt: skip
    s = c.alloc()
    lens = np.zeros(3, dtype=np.int64)
    for n in range(1, 160):
        lens[s] = n
        c.step(lens)
    x = torch.randn(40, 2, 16)
    c.key(0)[s, 119:159] = x  # the window's rows: committed
    assert c.key(0).committed_rows() == [0, 0, 0]
    text = repr(c.key(0))
    lo, hi = c.key(0)._committed_span(s)
    assert 0 < lo <= 119 and hi >= 159
    assert f"slot {s} holds rows [{lo}, {hi}) (earlier rows given back)" in text
    assert f"slot {s}, rows [{lo}, {hi}):" in text
    assert "committed_rows=[160, 0, 0]" in repr(c.key(1))  # the global layer keeps every row
    c.close()
