"""Subclasses of the public classes, as a library built on torch_vkv writes them
(docs/design.md, "Extension points"): their type survives where the library
hands the object back, and repr names the subclass without reading memory."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from torch_vkv import KVCache, VirtualKVTensor

PAGE = 4096


class TaggedCache(KVCache):
    def __init__(self, *args, tag="mine", **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag
        self.allocs = 0

    def alloc(self, num_tokens=None):
        self.allocs += 1
        return super().alloc(num_tokens)


class Observed(VirtualKVTensor):
    """Observes commits, as docs/design.md suggests."""

    def _commit_pages(self, first, count):
        self.seen = getattr(self, "seen", []) + [(first, count)]
        return super()._commit_pages(first, count)


class KeepsType(VirtualKVTensor):
    """Overrides __torch_function__ to keep its type (docs: "override it to keep your type")."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return torch.Tensor.__torch_function__.__func__(cls, func, types, args, kwargs or {})


def test_kvcache_subclass_keeps_its_type_and_repr_names_it():
    cache = TaggedCache(2, 2, 8, max_batch_size=4, max_seq_len=64, dtype=torch.float32, device="cpu",
                        page_size=PAGE, tag="t")  # fmt: skip
    slot = cache.alloc()
    cache.commit(slot, 10)
    assert cache.fork(slot, 10) != slot
    assert cache.allocs == 1 and cache.tag == "t"
    assert repr(cache).startswith("TaggedCache(num_layers=2"), repr(cache)
    for how in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError, match="got a TaggedCache"):
            how(cache)
    with cache as same:
        assert same is cache
    assert repr(cache).startswith("TaggedCache(") and repr(cache).endswith("closed)")


def test_virtual_tensor_subclass_commit_hook_and_repr():
    t = Observed.empty((4, 1024), dtype=torch.float32, device="cpu", page_size=PAGE)
    assert type(t) is Observed
    assert t.commit(0, slice(0, 10)) == 1 and t.seen == [(0, 1)]
    assert repr(t).startswith("Observed(shape=(4, 1024)"), repr(t)
    assert type(t + 1) is torch.Tensor and type(t[0]) is torch.Tensor
    with pytest.raises(TypeError, match="a Observed lives in reserved virtual memory"):
        pickle.dumps(t)
    t.close()
    assert repr(t).startswith("Observed(") and "<released>" in repr(t)


def test_virtual_tensor_subclass_that_keeps_its_type_prints_without_metadata():
    """What an op returns has the subclass's type but none of its attributes:
    repr used to raise AttributeError ('KeepsType' object has no attribute
    'reservation'). It says so instead, and reads no memory (a view of
    uncommitted rows faults on CUDA)."""
    t = KeepsType.empty((4, 1024), dtype=torch.float32, device="cpu", page_size=PAGE)
    t.commit(0)
    row = t[0]
    assert type(row) is KeepsType
    text = repr(row)
    assert text.startswith("KeepsType(shape=(1024,)") and "no reservation metadata" in text, text
    assert "committed_bytes=4096" in repr(t)
    t.close()
