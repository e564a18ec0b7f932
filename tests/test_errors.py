"""Errors that say what was expected and what was given, and objects that refuse to be copied.

Covers the cases of issue 8 item 6 for KVCache and PagePool: a CUDA device
without CUDA, a reservation past the address space, out-of-range counts of
any integer type (reported with their true value), copy/deepcopy/pickle, and
reprs that read no K/V memory.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from torch_vkv import KVCache, PagePool, PagedKVCache

from _subprocess import run_script as run_python

PAGE = 16 << 10


def small_cache(**kw) -> KVCache:
    args = dict(max_batch_size=4, max_seq_len=300, dtype=torch.float32, device="cpu", page_size=PAGE)
    args.update(kw)
    return KVCache(2, 2, 8, **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_device_without_cuda_is_a_value_error(device):
    with pytest.raises(ValueError, match=r"device: expected 'cpu' \((this torch is built without CUDA|no CUDA GPU)"):
        small_cache(device=device)
    with pytest.raises(ValueError, match="device: expected 'cpu'"):
        PagePool(device)
    with pytest.raises(ValueError, match="device: expected 'cpu'"):
        PagedKVCache(1, 1, 8, num_blocks=4, max_batch_size=1, max_seq_len=16, device=device)


def test_reservation_past_the_address_space_is_a_value_error():
    with pytest.raises(ValueError, match=r"max_seq_len: expected at most \d+ tokens per slot .* 128 TiB address space"):
        small_cache(max_seq_len=2**62)
    # Just over the limit, for the interleaved layout and a large batch, too.
    per_token = 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 heads, head_dim 8, float32
    limit = (1 << 47) // (1024 * per_token)
    with pytest.raises(ValueError, match=f"expected at most {limit} tokens per slot with max_batch_size=1024"):
        small_cache(max_batch_size=1024, max_seq_len=limit + 1, layout="interleaved")


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_huge_num_layers_is_a_value_error_not_a_memory_error(sliding_window):
    # The per-layer window list was built before the size check: an empty MemoryError.
    with pytest.raises(ValueError, match=r"max_seq_len: expected at most 1 tokens per slot .* address space"):
        KVCache(2**40, 2, 8, max_batch_size=1, max_seq_len=16, dtype=torch.float32, device="cpu",
                page_size=4096, sliding_window=sliding_window)


@pytest.mark.parametrize(
    "seq_lens, message",
    [
        ([2**70, 0, 0, 0], r"seq_lens\[0\]: expected an int <= 300, got 1180591620717411303424"),
        (np.array([0, 2**64 - 1, 0, 0], dtype=np.uint64), r"seq_lens\[1\]: expected an int <= 300, got 18446744073709551615"),
        ({0: np.uint64(2**64 - 1)}, r"seq_lens\[0\]: expected an int <= 300, got np.uint64\(18446744073709551615\)|got 18446744073709551615"),
        ({1: 2**70}, r"seq_lens\[1\]: expected an int <= 300, got 1180591620717411303424"),
        ([0, 0, -1, 0], r"seq_lens\[2\]: expected an int >= 0, got -1"),
        (np.array([0, 0, 0, 301], dtype=np.int32), r"seq_lens\[3\]: expected an int <= 300, got 301"),
        ({7: 1}, r"slot: expected an int <= 3, got 7"),
        ({np.int64(-1): 1}, r"slot: expected an int >= 0, got -1"),
    ],
)
def test_out_of_range_counts_report_their_true_value(seq_lens, message):
    with small_cache() as cache:
        for _ in range(4):
            cache.alloc()
        before = cache.memory_stats()
        for call in (cache.step, cache.step_async, cache.can_step):
            with pytest.raises(ValueError, match=message):
                call(seq_lens)
        assert cache.memory_stats()["used_bytes"] == before["used_bytes"] == 0
        with pytest.raises(ValueError, match=r"num_tokens: expected an int <= 300, got 18446744073709551615"):
            cache.commit(0, np.uint64(2**64 - 1))


@pytest.mark.parametrize(
    "seq_lens, message",
    [
        ([1, True, 0, 0], r"seq_lens\[1\]: expected an int, got True"),
        ([1.0, 0, 0, 0], r"seq_lens\[0\]: expected an int, got 1.0"),
        (np.array([0.5, 0, 0, 0]), r"seq_lens\[0\]: expected an int, got 0.5"),
        ({0: 2.0}, r"seq_lens\[0\]: expected an int, got 2.0"),
        ({"0": 2}, r"slot: expected an int, got '0'"),
        (torch.zeros(4), r"seq_lens: expected a 1-D integer tensor, got 'torch.float32 tensor of shape \(4,\)'"),
        ("1234", r"seq_lens: expected a sequence, a \{slot: num_tokens\} mapping or a 1-D tensor"),
        ([[1, 2], [3, 4], [5, 6], [7, 8]], r"seq_lens\[0\]: expected an int, got \[1, 2\]"),
    ],
)
def test_non_integer_counts_are_type_errors(seq_lens, message):
    with small_cache() as cache:
        for _ in range(4):
            cache.alloc()
        with pytest.raises(TypeError, match=message):
            cache.step(seq_lens)


def test_every_form_of_seq_lens_gives_the_same_commit():
    forms = [
        [0, 120, 0, 7],
        np.array([0, 120, 0, 7]),
        np.array([0, 120, 0, 7], dtype=np.uint16),
        torch.tensor([0, 120, 0, 7], dtype=torch.int32),
        {1: 120, 3: 7},
        {np.int32(1): np.int64(120), 3: np.uint8(7)},
    ]
    results = []
    for seq_lens in forms:
        with small_cache() as cache:
            for _ in range(4):
                cache.alloc()
            cache.step(seq_lens)
            results.append((cache.memory_stats()["used_bytes"], [cache.committed_tokens(s) for s in range(4)]))
    assert all(r == results[0] for r in results), results
    assert results[0][0] == 127 * 2 * 2 * 2 * 8 * 4


@pytest.mark.parametrize("make", [small_cache, lambda: PagePool("cpu", page_size=PAGE)], ids=["KVCache", "PagePool"])
def test_copy_deepcopy_and_pickle_are_refused(make):
    obj = make()
    name = type(obj).__name__
    for how, call in [("copy.copy", copy.copy), ("copy.deepcopy", copy.deepcopy), ("pickle", pickle.dumps)]:
        with pytest.raises(TypeError, match=rf"{how}: expected an object that can be copied, got a {name}"):
            call(obj)
    if isinstance(obj, KVCache):  # the original is untouched and works
        slot = obj.alloc()
        obj.commit(slot, 50)
        obj.key(0)[slot, :50] = 1.0
        assert not obj.closed and bool((obj.key(0)[slot, :50] == 1.0).all())
        obj.close()


def test_repr_reads_no_kv_memory_and_shows_committed_rows():
    # In a subprocess: on the host backend a read of an uncommitted row faults,
    # so a repr that read K/V memory would crash the child, not pytest.
    out = run_python(
        """
        import torch
        from torch_vkv import KVCache, PagePool
        pool = PagePool("cpu", page_size=16384)
        cache = KVCache(2, 2, 8, max_batch_size=12, max_seq_len=300, dtype=torch.float32, device="cpu", pool=pool)
        slots = [cache.alloc() for _ in range(10)]
        cache.commit(slots[0], 100)
        cache.step_async({slots[1]: 5})
        print(repr(cache)); print(str(cache)); print(repr(pool))
        cache.close()
        print(repr(cache))
        """
    )
    open_repr, open_str, pool_repr, closed_repr = out.splitlines()
    assert open_repr == open_str
    assert "max_batch_size=12, max_seq_len=300" in open_repr and "layout='per_layer'" in open_repr
    # used/committed rows of the first 8 active slots (the pages of 16 KiB hold 256 rows), then a count
    assert "rows used/committed by slot={0: 100/256, 1: 5/256, 2: 0/0," in open_repr
    assert open_repr.endswith("7: 0/0, ... (2 more)})")
    assert pool_repr.startswith("PagePool(backend='host', device='cpu', page_size=16384, created_pages=")
    assert "mapped_pages=" in pool_repr
    assert closed_repr.endswith(", closed)")


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="pool: expected a torch_vkv.PagePool or None, got 'cpu'"):
        small_cache(pool="cpu", page_size=None)
    pool = PagePool("cpu", page_size=PAGE)
    with pytest.raises(ValueError, match=f"page_size: expected None or the pool's page size {PAGE}, got 4096"):
        small_cache(pool=pool, page_size=4096)
    with pytest.raises(ValueError, match="memory_budget: expected None when a shared pool is given"):
        small_cache(pool=pool, page_size=None, memory_budget=1 << 20)
    with pytest.raises(ValueError, match="memory_budget: expected an int >= 0, got -1"):
        small_cache(memory_budget=-1)
    with pytest.raises(ValueError, match="prefill_bytes: expected an int >= 0, got -5"):
        PagePool("cpu", page_size=PAGE, prefill_bytes=-5)
    with pytest.raises(TypeError, match="max_bytes: expected an int, got 1.5"):
        PagePool("cpu", page_size=PAGE, max_bytes=1.5)


def test_cuda_in_a_child_forked_after_cuda_init_is_a_runtime_error(monkeypatch):
    """torch's rule, said by us before anything touches CUDA (the real fork runs in test_fork on a GPU)."""
    from torch_vkv.pool import resolve_device

    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(RuntimeError, match=r"CUDA cannot be used in a forked child.*got 'cuda:1'"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_stream_that_is_not_a_cuda_stream_is_a_type_error():
    """``stream=`` of the decommits was ignored on the CPU, whatever it was (a typo passed
    every CPU test), and on CUDA failed with "'str' object has no attribute 'cuda_stream'"."""
    cache = small_cache()
    slot = cache.alloc()
    cache.commit(slot, 10)
    for call in (lambda: cache.decommit(slot, 0, stream="default"), lambda: cache.reclaim(stream=0),
                 lambda: cache.key(0).source.decommit(slot, stream=1.5)):  # fmt: skip
        with pytest.raises(TypeError, match=r"stream: expected None or a torch.cuda.Stream, got "):
            call()
    assert cache.committed_tokens(slot) >= 10  # nothing changed
    assert cache.decommit(slot, 0, stream=None) >= 1
    cache.close()


def test_core_objects_refuse_none_and_sizes_that_wrap():
    """The extension's classes, reachable from public objects (``type(tensor.reservation)``,
    ``type(pool._pool)``), dereferenced a None argument (SIGSEGV), and a reservation of 2**64 - 1 bytes
    rounded up to 0 pages. In a child: a regression is a failed test."""
    out = run_python("""
        import torch
        from torch_vkv import PagePool, VirtualKVTensor
        from torch_vkv._ext import core
        C = core()
        pool = PagePool("cpu", page_size=64 << 10)
        t = VirtualKVTensor.empty((4, 1024, 2, 8), dtype=torch.float32, pool=pool)
        Reservation = type(t.reservation)
        cases = [
            (TypeError, "pool: expected an object, got None", lambda: Reservation.create(None, 100)),
            (TypeError, "backend: expected an object, got None", lambda: type(pool._pool)(None, 10)),
            (TypeError, "reservation: expected an object, got None", lambda: C.Committer().submit([(None, 0, 1)])),
            (TypeError, "backend: expected an object, got None", lambda: C.allocator_reserve(None, 100)),
            (TypeError, "Reservation.dlpack: self: expected an object", lambda: Reservation.dlpack(None)),
            (TypeError, "SlotTable.arrays: self: expected an object", lambda: C.SlotTable.arrays.fget(None)),
            (ValueError, "expected at most", lambda: Reservation.create(pool._pool, 2**64 - 1)),
            (ValueError, "expected a size of at most", lambda: C.allocator_reserve(C.host_backend(65536), 2**64 - 1)),
        ]
        for exc, text, call in cases:
            try:
                call()
            except exc as e:
                assert text in str(e), (text, str(e))
            else:
                raise AssertionError(f"no {exc.__name__}: {text}")
        print("ok")
    """)
    assert out.strip() == "ok", out


def _huge_and_odd_arguments():
    from torch_vkv import VirtualKVTensor, paged_from_dense
    from torch_vkv.attention import available_backends, metadata_tensor
    from torch_vkv.hf import batch_ops

    k = torch.zeros(2, 4, 1, 8)
    return {  # each reached pybind11's "incompatible function arguments" or a bare error from deep inside
        "margin_tokens past 2**62": (lambda: small_cache(margin_tokens=2**63), ValueError, r"margin_tokens: expected an int <="),
        "host page_size 2**64": (lambda: PagePool("cpu", page_size=2**64), ValueError, r"page_size: expected an int <="),
        "pool given as a string": (lambda: VirtualKVTensor.empty((2,), dtype=torch.float32, pool="x"), TypeError,
                                   r"pool: expected a torch_vkv.PagePool or None"),
        "block_size 0": (lambda: paged_from_dense(k, k, [1, 1], block_size=0), ValueError, r"block_size: expected an int >= 1"),
        "load_dense lengths not a sequence": (lambda: PagedKVCache(1, 1, 8, num_blocks=4, max_batch_size=2, max_seq_len=8,
                                                                   dtype=torch.float32, device="cpu").load_dense(0, k, k, 5),
                                              ValueError, r"lengths/slots: expected sequences of ints"),
        "seq_lens on the meta device": (lambda: small_cache().step(torch.zeros(2, dtype=torch.int64, device="meta")),
                                        ValueError, r"seq_lens: expected a tensor with values"),
        "beam_idx None": (lambda: batch_ops.row_index("beam_idx", None, 4, allow_mask=False), TypeError,
                          r"beam_idx: expected a 1-D tensor or sequence of integer row indices, got a NoneType"),
        "indices a slice": (lambda: batch_ops.row_index("indices", slice(0, 2), 4, allow_mask=True), TypeError,
                            r"indices: expected .* or a bool mask, got a slice"),
        "available_backends of a bad device": (lambda: available_backends("tpu"), ValueError,
                                               r"available_backends: expected a device such as"),
        "metadata past int32": (lambda: metadata_tensor([2**40]), ValueError, r"metadata_tensor: expected values that fit torch.int32"),
        "no slot fits": (lambda: KVCache(1, 1, 1, max_batch_size=10**8, max_seq_len=1, device="cpu"), ValueError,
                         r"max_batch_size: expected at most \d+ slots"),
    }


@pytest.mark.parametrize("case", sorted(_huge_and_odd_arguments()))
def test_huge_and_odd_arguments_get_errors_naming_them(case):
    call, exc, match = _huge_and_odd_arguments()[case]
    with pytest.raises(exc, match=match):
        call()


def test_budgets_past_the_address_space_mean_no_budget():
    """``memory_budget`` / ``set_max_bytes`` / ``trim`` of 2**200 bytes reached pybind11 as ints it could not
    take; a budget larger than any machine is no budget."""
    cache = small_cache(memory_budget=2**200)
    pool = PagePool("cpu", page_size=1 << 16)
    pool.set_max_bytes(2**200)
    assert pool.max_pages == cache.pool.max_pages == 1 << 62
    assert pool.trim(2**200) == 0
    cache.close()
