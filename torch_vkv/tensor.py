"""``VirtualKVTensor``: a tensor whose storage is a reserved virtual range.

Kernels see an ordinary strided tensor with a stable ``data_ptr()``; physical
pages are committed and decommitted underneath it by ranges of its leading
dimensions. Reading a row whose page is not committed faults (a segfault on
the host backend, an illegal-address error on the GPU), exactly as with the
driver, so callers commit before they read: :class:`torch_vkv.KVCache` does.

On CUDA the storage comes from a ``torch.cuda.MemPool`` built on torch_vkv's
pluggable allocator (``vkv_alloc`` reserves virtual space only), so PyTorch
owns the tensor in the ordinary way. On the CPU it wraps a host reservation
through the buffer protocol; the tensor keeps the reservation alive.

Extension points for subclasses:

* ``_commit_pages(first, count)`` / ``_decommit_pages(first, count, stream)``
  are the only places that touch the page table; override them to observe or
  veto commits (call ``super()``);
* ``__torch_function__`` returns plain ``torch.Tensor`` results for every
  operation (views included), so ``torch.compile`` and kernels only ever see
  plain tensors; a subclass that wants its own type back must override it;
* metadata are plain Python attributes (``page_size``, ``reservation``, ``pool``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch

from torch_vkv._checks import ArgumentTypeError, fail
from torch_vkv._ext import core
from torch_vkv.pool import PagePool

__all__ = ["VirtualKVTensor"]


@functools.lru_cache(maxsize=None)
def _pluggable_allocator() -> Any:
    """The CUDAPluggableAllocator over ``vkv_alloc``/``vkv_free`` (stateless; one per process)."""
    from torch.cuda.memory import CUDAPluggableAllocator

    return CUDAPluggableAllocator(core().__file__, "vkv_alloc", "vkv_free")


def _new_mem_pool() -> Any:
    alloc = _pluggable_allocator().allocator()
    try:
        return torch.cuda.MemPool(alloc, no_split=True)
    except TypeError:  # older signature without no_split
        return torch.cuda.MemPool(alloc)


class VirtualKVTensor(torch.Tensor):
    """A tensor over reserved virtual memory with pages committed on demand.

    Build one with :meth:`empty`. ``commit`` / ``decommit`` / ``is_committed``
    take a leading index: ints for the first dimensions, optionally ending with
    a ``slice`` (step 1) over the next one, e.g. ``t.commit(slot, slice(0, n))``
    backs rows ``t[slot, 0:n]``. Commit rounds out to whole pages; decommit
    only drops pages that lie entirely inside the range.
    """

    page_size: int
    pool: PagePool
    reservation: Any
    _mem_pool: Any

    @classmethod
    def empty(
        cls,
        shape: Sequence[int],
        *,
        dtype: torch.dtype,
        pool: PagePool | None = None,
        device: Any = None,
        page_size: int | None = None,
    ) -> "VirtualKVTensor":
        """Reserves virtual memory for ``shape`` (rounded up to whole pages) on
        ``pool``'s device, or on a new pool of its own on ``device`` (host pages
        of ``page_size`` bytes on the CPU). Nothing is committed."""
        if pool is None:
            pool = PagePool(device, page_size=page_size)
        elif device is not None or page_size is not None:
            fail("device/page_size", "None when a pool is given (the pool decides)", (device, page_size))
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            fail("shape", "a non-empty shape of positive sizes", shape)
        if not isinstance(dtype, torch.dtype):
            fail("dtype", "a torch.dtype", dtype, ArgumentTypeError)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        C = core()
        mem_pool = None
        if pool.device.type == "cuda":
            mem_pool = _new_mem_pool()
            with torch.cuda.use_mem_pool(mem_pool, device=pool.device):
                try:
                    raw = torch.empty(nbytes, dtype=torch.uint8, device=pool.device)
                except torch.OutOfMemoryError as e:
                    raise RuntimeError(
                        f"vkv_alloc could not reserve {nbytes} bytes of virtual memory: "
                        f"{C.allocator_last_error() or e}"
                    ) from e
            reservation = C.Reservation.adopt(pool._pool, raw.data_ptr())
        else:
            reservation = C.Reservation.create(pool._pool, nbytes)
            raw = torch.frombuffer(reservation, dtype=torch.uint8, count=nbytes)
        data = raw.view(dtype).view(shape)
        self = torch.Tensor._make_subclass(cls, data, False)
        self.page_size = pool.page_size
        self.pool = pool
        self.reservation = reservation
        self._mem_pool = mem_pool
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Every operation returns plain tensors: kernels, autograd and
        # torch.compile never meet the subclass, only its storage.
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def __repr__(self, *, tensor_contents=None) -> str:  # never reads memory
        return (
            f"VirtualKVTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"committed_bytes={self.committed_bytes()}, reserved_bytes={self.reservation.bytes})"
        )

    # -- ranges ---------------------------------------------------------------
    def byte_range(self, *index: int | slice) -> tuple[int, int]:
        """Byte offsets ``[start, stop)`` from the start of the storage that the
        leading ``index`` selects."""
        with torch._C.DisableTorchFunctionSubclass():
            shape, strides = tuple(self.shape), tuple(self.stride())
        if len(index) > len(shape):
            fail("index", f"at most {len(shape)} leading indices", index)
        offset = 0
        for dim, idx in enumerate(index):
            last = dim == len(index) - 1
            if isinstance(idx, slice):
                if not last:
                    fail("index", "ints for all but the last leading index (a contiguous range)", index)
                if idx.step not in (None, 1):
                    fail("index", "a slice with step 1", idx)
                start, stop, _ = idx.indices(shape[dim])
                stop = max(start, stop)
                return (offset + start * strides[dim]) * self.element_size(), (
                    offset + stop * strides[dim]
                ) * self.element_size()
            if isinstance(idx, bool) or not isinstance(idx, int):
                fail("index", "ints and an optional final slice", index, ArgumentTypeError)
            if not 0 <= idx < shape[dim]:
                fail(f"index[{dim}]", f"an int in [0, {shape[dim]})", idx)
            offset += idx * strides[dim]
        extent = strides[len(index) - 1] if index else math.prod(shape)
        return offset * self.element_size(), (offset + extent) * self.element_size()

    def _pages_covering(self, *index: int | slice) -> tuple[int, int]:
        start, stop = self.byte_range(*index)
        if stop <= start:
            return 0, 0
        first = start // self.page_size
        return first, -(-stop // self.page_size) - first

    def _pages_inside(self, *index: int | slice) -> tuple[int, int]:
        start, stop = self.byte_range(*index)
        first = -(-start // self.page_size)
        return first, max(0, stop // self.page_size - first)

    # -- commit / decommit ----------------------------------------------------
    def commit(self, *index: int | slice) -> int:
        """Backs the rows selected by ``index`` with physical pages; returns the
        number of pages newly committed. All or nothing: raises
        :class:`torch_vkv.OutOfPagesError` with nothing changed."""
        return self._commit_pages(*self._pages_covering(*index))

    def decommit(self, *index: int | slice, stream: Any = None) -> int:
        """Returns the pages that lie entirely inside ``index`` to the pool.

        On CUDA the unmap is ordered after the work queued so far on ``stream``
        (default: the current stream): a kernel still reading the rows never
        faults. Returns the number of pages decommitted.
        """
        first, count = self._pages_inside(*index)
        return self._decommit_pages(first, count, self._fence_stream(stream))

    def is_committed(self, *index: int | slice) -> bool:
        """Whether every page under ``index`` is committed."""
        first, count = self._pages_covering(*index)
        return all(self.reservation.is_committed(p) for p in range(first, first + count))

    def committed_bytes(self) -> int:
        return self.reservation.num_committed() * self.page_size

    def committed_ranges(self) -> list[tuple[int, int]]:
        """Committed byte ranges as ``[(offset, length)]`` from the storage start."""
        return [(f * self.page_size, n * self.page_size) for f, n in self.reservation.committed_ranges()]

    def _fence_stream(self, stream: Any) -> int | None:
        if self.pool.device.type != "cuda":
            return None
        if stream is None:
            stream = torch.cuda.current_stream(self.pool.device)
        return int(stream.cuda_stream)

    def _commit_pages(self, first: int, count: int) -> int:
        return self.reservation.commit(first, count) if count else 0

    def _decommit_pages(self, first: int, count: int, stream: int | None) -> int:
        return self.reservation.decommit(first, count, stream) if count else 0

    def release(self) -> None:
        """Decommits every page now (waiting for pending fences). The virtual
        range stays reserved until the tensor (and, on CUDA, its pool) dies."""
        self.reservation.release_all()
