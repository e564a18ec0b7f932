"""Python objects that compiled code finds through a *key* tensor.

A custom op called from a compiled graph takes only tensors and scalars. To
reach an object of ours (a cache, a model runner) it gets a key: a one-byte
tensor the object owns, never written, marked as a static input
(``mark_static_address``), whose address it looks up in a process-wide table of
weak references. An int handle would be simpler, but dynamo specialises on
ints: every new object would recompile the compiled code (and past dynamo's
recompile limit, silently run it eagerly). A tensor's address is not guarded.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

__all__ = ["register", "lookup"]

_TABLE: "weakref.WeakValueDictionary[tuple, Any]" = weakref.WeakValueDictionary()


def _address(key: torch.Tensor) -> tuple:
    return key.device.type, key.device.index, key.data_ptr()


def register(obj: Any, device: torch.device) -> torch.Tensor:
    """Returns the key (a one-byte tensor on ``device``) under which
    :func:`lookup` finds ``obj``. The object keeps the key alive; the table
    holds the object weakly, so it never keeps one alive, and an entry whose
    object died is gone before its key's address can be reused."""
    key = torch.zeros(1, dtype=torch.uint8, device=device)
    torch._dynamo.mark_static_address(key)  # compiled code gets the tensor itself, not a copy
    _TABLE[_address(key)] = obj
    return key


def lookup(key: torch.Tensor) -> Optional[Any]:
    """The object registered under ``key``, or ``None`` when it is gone."""
    return _TABLE.get(_address(key))
