"""torch_vkv: LLM KV caches in contiguous virtual memory, pages committed on demand.

Importing this package loads neither the C++ core, nor CUDA, nor Triton; each
loads on first use. The attention entry points and the paged baseline are
imported lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torch_vkv.cache import LAYOUTS, KVCache
from torch_vkv.errors import KVCacheCapacityError, OutOfPagesError, OutOfSlotsError
from torch_vkv.pool import PagePool
from torch_vkv.tensor import VirtualKVTensor

if TYPE_CHECKING:  # pragma: no cover
    from torch_vkv import attention
    from torch_vkv.attention import BACKENDS, append_kv, available_backends, select_backend
    from torch_vkv.hf import VirtualKVCache
    from torch_vkv.paged import BlockPool, PagedKVCache, paged_from_dense

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (PEP 562).
_LAZY = {
    "append_kv": "torch_vkv.attention",
    "available_backends": "torch_vkv.attention",
    "select_backend": "torch_vkv.attention",
    "BACKENDS": "torch_vkv.attention",
    "BlockPool": "torch_vkv.paged",
    "PagedKVCache": "torch_vkv.paged",
    "paged_from_dense": "torch_vkv.paged",
    "VirtualKVCache": "torch_vkv.hf",
}

__all__ = [
    "BACKENDS",
    "BlockPool",
    "KVCache",
    "KVCacheCapacityError",
    "LAYOUTS",
    "OutOfPagesError",
    "OutOfSlotsError",
    "PagePool",
    "PagedKVCache",
    "VirtualKVCache",
    "VirtualKVTensor",
    "__version__",
    "append_kv",
    "attention",
    "available_backends",
    "paged_from_dense",
    "select_backend",
]


def __getattr__(name: str) -> Any:
    if name == "attention":
        # The submodule, which is callable: torch_vkv.attention(q, k_cache, ...)
        # and torch_vkv.attention.append_kv both work, imported or not.
        return importlib.import_module("torch_vkv.attention")
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as e:  # e.g. VirtualKVCache without transformers
            raise AttributeError(f"torch_vkv.{name} needs an optional dependency: {e}") from e
        value = getattr(module, name)
        globals()[name] = value  # later lookups skip this hook
        return value
    if name == "triton_kernels":  # installed as torch_vkv.triton_kernels
        return importlib.import_module("torch_vkv.triton_kernels")
    raise AttributeError(f"module 'torch_vkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
