"""torch_vkv: LLM KV caches in contiguous virtual memory, pages committed on demand.

Importing this package loads neither the C++ core, nor CUDA, nor Triton; each
loads on first use. The paged baseline and the Hugging Face adapter are
imported lazily on first attribute access.

``torch_vkv.attention`` is the attention entry point (a function); the package
that defines it is reached with ``from torch_vkv.attention import ...`` (see
``docs/attention.md``, "Layout").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported eagerly so that ``torch_vkv.attention`` always names the function,
# whatever was imported before (importing a submodule rebinds the package
# attribute of the same name), and torch.compile can trace a call to it.
from torch_vkv.attention import (
    BACKENDS, append_kv, attach_host_values, attention, available_backends, metadata_tensor, select_backend,
)
from torch_vkv.cache import LAYOUTS, KVCache
from torch_vkv.errors import KVCacheCapacityError, OutOfPagesError, OutOfSlotsError
from torch_vkv.pool import PagePool
from torch_vkv.tensor import VirtualKVTensor

if TYPE_CHECKING:  # pragma: no cover
    from torch_vkv.hf import VirtualKVCache
    from torch_vkv.paged import BlockPool, PagedKVCache, paged_from_dense

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (PEP 562).
_LAZY = {
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
    "attach_host_values",
    "attention",
    "available_backends",
    "metadata_tensor",
    "paged_from_dense",
    "select_backend",
]


def __getattr__(name: str) -> Any:
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
