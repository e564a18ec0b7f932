"""Timers shared by the benchmarks: one for a call, one for the steps of a loop.

* :func:`time_us`: median time of one call of ``fn``. On CUDA it is
  ``triton.testing.do_bench`` (CUDA events around each call, the L2 cleared
  before each call, which also keeps the GPU busy while the host enqueues the
  call, so launch overhead is mostly hidden); elsewhere, or without triton, a
  host ``perf_counter`` loop with the same warm-up and repetition budgets.
* :func:`time_us_graph`: the same median for ``fn`` captured once in a CUDA graph and
  replayed: the device's time of the call with no host work in it (checks, dispatch,
  launches), as in a CUDA-graph decode step. CUDA only.
* ``l2_flush`` (both): how the L2 is emptied before each timed call. ``"write"`` is
  ``do_bench``'s (zero a 256 MB buffer): the L2 is then full of *dirty* lines, which the
  timed call writes back to memory as its reads evict them (up to the L2's size, 50 MB on
  an H100, of writes inside the timed window). ``"read"`` reads the 256 MB buffer instead:
  the L2 holds clean lines of another buffer, cold for the call and nothing to write back.
  The difference is a small kernel's (a decode step of one request reads 64 MiB at 16K).
* :class:`StepClock`: per-step times of a loop whose steps change state (a
  decode trajectory of exactly ``steps`` steps from a prepared cache), which a
  call-repeating timer such as ``do_bench`` cannot drive: CUDA events at the
  step boundaries on the GPU, ``perf_counter`` on the host.
* :func:`host_us`: the host's time per call of ``fn`` queued back to back (no
  sync inside the loop): where the device keeps up, the host's cost of a call.
* :func:`sync`: wait for ``device``'s queued work (a no-op off CUDA).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["L2_FLUSHES", "StepClock", "host_us", "sync", "time_us", "time_us_graph"]

#: ``l2_flush`` values of :func:`time_us` and :func:`time_us_graph` (see the module docstring).
L2_FLUSHES = ("write", "read")
_FLUSH_BYTES = 256 << 20  # do_bench's buffer


def time_us(fn: Callable[[], Any], device: torch.device, *, rep_ms: float, warmup_ms: float,
            l2_flush: str = "write") -> float:  # fmt: skip
    """Median microseconds of one ``fn()`` call, from about ``rep_ms`` of calls after ``warmup_ms`` of warm-up.

    Both budgets are in milliseconds, as in ``triton.testing.do_bench``: the number of
    calls follows from a first estimate of one call (at least one call each). ``l2_flush``:
    ``"write"`` (``do_bench`` itself) or ``"read"``, see the module docstring (CUDA only;
    elsewhere nothing is flushed).
    """
    if rep_ms <= 0 or warmup_ms < 0:
        raise ValueError(f"time_us: expected rep_ms > 0 and warmup_ms >= 0, got {rep_ms}, {warmup_ms}")
    if l2_flush not in L2_FLUSHES:
        raise ValueError(f"time_us: l2_flush: expected one of {L2_FLUSHES}, got {l2_flush!r}")
    if device.type == "cuda" and l2_flush == "read":
        return _time_us_read_flush(fn, device, rep_ms, warmup_ms)
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3
    fn()  # first call: compilation, allocation
    t0 = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-6)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    times = []
    for _ in range(max(1, int(rep_ms / estimate_ms))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _time_us_read_flush(fn: Callable[[], Any], device: torch.device, rep_ms: float, warmup_ms: float) -> float:
    """``do_bench``'s procedure (estimate from five calls, warm-up, CUDA events around each call,
    the median) with the L2 emptied by reading 256 MB rather than writing them."""
    flush = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    flush.zero_()  # written once, before anything is timed

    def empty_l2() -> None:
        flush.max()  # a reduction: reads every byte, writes one value

    fn()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        empty_l2()
        fn()
    end.record()
    sync(device)
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(1, int(rep_ms / estimate_ms)))]  # fmt: skip
    for begin, finish in events:
        empty_l2()
        begin.record()
        fn()
        finish.record()
    sync(device)
    times = [begin.elapsed_time(finish) * 1e3 for begin, finish in events]
    return statistics.median(times)


def time_us_graph(fn: Callable[[], Any], device: torch.device, *, rep_ms: float, warmup_ms: float,
                  l2_flush: str = "write") -> float:  # fmt: skip
    """Median microseconds of one ``fn()`` call captured in a CUDA graph, timed by :func:`time_us`
    on the graph's replay (the L2 cleared before each replay).

    ``fn`` runs a few times on a side stream first (compilation, plans, allocator warm-up,
    as ``torch.cuda.graph`` asks). Raises ``ValueError`` off CUDA, and whatever the capture
    raises for a ``fn`` that cannot be captured (a host sync, a host read of device data).
    """
    if device.type != "cuda":
        raise ValueError(f"time_us_graph: expected a CUDA device, got {device}")
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    current.wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return time_us(graph.replay, device, rep_ms=rep_ms, warmup_ms=warmup_ms, l2_flush=l2_flush)
    finally:
        sync(device)
        graph.reset()


class StepClock:
    """Marks the boundaries of ``steps`` steps; :meth:`step_ms` gives each step's time.

    CUDA events on the GPU (device time between the marks, read after a sync), host
    ``perf_counter`` elsewhere.
    """

    def __init__(self, device: torch.device, steps: int) -> None:
        self.cuda = device.type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if self.cuda else []
        self.times = [0.0] * (steps + 1)

    def mark(self, i: int) -> None:
        if self.cuda:
            self.events[i].record()
        else:
            self.times[i] = time.perf_counter()

    def step_ms(self) -> list[float]:
        if self.cuda:
            return [self.events[i].elapsed_time(self.events[i + 1]) for i in range(len(self.events) - 1)]
        return [(self.times[i + 1] - self.times[i]) * 1e3 for i in range(len(self.times) - 1)]


def host_us(fn: Callable[[], Any], device: torch.device, calls: int = 50) -> float:
    """Microseconds of host time per ``fn()`` call, ``calls`` calls queued back to back with no sync
    inside the loop (the device's queued work is waited for before and after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync(device)
    return (t1 - t0) / calls * 1e6


def sync(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (CUDA); nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
