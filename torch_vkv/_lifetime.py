"""Lifetime rules for the objects that own driver or OS memory (``KVCache``, ``PagePool``).

Such an object has exactly one owner, in one process:

* it cannot be copied (``copy.copy``, ``copy.deepcopy``) or pickled: a copy
  would share the page tables with the original, and closing one would leave
  the other pointing at released memory. :class:`Unique` raises a
  ``TypeError`` that says so.
* after ``os.fork()`` the child's copy is unusable: every method raises a
  ``RuntimeError`` ("this KVCache was created in process <pid> before fork();
  create a new cache in the child"), and its finalizer does nothing in the
  child (no release, no trim: the parent owns the pages). :func:`track`
  registers an object for this; the ``after_in_child`` fork handler calls each
  live object's ``_mark_forked()``.

:func:`locked` serialises such an object's methods on its ``_lock``;
:func:`one_thread` refuses, with a ``RuntimeError``, a call that would overlap
another thread's call into the same object (an object documented as
single-threaded, such as the serving ``Engine``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from typing import Any, Callable, Iterator, NoReturn, TypeVar

__all__ = ["Closable", "DropAfterCapture", "ThreadBusyError", "Unique", "forked_error", "locked", "one_thread",
           "release_deferred", "repr_before_init", "thread_guard", "track", "tracked"]

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T", bound="Closable")

# Live tracked objects by id. Not a WeakSet: that hashes its members, and a subclass that defines
# ``__eq__`` without ``__hash__`` (Python then sets ``__hash__`` to None) could not be built.
_live: "dict[int, weakref.ref[Any]]" = {}


def track(obj: Any) -> None:
    """Marks ``obj`` unusable in any child forked while it is alive (calls ``obj._mark_forked()`` there)."""
    release_deferred()
    key = id(obj)

    def forget(ref: "weakref.ref[Any]", key: int = key) -> None:
        if _live.get(key) is ref:  # not a newer object that took the same id
            del _live[key]

    _live[key] = weakref.ref(obj, forget)


def tracked() -> list[Any]:
    """The live objects :func:`track` registered."""
    return [obj for obj in (ref() for ref in list(_live.values())) if obj is not None]


# What objects dropped while this thread captured a CUDA graph held (their attributes), released after it.
_deferred: list = []


def _capturing() -> bool:
    try:
        import torch

        return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
    except Exception:  # interpreter shutdown, no CUDA build
        return False


def release_deferred() -> None:
    """Releases the memory of objects dropped during a CUDA-graph capture (see
    :class:`DropAfterCapture`); nothing while this thread still captures. Runs
    by itself when a cache or pool is made and at every call into a cache."""
    if _deferred and not _capturing():
        while _deferred:  # one at a time: another thread's collection may append meanwhile
            _deferred.pop()  # the destructors run here, outside the capture


class DropAfterCapture:
    """Objects whose release calls the driver (unmaps, a device synchronize) and so must not run
    inside a CUDA-graph capture: that invalidates the capture (``operation failed due to a previous
    error during capture``). A garbage collection can drop such an object at any allocation,
    including one during ``torch.compile``'s graph recording; then its attributes are kept alive
    and released later by :func:`release_deferred`."""

    def __del__(self) -> None:
        try:
            if _capturing():
                _deferred.append(list(vars(self).values()))
        except Exception:  # interpreter shutdown: nothing to keep
            pass


def _after_fork_in_child() -> None:
    # Only the forking thread exists in the child: nothing runs concurrently.
    for obj in tracked():
        obj._mark_forked()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def locked(method: _F) -> _F:
    """Runs ``method`` holding ``self._lock`` (an ``RLock``: locked methods call each other)."""

    @functools.wraps(method)
    def run_locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _deferred:
            release_deferred()
        with self._lock:
            return method(self, *args, **kwargs)

    return run_locked  # type: ignore[return-value]


class ThreadBusyError(RuntimeError):
    """Another thread holds the object's :func:`thread_guard`."""


class _Owner:
    """Which thread is inside an object's :func:`one_thread` methods."""

    __slots__ = ("lock", "thread", "thread_name")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: "int | None" = None
        self.thread_name = ""


@contextlib.contextmanager
def thread_guard(obj: Any, what: str, wait: "float | None" = None) -> Iterator[None]:
    """Holds ``obj``'s :func:`one_thread` guard for the ``with`` block: meanwhile another thread's call
    into one of ``obj``'s ``one_thread`` methods raises ``RuntimeError`` at once. Re-entered freely by
    the thread holding it. ``wait``: seconds to wait for another thread's hold to end before raising
    (``None``: do not wait). ``what`` names the caller in the error."""
    owner = obj.__dict__.get("_one_thread") or obj.__dict__.setdefault("_one_thread", _Owner())
    me = threading.get_ident()
    if owner.thread == me:  # re-entered from the thread inside (generate calls step)
        yield
        return
    if not (owner.lock.acquire(timeout=wait) if wait else owner.lock.acquire(blocking=False)):
        name = type(obj).__name__
        raise ThreadBusyError(
            f"{what}: another thread is inside this {name} (expected calls from one thread at a time; "
            f"serialise them with a lock; the thread inside: {owner.thread_name!r})"
        )
    owner.thread, owner.thread_name = me, threading.current_thread().name
    try:
        yield
    finally:
        owner.thread, owner.thread_name = None, ""
        owner.lock.release()


def one_thread(method: _F) -> _F:
    """Runs ``method`` unless another thread is inside one of the object's
    ``one_thread`` methods (or a :func:`thread_guard` block), in which case it raises
    ``RuntimeError`` at once (an overlapping call would corrupt its queues, not wait its
    turn: the caller must serialise). The same thread may re-enter (``generate`` calls ``step``)."""

    @functools.wraps(method)
    def run_alone(self: Any, *args: Any, **kwargs: Any) -> Any:
        with thread_guard(self, f"{type(self).__name__}.{method.__name__}"):
            return method(self, *args, **kwargs)

    return run_alone  # type: ignore[return-value]


def repr_before_init(method: _F) -> _F:
    """A ``__repr__`` that still answers for an object whose ``__init__`` did not finish (a subclass that
    raised before ``super().__init__()``, seen in a traceback or a debugger): the class name, not an
    ``AttributeError`` from inside ``repr``."""

    @functools.wraps(method)
    def answer(self: Any, *args: Any, **kwargs: Any) -> str:
        try:
            return method(self, *args, **kwargs)
        except AttributeError:
            return f"<{type(self).__name__}: construction did not finish>"

    return answer  # type: ignore[return-value]


def forked_error(kind: str, noun: str, pid: int) -> RuntimeError:
    """The error every method of an object inherited through fork() raises."""
    return RuntimeError(
        f"this {kind} was created in process {pid} before fork(); create a new {noun} in the child "
        f"(process {os.getpid()})"
    )


class Unique:
    """Refuses ``copy.copy``, ``copy.deepcopy`` and pickling with a ``TypeError``."""

    _copy_hint = "share the object itself instead"
    _owns = "owns virtual memory and its pages"

    def _refuse_copy(self, how: str) -> NoReturn:
        name = type(self).__name__
        article = "an" if name[:1] in "AEIOU" else "a"
        raise TypeError(
            f"{how}: expected an object that can be copied, got {article} {name}, which {self._owns} and "
            f"cannot be copied or pickled; {self._copy_hint}"
        )

    def __copy__(self) -> NoReturn:
        self._refuse_copy("copy.copy")

    def __deepcopy__(self, memo: Any) -> NoReturn:
        self._refuse_copy("copy.deepcopy")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        self._refuse_copy("pickle")


class Closable:
    """``with obj: ...`` closes ``obj`` on the way out (its ``close()``), whatever happened inside."""

    close: Callable[[], None]  # each subclass's own

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
