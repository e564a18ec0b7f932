"""PyTorch's whole-storage paths refuse tensors over a cache's memory.

A plain tensor over a cache's memory (a slice of ``KVCache.key(layer)``,
``view.as_subclass(torch.Tensor)``) shares the storage of the whole
reservation, and some of PyTorch's generic paths act on that whole storage:

* ``share_memory_()``, and sending the tensor through ``torch.multiprocessing``
  (a queue, a pipe, a pool's arguments), copy the storage into shared memory
  and swap the copy in under *every* tensor of that storage: the cache's own
  views would then read a stale copy, silently (pages committed later
  invisible, ``close()`` no longer clearing them).
* ``pickle``, ``torch.save`` and ``copy.deepcopy`` copy the whole reservation,
  uncommitted pages included: on CUDA reading an unmapped page is an illegal
  address, which ends the process's CUDA context.

* The storage itself (``view.untyped_storage()``, ``.storage()``) is the whole
  reservation: its ``fill_``/``copy_``/item writes are not checked against the
  page table (a fault past the committed pages), ``resize_`` swaps the memory
  of every view, and its ``share_memory_``, ``torch.multiprocessing``,
  pickling, ``clone``, copies and ``tolist`` do as above.

So these raise ``TypeError`` for a tensor or storage over a registered cache's memory
(:func:`torch_vkv.tensor.cache_source`), saying what to do instead (clone the
rows wanted). Every other tensor takes PyTorch's own path, after one dict
lookup. ``VirtualKVTensor`` and ``VirtualKVView`` take the same ``share_memory_``
and refuse pickling and deep copies on their own (their ``__reduce_ex__`` and
``__deepcopy__``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["install", "refuse_if_over_cache", "refuse_if_storage_of_cache"]

_installed = False


def refuse_if_over_cache(t: Any, what: str) -> None:
    """Raises ``TypeError`` when ``t`` is a tensor over a registered cache's memory."""
    from torch_vkv.tensor import cache_source  # the tensor module installs this one

    if isinstance(t, torch.Tensor) and cache_source(t) is not None:
        raise TypeError(
            f"{what}: expected a tensor with memory of its own, got a {tuple(t.shape)} {t.dtype} tensor over a "
            "torch_vkv cache's memory (this would copy or move the whole reservation, and leave the cache's views "
            "on a stale copy or read uncommitted pages); copy the rows wanted first, e.g. t.clone()"
        )


def refuse_if_storage_of_cache(storage: Any, what: str) -> None:
    """Raises ``TypeError`` when ``storage`` (an ``UntypedStorage`` or ``TypedStorage``) is a registered
    cache's reservation."""
    untyped = getattr(storage, "_untyped_storage", storage)  # a TypedStorage wraps one
    try:
        address = untyped.data_ptr()
    except Exception:  # a storage without memory (meta): not a cache's
        return
    if address in _sources() or getattr(untyped, "_torch_vkv_source", None) is not None:  # tensor.py's _RECORD
        raise TypeError(
            f"{what}: expected a storage of its own, got the storage of a torch_vkv cache ({untyped.nbytes()} bytes "
            "of reserved virtual memory, committed or not, under every view of the cache: writes through it are not "
            "checked against the page table, and copies, moves and resizes take all of it); work on tensors of the "
            "rows wanted, e.g. cache.key(0)[slot, :n]"
        )


@functools.lru_cache(maxsize=None)
def _sources() -> Any:
    """``torch_vkv.tensor._SOURCES`` (imported once: the tensor module installs this one)."""
    from torch_vkv.tensor import _SOURCES

    return _SOURCES


def _guarded(method: Callable[..., Any], what: str, check: Callable[[Any, str], None] = refuse_if_over_cache
             ) -> Callable[..., Any]:  # fmt: skip
    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        check(self, what)
        return method(self, *args, **kwargs)

    guarded.__torch_vkv_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def _guarded_storage_copy(method: Callable[..., Any], what: str) -> Callable[..., Any]:
    """A storage's ``copy_``, refused into a cache's storage unless from that storage itself: such a copy
    writes nothing (Triton's CPU interpreter copies every argument's storage back onto itself)."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        source = args[0] if args else kwargs.get("src", kwargs.get("source"))
        untyped = getattr(self, "_untyped_storage", self)
        if getattr(source, "_untyped_storage", source) is not untyped and not (
                hasattr(source, "data_ptr") and source.data_ptr() == untyped.data_ptr()):  # fmt: skip
            refuse_if_storage_of_cache(self, what)
        return method(self, *args, **kwargs)

    guarded.__torch_vkv_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def install() -> None:
    """Wraps ``torch.Tensor.share_memory_``, ``__reduce_ex__``, ``__deepcopy__``, the writing, resizing
    and copying methods of the storage classes and the reducers ``torch.multiprocessing`` registered
    for tensors. Idempotent; no device work."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, what in (("share_memory_", "share_memory_()"), ("__reduce_ex__", "pickle / torch.save"),
                       ("__deepcopy__", "copy.deepcopy")):  # fmt: skip
        method = getattr(torch.Tensor, name)
        if not getattr(method, "__torch_vkv_guarded__", False):
            setattr(torch.Tensor, name, _guarded(method, what))
    for cls in (torch.UntypedStorage, torch.TypedStorage):
        for name in ("fill_", "copy_", "resize_", "share_memory_", "__reduce__", "__deepcopy__", "__copy__",
                     "clone", "tolist", "__setitem__"):
            method = getattr(cls, name, None)
            if method is not None and not getattr(method, "__torch_vkv_guarded__", False):
                what = f"{cls.__name__}.{name}"
                setattr(cls, name, _guarded_storage_copy(method, what) if name == "copy_"
                        else _guarded(method, what, refuse_if_storage_of_cache))  # fmt: skip
    from multiprocessing.reduction import ForkingPickler

    from torch import multiprocessing  # noqa: F401  (registers PyTorch's reducers first)

    for cls, reduce in list(ForkingPickler._extra_reducers.items()):  # type: ignore[attr-defined]
        if getattr(reduce, "__torch_vkv_guarded__", False):
            continue
        if cls in (torch.Tensor, torch.nn.Parameter):
            ForkingPickler.register(cls, _guarded(reduce, "torch.multiprocessing (sharing a tensor)"))
        elif isinstance(cls, type) and issubclass(cls, (torch.UntypedStorage, torch.TypedStorage)):
            ForkingPickler.register(cls, _guarded(reduce, "torch.multiprocessing (sharing a storage)",
                                                  refuse_if_storage_of_cache))  # fmt: skip
