"""Host copies of small metadata tensors, so a backend that plans on the host needs no device sync.

FlashInfer's prefill is planned on the host: it needs each request's length, query
offsets and slot as Python ints. Read back from the device, they cost a copy and a
**sync per call**, i.e. per layer, and while the host waits it cannot queue the
layer's other kernels: the GPU idles through every layer's host work. A caller that
built the metadata from host values (the serving engine does, every step) attaches
them to the tensors it passes, and such a backend reads them instead::

    lens = metadata_tensor([700, 12], device="cuda")          # int32 [R], host copy kept
    cu = metadata_tensor([0, 700, 712], device="cuda")
    out = attention(q, k_cache, v_cache, lens, cu_seqlens_q=cu, backend="flashinfer")  # no sync

The host copy belongs to the tensor object (a view or a copy of it has none) and is
dropped, silently, when the tensor's storage moves or, outside inference mode, when
it is written in place afterwards (its version counter changes). Inference-mode
tensors keep no version counter: writing to one after attaching its values is an
error this module cannot see, so do not. Without host values every backend works as
before, reading the tensors back where it must.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch

__all__ = ["attach_host_values", "host_values", "metadata_tensor"]

_ATTR = "_torch_vkv_host_values"


def _version(tensor: torch.Tensor) -> Optional[int]:
    return None if tensor.is_inference() else tensor._version


def attach_host_values(tensor: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """Remember ``values`` as the host copy of the 1-D integer ``tensor``; returns ``tensor``.

    ``values`` must be exactly the tensor's contents (the caller built the tensor from
    them): backends trust them instead of reading the device.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.dtype.is_floating_point \
            or tensor.dtype.is_complex or tensor.dtype == torch.bool:  # fmt: skip
        got = f"{tensor.dtype} tensor of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) \
            else type(tensor).__name__  # fmt: skip
        raise ValueError(f"attach_host_values: expected a 1-D integer tensor, got a {got}")
    host = _ints("attach_host_values", values)
    if len(host) != tensor.numel():
        raise ValueError(f"attach_host_values: expected {tensor.numel()} values (the tensor's length), "
                         f"got {len(host)}")  # fmt: skip
    setattr(tensor, _ATTR, (tensor.data_ptr(), _version(tensor), host))
    return tensor


def host_values(tensor: Any) -> Optional[tuple]:
    """The host copy attached by :func:`attach_host_values`, or None when there is none or it is stale."""
    record = getattr(tensor, _ATTR, None)
    if record is None:
        return None
    ptr, version, host = record
    if ptr != tensor.data_ptr() or version != _version(tensor):
        return None
    return host


def metadata_tensor(values: Sequence[int], device: Any = None, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A 1-D ``dtype`` tensor on ``device`` (default: the CPU) holding ``values``, with its host copy
    attached: a backend that plans on the host (FlashInfer's prefill) reads the copy instead of syncing.
    ``values``: ints (e.g. ``cache_seqlens`` or ``cu_seqlens_q``), each within ``dtype``'s range."""
    host = list(_ints("metadata_tensor", values))
    if isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        info = torch.iinfo(dtype)  # any integer dtype: an int8 tensor of 300 raised torch's RuntimeError
        bad = next((v for v in host if not info.min <= v <= info.max), None)
        if bad is not None:
            raise ValueError(f"metadata_tensor: expected values that fit {dtype} ([{info.min}, {info.max}]), got {bad}")
    return attach_host_values(torch.tensor(host, dtype=dtype, device=device), host)


def _ints(caller: str, values: Sequence[int]) -> tuple:
    """``values`` as Python ints (anything with ``__index__``: numpy and 0-d torch ints too); a float or
    another non-integer is a ``TypeError``, not silently truncated."""
    try:
        items = list(values)
    except TypeError:
        items, bad = None, values  # not a sequence at all
    if items is not None:
        bad = next((v for v in items if not hasattr(type(v), "__index__")), None)
        if bad is None:
            return tuple(operator.index(v) for v in items)
    raise TypeError(f"{caller}: expected a sequence of ints, got {bad!r} ({type(bad).__name__})")
