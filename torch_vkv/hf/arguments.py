"""The checks of :class:`~torch_vkv.hf.VirtualKVCache`'s constructor arguments, in one place.

The cache builds its :class:`~torch_vkv.KVCache` lazily (device and dtype default to those of the
first ``key_states``), so a bad argument would otherwise surface at the first ``generate()``, in
the words of ``KVCache`` (``max_seq_len``, not ``max_cache_len``). Everything that can be checked
without the model's tensors is checked here, at construction, naming the argument the user passed;
:func:`check_reservation_fits` runs again with the real dtype when the ``KVCache`` is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from torch_vkv._checks import ArgumentTypeError, check_device, check_int, fail
from torch_vkv.cache import LAYOUTS
from torch_vkv.pool import ADDRESS_SPACE_BYTES, check_host_page_size

__all__ = ["CacheArguments", "check_cache_arguments", "check_reservation_fits"]

#: Bytes of the smallest floating-point element (float8): a ``max_cache_len`` that does not fit
#: the address space even with it is refused before the dtype is known.
_SMALLEST_ITEMSIZE = 1


@dataclass(frozen=True)
class CacheArguments:
    """The constructor's arguments, checked (``device``: a ``torch.device`` or ``None``)."""

    max_batch_size: int
    max_cache_len: int
    device: Optional[torch.device]
    dtype: Optional[torch.dtype]
    memory_budget: Optional[int]
    layout: str
    page_size: Optional[int]
    margin_tokens: int
    prefetch: bool


def check_cache_arguments(shape: tuple[int, int, int], max_batch_size: Any, max_cache_len: Any, *, device: Any,
                          dtype: Any, memory_budget: Any, layout: Any, page_size: Any, margin_tokens: Any,
                          prefetch: Any) -> CacheArguments:  # fmt: skip
    """Checks every argument (``ValueError`` / ``TypeError`` "what: expected X, got Y").
    ``shape``: ``(num_layers, num_kv_heads, head_dim)`` of the config."""
    max_batch_size = check_int("max_batch_size", max_batch_size, low=1)
    max_cache_len = check_int("max_cache_len", max_cache_len, low=1)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        fail("dtype", "None or a floating-point torch.dtype", dtype, ArgumentTypeError)
    device = check_device(device)
    if memory_budget is not None:
        memory_budget = check_int("memory_budget", memory_budget, low=0)
    if not isinstance(layout, str) or layout not in LAYOUTS:
        fail("layout", f"one of {LAYOUTS}", layout)
    if page_size is not None:
        page_size = check_host_page_size(page_size)
        if device is not None and device.type == "cuda":
            fail("page_size", "None on CUDA (the driver's 2 MiB granularity is used)", page_size)
    margin_tokens = check_int("margin_tokens", margin_tokens, low=0)
    if not isinstance(prefetch, bool):
        fail("prefetch", "a bool", prefetch, ArgumentTypeError)
    itemsize = _SMALLEST_ITEMSIZE if dtype is None else torch.empty((), dtype=dtype).element_size()
    check_reservation_fits(shape, max_batch_size, max_cache_len, itemsize)
    return CacheArguments(max_batch_size, max_cache_len, device, dtype, memory_budget, layout, page_size,
                          margin_tokens, prefetch)  # fmt: skip


def check_reservation_fits(shape: tuple[int, int, int], max_batch_size: int, max_cache_len: int, itemsize: int) -> None:
    """Refuses a ``max_cache_len`` whose reservation (every row, layer, K and V) cannot fit the
    address space with elements of ``itemsize`` bytes: the bound ``KVCache`` checks, in the
    words of this cache's arguments."""
    num_layers, num_kv_heads, head_dim = shape
    bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * itemsize
    if max_batch_size * max_cache_len * bytes_per_token > ADDRESS_SPACE_BYTES:
        fail("max_cache_len", f"at most {ADDRESS_SPACE_BYTES // (max_batch_size * bytes_per_token)} tokens with "
             f"max_batch_size={max_batch_size} and {bytes_per_token} bytes per token ({itemsize}-byte elements; "
             f"the reservation must fit in the {ADDRESS_SPACE_BYTES >> 40} TiB address space)",
             max_cache_len)  # fmt: skip
