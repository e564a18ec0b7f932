"""Subclasses of KVCache and VirtualKVTensor as a library built on torch_vkv
writes them (docs/design.md, "Subclassing"): what a subclass may define
(``__eq__``), what the errors call it, which public methods the cache's own
methods go through (the call graph the docs promise), and the read-only state
an adapter needs without reaching into private attributes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_vkv import KVCache, VirtualKVTensor

PAGE = 4096


def small(cls=KVCache, **kw):
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_seq_len", 256)
    return cls(2, 2, 8, dtype=torch.float32, device="cpu", page_size=PAGE, **kw)


class ComparedCache(KVCache):
    """Defines ``__eq__`` (so Python sets ``__hash__`` to None), as a record-like subclass may."""

    def __eq__(self, other):
        return isinstance(other, ComparedCache) and other.max_seq_len == self.max_seq_len


def test_subclass_that_defines_eq_can_be_built_and_is_still_fork_tracked():
    """A subclass with ``__eq__`` and no ``__hash__`` used to fail in ``KVCache.__init__``
    with ``TypeError: unhashable type: 'ComparedCache'`` (the fork registry was a WeakSet)."""
    a, b = small(ComparedCache), small(ComparedCache)
    assert a == b and a is not b
    from torch_vkv import _lifetime

    assert any(obj is a for obj in _lifetime.tracked()) and any(obj is b for obj in _lifetime.tracked())
    a.close()
    del a
    import gc

    gc.collect()
    assert sum(1 for obj in _lifetime.tracked() if isinstance(obj, ComparedCache)) == 1
    b.close()