"""Long-lived GPU state made outside every CUDA graph's memory pool.

A library that keeps buffers of its own between calls (FlashInfer's workspaces
and plans, made on a backend's first call) must not make them in a CUDA graph's
private pool: ``torch.compile``'s CUDA-graph trees refuse a live tensor there
that is not one of the graph's outputs ("Detected 1 tensor(s) in the cudagraph
pool not tracked as outputs"). The trees route the allocations of the *thread*
that warms up or records a graph to its pool (``_cuda_beginAllocateCurrentThreadToPool``,
torch 2.11 and later), whatever the stream; a side stream escaped only the
older per-stream routing. So :func:`outside_graph_pools` runs the code that
allocates in a short-lived helper thread, whose allocations no pool routes,
where this thread has a tree manager for the device (:func:`graph_trees_active`);
elsewhere the thread's start and join (126 us on a 2-core CPU machine) would be host time for nothing.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, TypeVar

import torch

__all__ = ["graph_trees_active", "outside_graph_pools", "run_in_helper_thread"]

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


def graph_trees_active(device: torch.device) -> bool:
    """Whether ``torch.compile``'s CUDA-graph trees have a manager for ``device`` in this thread,
    so that they may be routing its allocations to a graph's pool; ``True`` where that cannot be
    told (a torch whose trees keep their managers elsewhere)."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:  # never imported: no tree exists
        return False
    try:
        containers = trees.get_obj(trees.local, "tree_manager_containers")
        container = containers.get(device.index if device.index is not None else torch.cuda.current_device())
        return container is not None and container.tree_manager is not None
    except Exception:  # noqa: BLE001 - private torch internals changed: assume the worst
        return True


def outside_graph_pools(device: torch.device, make: Callable[[], T]) -> T:
    """``make()``, with its allocations outside any CUDA graph's pool and its GPU work
    ordered after the caller's stream and before its later work.

    Where CUDA-graph trees are active in this thread (:func:`graph_trees_active`),
    ``make()`` runs in a helper thread on a side stream that waits for the caller's
    current stream; the caller's stream then waits for the side stream; ``make()``
    sees ``device`` as the current device, and grad mode and other thread-local
    settings are the new thread's defaults. Elsewhere it runs in place: on the CPU,
    without trees, inside a capture (where a plan is refused anyway, and another
    thread's allocations could break a global-mode capture), or inside a helper thread.
    """
    if (device.type != "cuda" or getattr(_LOCAL, "helper", False) or torch.cuda.is_current_stream_capturing()
            or not graph_trees_active(device)):  # fmt: skip
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
