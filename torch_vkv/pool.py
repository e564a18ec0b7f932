"""Physical page pools: the memory that backs virtual KV tensors.

A :class:`PagePool` pre-creates physical pages up to a budget (the paper's
``reserve_physical_pages``), hands them to reservations and takes them back
without re-creating them. It can grow and shrink while in use; shrinking
returns free pages to the driver.

Threads: every method may be called from any thread; the C++ pool holds one
mutex around its state and every driver call (with the GIL released), and the
Python object keeps no state of its own. A pool cannot be copied or pickled,
and one inherited through ``fork()`` is unusable in the child (see
``torch_vkv._lifetime``).
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import torch

from torch_vkv._checks import check_int, fail
from torch_vkv._ext import core
from torch_vkv._lifetime import DropAfterCapture, Unique, forked_error, repr_before_init, track

__all__ = ["ADDRESS_SPACE_BYTES", "PagePool", "resolve_device"]

#: Default host page size: the same 2 MiB as the GPU's allocation granularity.
DEFAULT_HOST_PAGE_SIZE = 2 << 20

#: Virtual memory one process can reserve: 128 TiB, the 47-bit user address
#: space of x86-64 and AArch64 Linux (CUDA's unified address space shares it).
#: Sizes are checked against it before anything is reserved.
ADDRESS_SPACE_BYTES = 1 << 47


def resolve_device(device: Any) -> torch.device:
    """The device a pool or cache lives on.

    ``None`` -> the current CUDA device if CUDA is available, else the CPU;
    ``"cuda"`` -> the current CUDA device. A CUDA device on a machine (or a
    torch build) without CUDA, or an index past the last GPU, is a
    ``ValueError`` (checked without initialising CUDA when none is available);
    CUDA in a child forked after CUDA was initialised is a ``RuntimeError``,
    as torch's own.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        fail("device", "a torch.device, 'cpu' or 'cuda[:N]'", device)
    if device.type == "cuda":
        if getattr(torch.cuda, "_is_in_bad_fork", lambda: False)():
            raise RuntimeError(
                f"device: expected 'cpu' in a process forked after CUDA was initialised (CUDA cannot be used in a "
                f"forked child, as torch says; start workers with the 'spawn' method), got {str(device)!r}"
            )
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            fail("device", f"'cpu' ({why})", str(device))
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            fail("device", f"a CUDA device index < {torch.cuda.device_count()} (the GPUs visible)", str(device))
    elif device.type != "cpu":
        fail("device", "a CPU or CUDA device", device)
    return device


#: The largest host page size passed to the core (its sizes are 64-bit; it refuses pages past RAM + swap).
MAX_HOST_PAGE_SIZE = (1 << 64) - 1
#: Page counts past this mean "no limit" to the core (its budget without one): larger byte counts are clamped.
_UNLIMITED_PAGES = 1 << 62


def check_host_page_size(page_size: Any) -> int:
    """A host backend page size: a positive multiple of the OS page size (``mmap`` maps whole pages)."""
    page_size = check_int("page_size", page_size, low=1, high=MAX_HOST_PAGE_SIZE)
    if page_size % mmap.PAGESIZE:
        fail("host page_size", f"a positive multiple of the OS page size ({mmap.PAGESIZE} bytes)", page_size)
    return page_size


class PagePool(DropAfterCapture, Unique):
    """A budget of physical pages on one device.

    Parameters
    ----------
    device : ``"cpu"`` (the host backend: memfd + mmap) or ``"cuda[:N]"`` (the
        CUDA driver's virtual memory API); default: the current CUDA device,
        else the CPU.
    max_bytes : budget in bytes, rounded down to whole pages; ``None`` means no
        budget beyond what the driver can give.
    page_size : host backend only; bytes per page (a multiple of the OS page
        size, 2 MiB by default). On CUDA the page size is the driver's
        allocation granularity (2 MiB on H100/H200).
    prefill_bytes : create this many bytes of pages now, so that later commits
        only map them.

    Several :class:`~torch_vkv.KVCache` objects may share one pool (one budget
    for several models). Closing one of them returns its pages to this pool's
    free list and destroys none: whoever made the pool decides when to
    :meth:`trim` it. Safe to use from several threads. Cannot be copied or
    pickled; unusable in a child process after ``fork()``.
    """

    _copy_hint = "pass the same pool to every cache that should share it"

    def __init__(
        self,
        device: Any = None,
        *,
        max_bytes: int | None = None,
        page_size: int | None = None,
        prefill_bytes: int = 0,
    ) -> None:
        self._pid = os.getpid()
        self._forked = False
        self.device = resolve_device(device)
        max_bytes = None if max_bytes is None else check_int("max_bytes", max_bytes, low=0)
        prefill_bytes = check_int("prefill_bytes", prefill_bytes, low=0)
        C = core()
        if self.device.type == "cuda":
            if page_size is not None:
                fail("page_size", "None on CUDA (the driver's granularity is used)", page_size)
            torch.cuda.init()  # the primary context PyTorch uses must exist first
            self._backend = C.cuda_backend(self.device.index)
        else:
            page_size = DEFAULT_HOST_PAGE_SIZE if page_size is None else check_host_page_size(page_size)
            self._backend = C.host_backend(page_size)
        self.page_size: int = self._backend.page_size
        self._backend_name: str = self._backend.name  # plain values: readable in a forked child
        max_pages = (1 << 62) if max_bytes is None else max_bytes // self.page_size
        self._core = C.PagePool(self._backend, max_pages)
        track(self)
        if prefill_bytes:
            self.prefill(prefill_bytes)

    @property
    def _pool(self) -> Any:
        """The C++ pool (for reservations drawing on it); raises in a forked child."""
        if self._forked:
            raise forked_error("PagePool", "pool", self._pid)
        return self._core

    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"host"``."""
        return self._backend_name

    @property
    def max_pages(self) -> int:
        """The budget in pages: pages that may exist at once."""
        return self._pool.stats()["max_pages"]

    def prefill(self, num_bytes: int) -> int:
        """Creates free pages until ``num_bytes`` worth exist (within the budget); returns pages existing.

        Raises :class:`~torch_vkv.OutOfPagesError` when the device cannot hold them: on the host backend,
        at once, with nothing created, past the machine's memory and swap."""
        num_bytes = check_int("num_bytes", num_bytes, low=0)
        return self._pool.prefill(min(-(-num_bytes // self.page_size), _UNLIMITED_PAGES))

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Grows or shrinks the budget. Shrinking destroys free pages now; pages
        in use stay until they are released, and none is created while over budget."""
        pages = _UNLIMITED_PAGES if max_bytes is None else check_int("max_bytes", max_bytes, low=0) // self.page_size
        self._pool.set_max_pages(min(pages, _UNLIMITED_PAGES))  # a budget past the address space is none

    def trim(self, keep_free_bytes: int = 0) -> int:
        """Returns free pages beyond ``keep_free_bytes`` to the driver; returns pages destroyed.

        Every free page counts, whichever cache used it last: on a shared pool
        only the pool's owner should trim."""
        keep = check_int("keep_free_bytes", keep_free_bytes, low=0)
        return self._pool.trim(min(keep // self.page_size, _UNLIMITED_PAGES))

    def reap(self) -> None:
        """Finishes decommits whose fences have completed (does not wait)."""
        self._pool.reap()

    def available(self) -> int:
        """Pages a commit can have now: free, creatable within the budget, or pending a fence.

        Lock-free (no wait for a background commit's driver calls): a snapshot as of the last
        operation on the pool to end, exact while no other thread is inside it. A commit
        re-checks under the pool's mutex and raises :class:`~torch_vkv.OutOfPagesError`,
        changing nothing, when short."""
        return self._pool.available()

    def stats(self) -> dict[str, Any]:
        """Pool counters: ``created_pages``, ``free_pages``, ``mapped_pages``,
        ``pending_pages``, ``max_pages``, ``page_size``, call counts and times."""
        return self._pool.stats()

    def _mark_forked(self) -> None:
        # In a child after fork(): the parent owns the pages; touch nothing.
        self._forked = True

    @repr_before_init
    def __repr__(self) -> str:  # reads counters only, never page memory
        head = f"PagePool(backend={self.backend!r}, device={str(self.device)!r}, page_size={self.page_size}"
        if self._forked:
            return f"{head}, created in process {self._pid} before fork(): unusable here)"
        s = self._core.stats()
        return (
            f"{head}, created_pages={s['created_pages']}, free_pages={s['free_pages']}, "
            f"mapped_pages={s['mapped_pages']}, max_pages={s['max_pages']})"
        )
