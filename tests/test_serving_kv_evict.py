"""Prefix caching's evictions for memory (``KVManager.can_grow``): only parked slots that give pages back.

A parked slot (a finished request's slot kept for its prompt blocks) whose pages a running
request shares (it forked them) frees nothing when evicted: ``can_grow`` must not empty the
prefix cache on such slots before the scheduler preempts. No model: the manager alone, on a
1-layer shape with 32 tokens a page (virtual: 2 buffers, so 2 pool pages a block; paged:
blocks of 32 tokens).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_vkv import KVCache, PagedKVCache
from torch_vkv.serving.kv import KVManager
from torch_vkv.serving.prefix import block_keys

B = 32  # tokens of a block (a page of one buffer, or a paged block)
KINDS = ("virtual", "paged")


def manager(kind: str, blocks: int = 6) -> KVManager:
    """``blocks`` blocks of budget (virtual: 2 pool pages each)."""
    budget = blocks * 2 * 4096 if kind == "virtual" else blocks * B * 256
    return KVManager(kind, num_layers=1, num_kv_heads=1, head_dim=32, num_slots=4, max_seq_len=16 * B,
                     dtype=torch.float32, device="cpu", memory_budget=budget, page_size=4096, block_size=B,
                     prefix_caching=True, parking_slots=3)  # fmt: skip


def free_pages(kv: KVManager) -> int:
    """Pool pages free outside parked slots (parked ones count in KVManager.available_pages)."""
    return kv.cache.available_pages() if kv.kind == "virtual" else kv.cache.pool.num_free


def grow(kv: KVManager, slot: int, n: int) -> None:
    seq = np.zeros(kv.num_slots, dtype=np.int64)
    seq[slot] = n
    assert kv.can_grow(seq)
    kv.grow(seq)


def parked_slot(kv: KVManager, first: int, blocks: int = 2, src: int | None = None) -> int:
    """A finished request's slot holding ``blocks`` prompt blocks (tokens from ``first`` on),
    parked; forked from ``src``'s (then the same tokens) when given."""
    toks = list(range(first, first + blocks * B))
    slot = kv.alloc(blocks * B) if src is None else kv.fork(src, blocks * B)
    if src is None:
        grow(kv, slot, blocks * B)
    kv.prefix.add(slot, toks, block_keys(toks, B))
    kv.free(slot, park=True)
    return slot


def fill(kv: KVManager) -> int:
    """A running request taking every free page, on a block boundary."""
    a = kv.alloc()
    grow(kv, a, free_pages(kv) // kv.pages_for(1) * B)
    assert free_pages(kv) == 0
    return a


def wants(kv: KVManager, slot: int, more_blocks: int) -> np.ndarray:
    seq = np.zeros(kv.num_slots, dtype=np.int64)
    seq[slot] = kv.cache.committed_tokens(slot) + more_blocks * B
    return seq


@pytest.mark.parametrize("kind", KINDS)
def test_a_parked_slot_shared_with_a_running_request_is_not_evicted(kind):
    kv = manager(kind)
    p = parked_slot(kv, 0)
    r = kv.fork(p, 2 * B)  # a running request on p's cached prefix: p's pages are r's too
    grow(kv, r, 2 * B + 1)
    q = parked_slot(kv, 1000)  # more recently used than p, its pages its own
    a = fill(kv)
    assert kv.prefix.parked == [p, q]
    assert kv.cache.freeable_pages([p]) == 0 and kv.cache.freeable_pages([q]) == kv.pages_for(2 * B)
    # Three more blocks: evicting every parked slot finds two. Nothing is evicted (the caller preempts).
    assert not kv.can_grow(wants(kv, a, 3))
    assert kv.prefix.parked == [p, q]
    # Two more: q's eviction does it; p, the least recently used, stays (evicting it frees nothing).
    seq = wants(kv, a, 2)
    assert kv.can_grow(seq)
    assert kv.prefix.parked == [p]
    kv.grow(seq)
    assert kv.prefix.lookup(list(range(2 * B)), block_keys(list(range(2 * B)), B)) == (p, 2 * B)
    # Once r is gone, p's pages are its own again: evicting it helps.
    kv.free(r)
    assert kv.cache.freeable_pages([p]) == kv.pages_for(2 * B)
    assert kv.can_grow(wants(kv, a, 2)) and kv.prefix.parked == []
    kv.close()


@pytest.mark.parametrize("kind", KINDS)
def test_parked_slots_sharing_pages_with_each_other_are_evicted_together(kind):
    kv = manager(kind, blocks=8)
    p = parked_slot(kv, 0)
    q = parked_slot(kv, 0, src=p)  # the same prompt again, finished: p and q map the same pages
    s = parked_slot(kv, 1000)  # the most recently used
    a = fill(kv)
    assert kv.prefix.parked == [p, q, s]
    assert kv.cache.freeable_pages([p]) == kv.cache.freeable_pages([q]) == 0
    assert kv.cache.freeable_pages([p, q]) == kv.pages_for(2 * B)
    assert kv.can_grow(wants(kv, a, 2))  # p and q, the least recently used, free their pages together
    assert kv.prefix.parked == [s]
    kv.close()


@pytest.mark.parametrize("kind", KINDS)
def test_evictions_skip_slots_of_the_run_that_add_nothing(kind):
    kv = manager(kind, blocks=8)
    p = parked_slot(kv, 0)
    r = kv.fork(p, 2 * B)  # p frees nothing while r runs
    grow(kv, r, 2 * B + 1)
    q = parked_slot(kv, 1000, blocks=1)
    s = parked_slot(kv, 2000, blocks=1)
    a = fill(kv)
    assert kv.can_grow(wants(kv, a, 2))  # needs q and s; p, least recently used, is passed over
    assert kv.prefix.parked == [p]
    kv.close()


def test_freeable_pages_counts_pages_no_other_slot_maps():
    c = KVCache(1, 1, 32, max_batch_size=4, max_seq_len=512, dtype=torch.float32, device="cpu", page_size=4096)
    s = c.alloc()
    c.commit(s, 100)  # 4 pages a buffer, 2 buffers
    f = c.fork(s, 70)  # shares 2 pages, its own third
    g = c.fork(f, 64)  # shares the same 2 pages
    assert c.freeable_pages([s]) == 2 * 2 and c.freeable_pages([f]) == 1 * 2 and c.freeable_pages([g]) == 0
    assert c.freeable_pages([f, g]) == 1 * 2 and c.freeable_pages([s, f, g]) == 5 * 2  # 4 + 1 distinct pages a buffer
    before = c.available_pages()
    c.free(f)
    c.free(g)
    assert c.available_pages() - before == 1 * 2  # as freeable_pages([f, g]) said
    with pytest.raises(ValueError, match="slot"):
        c.freeable_pages([f])  # not active
    assert c.step_pages({s: 200}) == (7 - 4) * 2 and c.step_pages({s: 100}) == 0
    c.close()
    p = PagedKVCache(1, 1, 32, num_blocks=8, max_batch_size=3, max_seq_len=256, page_size=32, dtype=torch.float32,
                     device="cpu")  # fmt: skip
    s = p.alloc()
    p.commit(s, 100)
    f = p.fork(s, 70)
    assert p.freeable_pages([s]) == 2 and p.freeable_pages([f]) == 1 and p.freeable_pages([s, f]) == 5
