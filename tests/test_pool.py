"""Reservations and the page pool (the C++ core), on the host backend and on CUDA."""

from __future__ import annotations

import pytest
import torch

import torch_vkv
from torch_vkv import PagePool, VirtualKVTensor
from torch_vkv._ext import core

from conftest import small_page


def _pool(device: str, max_pages: int = 64) -> PagePool:
    pool = PagePool(device, page_size=small_page(device))
    pool.set_max_bytes(max_pages * pool.page_size)
    return pool


def _settle(device: str, pool: PagePool) -> None:
    """On CUDA a decommit waits for the current stream: let it finish and reap."""
    if device == "cuda":
        torch.cuda.synchronize()
    pool.reap()


def _bytes_view(device: str, pool: PagePool, nbytes: int) -> VirtualKVTensor:
    return VirtualKVTensor.empty((nbytes,), dtype=torch.uint8, pool=pool)


def test_commit_decommit_and_query(device):
    pool = _pool(device)
    ps = pool.page_size
    t = _bytes_view(device, pool, 8 * ps)
    res = t.reservation
    assert res.num_pages == 8 and res.num_committed() == 0
    assert res.commit(2, 3) == 3
    assert res.commit(2, 3) == 0  # idempotent
    assert res.committed_ranges() == [(2, 3)]
    assert [res.is_committed(p) for p in range(8)] == [False, False, True, True, True, False, False, False]
    t[2 * ps : 5 * ps].fill_(7)
    assert int(t[2 * ps : 5 * ps].sum()) == 7 * 3 * ps
    assert res.decommit(3, 1, None) == 1
    assert res.committed_ranges() == [(2, 1), (4, 1)]
    assert pool.stats()["mapped_pages"] == 2
    # data on the pages that stayed is intact
    assert int(t[2 * ps : 3 * ps].sum()) == 7 * ps and int(t[4 * ps : 5 * ps].sum()) == 7 * ps


def test_fresh_pages_read_zero_and_recycled_pages_are_reused(device):
    pool = _pool(device)
    ps = pool.page_size
    t = _bytes_view(device, pool, 4 * ps)
    t.commit(slice(0, 2 * ps))
    assert int(t[: 2 * ps].sum()) == 0  # fresh pages are zero-filled
    t[: 2 * ps].fill_(3)
    t.decommit(slice(0, 2 * ps), stream=None)
    # On CUDA the pages return to the pool once the fill before the decommit has run: with the GPU busy
    # (other test workers), a commit right away could find them still fenced and create new ones.
    _settle(device, pool)
    created = pool.stats()["pages_created_total"]
    t.commit(slice(2 * ps, 4 * ps))
    assert pool.stats()["pages_created_total"] == created  # recycled, not re-created
    assert torch.isfinite(t[2 * ps :].float()).all()


def test_alias_maps_one_page_at_two_addresses(device):
    pool = _pool(device)
    ps = pool.page_size
    a = _bytes_view(device, pool, 4 * ps)
    b = _bytes_view(device, pool, 4 * ps)
    a.commit(slice(0, 2 * ps))
    a[: 2 * ps].copy_(torch.arange(2 * ps, device=a.device) % 251)
    assert b.reservation.alias(1, a.reservation, 0, 2) == 2
    assert torch.equal(b[ps : 3 * ps], a[: 2 * ps])
    b[ps : ps + 10].fill_(255)  # a write through one alias is seen through the other
    assert int(a[:10].min()) == 255
    assert pool.stats()["mapped_pages"] == 2  # two pages, four mappings
    with pytest.raises(ValueError, match="already committed"):
        b.reservation.alias(2, a.reservation, 0, 1)
    # decommitting one alias leaves the page alive under the other
    a.decommit(slice(0, 2 * ps), stream=None)
    assert pool.stats()["mapped_pages"] == 2
    assert torch.equal(b[ps + 10 : ps + 20].cpu(), (torch.arange(10, 20) % 251).to(torch.uint8))
    with pytest.raises(ValueError, match="not committed"):
        b.reservation.alias(0, a.reservation, 0, 1)
    b.decommit(stream=None)
    _settle(device, pool)
    assert pool.stats()["mapped_pages"] == 0


def test_out_of_pages_changes_nothing(device):
    pool = _pool(device, max_pages=3)
    ps = pool.page_size
    t = _bytes_view(device, pool, 8 * ps)
    t.commit(slice(0, ps))
    t[:ps].fill_(9)
    before = pool.stats()
    with pytest.raises(torch_vkv.OutOfPagesError, match="needs 3 new page") as info:
        t.reservation.commit(1, 3)
    assert info.value.requested_pages == 3 and info.value.available_pages == 2
    after = pool.stats()
    assert after["mapped_pages"] == before["mapped_pages"] == 1
    assert t.reservation.committed_ranges() == [(0, 1)]
    assert int(t[:ps].sum()) == 9 * ps


def test_pool_prefill_shrink_and_trim(device):
    pool = _pool(device, max_pages=8)
    assert pool.prefill(4 * pool.page_size) == 4
    s = pool.stats()
    assert s["created_pages"] == 4 and s["free_pages"] == 4
    t = _bytes_view(device, pool, 6 * pool.page_size)
    t.commit(slice(0, 2 * pool.page_size))
    pool.set_max_bytes(3 * pool.page_size)  # shrink below what exists: free pages go
    s = pool.stats()
    assert s["created_pages"] == 3 and s["mapped_pages"] == 2 and s["free_pages"] == 1
    with pytest.raises(torch_vkv.OutOfPagesError):
        t.reservation.commit(2, 2)
    t.decommit(stream=None)
    _settle(device, pool)
    assert pool.trim() == 3
    assert pool.stats()["created_pages"] == 0


def test_host_prefill_past_the_machines_memory_raises_at_once():
    """Host pages are sparse memfd memory that no call fails to create: a prefill without a
    budget (``PagePool("cpu", prefill_bytes=2**70)``) looped for ages with the GIL released,
    growing its bookkeeping until the OOM killer came. The host backend holds at most the
    machine's memory and swap: past it, OutOfPagesError at once, nothing created."""
    from _subprocess import check_scenario

    check_scenario("""
import time
import torch_vkv
from torch_vkv import PagePool
pool = PagePool("cpu", page_size=4096)
start = time.monotonic()
for call in (lambda: pool.prefill(2**70), lambda: PagePool("cpu", prefill_bytes=2**62)):
    try:
        call()
    except torch_vkv.OutOfPagesError as e:
        assert "memory and swap" in str(e) and "nothing was created" in str(e), e
    else:
        raise AssertionError("no OutOfPagesError")
assert time.monotonic() - start < 10
assert pool.stats()["created_pages"] == 0
assert pool.prefill(8 * 4096) == 8   # a prefill within the machine's memory still works
""", timeout=60)


def test_host_page_larger_than_the_machines_memory_is_refused_at_construction():
    """A host page that RAM + swap could never back was accepted (``PagePool("cpu",
    page_size=2**62)``) and only the first cache on the pool refused it: now the
    pool and a cache refuse it at construction, naming the limit and the value."""
    from torch_vkv import KVCache

    for make in (lambda ps: PagePool("cpu", page_size=ps),
                 lambda ps: KVCache(2, 2, 8, max_batch_size=1, max_seq_len=64, dtype=torch.float32, device="cpu", page_size=ps)):  # fmt: skip
        for ps in (2**62, 2**50):
            with pytest.raises(ValueError, match=rf"at most the machine's memory \(RAM \+ swap, \d+ bytes\), got {ps}"):
                make(ps)
    assert PagePool("cpu", page_size=1 << 20).page_size == 1 << 20  # an ordinary page still works


def test_ordered_decommit_waits_for_its_fence():
    """CPU twin of the GPU ordering rule: pages decommitted behind an
    unfinished fence stay mapped (readable) until the fence completes."""
    pool = _pool("cpu", max_pages=2)
    ps = pool.page_size
    t = _bytes_view("cpu", pool, 4 * ps)
    C = core()
    t.commit(slice(0, 2 * ps))
    t[: 2 * ps].fill_(5)
    C.hold_fences(pool._backend, True)
    try:
        t.reservation.decommit(0, 2, 1234)  # any stream value: the host fence is held
        s = pool.stats()
        assert s["pending_pages"] == 2 and s["mapped_pages"] == 2
        assert not t.reservation.is_committed(0)
        assert int(t[: 2 * ps].sum()) == 5 * 2 * ps  # a "kernel" still reading sees its data
        # recommitting a pending page revives it, data and all
        assert t.reservation.commit(0, 1) == 1
        assert int(t[:ps].sum()) == 5 * ps
        # a commit that needs the pending page waits for (here: releases) the fence
        t.reservation.commit(2, 1)
        assert pool.stats()["pending_pages"] == 0
    finally:
        C.hold_fences(pool._backend, False)


def test_allocator_registry_on_host():
    """The pluggable allocator's logic (reserve, adopt, free) on the host backend."""
    C = core()
    pool = _pool("cpu")
    n0 = C.allocator_num_regions()
    addr = C.allocator_reserve(pool._backend, 3 * pool.page_size + 1)
    assert C.allocator_num_regions() == n0 + 1
    res = C.Reservation.adopt(pool._pool, addr)
    assert res.num_pages == 4 and res.base == addr
    res.commit(0, 2)
    with pytest.raises(ValueError, match="already adopted"):
        C.Reservation.adopt(pool._pool, addr)
    assert C.allocator_release(addr)  # frees the pages of the adopting reservation first
    assert pool.stats()["mapped_pages"] == 0 and res.num_committed() == 0
    assert not C.allocator_release(addr)
    with pytest.raises(ValueError, match="not returned by vkv_alloc"):
        C.Reservation.adopt(pool._pool, addr)


def test_bad_ranges_raise_value_error(device):
    pool = _pool(device)
    t = _bytes_view(device, pool, 4 * pool.page_size)
    with pytest.raises(ValueError, match="outside the reservation"):
        t.reservation.commit(t.reservation.num_pages - 1, 2)
    with pytest.raises(ValueError, match="step 1"):
        t.commit(slice(0, 10, 2))
    with pytest.raises(ValueError, match=r"index\[0\]"):
        t.commit(10 * pool.page_size)
    with pytest.raises(ValueError, match="host page_size"):
        PagePool("cpu", page_size=1000)
