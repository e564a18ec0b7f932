"""PyTorch's whole-storage paths (``share_memory_``, ``torch.multiprocessing``, pickle, ``torch.save``,
``copy.deepcopy``) refuse tensors over a cache's memory (torch_vkv/_sharing.py), and only those."""

from __future__ import annotations

import copy
import io
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from torch_vkv import KVCache


@pytest.fixture
def cache():
    c = KVCache(1, 2, 8, max_batch_size=2, max_seq_len=1024, dtype=torch.float32, device="cpu", page_size=4096)
    yield c
    c.close()


def _whole_storage_paths():
    return {
        "share_memory_()": lambda t: t.share_memory_(),
        "pickle": lambda t: pickle.dumps(t),
        "torch.save": lambda t: torch.save(t, io.BytesIO()),
        "copy.deepcopy": lambda t: copy.deepcopy(t),
        "torch.multiprocessing": lambda t: ForkingPickler.dumps(t),
    }


@pytest.mark.parametrize("path", sorted(_whole_storage_paths()))
@pytest.mark.parametrize("form", ["slice", "as_subclass", "view"])
def test_tensors_over_a_cache_refuse_whole_storage_paths(cache, path, form):
    s = cache.alloc()
    cache.commit(s, 8)
    k = cache.key(0)
    k[s, :8] = torch.arange(8 * 16, dtype=torch.float32).view(8, 2, 8)
    t = {"slice": lambda: k[s, :8], "as_subclass": lambda: k.as_subclass(torch.Tensor), "view": lambda: k}[form]()
    with pytest.raises(TypeError, match="clone"):
        _whole_storage_paths()[path](t)
    # Nothing moved: the cache's views still see the cache (a fork of the slot reads the same rows).
    s2 = cache.fork(s, 8)
    assert torch.equal(k[s2, :8], k[s, :8]) and float(k[s, 7, 1, 7]) == 127.0
    assert k.untyped_storage().data_ptr() == cache.key(0).source.untyped_storage().data_ptr()


@pytest.mark.parametrize("path", sorted(_whole_storage_paths()))
def test_clones_and_other_tensors_take_torchs_own_paths(cache, path):
    s = cache.alloc()
    cache.commit(s, 4)
    cache.key(0)[s, :4] = 1.5
    for t in (cache.key(0)[s, :4].clone(), torch.randn(3, 4), torch.nn.Parameter(torch.randn(2))):
        out = _whole_storage_paths()[path](t)
        if path == "pickle":
            assert torch.equal(pickle.loads(out), t)
        elif path == "copy.deepcopy":
            assert torch.equal(out, t) and out.data_ptr() != t.data_ptr()


def _storage_paths():
    return {
        "fill_": lambda st: st.fill_(0),  # faulted (SIGSEGV): it writes every byte of the reservation
        "copy_": lambda st: st.copy_(torch.zeros(st.nbytes(), dtype=torch.uint8).untyped_storage()),
        "resize_": lambda st: st.resize_(16),  # would swap the memory under every view
        "share_memory_": lambda st: st.share_memory_(),
        "pickle": lambda st: pickle.dumps(st),
        "copy.deepcopy": lambda st: copy.deepcopy(st),
        "copy.copy": lambda st: copy.copy(st),
        "clone": lambda st: st.clone(),
        "torch.multiprocessing": lambda st: ForkingPickler.dumps(st),  # moved the reservation to shared memory
        "copy_ by keyword": lambda st: st.copy_(src=torch.zeros(st.nbytes(), dtype=torch.uint8).untyped_storage()),
    }


@pytest.mark.parametrize("path", sorted(_storage_paths()))
@pytest.mark.parametrize("form", ["untyped", "typed", "of a slice"])
def test_the_storage_of_a_cache_refuses_whole_storage_writes_and_copies(cache, path, form):
    """``view.untyped_storage()`` is the whole reservation: writing, resizing, sharing or copying it
    raises TypeError and changes nothing; other storages work as before."""
    import warnings

    s = cache.alloc()
    cache.commit(s, 8)
    k = cache.key(0)
    k[s, :8] = 2.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated
        storage = {"untyped": lambda: k.untyped_storage(), "typed": lambda: k.storage(),
                   "of a slice": lambda: k[s, :4].untyped_storage()}[form]()  # fmt: skip
        with pytest.raises(TypeError, match="storage of a torch_vkv cache"):
            _storage_paths()[path](storage)
        assert float(k[s, :8].sum()) == 2.5 * 8 * 16 and k.untyped_storage().data_ptr() == k.data_ptr() - (
            k.storage_offset() * k.element_size())
        other = torch.full((8,), 3.0)
        _storage_paths()[path](other.untyped_storage())  # a storage of its own: PyTorch's path
        if path == "copy_ by keyword":
            assert float(other.sum()) == 0.0  # copied (the keyword reached PyTorch's copy_)


@pytest.mark.cuda
def test_cuda_tensors_over_a_cache_refuse_whole_storage_paths(monkeypatch):
    """On the GPU the same paths would copy the whole reservation to the host, reading pages that are not
    mapped (an illegal address, the end of the CUDA context): refused, and the context stays usable. With
    TORCH_VKV_DEBUG=1 (device metadata read back) append_kv checks a slice's rows as the view's."""
    from torch_vkv import append_kv

    monkeypatch.setenv("TORCH_VKV_DEBUG", "1")

    cache = KVCache(1, 2, 64, max_batch_size=2, max_seq_len=1 << 16, dtype=torch.bfloat16, device="cuda")
    try:
        s = cache.alloc()
        cache.commit(s, 16)
        k, v = cache.key(0), cache.value(0)
        k[s, :16] = 2.0
        for t in (k[s, :16], k.as_subclass(torch.Tensor)):
            for path in _whole_storage_paths().values():
                with pytest.raises(TypeError, match="clone"):
                    path(t)
        rows = k.committed_rows()[s]
        new = torch.ones(1, 2, 64, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(ValueError, match="committed"):
            append_kv(k[:, : rows + 64], v[:, : rows + 64], new, new, torch.tensor([rows + 1], dtype=torch.int32, device="cuda"),
                      slots=torch.tensor([s], dtype=torch.int32, device="cuda"))  # fmt: skip
        assert pickle.loads(pickle.dumps(k[s, :16].clone())).eq(2.0).all()
        torch.cuda.synchronize()
        assert float(k[s, :16].float().sum()) == 2.0 * 16 * 2 * 64
    finally:
        cache.close()
