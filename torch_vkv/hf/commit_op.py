"""The in-graph commit safety net of :class:`~torch_vkv.hf.VirtualKVCache`.

Page commits are host calls into the driver, so they happen before a compiled
step, in :meth:`VirtualKVCache.prepare_step` (``generate()`` calls it). A
hand-written compiled loop may forget it; then the first layer's write runs
:func:`ensure_committed` first. At run time the op asks the cache whether the
step was announced: if so it does nothing (no sync); if not it reads the new
lengths (a device sync) and commits what they need before any K/V write, and
the host takes those lengths. Its int zero result is added to the lengths the
writes use, which orders every write after it.

While a CUDA graph is being captured the op commits nothing (a driver call
cannot be captured, and a replay runs no Python): it only tells the cache
that steps may now run as replays, so the host reads lengths back when it
cannot account for a step. Captured steps need ``prepare_step``.

The op only takes tensors and ints, so it finds its cache through a handle:
a process-wide table of weak references (any number of caches per process).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Protocol

import torch

__all__ = ["ensure_committed", "register_cache"]


class _StepObserver(Protocol):
    def _on_compiled_step(self, cache_seqlens: torch.Tensor, seq_length_t: torch.Tensor, capturing: bool) -> None: ...


_CACHES: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def register_cache(cache: _StepObserver) -> int:
    """Returns the handle under which :func:`ensure_committed` finds ``cache``
    (held weakly: the table never keeps a cache alive)."""
    handle = next(_HANDLES)
    _CACHES[handle] = cache
    return handle


@torch.library.custom_op("torch_vkv_hf::ensure_committed", mutates_args=())
def ensure_committed(cache_seqlens: torch.Tensor, seq_length_t: torch.Tensor, handle: int) -> torch.Tensor:
    """Commits the rows a running compiled step writes, unless announced.

    Args:
        cache_seqlens: int32, shape ``[batch]``: lengths after this step.
        seq_length_t: int64, shape ``[]``: tokens seen after this step.
        handle: from :func:`register_cache`.

    Returns an int32 zero of shape ``[]`` on ``cache_seqlens``' device.
    """
    cache = _CACHES.get(handle)
    if cache is not None:
        capturing = cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()
        cache._on_compiled_step(cache_seqlens, seq_length_t, capturing)
    return torch.zeros((), dtype=cache_seqlens.dtype, device=cache_seqlens.device)


@ensure_committed.register_fake
def _(cache_seqlens, seq_length_t, handle):
    return cache_seqlens.new_empty(())
