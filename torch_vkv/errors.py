"""Typed errors of torch_vkv.

Three kinds of failure are kept apart:

* bad input raises :class:`ValueError` / :class:`TypeError` saying what was
  expected and what was given;
* no capacity raises a :class:`KVCacheCapacityError` that a scheduler can catch
  and act on (preempt, wait, reject); whatever raised it changed nothing;
* a driver failure raises :class:`RuntimeError` naming the driver call, its
  error string and the sizes involved.
"""

from __future__ import annotations

__all__ = ["KVCacheCapacityError", "OutOfPagesError", "OutOfSlotsError"]


class KVCacheCapacityError(RuntimeError):
    """The cache cannot serve a request now; nothing was changed."""


class OutOfPagesError(KVCacheCapacityError):
    """Not enough physical pages to commit what was asked.

    Attributes ``requested_pages`` and ``available_pages`` say how many pages
    were asked for and how many could have been had.
    """

    def __init__(self, message: str, requested_pages: int = 0, available_pages: int = 0) -> None:
        super().__init__(message)
        self.requested_pages = requested_pages
        self.available_pages = available_pages


class OutOfSlotsError(KVCacheCapacityError):
    """Every slot (batch row) of the cache is in use."""
