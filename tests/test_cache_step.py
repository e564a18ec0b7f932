"""The per-step path through the C++ slot table (csrc/slots.h, torch_vkv/_cache_step.py).

Every accepted form of ``seq_lens`` gives the same result as an int64 array;
the forms the table reads directly (int32/int64 arrays of any stride, CPU
tensors) and the ones Python converts first (lists, mappings, other dtypes,
byte-swapped arrays) agree; every error leaves the table as it was; a step
that crosses no page makes no commit; the table's view arrays follow it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_vkv import KVCache, OutOfPagesError
from torch_vkv._cache_step import STEP_DONE, STEP_INVALID, STEP_SHORT, STEP_TRIM
from torch_vkv._ext import core

PAGE = 4096  # 64 tokens a page per buffer with the shape below
L, H, D, B, MAX_SEQ = 2, 2, 8, 4, 512


def make(**kw) -> KVCache:
    args = dict(max_batch_size=B, max_seq_len=MAX_SEQ, dtype=torch.float32, device="cpu", page_size=PAGE)
    return KVCache(L, H, D, **{**args, **kw})


def state(c: KVCache) -> tuple:
    c.synchronize()
    return (c._used_tokens.tolist(), c._committed_pages.tolist(), c._covered_tokens.tolist(),
            [r.committed_ranges() for r in c._reservations], c.pool.stats()["mapped_pages"])


def test_statuses_match_the_core() -> None:
    C = core()
    assert (C.STEP_DONE, C.STEP_INVALID, C.STEP_SHORT, C.STEP_TRIM) == (STEP_DONE, STEP_INVALID, STEP_SHORT, STEP_TRIM)


@pytest.mark.parametrize(
    "form",
    ["int64", "int32", "strided", "big_endian", "uint16", "tensor64", "tensor32", "list", "mapping", "noncontig_tensor"],
)
def test_every_form_steps_like_an_int64_array(form: str) -> None:
    lens = [70, 0, 130, 5]
    ref, got = make(), make()
    for c in (ref, got):
        for _ in range(B):
            c.alloc()
        c.free(1)
    ref.step_async(np.array(lens, dtype=np.int64))
    seq_lens = {
        "int64": np.array(lens, dtype=np.int64),
        "int32": np.array(lens, dtype=np.int32),
        "strided": np.repeat(np.array(lens, dtype=np.int64), 3)[::3],
        "big_endian": np.array(lens, dtype=">i8"),
        "uint16": np.array(lens, dtype=np.uint16),
        "tensor64": torch.tensor(lens, dtype=torch.int64),
        "tensor32": torch.tensor(lens, dtype=torch.int32),
        "list": lens,
        "mapping": {0: 70, 2: 130, 3: 5},
        "noncontig_tensor": torch.tensor(lens, dtype=torch.int64).repeat_interleave(2)[::2],
    }[form]
    got.step_async(seq_lens)
    assert state(got) == state(ref)
    assert got.memory_stats()["commit_calls"] == ref.memory_stats()["commit_calls"]
    ref.close()
    got.close()


def test_a_step_within_committed_pages_commits_nothing() -> None:
    c = make()
    for _ in range(B):
        c.alloc()
    lens = np.array([10, 63, 64, 0], dtype=np.int64)
    c.step_async(lens)
    c.synchronize()
    calls, maps = c.memory_stats()["commit_calls"], c.pool.stats()["map_calls"]
    lens[:3] = [20, 63, 65]  # with the lookahead, 64 and 66 tokens: within the pages committed
    assert c._slots.step(lens, 1) == STEP_DONE
    c.step_async(lens)
    assert c.memory_stats()["commit_calls"] == calls and c.pool.stats()["map_calls"] == maps
    assert c._used_tokens.tolist() == [20, 63, 65, 0]
    lens[0] = 64  # slot 0's lookahead crosses: a prefetch
    c.step_async(lens)
    c.synchronize()
    assert c.memory_stats()["commit_calls"] == calls + 1
    assert c.committed_tokens(0) == 128
    c.close()


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.array([10, 600, 0, 0]), ValueError, r"seq_lens\[1\]: expected an int <= 512, got 600"),
        (np.array([10, -1, 0, 0], dtype=np.int32), ValueError, r"seq_lens\[1\]: expected an int >= 0, got -1"),
        (np.array([10, 0, 0, 7]), ValueError, "slot: expected a slot returned by alloc"),
        (np.array([10, 0, 0]), ValueError, r"seq_lens: expected 4 entries \(one per slot\), got 'shape \(3,\)'"),
        (np.zeros((2, 4), dtype=np.int64), ValueError, "expected 4 entries"),
        (np.array([1.0, 0, 0, 0]), TypeError, r"seq_lens\[0\]: expected an int"),
        (np.array([True, False, False, False]), TypeError, r"seq_lens\[0\]: expected an int"),
        (torch.tensor([1, 0, 0, 0], dtype=torch.bool), TypeError, "1-D integer tensor"),
        ("1234", TypeError, "a sequence"),
    ],
)
def test_bad_seq_lens_raise_with_nothing_changed(bad, exc, match) -> None:
    c = make()
    for _ in range(3):
        c.alloc()
    c.step_async(np.array([10, 100, 0, 0]))
    before = state(c)
    for call in (c.step, c.step_async, c.can_step):
        with pytest.raises(exc, match=match):
            call(bad)
        assert state(c) == before
    c.close()


def test_out_of_pages_on_the_fast_path_changes_nothing_and_reclaims_first() -> None:
    c = make(memory_budget=2 * L * 2 * PAGE)  # 2 pages per buffer in all (4 buffers)
    a, b = c.alloc(), c.alloc()
    c.step(np.array([64, 64, 0, 0]))  # every page of the budget
    before = state(c)
    with pytest.raises(OutOfPagesError, match=r"needs 4 new page\(s\).*\(slots \[0\]\)") as info:
        c.step_async(np.array([65, 64, 0, 0]))
    assert info.value.requested_pages == 4 and info.value.available_pages == 0
    assert state(c) == before
    assert not c.can_step(np.array([65, 64, 0, 0]))
    c.free(b)  # its pages stay cached: the next step takes them back
    assert c.can_step(np.array([65, 0, 0, 0]))
    c.step_async(np.array([65, 0, 0, 0]), lookahead_tokens=0)
    assert c.committed_tokens(a) == 128 and c.committed_tokens(b) == 0
    c.close()


def test_lookahead_tokens_is_checked() -> None:
    c = make()
    c.alloc()
    for bad, exc in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="lookahead_tokens: expected an int"):
            c.step_async(np.array([1, 0, 0, 0]), lookahead_tokens=bad)
    for big in (np.int64(600), 10**30):  # capped at max_seq_len
        c.step_async(np.array([1, 0, 0, 0]), lookahead_tokens=big)
        c.synchronize()
        assert c.committed_tokens(0) == MAX_SEQ
    c.close()


def test_free_during_a_prefetch_leaves_the_table_and_the_buffers_agreeing() -> None:
    # A windowed slot decommits everything when freed: the prefetch must be credited first.
    c = make(sliding_window=32)
    s = c.alloc()
    for n in range(60, 200, 7):
        c.step_async(np.array([n, 0, 0, 0]))
    c.free(s)
    for res in c._reservations:
        assert res.num_committed() == 0
    assert state(c)[1] == [0, 0, 0, 0]
    c.close()


def test_window_trim_runs_only_when_a_window_crosses_a_page() -> None:
    # A step from L tokens keeps rows >= L - 32 of the windowed layers (64 tokens a page).
    c = make(sliding_window=32)
    c.alloc()
    c.step(np.array([100, 0, 0, 0]))  # from 0: nothing behind the window
    assert c.window_start(0).tolist() == [0, 0, 0, 0]
    for n, status, start in ((100, STEP_TRIM, 64), (127, STEP_DONE, 64), (161, STEP_DONE, 64), (162, STEP_TRIM, 128)):
        # from 100: row 68 is in page 1 (page 0 goes); from 127 and 161: still page 1; from 162: page 2
        assert c._slots.step(np.array([n, 0, 0, 0]), -1) == status, n
        if status == STEP_TRIM:
            c._slots.trim_windows(None)
        assert c.window_start(0).tolist() == [start, 0, 0, 0], n
    c.close()


def test_table_views_and_close() -> None:
    c = make()
    c.alloc()
    with pytest.raises(ValueError, match="read-only"):
        c._committed_pages[0] = 3  # set through the table only (covered tokens follow)
    c.close()
    assert c.pages_for_tokens(65) == 2 and c.tokens_for_pages(10**30) == MAX_SEQ
    with pytest.raises(RuntimeError, match="closed"):
        c.step_async(np.array([1, 0, 0, 0]))


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_available_pages_and_the_pool_count_agree_with_memory_stats(layout: str) -> None:
    """The cheap reads a scheduler uses every iteration (no wait for the
    background commits) give memory_stats()'s figures once those are done:
    free + not created + freed slots' cached pages, and mapped = committed."""
    from torch_vkv.serving.kv import KVManager

    kv = KVManager("virtual", num_layers=2, num_kv_heads=2, head_dim=16, num_slots=4, max_seq_len=4096,
                   dtype=torch.float32, device="cpu", memory_budget=64 * 4096, layout=layout,
                   page_size=4096)  # fmt: skip
    c = kv.cache
    a, b = c.alloc(), c.alloc()
    seq = np.zeros(4, dtype=np.int64)
    seq[a], seq[b] = 300, 90
    c.step_async(seq, lookahead_tokens=64)
    c.free(b)
    c.synchronize()
    s = c.memory_stats()
    uncreated = s["max_pages"] - s["pool_pages"]
    assert c.available_pages() == s["free_pages"] + uncreated + s["cached_bytes"] // s["page_size"]
    assert 0 < c.available_pages() < 64
    assert kv.mapped_bytes() == kv.committed_bytes() == s["committed_bytes"] > 0
    kv.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.available_pages()


def test_seq_lens_reports_the_lengths_the_cache_was_told() -> None:
    """``KVCache.seq_lens``: the public, read-only view of what each slot uses (the lengths the last
    step, commit, fork or crop left it), a snapshot the caller cannot write back through."""
    c = make()
    try:
        assert c.seq_lens.tolist() == [0] * B and c.seq_lens.dtype == np.int64
        s, t = c.alloc(), c.alloc()
        c.commit(s, 100)
        c.step_async({s: 130, t: 7})
        assert c.seq_lens[[s, t]].tolist() == [130, 7]
        c.decommit(s, 70)  # a crop lowers it
        f = c.fork(s, 64)
        lens = c.seq_lens
        assert lens[[s, t, f]].tolist() == [70, 7, 64]
        assert int(lens.sum()) * c.bytes_per_token == c.memory_stats()["used_bytes"]
        lens[:] = 999  # a copy: the cache is unchanged
        assert c.seq_lens[[s, t, f]].tolist() == [70, 7, 64]
        with pytest.raises(AttributeError):
            c.seq_lens = np.zeros(B, dtype=np.int64)
        c.free(t)
        assert c.seq_lens[t] == 0
    finally:
        c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.seq_lens


def test_hf_windows_reads_only_the_public_seq_lens() -> None:
    """``torch_vkv.hf.windows.step_need`` needs nothing of the KVCache but ``seq_lens`` and ``decommit``."""
    from torch_vkv.hf.windows import step_need

    class Told:
        seq_lens = np.array([10, 12, 20, 0], dtype=np.int64)
        crops: list = []

        def decommit(self, slot: int, keep: int) -> None:
            self.crops.append((slot, keep))

    kv = Told()
    need = step_need(kv, np.array([11, 15, 15, 0], dtype=np.int64), [10, 10, 10, 0])
    # row 0 told start: as is; row 1 told past start + 1, short of need: back to start; row 2 past need: to need.
    assert need.tolist() == [11, 15, 0, 0] and kv.crops == [(2, 15), (1, 10)]
