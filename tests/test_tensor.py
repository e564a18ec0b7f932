"""VirtualKVTensor: ranges of leading dimensions, plain results, subclass hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_vkv import PagePool, VirtualKVTensor

from conftest import small_page


def test_commit_by_leading_ranges_and_query(device):
    t = VirtualKVTensor.empty((4, 4096, 2, 32), dtype=torch.float16, device=device, page_size=small_page(device))
    row = t.stride(0) * t.element_size()
    assert t.shape == (4, 4096, 2, 32) and t.data_ptr() % t.page_size == 0
    assert t.committed_bytes() == 0 and not t.is_committed(0, slice(0, 1))
    t.commit(2, slice(0, 100))
    assert t.is_committed(2, slice(0, 100))
    if row >= t.page_size:  # on 2 MiB pages all four 512 KiB rows share one page
        assert not t.is_committed(3)
    assert t.byte_range(2, slice(0, 100)) == (2 * row, 2 * row + 100 * 2 * 32 * 2)
    x = torch.randn(100, 2, 32, dtype=torch.float16, device=t.device)
    t[2, :100] = x
    assert torch.equal(t[2, :100], x)
    t.commit(1)  # a whole leading index
    assert t.is_committed(1)
    t[1].normal_()
    t.decommit(1, stream=None)
    if device == "cuda":
        torch.cuda.synchronize()
    t.pool.reap()
    if row % t.page_size == 0:  # rows own whole pages: row 1's pages are gone
        assert not t.is_committed(1, slice(0, 1))
        assert [off // row for off, _ in t.committed_ranges()] == [2]
    else:  # 2 MiB pages hold 4 rows: a page partly outside the range stays
        assert t.is_committed(1) and t.committed_ranges() == [(0, t.page_size)]
    assert torch.equal(t[2, :100], x)  # other rows untouched


def test_negative_leading_indices_count_from_the_end():
    """``t.commit(-1)`` is the last row, as ``t[-1]`` and ``t.commit(slice(-1, None))`` are; past ``-len``
    a ValueError names the range."""
    t = VirtualKVTensor.empty((4, 1024), dtype=torch.float32, device="cpu", page_size=4096)
    assert t.byte_range(-1) == t.byte_range(3) == t.byte_range(slice(-1, None))
    assert t.byte_range(-4, slice(0, 8)) == t.byte_range(0, slice(0, 8))
    t.commit(-1)
    assert t.is_committed(3) and not t.is_committed(2) and t.is_committed(-1)
    t[-1] = 2.0
    assert t[3].eq(2).all()
    assert t.decommit(-1) == 1 and not t.is_committed(3)
    for bad in (4, -5):
        with pytest.raises(ValueError, match=r"index\[0\]: expected an int in \[-4, 4\), got " + str(bad)):
            t.commit(bad)


def test_operations_return_plain_tensors_and_compile(device):
    t = VirtualKVTensor.empty((2, 64, 4), dtype=torch.float32, device=device, page_size=small_page(device))
    t.commit(0)
    t[0].copy_(torch.randn(64, 4))
    for out in (t[0], t + 1, t[0].sum(), t.view(-1)[:3], torch.nn.functional.relu(t[0])):
        assert type(out) is torch.Tensor
    assert isinstance(t, VirtualKVTensor) and isinstance(t, torch.Tensor)

    @torch.compile(fullgraph=True, backend="eager")
    def f(k):
        return (k * 2).sum(dim=-1)

    view = t[0]
    assert torch.allclose(f(view), (view * 2).sum(dim=-1))


def test_subclass_hooks_see_every_commit():
    class CountingTensor(VirtualKVTensor):
        def _commit_pages(self, first, count):
            self.log.append(("commit", first, count))
            return super()._commit_pages(first, count)

        def _decommit_pages(self, first, count, stream):
            self.log.append(("decommit", first, count))
            return super()._decommit_pages(first, count, stream)

    t = CountingTensor.empty((8, 1024), dtype=torch.uint8, device="cpu", page_size=4096)
    t.log = []
    assert isinstance(t, CountingTensor)
    t.commit(slice(0, 8))
    t.decommit(slice(4, 8))
    assert t.log == [("commit", 0, 2), ("decommit", 1, 1)]


def test_bad_arguments():
    pool = PagePool("cpu", page_size=4096)
    with pytest.raises(ValueError, match=r"shape\[0\]: expected an int >= 1, got 0"):
        VirtualKVTensor.empty((0, 4), dtype=torch.float16, pool=pool)
    # Sizes were passed through int(): 2.5 became 2 silently, and a shape past 2**64 bytes reached
    # the C++ as a pybind11 "incompatible function arguments" TypeError.
    with pytest.raises(TypeError, match=r"shape\[0\]: expected an int, got 2.5"):
        VirtualKVTensor.empty((2.5, 4), dtype=torch.float16, pool=pool)
    with pytest.raises(TypeError, match="shape: expected a non-empty sequence of positive ints, got 5"):
        VirtualKVTensor.empty(5, dtype=torch.float16, pool=pool)
    for huge in ((1 << 40, 1 << 40), (1 << 47,)):
        with pytest.raises(ValueError, match="shape: expected at most 140737488355328 bytes"):
            VirtualKVTensor.empty(huge, dtype=torch.float16, pool=pool)
    with pytest.raises(TypeError, match="dtype"):
        VirtualKVTensor.empty((4, 4), dtype="float16", pool=pool)
    with pytest.raises(ValueError, match="None when a pool is given"):
        VirtualKVTensor.empty((4, 4), dtype=torch.float16, pool=pool, device="cpu")
    t = VirtualKVTensor.empty((4, 4), dtype=torch.float16, pool=pool)
    with pytest.raises(ValueError, match="contiguous range"):
        t.commit(slice(0, 2), slice(0, 2))
    with pytest.raises(ValueError, match="at most 2 leading indices"):
        t.commit(0, 0, 0)
    with pytest.raises(TypeError, match="ints and an optional final slice"):
        t.commit(0.5)


def test_leading_indices_take_numpy_ints_and_name_bad_slice_bounds():
    """A NumPy int is an index like a Python int (it was refused as "expected ints ...,
    got (np.int64(1),)"), and a slice of floats is refused in the library's words (it was
    Python's own "slice indices must be integers" from slice.indices)."""
    pool = PagePool("cpu", page_size=4096)
    t = VirtualKVTensor.empty((4, 64, 8), dtype=torch.float32, pool=pool)  # 2 rows per page
    assert t.commit(np.int64(3)) == 1 and t.is_committed(np.int32(2))
    assert t.byte_range(np.int64(1), slice(np.int64(2), np.int64(5))) == t.byte_range(1, slice(2, 5))
    assert t.decommit(np.int64(2)) == 0 and t.decommit(np.int64(2), slice(0, 64)) == 0  # half a page
    with pytest.raises(TypeError, match=r"index: expected a slice of ints or None, got slice\(0.0, 3, None\)"):
        t.commit(2, slice(0.0, 3))
    with pytest.raises(TypeError, match="ints and an optional final slice"):
        t.commit(np.float64(1.0))
    with pytest.raises(TypeError, match="ints and an optional final slice"):
        t.commit(np.bool_(True))
    t.close()


def test_release_keeps_the_tensor_usable_close_is_final():
    t = VirtualKVTensor.empty((4, 1024), dtype=torch.uint8, device="cpu", page_size=4096)
    assert not t.forked and not t.closed
    assert t.commit(0, slice(0, 1024)) == 1
    t.release()
    assert t.committed_bytes() == 0
    assert t.commit(1) == 1  # release() is not the end
    t.close()
    assert t.closed and t.committed_bytes() == 0 and t.pool.stats()["mapped_pages"] == 0
    with pytest.raises(ValueError, match="closed"):
        t.commit(0)
    t.close()  # idempotent
    assert repr(t).endswith("<released>)")


def test_writes_into_uncommitted_pages_raise_instead_of_faulting():
    """A write through a VirtualKVTensor into a page that is not committed was a
    SIGSEGV on the host backend (``t[1] = 1``, ``t.fill_``, ``t.copy_``,
    ``t[1] += 1``): it is checked against the page table, as a cache view's."""
    from _subprocess import run_python

    proc = run_python("""
        import numpy as np, pytest, torch
        from torch_vkv import VirtualKVTensor

        t = VirtualKVTensor.empty((4, 1024), dtype=torch.float32, device="cpu", page_size=4096)
        t.commit(0)
        t[0] = 1.0  # committed rows: written as before
        t[0, 5:9] += 1
        t[0].fill_(3)  # through a derived tensor: unchecked, and fine here
        t.index_put_((torch.tensor([0]),), torch.tensor(2.0))
        t.masked_fill_(torch.tensor([True, False, False, False])[:, None], 4.0)
        for write in (lambda: t.__setitem__(1, 1.0), lambda: t.__setitem__((slice(None), 0), 1.0),
                      lambda: t.fill_(1), lambda: t.zero_(), lambda: t.copy_(torch.ones(4, 1024)),
                      lambda: t.add_(1), lambda: t.index_put_((torch.tensor([2]),), torch.tensor(1.0)),
                      lambda: t.masked_fill_(torch.tensor([False, True, False, False])[:, None], 1.0),
                      lambda: t.scatter_(0, torch.tensor([[3]]), torch.ones(1, 1))):
            with pytest.raises(ValueError, match="committed pages"):
                write()
        with pytest.raises(ValueError, match="committed pages"):
            t[2, 0:4] += 1
        assert t[0].sum().item() == 4.0 * 1024 and t[1:].abs().sum().item() == 0

        flat = VirtualKVTensor.empty((4096,), dtype=torch.float32, device="cpu", page_size=4096)
        flat.commit(slice(0, 1024))
        flat[:1024] = 1.0
        flat[np.int64(3)] = 2.0
        with pytest.raises(ValueError, match="committed pages"):
            flat[2000] = 1.0
        with pytest.raises(ValueError, match="committed pages"):
            flat.fill_(0)
        t.close()
        with pytest.raises(RuntimeError, match="closed"):
            t[0] = 5.0  # as through a view of a closed cache (strict mode and CUDA would fault)
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_compiled_code_writes_the_cache_through_append_kv():
    """docs/design.md: under torch.compile two writes through a view in one graph
    (or ``k[s, rows] += x``) make inductor copy the whole buffer back (SIGSEGV on
    uncommitted pages); append_kv, the documented way, writes only its rows."""
    from _subprocess import run_python

    proc = run_python("""
        import torch
        from torch_vkv import KVCache, append_kv

        cache = KVCache(1, 2, 8, max_batch_size=4, max_seq_len=1024, dtype=torch.float32, device="cpu",
                        page_size=4096)
        slot = cache.alloc()
        cache.commit(slot, 10)
        k, v = cache.key(0), cache.value(0)
        slots = torch.tensor([slot], dtype=torch.int32)
        cu = torch.tensor([0, 4], dtype=torch.int32)

        @torch.compile
        def write(k, v, x):
            append_kv(k, v, x, x, torch.tensor([4], dtype=torch.int32), cu_seqlens_q=cu, slots=slots)
            append_kv(k, v, x + 1, x + 1, torch.tensor([8], dtype=torch.int32), cu_seqlens_q=cu, slots=slots)

        write(k, v, torch.ones(4, 2, 8))
        assert k[slot, :4].eq(1).all() and v[slot, 4:8].eq(2).all() and k[slot, 8:].eq(0).all()
        print("ok")
    """, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_writes_are_checked_after_an_in_place_change_of_strides_or_offset():
    """``transpose_``/``as_strided_`` on a VirtualKVTensor (its own, so allowed) changed the strides or the
    storage offset under the write check and the page ranges, which assumed the layout ``empty`` made: a
    write into committed-looking places faulted (SIGSEGV) and ``is_committed`` answered for other bytes."""
    from _subprocess import check_scenario

    check_scenario("""
        import pytest, torch
        from torch_vkv import VirtualKVTensor

        # [2, 4, 1024] float32 on 4 KiB pages: t[i, j] is page 4 * i + j
        t = VirtualKVTensor.empty((2, 4, 1024), dtype=torch.float32, device="cpu", page_size=4096)
        t.commit(0, slice(0, 1))
        t[0, 0] = 2.0
        t.transpose_(1, 2)  # [2, 1024, 4]: t[0, 0] spans pages 0..3, only page 0 committed
        with pytest.raises(ValueError, match="committed pages"):
            t[0, 0] = 1.0
        with pytest.raises(ValueError, match="committed pages"):
            t[0, 0:2] += 1
        assert t[0, :, 0].eq(2).all() and t[0, :, 1:].abs().sum() == 0
        with pytest.raises(ValueError, match="contiguous"):
            t.commit(0, slice(0, 1))  # rows of the transposed tensor are no byte range
        with pytest.raises(ValueError, match="contiguous"):
            t.is_committed(0)
        t.transpose_(1, 2)
        assert t[0, 0].eq(2).all() and t.is_committed(0, slice(0, 1)) and not t.is_committed(0, slice(0, 2))

        u = VirtualKVTensor.empty((4, 1024), dtype=torch.float32, device="cpu", page_size=4096)
        u.commit(0)
        u.as_strided_((3, 1024), (1024, 1), 1024)  # u[i] is page i + 1
        assert not u.is_committed(0) and u.byte_range(0) == (4096, 8192)
        with pytest.raises(ValueError, match="committed pages"):
            u[0] = 1.0
        with pytest.raises(ValueError, match="committed pages"):
            u.fill_(1.0)
        u.commit(0)
        u[0] = 3.0
        assert u.is_committed(0) and u.reservation.committed_ranges() == [(0, 2)]
        assert u[0].eq(3).all()
        # a size-1 dimension with any stride is still contiguous: its extent is its size, not its stride
        w = VirtualKVTensor.empty((2048,), dtype=torch.float32, device="cpu", page_size=4096)
        w.as_strided_((1, 2048), (1, 1))
        assert w.byte_range(0) == (0, 8192)
        w.commit(0)
        assert w.is_committed(0) and w.reservation.committed_ranges() == [(0, 2)]
        w[0] = 1.0
    """)


def test_write_checks_of_a_large_tensor_cost_no_memory_per_element():
    """The write check listed every leading index in Python: ``t.zero_()`` of a 1-D tensor of 10**7 bytes
    took seconds and about 1 GB (one of 10**10 bytes would be killed for memory). Ranges stay ranges."""
    from _subprocess import check_scenario

    check_scenario("""
        import resource, time, pytest, torch
        from torch_vkv import VirtualKVTensor

        n = 10**7
        t = VirtualKVTensor.empty((n,), dtype=torch.uint8, device="cpu", page_size=4096)
        t.commit(slice(0, n - 8192))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        t[: n - 8192] = 1
        t[: n - 8192] += 1
        t[0 : n - 8192 : 3] = 2
        t[::4096][:-3].fill_(0)  # through a derived tensor: unchecked
        for write in (lambda: t.zero_(), lambda: t.__setitem__(slice(None), 1),
                      lambda: t.__setitem__(slice(None, None, 4096), 1), lambda: t.add_(1)):
            with pytest.raises(ValueError, match="committed pages"):
                write()
        elapsed = time.perf_counter() - start
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert elapsed < 2.0 and grown_mb < 50, (elapsed, grown_mb)
        assert int(t[: n - 8192].sum()) > 0 and t[n - 8192 :].abs().sum() == 0
    """)


def test_writes_after_set_are_checked_against_the_memory_now_viewed():
    """``t.set_(storage)`` re-points a VirtualKVTensor (its own, so allowed): the write check still read its
    old reservation, so a write into another cache's uncommitted page passed and faulted (SIGSEGV), and a
    write into plain memory was refused. Page operations now refuse such a tensor."""
    from _subprocess import check_scenario

    check_scenario("""
        import pytest, torch
        from torch_vkv import VirtualKVTensor
        from torch_vkv.tensor import cache_source

        def make():
            return VirtualKVTensor.empty((4, 1024), dtype=torch.float32, device="cpu", page_size=4096)

        t, other = make(), make()
        t.commit(slice(0, 4))
        other.commit(0)
        rows = t[1:]  # over t's reservation, kept past the set_
        t.set_(other.untyped_storage(), 0, (4, 1024))  # now over other's memory: only its row 0 committed
        source = cache_source(rows)  # t's reservation without t: remade from the storage's record
        assert source is not t and source.reservation is t.reservation and source.is_committed(3)
        t[0] = 1.0
        assert other[0].eq(1).all()
        with pytest.raises(ValueError, match="committed pages"):
            t[2] = 1.0
        with pytest.raises(ValueError, match="committed pages"):
            t.fill_(2.0)
        for page_op in (lambda: t.commit(2), lambda: t.is_committed(0), lambda: t.decommit(0)):
            with pytest.raises(ValueError, match="storage"):
                page_op()
        other.close()
        with pytest.raises(RuntimeError, match="closed"):
            t[0] = 1.0

        plain = make()
        plain.set_(torch.zeros(8))  # plain memory of its own: no page table to check
        plain[3] = 1.0
        plain.fill_(2.0)
        assert plain.eq(2).all()
    """)


def test_a_page_table_larger_than_a_quarter_of_the_memory_is_refused_before_it_is_built():
    """16 bytes of host page table a page: 100 TiB of 4 KiB host pages (inside the 128 TiB address space)
    would need 430 GB; filling it got the process killed by the kernel's OOM killer. It is a ValueError
    naming the page table, in a KVCache as for a tensor, and the next reservation works."""
    import os

    from torch_vkv import KVCache

    table = (100 << 40) // 4096 * 16
    if table <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4:
        pytest.skip("this machine's memory is large enough that a quarter of it holds a 430 GB page table")
    with pytest.raises(ValueError, match=r"expected a page table \(16 bytes a page: 429496729600 bytes"):
        VirtualKVTensor.empty((100 << 40,), dtype=torch.uint8, device="cpu", page_size=4096)
    with pytest.raises(ValueError, match="page table"):  # 8 buffers of 12.5 TiB each
        KVCache(4, 8, 128, max_batch_size=64, max_seq_len=50_000_000, dtype=torch.float32, device="cpu",
                page_size=4096)  # fmt: skip
    t = VirtualKVTensor.empty((4, 1024), dtype=torch.float32, device="cpu", page_size=4096)
    t.commit(0)
    t[0] = 1.0
    assert t[0].sum().item() == 1024.0


def test_a_commit_past_the_kernels_limit_of_memory_mappings_is_out_of_pages():
    """On the host backend each committed run is a memory mapping, and the kernel allows a process about
    65,530 (vm.max_map_count). A commit past that raised a plain RuntimeError (a driver error), which a
    scheduler cannot act on; it is OutOfPagesError, as CUDA's out-of-memory from cuMemMap is, and nothing
    changed: once mappings are freed the same commit succeeds and the committed data is intact."""
    from _subprocess import check_scenario

    check_scenario("""
import ctypes
import torch
from torch_vkv import OutOfPagesError, VirtualKVTensor

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
t = VirtualKVTensor.empty((64, 1024), dtype=torch.float32, device="cpu", page_size=4096)
t.commit(slice(0, 8))
x = torch.randn(8, 1024)
t[0:8] = x
fillers = []  # one-page mappings of alternating protection (never merged) until the kernel refuses one
while True:
    a = libc.mmap(None, 4096, 1 if len(fillers) % 2 else 0, 0x22, -1, 0)  # MAP_PRIVATE | MAP_ANONYMOUS
    if a in (None, ctypes.c_void_p(-1).value):
        break
    fillers.append(a)
assert len(fillers) > 1000, len(fillers)
try:
    t.commit(40)  # inside the unbacked range: splits its mapping in three
except OutOfPagesError as e:
    assert "max_map_count" in str(e), e
else:
    raise AssertionError("the commit past the limit succeeded")
for a in fillers:
    libc.munmap(a, 4096)
assert not t.is_committed(40) and t.is_committed(slice(0, 8))
assert torch.equal(t[0:8], x)
t.commit(40)
t[40] = 1.0
assert t[40].sum().item() == 1024.0
""")
