"""The in-graph commit safety net of :class:`~torch_vkv.hf.VirtualKVCache`.

Page commits are host calls into the driver, so they happen before a compiled
step, in :meth:`VirtualKVCache.prepare_step` (``generate()`` calls it). A
hand-written compiled loop may forget it; then the first layer's write runs
:func:`ensure_committed` first. At run time the op asks the cache whether the
step was announced (as many tokens as this step's): if so it does nothing (no
sync); if not it reads the lengths (a device sync) and commits what they need
with the step's tokens before any K/V write, and the host takes those lengths.
It gets the lengths before the step, and its int zero result is added to them
by the step, which orders the step's adds and every write after it: the cache
can refuse the step (``ValueError``: another batch than the cache's, or past
``max_cache_len``) with nothing changed.

While a CUDA graph is being captured the op commits nothing (a driver call
cannot be captured, and a replay runs no Python): it only tells the cache
that steps may now run as replays, so the host reads lengths back when it
cannot account for a step. Captured steps need ``prepare_step``.

The op only takes tensors, so it finds its cache through a *key* tensor
(:mod:`torch_vkv._keyed`): an int handle would recompile the compiled forward
for every new cache.
"""

from __future__ import annotations

from typing import Protocol

import torch

from torch_vkv import _keyed

__all__ = ["ensure_committed", "register_cache"]


class _StepObserver(Protocol):
    def _on_compiled_step(self, cache_seqlens: torch.Tensor, seq_length_t: torch.Tensor, capturing: bool,
                          num_tokens: int) -> None: ...  # fmt: skip


def register_cache(cache: _StepObserver, device: torch.device) -> torch.Tensor:
    """Returns the key (a one-byte tensor on ``device``) under which
    :func:`ensure_committed` finds ``cache`` (held weakly; the cache keeps the key)."""
    return _keyed.register(cache, device)


@torch.library.custom_op("torch_vkv_hf::ensure_committed", mutates_args=())
def ensure_committed(cache_seqlens: torch.Tensor, seq_length_t: torch.Tensor, cache_key: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:  # fmt: skip
    """Commits the rows a running compiled step writes, unless announced.

    Args:
        cache_seqlens: int32, shape ``[batch]``: lengths before this step.
        seq_length_t: int64, shape ``[]``: tokens seen before this step.
        cache_key: from :func:`register_cache`.
        num_tokens: new tokens a row in this step (a step of other than the
            announced tokens is not covered by the announcement's commit).

    The cache may raise (a step it cannot take); the step adds the zero
    result to its lengths, so it changes nothing before this op returns.

    Returns an int32 zero of shape ``[]`` on ``cache_seqlens``' device.
    """
    cache = _keyed.lookup(cache_key)
    if cache is not None:
        capturing = cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()
        cache._on_compiled_step(cache_seqlens, seq_length_t, capturing, num_tokens)
    return torch.zeros((), dtype=cache_seqlens.dtype, device=cache_seqlens.device)


@ensure_committed.register_fake
def _(cache_seqlens, seq_length_t, cache_key, num_tokens):
    return cache_seqlens.new_empty(())
