"""torch_vkv._graph_pools: long-lived state made outside CUDA-graph pools (a helper thread)."""

from __future__ import annotations

import threading
import types

import pytest
import torch

from torch_vkv import _graph_pools as graph_pools
from torch_vkv._graph_pools import graph_trees_active, outside_graph_pools, run_in_helper_thread


def test_helper_thread_runs_elsewhere_and_returns_the_value():
    caller = threading.get_ident()
    ran_on = run_in_helper_thread(threading.get_ident)
    assert ran_on != caller


def test_helper_thread_raises_the_callers_exception_object():
    err = ValueError("made in the helper")

    def fail():
        raise err

    with pytest.raises(ValueError) as info:
        run_in_helper_thread(fail)
    assert info.value is err


def test_nested_calls_stay_in_the_helper_thread():
    def outer():
        return threading.get_ident(), run_in_helper_thread(threading.get_ident)

    helper, nested = run_in_helper_thread(outer)
    assert helper == nested != threading.get_ident()


def test_cpu_runs_in_place():
    assert outside_graph_pools(torch.device("cpu"), threading.get_ident) == threading.get_ident()


def test_graph_trees_active_follows_this_threads_tree_managers(monkeypatch):
    """True only where torch.compile's CUDA-graph trees keep a manager for the device in this
    thread (a stand-in manager here: no GPU needed)."""
    import torch._inductor.cudagraph_trees as trees

    containers = trees.get_obj(trees.local, "tree_manager_containers")
    monkeypatch.setitem(containers, 5, types.SimpleNamespace(tree_manager=object()))
    monkeypatch.setitem(containers, 6, types.SimpleNamespace(tree_manager=None))  # released
    assert graph_trees_active(torch.device("cuda", 5))
    assert not graph_trees_active(torch.device("cuda", 6))
    assert not graph_trees_active(torch.device("cuda", 7))


def test_graph_trees_active_assumes_the_worst_on_unknown_internals(monkeypatch):
    import torch._inductor.cudagraph_trees as trees

    monkeypatch.delattr(trees, "get_obj")
    assert graph_trees_active(torch.device("cuda", 0))


def _pool_of(t: torch.Tensor):
    """The pool id of the segment holding ``t`` (``(0, 0)``: the default pool)."""
    ptr = t.untyped_storage().data_ptr()
    for seg in torch.cuda.memory_snapshot():
        if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return tuple(seg.get("segment_pool_id", (0, 0)))
    raise AssertionError("storage not found in the allocator's snapshot")


@pytest.mark.cuda
def test_cuda_allocations_escape_a_thread_routed_pool(monkeypatch):
    """What CUDA-graph trees do while warming up a graph (torch >= 2.11): every allocation of this
    thread goes to the graph's pool, whatever the stream. Made through outside_graph_pools, a
    tensor lands in the default pool, and its GPU work is ordered with the caller's stream."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(graph_pools, "graph_trees_active", lambda device: True)  # the routing below is by hand
    begin = getattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool", None)
    if begin is None:
        pytest.skip("this torch routes allocations to a pool per stream, not per thread")
    dev = torch.device("cuda", torch.cuda.current_device())
    pool = torch.cuda.graph_pool_handle()
    src = torch.randn(1 << 20, device=dev)
    begin(dev.index, pool)
    try:
        routed = torch.empty(1 << 20, device=dev)
        kept = graph_pools.outside_graph_pools(dev, lambda: src * 2)  # queued after src was made, on a side stream
        after = kept + 1  # the caller's stream waits for the side stream
    finally:
        torch._C._cuda_endAllocateToPool(dev.index, pool)
    torch.cuda.synchronize()
    assert _pool_of(routed) == tuple(pool)
    assert _pool_of(kept) == (0, 0)
    torch.testing.assert_close(after, src * 2 + 1, rtol=0, atol=0)
    del routed
    torch._C._cuda_releasePool(dev.index, pool)
