"""Long-lived GPU state made outside every CUDA graph's memory pool.

A library that keeps buffers of its own between calls (FlashInfer's workspaces
and plans, made on a backend's first call) must not make them in a CUDA graph's
private pool: ``torch.compile``'s CUDA-graph trees refuse a live tensor there
that is not one of the graph's outputs ("Detected 1 tensor(s) in the cudagraph
pool not tracked as outputs"). The trees route the allocations of the *thread*
that warms up or records a graph to its pool (``_cuda_beginAllocateCurrentThreadToPool``,
torch 2.11 and later), whatever the stream; a side stream escaped only the
older per-stream routing. So :func:`outside_graph_pools` runs the code that
allocates in a short-lived helper thread, whose allocations no pool routes.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

__all__ = ["outside_graph_pools", "run_in_helper_thread"]

T = TypeVar("T")

_LOCAL = threading.local()  # .helper: this thread is one of run_in_helper_thread's


def run_in_helper_thread(fn: Callable[[], T], name: str = "torch_vkv-helper") -> T:
    """``fn()`` run to its end in a new thread: its value, or its exception raised here (the
    helper's traceback kept). Called from a helper thread, ``fn()`` runs in place."""
    if getattr(_LOCAL, "helper", False):
        return fn()
    box: list = []

    def body() -> None:
        _LOCAL.helper = True
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller, raised there
            box.append((False, e))

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def outside_graph_pools(device: torch.device, make: Callable[[], T]) -> T:
    """``make()``, with its allocations outside any CUDA graph's pool and its GPU work
    ordered after the caller's stream and before its later work.

    On CUDA, ``make()`` runs in a helper thread on a side stream that waits for the
    caller's current stream; the caller's stream then waits for the side stream. On
    the CPU, inside a capture (where a plan is refused anyway, and another thread's
    allocations could break a global-mode capture) or inside a helper thread, it
    runs in place. ``make()`` sees ``device`` as the current device; grad mode
    and other thread-local settings are the new thread's defaults.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing() or getattr(_LOCAL, "helper", False):
        return make()
    caller = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(caller)

    def on_side_stream() -> T:
        with torch.cuda.device(device), torch.cuda.stream(side):
            return make()

    try:
        return run_in_helper_thread(on_side_stream, name="torch_vkv-outside-graph-pools")
    finally:
        caller.wait_stream(side)
