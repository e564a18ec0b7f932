"""Lazy access to the C++ core ``torch_vkv._C``.

Importing torch_vkv never loads the extension or touches CUDA; the first use
of a cache, tensor or pool does.
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def core() -> ModuleType:
    try:
        from torch_vkv import _C
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "torch_vkv's C++ core (torch_vkv._C) is not built; install the package with "
            "`pip install -e .` (needs a C++17 compiler and pybind11)"
        ) from e
    return _C
