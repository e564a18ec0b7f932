"""The in-place methods of a :class:`~torch_vkv.tensor.VirtualKVView`, checked against the page table.

A write to a row that is not committed faults (SIGSEGV on the host backend, an
illegal address that ends the CUDA context). So every method that writes the
view's data asks ``VirtualKVView._check_write`` first, with the places it
writes as an index of the view:

* element-wise and whole-view methods (``zero_``, ``exp_``, ``+=``, ``tril_``,
  ...) write every row of every slot;
* the methods that write chosen places (``index_put_``, ``index_copy_``,
  ``masked_fill_``, ``scatter_``, ``put_``, ...) write the slots and rows their
  index addresses, so a write into committed rows works while other slots are
  empty.

Methods that change only metadata are left alone (``detach_``,
``requires_grad_(False)``; ``requires_grad_(True)``, ``view.requires_grad = True``
and assigning ``view.data`` raise ``TypeError``), but those that change the view's shape, strides or storage in
place (``transpose_``, ``unsqueeze_``, ``set_``, ``resize_``, ...) raise
``TypeError``: ``KVCache.key(l)`` returns one shared view object.

An augmented assignment to an index (``view[slot, rows] += x``) is Python's
``t = view[slot, rows]; t += x; view[slot, rows] = t``: the write happens in
``t += x``, on the plain tensor indexing returned, before the checked
``__setitem__``. So ``__getitem__`` asks whether the calling bytecode is such
an assignment (the index duplicated just before the subscript: ``COPY 2;
COPY 2`` / ``DUP_TOP_TWO``, or ``COPY 3`` three times before a 3.12+
``BINARY_SLICE``; once CPython 3.11-3.12 specialise the subscript the frame
points at its inline cache entries, which are stepped over) and then checks the
rows as a write; so does ``view[index].zero_()``, a method that writes its whole
tensor looked up on the result at once (``_method_called_on_result``, from
``dis`` once per code object); any other read is unchecked, as before.

Index tensors on CUDA are not read (that would sync), as in ``__setitem__``; ``out=`` arguments of torch functions and in-place torch
functions (``torch.relu_(view)``, ``F.relu(view, inplace=True)``,
``torch.Tensor.add_(view, 1)``: they do not look the method up on the view)
are not seen at all.
"""

from __future__ import annotations

import dis
import numbers
import sys
from typing import Any, Callable, Optional

import numpy as np
import torch

__all__ = ["install"]

#: No data written: shape, strides, autograd or storage bookkeeping only (``share_memory_`` is refused
#: for every tensor over a cache's memory, in _sharing.py).
_METADATA = {"as_strided_", "detach_", "requires_grad_", "resize_", "resize_as_", "resize_as_sparse_", "set_",
             "share_memory_", "sparse_resize_", "sparse_resize_and_clear_", "squeeze_", "unsqueeze_",
             "swapaxes_", "swapdims_", "t_", "transpose_"}  # fmt: skip
#: Of those, the ones that change the view's shape, strides or storage in place. ``KVCache.key(l)`` returns the
#: same view object every time (the kernels, the engine and the HF adapter hold it): ``k.transpose_(1, 2)``
#: would change it for all of them, so they raise and name the out-of-place method.
_RESHAPING = {"as_strided_", "resize_", "resize_as_", "resize_as_sparse_", "set_", "sparse_resize_",
              "sparse_resize_and_clear_", "squeeze_", "unsqueeze_", "swapaxes_", "swapdims_", "t_", "transpose_"}  # fmt: skip

_INPLACE_OPERATORS = ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ifloordiv__", "__imod__",
                      "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__")  # fmt: skip

_NOTHING = (slice(0, 0),)  # an index that writes nothing: torch itself raises for the bad arguments
_EVERYTHING = None  # the whole view


def _dim(view: torch.Tensor, dim: Any) -> Optional[int]:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -view.dim() <= dim < view.dim():
        return None
    return int(dim) % view.dim()


def _along(view: torch.Tensor, dim: Any, index: Any, *args: Any, **kwargs: Any) -> Any:
    """``index_copy_``/``index_fill_``/``index_add_``/``index_reduce_``: ``index`` along ``dim``."""
    d = _dim(view, dim)
    if d is None or not isinstance(index, torch.Tensor):
        return _NOTHING if d is None else _EVERYTHING
    return _EVERYTHING if d > 1 else (slice(None),) * d + (index,)


def _index_put(view: torch.Tensor, indices: Any, *args: Any, **kwargs: Any) -> Any:
    if not isinstance(indices, (tuple, list)):
        return _NOTHING
    return tuple(slice(None) if i is None else i for i in indices)


def _masked(view: torch.Tensor, mask: Any, *args: Any, **kwargs: Any) -> Any:
    """``masked_fill_``/``masked_scatter_``: the slots and rows where the broadcast mask is set."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return _NOTHING
    try:
        fits = torch.broadcast_shapes(mask.shape, view.shape) == view.shape
    except RuntimeError:
        fits = False
    if not fits:
        return _NOTHING  # torch refuses it
    if mask.device.type != "cpu":
        return (mask,)  # not read: see __setitem__
    m = mask.reshape((1,) * (view.dim() - mask.dim()) + tuple(mask.shape))
    if m.dim() > 2:
        m = m.flatten(2).any(-1)
    return (m.expand(view.shape[0], view.shape[1]),)


def _scatter(view: torch.Tensor, dim: Any, index: Any, *args: Any, **kwargs: Any) -> Any:
    """``scatter_``/``scatter_add_``/``scatter_reduce_``: along ``dim`` the values of
    ``index``, along every other dimension the first ``index.shape[i]`` places."""
    d = _dim(view, dim)
    if d is None or not isinstance(index, torch.Tensor) or index.dim() != view.dim() or not index.numel():
        return _NOTHING
    places = [slice(0, index.shape[0]), slice(0, index.shape[1])]
    if d < 2:
        places[d] = index.flatten()
    return tuple(places)


def _put(view: torch.Tensor, index: Any, *args: Any, **kwargs: Any) -> Any:
    """``put_``: flat places of the view taken in row-major order (negative from the end)."""
    if not isinstance(index, torch.Tensor) or index.is_floating_point() or not index.numel():
        return _NOTHING
    if index.device.type != "cpu":
        return (index,)  # not read: see __setitem__
    flat = index.flatten().numpy(force=True).astype(np.int64)
    flat = np.where(flat < 0, flat + view.numel(), flat)
    flat = flat[(flat >= 0) & (flat < view.numel())]  # torch raises for the others
    slots, rows = np.unravel_index(flat, tuple(view.shape))[:2]
    return (torch.from_numpy(np.unique(slots)), torch.from_numpy(np.unique(rows)))


_CHOSEN_PLACES: dict[str, Callable[..., Any]] = {
    "index_add_": _along, "index_copy_": _along, "index_fill_": _along, "index_reduce_": _along,
    "index_put_": _index_put, "masked_fill_": _masked, "masked_scatter_": _masked,
    "scatter_": _scatter, "scatter_add_": _scatter, "scatter_reduce_": _scatter, "put_": _put,
}  # fmt: skip


def _checked(name: str, places: Optional[Callable[..., Any]]) -> Callable[..., torch.Tensor]:
    method = getattr(torch.Tensor, name)

    def inplace(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # traced code: the page table is not traceable
            # The chosen-places helpers read [slots, rows, ...]: a 1-D VirtualKVTensor is checked whole.
            chosen = places is not None and self.dim() >= 2
            self._check_write(places(self, *args, **kwargs) if chosen else _EVERYTHING)
        return method(self, *args, **kwargs)

    inplace.__name__ = inplace.__qualname__ = name
    inplace.__doc__ = f"``torch.Tensor.{name}``, once every row it writes is committed."
    return inplace


def _refused(name: str) -> Callable[..., torch.Tensor]:
    method = getattr(torch.Tensor, name)
    view_method = name.rstrip("_")
    instead = (f"the out-of-place {view_method}(...) (a new view of the same memory)" if hasattr(torch.Tensor, view_method)
               else "a new tensor (this call would re-point or resize the cache's memory)")  # fmt: skip

    def reshape_in_place(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return method(self, *args, **kwargs)
        raise TypeError(
            f"{name}: a cache's view is shared (KVCache.key/value return the same object to every caller) and "
            f"keeps its shape and memory; expected {instead}, got an in-place call on a {tuple(self.shape)} "
            f"{type(self).__name__}"
        )

    reshape_in_place.__name__ = reshape_in_place.__qualname__ = name
    return reshape_in_place


def _augmented_subscript_patterns() -> tuple[frozenset[int], tuple[bytes, ...]]:
    """(the subscript opcodes, the byte strings of the instructions that precede one in
    ``x[i] op= y``) of this Python's bytecode (see the module docstring)."""
    op = dis.opmap
    subscripts = frozenset(op[name] for name in ("BINARY_SUBSCR", "BINARY_SLICE") if name in op)
    if "COPY" in op:  # 3.11+: two-byte instructions, COPY n duplicates the n-th item of the stack
        return subscripts, (bytes([op["COPY"], 2, op["COPY"], 2]), bytes([op["COPY"], 3] * 3))
    return subscripts, (bytes([op["DUP_TOP_TWO"], 0]),)


_SUBSCRIPTS, _AUGMENTED_PREFIXES = _augmented_subscript_patterns()


_CACHE = dis.opmap.get("CACHE")  # 3.11+: inline cache entries after an instruction


_METHOD_LOADS = frozenset(op for name, op in dis.opmap.items() if name in ("LOAD_ATTR", "LOAD_METHOD"))
#: Per code object: offset of a subscript instruction -> the method name loaded right after it.
_METHOD_AFTER: "dict[Any, dict[int, str]]" = {}


def _subscript_at(frame: Any) -> int:
    """Offset of the subscript instruction ``frame`` executes, or -1 (see :func:`_in_augmented_assignment`)."""
    at = frame.f_lasti
    code = frame.f_code.co_code  # the unspecialised bytecode
    # Once CPython specialises the subscript (3.11, 3.12: BINARY_SUBSCR_GETITEM calls __getitem__ inline),
    # f_lasti points at its last inline cache entry: step back to the instruction.
    while _CACHE is not None and 0 < at < len(code) and code[at] == _CACHE:
        at -= 2
    if at < 0 or at >= len(code) or code[at] not in _SUBSCRIPTS:
        return -1  # called from a CALL (operator.getitem, super().__getitem__) or C: a plain read
    return at


def _method_called_on_result(frame: Any, at: int) -> Optional[str]:
    """The method looked up on the subscript's result at offset ``at`` (``view[i].zero_()``), if any."""
    code = frame.f_code
    table = _METHOD_AFTER.get(code)
    if table is None:
        table = {}
        previous = None
        for ins in dis.get_instructions(code):
            if previous is not None and previous.opcode in _SUBSCRIPTS and ins.opcode in _METHOD_LOADS:
                table[previous.offset] = ins.argval
            previous = ins
        if len(_METHOD_AFTER) > 4096:  # code objects of a long-running process: keep the memory bounded
            _METHOD_AFTER.clear()
        _METHOD_AFTER[code] = table
    return table.get(at)


def _in_augmented_assignment(frame: Any, at: Optional[int] = None) -> bool:
    """Whether ``frame`` is executing the subscript of ``x[i] op= y`` (read-modify-write); ``at``: the
    subscript's offset when the caller has it (:func:`_subscript_at`)."""
    at = _subscript_at(frame) if at is None else at
    code = frame.f_code.co_code
    return at >= 0 and any(code[max(0, at - len(prefix)):at] == prefix for prefix in _AUGMENTED_PREFIXES)


def _getitem(self: Any, index: Any) -> torch.Tensor:
    """``torch.Tensor.__getitem__``; inside ``view[index] op= x``, or ``view[index].zero_()`` (an in-place
    method writing the whole result, called on it at once), the rows are checked as a write first."""
    if not torch.compiler.is_compiling():
        frame = sys._getframe(1)
        at = _subscript_at(frame)
        if at >= 0 and (_in_augmented_assignment(frame, at) or _method_called_on_result(frame, at) in _WHOLE_WRITES):
            self._check_write(index)
    return torch.Tensor.__getitem__(self, index)


#: In-place methods that write every element of the tensor they are called on: ``view[index].zero_()`` writes
#: exactly the places ``index`` addresses (the chosen-places methods, ``index_fill_``, ``scatter_``, ..., write
#: fewer: not checked there, a legal write into committed rows must keep working).
_WHOLE_WRITES = frozenset(
    n for n in dir(torch.Tensor)
    if n.endswith("_") and not n.startswith("_") and n not in _METADATA and n not in _CHOSEN_PLACES
)  # fmt: skip


def _setitem(self: Any, index: Any, value: Any) -> None:
    """``torch.Tensor.__setitem__`` after the places ``index`` writes are checked."""
    self._check_write(index)
    torch.Tensor.__setitem__(self, index, value)


def _data_property() -> property:
    """``view.data``: read as any tensor's; assigning it would re-point the shared view (as ``set_``)."""
    getter = torch.Tensor.data.__get__

    def refuse(self: Any, value: Any) -> None:
        raise TypeError(
            f"data: a cache's view is shared (KVCache.key/value return the same object to every caller) and keeps "
            f"its memory; expected no assignment, got one of a {type(value).__name__} to a {tuple(self.shape)} "
            f"{type(self).__name__}; write into it instead (view[slot, rows] = x, append_kv)"
        )

    return property(lambda self: getter(self, type(self)), refuse, doc="The view as a plain tensor (read-only).")


def _requires_grad_(self: Any, requires_grad: bool = True) -> Any:
    """``torch.Tensor.requires_grad_``, refused with ``True``: the cache is written in place by every step
    (an in-place write to a leaf that requires grad is an autograd error) and attention over it would
    return outputs that require grad."""
    if requires_grad and not torch.compiler.is_compiling():
        raise TypeError(f"requires_grad_: a cache's view is inference state; expected requires_grad=False, got "
                        f"{requires_grad!r} (clone the rows to differentiate through them)")  # fmt: skip
    return torch.Tensor.requires_grad_(self, requires_grad)


def _requires_grad_property() -> property:
    """``view.requires_grad``: read as any tensor's; set to True refused as :func:`_requires_grad_`."""
    descriptor = torch.Tensor.requires_grad

    def assign(self: Any, value: Any) -> None:
        if value and not torch.compiler.is_compiling():
            _requires_grad_(self, value)  # raises
        descriptor.__set__(self, value)

    return property(lambda self: descriptor.__get__(self, type(self)), assign, doc=descriptor.__doc__)


def install(cls: type, *, shared_view: bool = True) -> None:
    """Replaces every data-writing in-place method of ``cls`` by a checked one (``cls._check_write``),
    ``__setitem__`` by a checked one and ``__getitem__`` as above; for a ``VirtualKVView`` (``shared_view``, one object every caller holds) also
    its in-place reshapes by refusals, and ``data`` and ``requires_grad(_)``. A ``VirtualKVTensor``
    (``shared_view=False``) keeps those: it is the caller's own tensor."""
    public = [n for n in dir(torch.Tensor) if n.endswith("_") and not n.startswith("_") and n not in _METADATA]
    for name in public + [n for n in _INPLACE_OPERATORS if hasattr(torch.Tensor, n)]:
        setattr(cls, name, _checked(name, _CHOSEN_PLACES.get(name)))
    cls.__getitem__ = _getitem
    cls.__setitem__ = _setitem
    if not shared_view:
        return
    for name in _RESHAPING:
        if hasattr(torch.Tensor, name):
            setattr(cls, name, _refused(name))
    cls.data = _data_property()
    cls.requires_grad_ = _requires_grad_
    cls.requires_grad = _requires_grad_property()
