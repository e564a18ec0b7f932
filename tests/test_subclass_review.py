"""Subclasses of KVCache and VirtualKVTensor as a library built on torch_vkv
writes them (docs/design.md, "Subclassing"): what a subclass may define
(``__eq__``), what the errors call it, which public methods the cache's own
methods go through (the call graph the docs promise), and the read-only state
an adapter needs without reaching into private attributes."""

from __future__ import annotations

import importlib.util

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


def test_subclass_with_eq_is_unusable_in_a_forked_child_and_the_error_names_it():
    """The fork registry reaches such a subclass too: in a forked child its methods raise,
    naming the subclass, and the parent's cache keeps working (a child process: fork)."""
    from _subprocess import check_scenario

    check_scenario(
        """
        import os, torch
        from torch_vkv import KVCache

        class ComparedCache(KVCache):
            def __eq__(self, other):
                return self is other

        cache = ComparedCache(2, 2, 8, max_batch_size=2, max_seq_len=256, dtype=torch.float32, device="cpu",
                              page_size=4096)
        slot = cache.alloc()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                cache.commit(slot, 10)
            except RuntimeError as e:
                code = 0 if "this ComparedCache was created in process" in str(e) else 2
            os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        cache.commit(slot, 10)
        assert cache.committed_tokens(slot) >= 10
        cache.close()
        """
    )


class Named(KVCache):
    pass


def test_errors_of_a_closed_subclass_name_the_subclass():
    cache = small(Named)
    cache.close()
    with pytest.raises(RuntimeError, match="the Named is closed"):
        cache.alloc()
    base = small()
    base.close()
    with pytest.raises(RuntimeError, match="the KVCache is closed"):
        base.alloc()


def _before_base(name, before):
    """A method ``name`` that runs ``before(self, name)``, then ``KVCache``'s own ``name``."""

    def wrap(self, *args, **kwargs):
        before(self, name)
        return getattr(KVCache, name)(self, *args, **kwargs)

    return wrap


def _record_call(self, name):
    self.calls.append(name)


def _check_ready(self, name):
    assert getattr(self, "ready", False), f"KVCache.__init__ called {name} before the subclass's own"


class Recorder(KVCache):
    """Records every public method the cache calls on itself."""

    def __init__(self, *args, **kwargs):
        self.calls: list[str] = []
        super().__init__(*args, **kwargs)

    alloc = _before_base("alloc", _record_call)
    free = _before_base("free", _record_call)
    commit = _before_base("commit", _record_call)
    can_commit = _before_base("can_commit", _record_call)
    step = _before_base("step", _record_call)
    step_async = _before_base("step_async", _record_call)
    can_step = _before_base("can_step", _record_call)
    decommit = _before_base("decommit", _record_call)
    reclaim = _before_base("reclaim", _record_call)
    memory_stats = _before_base("memory_stats", _record_call)
    close = _before_base("close", _record_call)


@pytest.mark.parametrize(
    "call, expected",
    [
        # the aliases and the one-slot forms go through the public method they name
        (lambda c, s: c.release(s), ["free"]),
        (lambda c, s: c.reserve(s, 40), ["commit", "step"]),
        (lambda c, s: c.can_reserve(s, 40), ["can_commit", "can_step"]),
        (lambda c, s: c.commit(s, 40), ["commit", "step"]),
        (lambda c, s: c.__exit__(None, None, None), ["close"]),
        # the rest call none: fork and remap take slots without alloc, step_async does not call step,
        # close frees no slot, repr and stats read the bookkeeping
        (lambda c, s: c.fork(s, 20), []),
        (lambda c, s: c.remap([s], [s], [10]), []),
        (lambda c, s: c.step_async({s: 50}), ["step_async"]),
        (lambda c, s: c.prewarm(10), []),
        (lambda c, s: c.decommit(s, 10), ["decommit"]),
        (lambda c, s: c.reclaim(), ["reclaim"]),
        (lambda c, s: c.free(c.fork(s, 20)), ["free"]),  # a freed slot with shared pages: decommitted
        (lambda c, s: c.close(), ["close"]),
        (lambda c, s: repr(c), []),
    ],
)
def test_which_public_methods_the_cache_calls_on_itself(call, expected):
    """The call graph docs/design.md ("Subclassing") promises: an override of each
    method listed runs for the call, and of no other public method."""
    cache = small(Recorder)
    slot = cache.alloc()
    cache.commit(slot, 30)
    cache.calls.clear()
    call(cache, slot)
    assert cache.calls == expected
    KVCache.close(cache)


def test_a_step_that_reclaims_freed_slots_calls_no_decommit_override():
    cache = small(Recorder, memory_budget=4 * 2 * PAGE)  # 2 pages for each of the 4 buffers
    first, second = cache.alloc(), cache.alloc()
    cache.commit(first, 64)  # 64 tokens: one page per buffer
    cache.free(first)  # its pages stay (deferred reclamation)
    cache.calls.clear()
    cache.step({second: 128})  # needs both pages per buffer: reclaims the freed slot's
    assert cache.calls == ["step"] and cache.committed_tokens(first) == 0
    KVCache.close(cache)


def test_hf_subclass_closed_error_names_the_subclass():
    transformers = pytest.importorskip("transformers")
    from torch_vkv.hf import VirtualKVCache

    class MyCache(VirtualKVCache):
        pass

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    cache = MyCache(config, 2, 64, device="cpu", dtype=torch.float32, page_size=PAGE)
    assert cache.kv_cache.num_buffers == 4 and cache.kv_cache.trims_windows is False
    import copy
    import pickle

    for how, refused in [("copied", copy.copy), ("deep-copied", copy.deepcopy), ("pickled", pickle.dumps)]:
        with pytest.raises(TypeError, match=f"^MyCache cannot be {how}"):
            refused(cache)
    cache.close()
    states = torch.zeros(1, 2, 1, 8)
    with pytest.raises(RuntimeError, match="MyCache is closed"):
        cache.update(states, states, 0)


def test_trims_windows_and_num_buffers_are_public_read_only():
    """The Hugging Face adapter read ``KVCache._windowed`` and ``len(KVCache._buffers)``;
    an adapter of one's own needs the same, read-only."""
    plain = small()
    windowed = small(sliding_window=[64, None])
    inter = small(layout="interleaved")
    assert plain.trims_windows is False and windowed.trims_windows is True and inter.trims_windows is False
    assert plain.num_buffers == 4 and inter.num_buffers == 1
    for cache in (plain, windowed):
        with pytest.raises(AttributeError):
            cache.trims_windows = True
        with pytest.raises(AttributeError):
            cache.num_buffers = 1
    for cache in (plain, windowed, inter):
        cache.close()


class CountingPages(VirtualKVTensor):
    """Counts its committed pages through the page hooks (docs/design.md, "Subclassing")."""

    def _commit_pages(self, first, count):
        done = super()._commit_pages(first, count)
        self.pages = getattr(self, "pages", 0) + done
        return done

    def _decommit_pages(self, first, count, stream):
        done = super()._decommit_pages(first, count, stream)
        self.pages = getattr(self, "pages", 0) - done
        return done


def test_virtual_tensor_page_hooks_see_commit_and_decommit_and_what_release_bypasses():
    """commit/decommit go through the hooks; release()/close() drop every page at once
    without them (the docs used to call the hooks "the only places that touch the page
    table"), so a subclass that counts pages overrides release too."""
    t = CountingPages.empty((4, 1024), dtype=torch.float32, device="cpu", page_size=PAGE)
    t.commit(0)
    t.commit(slice(1, 3))
    assert t.pages == 3 == t.reservation.num_committed()
    t.decommit(1)
    assert t.pages == 2 == t.reservation.num_committed()
    t.release()
    assert t.reservation.num_committed() == 0 and t.pages == 2  # the hooks did not run
    t.close()


def test_step_with_a_numpy_array_reaches_an_overridden_step():
    cache = small(Recorder)
    slot = cache.alloc()
    cache.calls.clear()
    lens = np.zeros(4, dtype=np.int64)
    lens[slot] = 40
    cache.step(lens)
    assert cache.calls == ["step"] and cache.committed_tokens(slot) >= 40
    KVCache.close(cache)


def test_virtual_tensor_empty_is_typed_as_the_class_it_is_called_on():
    """``Sub.empty(...)`` returns a ``Sub`` at run time; its annotation said ``VirtualKVTensor``,
    so a type checker lost the subclass (and its attributes) at every ``empty`` call."""
    import typing

    returned = typing.get_type_hints(VirtualKVTensor.empty)["return"]
    assert isinstance(returned, typing.TypeVar) and returned.__bound__ is not None
    assert typing.get_type_hints(VirtualKVTensor.empty)["cls"] == type[returned]
    t = CountingPages.empty((2, 1024), dtype=torch.float32, device="cpu", page_size=PAGE)
    assert type(t) is CountingPages
    t.close()


class AttributesAfterInit(KVCache):
    """Sets its own state after ``super().__init__``: fine only if the constructor calls no public method."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ready = True

    alloc = _before_base("alloc", _check_ready)
    free = _before_base("free", _check_ready)
    commit = _before_base("commit", _check_ready)
    step = _before_base("step", _check_ready)
    step_async = _before_base("step_async", _check_ready)
    decommit = _before_base("decommit", _check_ready)
    reclaim = _before_base("reclaim", _check_ready)
    memory_stats = _before_base("memory_stats", _check_ready)


@pytest.mark.parametrize("kw", [{}, {"layout": "interleaved"}, {"sliding_window": [64, None]}])
def test_the_constructor_calls_no_public_method_so_attributes_may_come_after_it(kw):
    cache = small(AttributesAfterInit, **kw)
    slot = cache.alloc()
    cache.commit(slot, 10)
    assert cache.memory_stats()["active_slots"] == 1
    cache.close()


def test_repr_of_a_subclass_whose_init_did_not_finish_names_it():
    """A subclass that raises before ``super().__init__()`` leaves an object a traceback or a debugger
    prints: repr answers with the class name instead of raising AttributeError from inside repr."""
    from torch_vkv import PagePool
    from torch_vkv.paged import PagedKVCache
    from torch_vkv.serving import Engine

    classes = [KVCache, PagePool, PagedKVCache, Engine]
    if importlib.util.find_spec("transformers") is not None:
        from torch_vkv.hf import VirtualKVCache

        classes.append(VirtualKVCache)
    for base in classes:
        class Early(base):
            def __init__(self):
                raise ValueError("refused before super().__init__()")

        with pytest.raises(ValueError, match="refused before"):
            Early()
        assert repr(base.__new__(Early)) == "<Early: construction did not finish>", base
