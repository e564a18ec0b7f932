"""Physical page pools: the memory that backs virtual KV tensors.

A :class:`PagePool` pre-creates physical pages up to a budget (the paper's
``reserve_physical_pages``), hands them to reservations and takes them back
without re-creating them. It can grow and shrink while in use; shrinking
returns free pages to the driver.
"""

from __future__ import annotations

from typing import Any

import torch

from torch_vkv._checks import check_int, fail
from torch_vkv._ext import core

__all__ = ["PagePool", "resolve_device"]

#: Default host page size: the same 2 MiB as the GPU's allocation granularity.
DEFAULT_HOST_PAGE_SIZE = 2 << 20


def resolve_device(device: Any) -> torch.device:
    """``None`` -> the current CUDA device if CUDA is available, else the CPU."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        fail("device", "a torch.device, 'cpu' or 'cuda[:N]'", device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        fail("device", "a CPU or CUDA device", device)
    return device


class PagePool:
    """A budget of physical pages on one device.

    Args:
        device: ``"cpu"`` (the host backend: memfd + mmap) or ``"cuda[:N]"``
            (the CUDA driver's virtual memory API).
        max_bytes: budget in bytes, rounded down to whole pages; ``None``
            means no budget beyond what the driver can give.
        page_size: host backend only; bytes per page (a multiple of the OS page
            size, 2 MiB by default). On CUDA the page size is the driver's
            allocation granularity (2 MiB on H100/H200).
        prefill_bytes: create this many bytes of pages now, so that later
            commits only map them.
    """

    def __init__(
        self,
        device: Any = None,
        *,
        max_bytes: int | None = None,
        page_size: int | None = None,
        prefill_bytes: int = 0,
    ) -> None:
        self.device = resolve_device(device)
        C = core()
        if self.device.type == "cuda":
            if page_size is not None:
                fail("page_size", "None on CUDA (the driver's granularity is used)", page_size)
            torch.cuda.init()  # the primary context PyTorch uses must exist first
            self._backend = C.cuda_backend(self.device.index)
        else:
            page_size = DEFAULT_HOST_PAGE_SIZE if page_size is None else check_int("page_size", page_size, low=1)
            self._backend = C.host_backend(page_size)
        self.page_size: int = self._backend.page_size
        max_pages = (1 << 62) if max_bytes is None else check_int("max_bytes", max_bytes, low=0) // self.page_size
        self._pool = C.PagePool(self._backend, max_pages)
        if prefill_bytes:
            self.prefill(prefill_bytes)

    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"host"``."""
        return self._backend.name

    @property
    def max_pages(self) -> int:
        return self._pool.stats()["max_pages"]

    def prefill(self, num_bytes: int) -> int:
        """Creates free pages until ``num_bytes`` worth exist (within the budget); returns pages existing."""
        num_bytes = check_int("num_bytes", num_bytes, low=0)
        return self._pool.prefill(-(-num_bytes // self.page_size))

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Grows or shrinks the budget. Shrinking destroys free pages now; pages
        in use stay until they are released, and none is created while over budget."""
        pages = (1 << 62) if max_bytes is None else check_int("max_bytes", max_bytes, low=0) // self.page_size
        self._pool.set_max_pages(pages)

    def trim(self, keep_free_bytes: int = 0) -> int:
        """Returns free pages beyond ``keep_free_bytes`` to the driver; returns pages destroyed."""
        keep = check_int("keep_free_bytes", keep_free_bytes, low=0)
        return self._pool.trim(keep // self.page_size)

    def reap(self) -> None:
        """Finishes decommits whose fences have completed (does not wait)."""
        self._pool.reap()

    def stats(self) -> dict[str, Any]:
        """Pool counters: ``created_pages``, ``free_pages``, ``mapped_pages``,
        ``pending_pages``, ``max_pages``, ``page_size``, call counts and times."""
        return self._pool.stats()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"PagePool(backend={self.backend!r}, device={str(self.device)!r}, page_size={self.page_size}, "
            f"created_pages={s['created_pages']}, free_pages={s['free_pages']}, max_pages={s['max_pages']})"
        )
