"""``VirtualKVTensor``: a tensor whose storage is a reserved virtual range.

Kernels see an ordinary strided tensor with a stable ``data_ptr()``; physical
pages are committed and decommitted underneath it by ranges of its leading
dimensions.

**Reads of rows that are not committed.** On the host backend (CPU) every page
that is not committed reads as zeros and faults only on a write (writes
through a ``VirtualKVTensor`` or ``VirtualKVView`` itself are checked first
and raise ``ValueError``); in strict
mode (``TORCH_VKV_DEBUG=1`` in the environment when the tensor is created)
it faults on any access, so tests catch out-of-bounds reads. On CUDA a shared
zero page does not scale (it costs driver memory per mapping), so such a read
is an illegal-address fault that kills the CUDA context: **on CUDA, reading
rows past what was committed is the caller's responsibility**
(:class:`torch_vkv.KVCache` commits what ``reserve``/``step`` ask for, and
its kernels read no further). What torch_vkv itself does never reads them:
``repr``/``str`` of a :class:`VirtualKVTensor` or a :class:`VirtualKVView`
show shape, dtype, device and committed rows, and at most the values of
committed rows.

**Lifetime.** The storage is the reservation itself, handed to PyTorch through
DLPack: every tensor and view over it keeps the virtual range alive, as with
any PyTorch storage, and the range (with any pages still committed) is
released when the last of them dies. :meth:`VirtualKVTensor.close` returns the
pages at once: afterwards views read zeros on the host backend, and on CUDA
they are invalid like freed memory (their ``repr`` says ``<released>``
without reading).

**Copies.** Pickling, ``torch.save`` and ``copy.deepcopy`` of these tensors
raise ``TypeError``: they would write the whole virtual range. Clone the rows
you want (``cache.key(0)[slot, :n].clone()``); ordinary tensors pickle as usual.
A slice (``view[slot, :n]``) is an ordinary tensor over the same storage, and
``torch.save`` writes a tensor's whole storage: save ``.clone()`` of it, never
the slice itself (that reads every uncommitted row: zeros on the host backend,
a fault on CUDA).

**fork.** In a child process an inherited tensor's committed pages are
private copy-on-write copies (the child's writes never reach the parent;
writes through a view past them raise ``ValueError``, as in the parent), and
every page-table operation raises ``RuntimeError`` ("create a new cache in
the child"). CUDA itself cannot be used in a forked child (PyTorch says the
same); use the ``spawn`` start method.

Extension points for subclasses:

* ``_commit_pages(first, count)`` / ``_decommit_pages(first, count, stream)``
  are the only places that touch the page table; override them to observe or
  veto commits (call ``super()``);
* ``__torch_function__`` is disabled (PyTorch's
  ``_disabled_torch_function_impl``, as ``torch.nn.Parameter`` does): every
  operation, views included, returns a plain ``torch.Tensor`` at no cost per
  call, so kernels and ``torch.compile`` only meet plain tensors; a subclass
  that wants its own type back must override it;
* metadata are plain Python attributes (``page_size``, ``reservation``, ``pool``).
"""

from __future__ import annotations

import bisect
import math
import weakref
from typing import Any, Iterable, NoReturn, Optional, Sequence, TypeVar

import torch
import torch.utils.dlpack

from torch_vkv._checks import ArgumentTypeError, Described, check_int, check_stream, fail, is_int
from torch_vkv import _shared_writes, _sharing, _view_writes
from torch_vkv._ext import core
from torch_vkv._write_places import check_tensor_write, inside_runs, slots_and_rows
from torch_vkv.pool import ADDRESS_SPACE_BYTES, PagePool

__all__ = ["VirtualKVTensor", "VirtualKVView"]

# The class a classmethod was called on (typing.Self needs Python 3.11): ``Sub.empty(...)`` is a ``Sub``.
_Tensor = TypeVar("_Tensor", bound="VirtualKVTensor")


_CLOSED_WRITE = ("cannot write through a view of a closed cache (its memory is released); "
                 "take new views from an open KVCache")


#: Live ``VirtualKVTensor`` s by their storage's address, so that a plain tensor over a cache's memory (a
#: slice of a view, ``view.as_subclass(torch.Tensor)``) is known for one (:func:`view_over_cache`). A new
#: reservation at the address of a released one takes its entry.
_SOURCES: "weakref.WeakValueDictionary[int, VirtualKVTensor]" = weakref.WeakValueDictionary()
#: The attribute of a reservation's storage that remakes its ``VirtualKVTensor`` once that was dropped:
#: ``(class, dtype, shape, pool, reservation)``.
_RECORD = "_torch_vkv_source"


def cache_source(t: torch.Tensor) -> Optional["VirtualKVTensor"]:
    """The live :class:`VirtualKVTensor` whose memory ``t`` lies over (shares its storage), or ``None``."""
    if isinstance(t, VirtualKVView):
        return t.source
    if isinstance(t, VirtualKVTensor) and t._over_own_reservation():
        return t  # else re-pointed by set_: the tensor whose memory it views now, if any
    if not isinstance(t, torch.Tensor) or t.device.type not in ("cpu", "cuda"):
        return None
    try:
        storage = t.untyped_storage()
        source = _SOURCES.get(storage.data_ptr())
    except Exception:  # no storage (a fake, functional or wrapper subclass tensor): not a cache's
        return None
    if source is not None and not source._over_own_reservation():
        source = None  # re-pointed by set_: remade below
    if source is None:  # the tensor was dropped, a detached tensor (no view base) keeps the storage alive
        record = getattr(storage, _RECORD, None)
        source = None if record is None else record[0]._wrap(torch.empty(0, dtype=record[1], device=t.device)
                                                                .set_(storage, 0, record[2]), *record[3:])  # fmt: skip
    return source


def view_over_cache(t: torch.Tensor) -> Optional["VirtualKVView"]:
    """``t`` as a :class:`VirtualKVView` when it lies over the memory of a live :class:`VirtualKVTensor`
    (a view itself, or a plain tensor of at least 2 dimensions, slots and rows first, that shares its
    storage); ``None`` for any other tensor. Reads no data."""
    if isinstance(t, VirtualKVView):
        return t
    source = cache_source(t) if isinstance(t, torch.Tensor) and t.dim() >= 2 else None
    return None if source is None else VirtualKVView.of(source, t)


def _refuse_copy(self: torch.Tensor, *args: Any) -> NoReturn:
    raise TypeError(
        f"a {type(self).__name__} lives in reserved virtual memory and cannot be pickled, saved with "
        "torch.save or deep-copied (that would write the whole virtual range, committed or not); "
        "clone the rows you want instead, e.g. cache.key(0)[slot, :n].clone()"
    )


class VirtualKVTensor(torch.Tensor):
    """A tensor over reserved virtual memory with pages committed on demand.

    Build one with :meth:`empty`. ``commit`` / ``decommit`` / ``is_committed``
    take a leading index: ints for the first dimensions, optionally ending with
    a ``slice`` (step 1) over the next one, e.g. ``t.commit(slot, slice(0, n))``
    backs rows ``t[slot, 0:n]``. Commit rounds out to whole pages; decommit
    only drops pages that lie entirely inside the range.

    Writes through the tensor itself (``t[i] = x``, ``t[i] += x`` and its
    in-place methods: ``fill_``, ``copy_``, ``index_put_``, ...) raise
    ``ValueError`` for places outside committed pages instead of faulting;
    writes through tensors an op returned (``t[i].fill_(x)``) are not checked.
    """

    page_size: int
    pool: PagePool
    reservation: Any

    __torch_function__ = torch._C._disabled_torch_function_impl
    __reduce_ex__ = __deepcopy__ = _refuse_copy

    @classmethod
    def empty(
        cls: type[_Tensor],
        shape: Sequence[int],
        *,
        dtype: torch.dtype,
        pool: PagePool | None = None,
        device: Any = None,
        page_size: int | None = None,
    ) -> _Tensor:
        """Reserves virtual memory for ``shape`` (rounded up to whole pages) on
        ``pool``'s device, or on a new pool of its own on ``device`` (host pages
        of ``page_size`` bytes on the CPU). Nothing is committed."""
        if pool is None:
            pool = PagePool(device, page_size=page_size)
        elif not isinstance(pool, PagePool):
            fail("pool", "a torch_vkv.PagePool or None", type(pool), ArgumentTypeError)
        elif device is not None or page_size is not None:
            fail("device/page_size", "None when a pool is given (the pool decides)", (device, page_size))
        if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)) or not shape:
            fail("shape", "a non-empty sequence of positive ints", shape, ArgumentTypeError)
        shape = tuple(check_int(f"shape[{i}]", s, low=1) for i, s in enumerate(shape))
        if not isinstance(dtype, torch.dtype):
            fail("dtype", "a torch.dtype", dtype, ArgumentTypeError)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        if nbytes > ADDRESS_SPACE_BYTES:  # before the C++, which takes 64-bit sizes
            fail("shape", f"at most {ADDRESS_SPACE_BYTES} bytes (the {ADDRESS_SPACE_BYTES >> 40} TiB address space)",
                 Described(f"{shape}, {nbytes} bytes of {dtype}"))  # fmt: skip
        reservation = core().Reservation.create(pool._pool, nbytes)
        # The reservation is the storage: the DLPack deleter keeps it alive
        # for as long as any tensor or view over it lives.
        raw = torch.utils.dlpack.from_dlpack(reservation.dlpack())[:nbytes]
        self = cls._wrap(raw.view(dtype).view(shape), pool, reservation)
        # The storage outlives this object under tensors that are no view of it (``view.detach()``,
        # ``view.data``): it keeps what makes a new one (cache_source), and no tensor (that would be a cycle
        # through C++ the collector cannot see).
        setattr(self.untyped_storage(), _RECORD, (cls, dtype, shape, pool, reservation))
        return self

    @classmethod
    def _wrap(cls: type[_Tensor], data: torch.Tensor, pool: PagePool, reservation: Any) -> _Tensor:
        self = torch.Tensor._make_subclass(cls, data, False)
        self.page_size = pool.page_size
        self.pool = pool
        self.reservation = reservation
        _SOURCES[self.untyped_storage().data_ptr()] = self
        return self

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # never reads the tensor's memory
        head = f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}"
        state = self._unusable_state()
        if state:
            return f"{head}, {state})"
        return f"{head}, committed_bytes={self.committed_bytes()}, reserved_bytes={self.reservation.bytes})"

    def _unusable_state(self) -> str | None:
        if getattr(self, "reservation", None) is None:  # a subclass's __torch_function__ kept the type only
            return "<made by an operation: no reservation metadata, memory not read>"
        if self.reservation.forked:
            return "<inherited through fork(): unusable in this process>"
        if self.reservation.closed:
            return "<released>"
        return None

    # -- ranges ---------------------------------------------------------------
    def byte_range(self, *index: int | slice) -> tuple[int, int]:
        """Byte offsets ``[start, stop)`` from the start of the storage that the
        leading ``index`` selects. Needs a contiguous tensor (the layout
        :meth:`empty` made; after an in-place ``transpose_`` the rows of an
        index are no byte range: ``ValueError``); its storage offset counts."""
        shape, strides = tuple(self.shape), tuple(self.stride())
        if len(index) > len(shape):
            fail("index", f"at most {len(shape)} leading indices", index)
        if not self._over_own_reservation():
            fail("tensor", "a tensor over the storage of its own reservation (its page table)", Described(
                 f"one re-pointed by set_ to other memory, at {self.untyped_storage().data_ptr():#x}"))
        if not self.is_contiguous():
            fail("tensor", "a contiguous layout, as VirtualKVTensor.empty made it (an index's rows must be one byte "
                 "range; take a transposed view with t.transpose(...) instead of t.transpose_(...))",
                 Described(f"shape {shape}, strides {strides} (changed in place)"))  # fmt: skip
        # Contiguous: the elements under dimension ``dim`` span prod(shape[dim + 1:]) (a size-1 dimension's
        # stride may be anything).
        offset = self.storage_offset()
        for dim, idx in enumerate(index):
            inner = math.prod(shape[dim + 1:])
            last = dim == len(index) - 1
            if isinstance(idx, slice):
                if not last:
                    fail("index", "ints for all but the last leading index (a contiguous range)", index)
                if any(b is not None and not is_int(b) for b in (idx.start, idx.stop, idx.step)):
                    fail("index", "a slice of ints or None", idx, ArgumentTypeError)
                if idx.step not in (None, 1):
                    fail("index", "a slice with step 1", idx)
                start, stop, _ = idx.indices(shape[dim])
                stop = max(start, stop)
                return (offset + start * inner) * self.element_size(), (offset + stop * inner) * self.element_size()
            if not is_int(idx):
                fail("index", "ints and an optional final slice", index, ArgumentTypeError)
            idx = int(idx)
            if not -shape[dim] <= idx < shape[dim]:  # negative counts from the end, as in t[idx]
                fail(f"index[{dim}]", f"an int in [{-shape[dim]}, {shape[dim]})", idx)
            idx %= shape[dim]
            offset += idx * inner
        extent = math.prod(shape[len(index):])
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
        return self._decommit_pages(first, count, self._fence_stream(check_stream(stream)))

    def is_committed(self, *index: int | slice) -> bool:
        """Whether every page under ``index`` is committed."""
        first, count = self._pages_covering(*index)
        return all(self.reservation.is_committed(p) for p in range(first, first + count))

    def committed_bytes(self) -> int:
        """Bytes of the pages committed now (pending decommits excluded)."""
        return self.reservation.num_committed() * self.page_size

    def committed_ranges(self) -> list[tuple[int, int]]:
        """Committed byte ranges as ``[(offset, length)]`` from the storage start."""
        return [(f * self.page_size, n * self.page_size) for f, n in self.reservation.committed_ranges()]

    def _fence_stream(self, stream: Any) -> int | None:
        if self.pool.device.type != "cuda":
            return 0  # the host backend fences nothing, unless a test holds its fences (core().hold_fences)
        if stream is None:
            stream = torch.cuda.current_stream(self.pool.device)
        return int(stream.cuda_stream)

    def _commit_pages(self, first: int, count: int) -> int:
        return self.reservation.commit(first, count) if count else 0

    def _decommit_pages(self, first: int, count: int, stream: int | None) -> int:
        return self.reservation.decommit(first, count, stream) if count else 0

    # -- writes ---------------------------------------------------------------
    # A write into a page that is not committed faults (SIGSEGV on the host backend). Writes through the
    # tensor itself (``t[i] = x``, ``t[i] += x`` and its in-place methods, installed below) are checked
    # against the page table first, as a cache view's; what an op returns is a plain tensor, unchecked.

    def _check_write(self, index: Any = None) -> None:
        """Raises ``ValueError`` unless every place that ``index`` (``None``: all) writes is committed."""
        if torch.compiler.is_compiling() or getattr(self, "reservation", None) is None:
            return  # traced (the page table is not traceable); made by an op: no metadata
        source = cache_source(self)  # itself, or after set_ the tensor whose memory it views (None: plain memory)
        if source is None:
            return
        if source.reservation.closed:  # strict mode and CUDA fault (the host's own memory otherwise): as a view
            raise RuntimeError(f"cannot write through a closed {type(self).__name__} (its memory is released)")
        check_tensor_write(self, index, source)  # torch_vkv/_write_places.py

    def _over_own_reservation(self) -> bool:
        """False once ``set_`` gave the tensor other memory (its page table no longer describes it)."""
        return self.untyped_storage().data_ptr() == self.reservation.base

    def release(self) -> None:
        """Decommits every page now (waiting for pending fences, and on CUDA for
        the device). The virtual range stays reserved until the last tensor
        over it dies; pages can be committed again."""
        self.reservation.release_all()

    def close(self) -> None:
        """Returns every page now (as :meth:`release`) and refuses commits
        from then on. Views stay valid Python objects: on the host backend they
        read zeros and writes through them land in memory of the closed range's
        own (never in a pool page), on CUDA they are invalid like freed memory;
        writes through the tensor itself raise ``RuntimeError``. Idempotent."""
        if not self.reservation.closed:
            self.reservation.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (or the owning cache's close) ended the tensor: its memory is released."""
        return self.reservation.closed

    @property
    def forked(self) -> bool:
        """Whether this tensor was inherited from the parent of a fork (then
        every page-table operation raises ``RuntimeError``)."""
        return self.reservation.forked


class VirtualKVView(torch.nn.Parameter):
    """A view of a :class:`VirtualKVTensor` (what ``KVCache.key(layer)`` and
    ``KVCache.value(layer)`` return), shape ``[max_batch_size, max_seq_len,
    num_kv_heads, head_dim]``.

    It is the same strided tensor over the same memory; only three things
    differ from a plain view. ``repr``/``str`` never read a row that is not
    committed: they show shape, dtype, device, :meth:`committed_rows` per slot
    and the values of committed rows of the first slots, or ``<released>``
    after the cache was closed. Pickling, ``torch.save`` and ``copy.deepcopy``
    raise ``TypeError`` (clone the rows wanted instead). Every operation returns
    a plain ``torch.Tensor`` (``__torch_function__`` is disabled), so ops and
    kernels see plain tensors at no extra cost.

    It derives from ``torch.nn.Parameter`` (with ``requires_grad=False``)
    because PyTorch treats parameters as plain tensors everywhere a custom
    subclass is refused: ``torch.compile`` passes them to custom ops (its
    first-call aliasing check rejects other subclasses), CUDA graphs and
    ``torch._dynamo.mark_static_address`` take them as static inputs. One
    consequence: assigned to an ``nn.Module`` attribute it would be registered
    as a parameter of the module; keep cache views in plain attributes of
    non-module objects, or store ``view.as_subclass(torch.Tensor)``.

    Writes through the view itself (``view[slot, rows] = x``, and every
    in-place method that writes data: ``zero_``, ``copy_``, ``exp_``, ``+=``,
    ``index_put_``, ``masked_fill_``, ``scatter_``, ...; see
    ``torch_vkv/_view_writes.py``) are checked against the page table first and
    raise ``ValueError`` for rows that are not committed (``RuntimeError`` after
    the cache was closed): such a write would fault; and for rows in pages
    another slot maps (``KVCache.fork`` / ``remap``: read-only, a write would
    change every slot mapping them). Writes through tensors an
    op returned, ``out=`` arguments of torch functions and in-place torch
    functions (``torch.relu_(view)``, ``torch.Tensor.add_(view, 1)``) are not checked.
    An augmented assignment to an index (``view[slot, rows] += x``, Python's
    ``t = view[slot, rows]; t += x; view[slot, rows] = t``) is checked when
    the view is indexed, before ``t += x`` writes (the view's ``__getitem__``
    recognises the calling bytecode); ``t = view[slot, rows]; t += x`` in two
    statements writes through a plain tensor and is not.
    In-place methods that would change the view's shape, strides or storage
    (``transpose_``, ``unsqueeze_``, ``set_``, ``resize_``, ...) raise
    ``TypeError``: the cache hands this one object to every caller; use the
    out-of-place ``transpose(...)``. So do ``view.data = t`` and
    ``requires_grad_(True)``, and writes, resizes and copies of the storage
    under the view (the whole reservation).
    A plain tensor over the cache's memory (a slice, ``view.as_subclass``) is
    checked by :func:`~torch_vkv.append_kv` as the view is, and refused by
    ``share_memory_``, ``torch.multiprocessing``, pickle, ``torch.save`` and
    ``copy.deepcopy`` (they would copy or move the whole reservation).
    Reading rows past the committed ones reads zeros on the host backend and
    faults on CUDA: there it is the caller's responsibility.
    """

    source: VirtualKVTensor

    __torch_function__ = torch._C._disabled_torch_function_impl
    __reduce_ex__ = __deepcopy__ = _refuse_copy

    #: Slots whose committed rows ``repr`` prints.
    REPR_SLOTS = 2

    @classmethod
    def of(cls, source: VirtualKVTensor, view: torch.Tensor) -> "VirtualKVView":
        """Wraps ``view`` (a tensor over ``source``'s memory, at least 2-D:
        slots, rows, ...) without copying."""
        if not isinstance(source, VirtualKVTensor):
            fail("source", "a VirtualKVTensor", type(source), ArgumentTypeError)
        if view.dim() < 2 or view.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
            fail("view", "a tensor of at least 2 dimensions over the source's storage", tuple(view.shape))
        self = torch.Tensor._make_subclass(cls, view, False)
        self.source = source
        return self

    def committed_rows(self) -> list[int]:
        """For each index of the first dimension (a slot), how many leading rows
        of the second lie entirely in committed pages. Reads only the page table."""
        return self._committed_rows(range(self.shape[0]))

    def _row_layout(self) -> tuple[int, int, int, int]:
        """``(offset, slot_bytes, row_bytes, extent)``: where row 0 of slot 0
        starts in the reservation, the byte strides of slots and rows, and the
        bytes one row spans (heads and head_dim)."""
        esz = self.element_size()
        sizes, strides = tuple(self.shape), tuple(self.stride())
        extent = (1 + sum((n - 1) * st for n, st in zip(sizes[2:], strides[2:]))) * esz
        return self.data_ptr() - self.source.reservation.base, strides[0] * esz, strides[1] * esz, extent

    def _committed_rows(self, slots: Iterable[int], ranges: Optional[list] = None) -> list[int]:
        offset, slot_bytes, row_bytes, extent = self._row_layout()
        ps = self.source.page_size
        ranges = self.source.reservation.committed_ranges() if ranges is None else ranges
        runs = [(f * ps, (f + n) * ps) for f, n in ranges]
        starts = [lo for lo, _ in runs]
        rows = []
        for slot in slots:
            start = offset + slot * slot_bytes
            i = bisect.bisect_right(starts, start) - 1
            end = runs[i][1] if i >= 0 else 0
            fits = start + extent <= end
            rows.append(min(self.shape[1], (end - start - extent) // row_bytes + 1) if fits else 0)
        return rows

    def _rows_committed(self, slot: int, start: int, end: int, runs: Optional[list] = None) -> bool:
        """Whether rows ``[start, end)`` of ``slot`` lie in committed pages
        (True when empty). Reads only the page table; ``runs``: its
        ``committed_ranges()`` when the caller already has them."""
        if end <= start:
            return True
        offset, slot_bytes, row_bytes, extent = self._row_layout()
        base = offset + slot * slot_bytes
        lo, hi = base + start * row_bytes, base + (end - 1) * row_bytes + extent
        runs = runs if runs is not None else self.source.reservation.committed_ranges()
        return inside_runs(lo, hi, runs, self.source.page_size)

    # -- writes ---------------------------------------------------------------
    # A write to a row that is not committed faults (SIGSEGV on the host backend, an illegal
    # address that ends the CUDA context): it would kill a server with every request in flight.
    # Writes through the view itself are checked against the page table first (a few us); what
    # an op returns is a plain tensor and unchecked, and so are writes with CUDA index tensors
    # (reading them would sync), Ellipsis or None in the index.

    def _check_write(self, index: Any = None) -> None:
        if torch.compiler.is_compiling():
            return  # traced code: the page table is not traceable (write through append_kv there)
        reservation = self.source.reservation
        if reservation.closed:
            raise RuntimeError(_CLOSED_WRITE)
        slots, rows = slots_and_rows(index, self.shape[0], self.shape[1], self.dim())
        if not slots or not rows:
            return
        lo, hi = min(rows), max(rows) + 1
        # A forked child writes its private copies of the pages mapped at fork() (docs/design.md,
        # "fork"), read from its own copy of the page table: committed_ranges() refuses there.
        runs = reservation.inherited_ranges() if reservation.forked else reservation.committed_ranges()
        for slot in slots:
            if not self._rows_committed(slot, lo, hi, runs):
                if reservation.closed:  # closed by another thread since the check above
                    raise RuntimeError(_CLOSED_WRITE)
                fail(f"rows written in slot {slot}", f"rows in committed pages (this slot's leading "
                     f"{self._committed_rows([slot], runs)[0]}; commit more first: KVCache.commit or step)",
                     Described(f"rows [{lo}, {hi})"))  # fmt: skip
        _shared_writes.check_shared_write(self, slots, lo, hi)  # pages another slot maps: read-only

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # reads committed rows only
        head = f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}"
        state = self.source._unusable_state()
        if state:
            return f"{head}, {state})"
        rows = self.committed_rows()
        spans = {slot: self._committed_span(slot) for slot, n in enumerate(rows) if not n}
        behind = {slot: span for slot, span in spans.items() if span[1] > span[0]}  # a window gave rows back
        extra = ", sliding window: " + ", ".join(
            f"slot {slot} holds rows [{lo}, {hi}) (earlier rows given back)" for slot, (lo, hi) in behind.items()
        ) if behind else ""  # fmt: skip
        lines = [f"{head}, committed_rows={rows}{extra})"]
        filled = sorted([(slot, 0, n) for slot, n in enumerate(rows) if n]
                        + [(slot, lo, hi) for slot, (lo, hi) in behind.items()])  # fmt: skip
        for slot, lo, hi in filled[: self.REPR_SLOTS]:
            lines.append(f"slot {slot}, rows [{lo}, {hi}):\n{self[slot, lo:hi]!r}")
        if len(filled) > self.REPR_SLOTS:
            lines.append(f"({len(filled) - self.REPR_SLOTS} more slots with committed rows)")
        return "\n".join(lines)

    def _committed_span(self, slot: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of ``slot`` in its first run of committed pages
        (``(0, 0)``: none): where a sliding window gave the first rows back."""
        offset, slot_bytes, row, extent = self._row_layout()
        base = offset + slot * slot_bytes
        ps = self.source.page_size
        for first, count in self.source.reservation.committed_ranges():
            lo = max(0, -(-(first * ps - base) // row))
            hi = min(self.shape[1], ((first + count) * ps - extent - base) // row + 1)
            if hi > lo:
                return lo, hi
        return 0, 0


# Every data-writing in-place method of the view and of the tensor is checked (torch_vkv/_view_writes.py).
_view_writes.install(VirtualKVView)
_view_writes.install(VirtualKVTensor, shared_view=False)
# Plain tensors over a cache's memory: no whole-storage copy or move (torch_vkv/_sharing.py).
_sharing.install()
