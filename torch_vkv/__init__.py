"""torch_vkv: LLM KV caches in contiguous virtual memory, pages committed on demand.

Importing this package loads neither the C++ core nor CUDA; both load on first use.
"""

from __future__ import annotations

from torch_vkv.cache import LAYOUTS, KVCache
from torch_vkv.errors import KVCacheCapacityError, OutOfPagesError, OutOfSlotsError
from torch_vkv.pool import PagePool
from torch_vkv.tensor import VirtualKVTensor

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "KVCacheCapacityError",
    "LAYOUTS",
    "OutOfPagesError",
    "OutOfSlotsError",
    "PagePool",
    "VirtualKVTensor",
    "__version__",
]
