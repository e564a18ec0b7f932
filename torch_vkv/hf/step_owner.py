"""``StepOwner``: which thread runs the eager step in progress of a :class:`~torch_vkv.hf.VirtualKVCache`.

A cache holds one batch of sequences, and a step is one forward: layer 0's ``update`` advances
every row's length, the other layers write at the same positions. Two threads stepping one cache
at once put both steps' tokens in the same rows (each layer 0 advances the lengths again), and the
attention then reads the other thread's tokens as history: wrong tokens, no error. This catches
such an overlap where it shows, a layer after 0 whose step another thread began, and from then
on refuses every step until ``reset()``: the lengths are no longer to be trusted.

Steps from different threads one after the other (a sequence continued on another worker) are
fine and not refused. Whole steps of two threads that happen not to overlap cannot be told from
that; they interleave tokens all the same, so the rule stays: one thread at a time per cache, one
cache per concurrent sequence batch. Compiled steps run no Python per layer and are not checked.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

__all__ = ["StepOwner"]

_MESSAGE = ("VirtualKVCache used by two threads at once: expected one step at a time on a cache (build one "
            "cache per thread); ")  # fmt: skip


class StepOwner:
    """The thread of the eager step in progress, and whether two threads' steps overlapped."""

    def __init__(self) -> None:
        # The Thread object, not its ident: a finished thread's ident is reused by the next one.
        self._thread: Optional[threading.Thread] = None
        self._overlapped = False
        # Held around each update's host work (not the model's attention): two threads' first updates
        # both built a KVCache, and the first one, freed, was still being written by the other (SIGSEGV).
        self._lock = threading.Lock()

    def run(self, layer_idx: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, the host work of layer ``layer_idx``'s update, under the lock, after
        :meth:`begin` (layer 0) or :meth:`check_layer` (the others)."""
        with self._lock:
            if layer_idx == 0:
                self.begin()
            else:
                self.check_layer(layer_idx)
            return fn(*args)

    def begin(self) -> None:
        """Layer 0 of an eager step, before anything changes."""
        self._check_not_overlapped()
        self._thread = threading.current_thread()

    def check_layer(self, layer_idx: int) -> None:
        """A later layer's update: the step must be this thread's."""
        self._check_not_overlapped()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._overlapped = True
            raise RuntimeError(_MESSAGE + f"layer {layer_idx} belongs to a step that another thread began after "
                               "this thread's; both steps wrote to the same rows: call cache.reset()")  # fmt: skip

    def clear(self) -> None:
        """``reset()``: a new sequence; an overlap is forgotten."""
        self._thread = None
        self._overlapped = False

    def _check_not_overlapped(self) -> None:
        if self._overlapped:
            raise RuntimeError(_MESSAGE + "two threads' steps overlapped and the rows hold both; call "
                               "cache.reset() before the next step")  # fmt: skip
