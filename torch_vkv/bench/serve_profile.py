"""``bench serve --profile``: where a configuration's busy time goes.

The serving benchmark's targets ask, where one is missed, whether an iteration
is bound by the host or by the kernels. ``--profile`` runs ``torch.profiler``
over a window of each configuration's timed loop (:class:`ProfileWindow`:
:data:`PROFILE_ITERATIONS` iterations, from the first one at which no request
waits, or from iteration :data:`PROFILE_START` at the latest) and adds to its
row the device time of every kernel (``profile_kernel_pct`` of the window's busy
time), beside the engine's own host time (``host_pct``), and to ``serve.json`` /
``serve.md`` the kernels that took the most device time (operators by CPU time
on a CPU). A window, not the whole loop: the profiler's trace of a whole run
(thousands of iterations) took minutes to collect on an H200. Profiling slows
the host side: take throughput and latency from a run without ``--profile``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.autograd import DeviceType

__all__ = ["PROFILE_ITERATIONS", "PROFILE_START", "ProfileWindow", "start_profiler", "summarize_profile",
           "profile_lines"]  # fmt: skip

#: Iterations a profile covers.
PROFILE_ITERATIONS = 32
#: The latest iteration a profile starts at (earlier, once no request waits: the steady batch).
PROFILE_START = 16


def start_profiler(device: torch.device) -> Any:
    """A started ``torch.profiler.profile`` of the CPU and, on CUDA, the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def summarize_profile(prof: Any, *, busy_s: float, host_s: Optional[float], num_iterations: int, top: int = 8) -> dict:
    """Stops ``prof`` and returns the run's split: ``kernel_s`` (device time of
    all kernels), ``kernel_pct`` and ``host_pct`` of ``busy_s`` (the summed wall
    time of the profiled iterations; ``host_s`` ``None``: no host split, as for
    ``bench hf``), per-iteration means, and the ``top`` kernels by device
    time (operators by self CPU time when no device ran)."""
    prof.stop()
    events = prof.key_averages()
    # Kernels only: a host-side range (an operator, inductor's "## Call CompiledFxGraph ##")
    # also reports the device time of the kernels it launched, which would count them twice.
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    if not kernels:  # a profiler that files kernels under their operators: drop inductor's ranges at least
        kernels = [e for e in events if not e.key.startswith("## ")]
    kernel_us = sum(max(0.0, float(e.self_device_time_total)) for e in kernels)
    device = kernel_us > 0  # no device activity (a CPU run): no kernel split, operators by CPU time
    key = "self_device_time_total" if device else "self_cpu_time_total"
    ranked = sorted(kernels if device else events, key=lambda e: float(getattr(e, key)), reverse=True)[:top]
    n = max(1, num_iterations)
    return {
        "busy_s": busy_s,
        "host_s": host_s,
        "kernel_s": kernel_us / 1e6 if device else None,
        "kernel_pct": 100 * kernel_us / 1e6 / busy_s if device and busy_s > 0 else None,
        "host_pct": 100 * host_s / busy_s if host_s is not None and busy_s > 0 else None,
        "num_iterations": num_iterations,
        "kernel_ms_per_iteration": kernel_us / 1e3 / n if device else None,
        "host_ms_per_iteration": host_s * 1e3 / n if host_s is not None else None,
        "ranked_by": "device" if device else "cpu",
        "top": [{"name": e.key, "self_ms": float(getattr(e, key)) / 1e3, "calls": int(e.count)} for e in ranked],
    }


class ProfileWindow:
    """``torch.profiler`` over ``num_iterations`` consecutive iterations of a run.

    The loop calls :meth:`before_step` before each ``step()`` (with the
    number of iterations recorded so far and whether requests wait) and
    :meth:`after_step` after it; :meth:`finish` at the end of the run closes
    a window the run ended inside, :meth:`stop` drops it on an error.
    ``summary`` is :func:`summarize_profile`'s dict, plus ``first_iteration``
    and ``num_decode_only`` (iterations of the window without prefill tokens).
    """

    def __init__(self, device: torch.device, num_iterations: int = PROFILE_ITERATIONS,
                 start_by: int = PROFILE_START) -> None:  # fmt: skip
        self.device = device
        self.num_iterations = num_iterations
        self.start_by = start_by
        self.first: Optional[int] = None
        self.summary: Optional[dict] = None
        self._prof: Any = None

    def before_step(self, num_recorded: int, requests_wait: bool) -> None:
        if self.summary is None and self._prof is None and (num_recorded >= self.start_by or not requests_wait):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the window's kernels only
            self._prof = start_profiler(self.device)
            self.first = num_recorded

    def after_step(self, iterations: Sequence[Any]) -> None:
        if self._prof is not None and len(iterations) - self.first >= self.num_iterations:
            self.finish(iterations)

    def finish(self, iterations: Sequence[Any]) -> None:
        if self._prof is None:
            return
        window = iterations[self.first :]
        prof, self._prof = self._prof, None
        self.summary = summarize_profile(prof, busy_s=sum(i.wall_s for i in window),
                                         host_s=sum(i.host_s for i in window), num_iterations=len(window))  # fmt: skip
        self.summary.update(first_iteration=self.first,
                            num_decode_only=sum(1 for i in window if i.num_prefill_tokens == 0))  # fmt: skip

    def stop(self) -> None:
        if self._prof is not None:
            self._prof.stop()
            self._prof = None


def profile_lines(rows: list, labels: Sequence[str] = ("group", "config")) -> list:
    """Markdown lines: per row with a profile (named by its ``labels`` keys), the split and the top operators."""
    lines = []
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        tops = ", ".join(f"`{t['name'][:60]}` {t['self_ms']:.1f} ms x{t['calls']}" for t in p["top"][:5])
        kernel = "no device kernels"
        if p["kernel_pct"] is not None:
            kernel = f"kernels {p['kernel_pct']:.1f}% of the busy time ({p['kernel_ms_per_iteration']:.2f} ms an iteration)"
        host = f", engine host time {p['host_pct']:.1f}%" if p["host_pct"] is not None else ""
        name = " ".join(str(r[k]) for k in labels if r.get(k) not in (None, ""))
        if p.get("first_iteration") is not None:
            last = p["first_iteration"] + p["num_iterations"] - 1
            name += f", iterations {p['first_iteration']}-{last} ({p['num_decode_only']} decode-only)"
        lines.append(f"- profile {name}: {kernel}{host}; top by {p['ranked_by']} time: {tops}")
    return lines
