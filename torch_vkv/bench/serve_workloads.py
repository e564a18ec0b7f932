"""The workloads of ``python -m torch_vkv bench serve`` at each size (``full``, ``quick``, ``smoke``):
which traces, how many requests at which rates, on which model, with which engine sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from torch_vkv._checks import fail

__all__ = ["CACHE_CONFIGS", "CACHING_WORKLOADS", "SERVE_WORKLOADS", "Part", "Workload", "check_traces", "workloads"]

SERVE_WORKLOADS = ("offline", "long-offline", "long-online", "sync-vs-async", "capacity", "prefix", "parallel")
#: Workloads that run each of :data:`CACHE_CONFIGS` with prefix caching on and off.
CACHING_WORKLOADS = ("prefix", "parallel")
CACHE_CONFIGS = ("virtual-interleaved", "virtual-per_layer", "paged-16")


@dataclass(frozen=True)
class Part:
    """One run of every configuration: ``num_requests`` of ``trace`` (a
    :data:`.workloads.WORKLOADS` name) arriving at ``rate`` requests/s
    (``inf``: all at t=0), served by ``model`` (a :data:`.models.MODELS` name).
    ``lengths``: every request's (prompt, output) tokens instead of the
    trace's (``trace`` then only names the part); ``shared_prefix_tokens``:
    the first tokens every prompt shares; ``n``: completions a request."""

    trace: str
    rate: float
    model: str
    num_requests: int
    lengths: Optional[tuple[int, int]] = None
    shared_prefix_tokens: int = 0
    n: int = 1


@dataclass(frozen=True)
class Workload:
    """A workload at one scale (``full``, ``quick`` or ``smoke``): its parts,
    the engine's sizes (``max_seq_len`` is a cap: each part uses its longest
    request), an optional KV ``memory_budget`` in bytes (``None``: the
    engine's default), and lengths clipped to ``max_prompt_tokens`` /
    ``max_output_tokens`` where set (smoke only)."""

    name: str
    parts: tuple[Part, ...]
    max_batch_size: int
    max_seq_len: int
    chunk_size: int
    memory_budget: Optional[int] = None
    max_prompt_tokens: Optional[int] = None
    max_output_tokens: Optional[int] = None


GiB = 1 << 30
INF = math.inf


def workloads(scale: str, device_type: str = "cuda") -> dict[str, Workload]:
    """The workloads at ``scale``. GPU sizes fit one 10-minute command
    (``full``, per workload) or about 2 minutes each (``quick``) on an H200; ``smoke`` runs on a
    CPU in seconds (on CUDA its capacity budget is 8 pages of 2 MiB: the
    driver's granularity, where the CPU test uses 4 KiB host pages)."""
    if scale not in ("smoke", "quick", "full"):
        fail("scale", "'smoke', 'quick' or 'full'", scale)
    if scale == "smoke":
        budget = (16 << 20) if device_type == "cuda" else (128 << 10)
        def w(name, parts, **kw):  # noqa: E306
            sizes = dict(max_batch_size=4, max_seq_len=512, chunk_size=64, max_prompt_tokens=48, max_output_tokens=6)
            return Workload(name, tuple(Part(t, r, "tiny", n) for t, r, n in parts), **{**sizes, **kw})

        return {
            "offline": w("offline", [("uniform", INF, 4)]),
            "long-offline": w("long-offline", [("arxiv_long_offline", INF, 2)], max_prompt_tokens=200),
            "long-online": w("long-online", [("arxiv_long_online", 40.0, 3), ("arxiv_summarization", 80.0, 3)]),
            "sync-vs-async": w("sync-vs-async", [("sync_vs_async", INF, 4)]),
            "capacity": w("capacity", [("arxiv_summarization", INF, 8)], max_batch_size=16, memory_budget=budget),
            "prefix": Workload("prefix", (Part("shared_prompt", INF, "tiny", 8, (72, 4), 64),), max_batch_size=4,
                               max_seq_len=512, chunk_size=64),  # fmt: skip
            "parallel": Workload("parallel", (Part("n8", INF, "tiny", 2, (40, 5), n=8),), max_batch_size=16,
                                 max_seq_len=512, chunk_size=64),  # fmt: skip
        }
    q = scale == "quick"
    rates = (2.0, 8.0) if q else (1.0, 2.0, 4.0, 8.0)
    return {
        "offline": Workload("offline", (Part("uniform", INF, "llama3-8b", 64 if q else 256),),
                            max_batch_size=64 if q else 128, max_seq_len=2049, chunk_size=4096,
                            memory_budget=40 * GiB),  # fmt: skip
        "long-offline": Workload("long-offline", (Part("arxiv_long_offline", INF, "yi-6b-200k", 1 if q else 3),),
                                 max_batch_size=4, max_seq_len=200_000, chunk_size=16384,
                                 memory_budget=48 * GiB),  # fmt: skip
        "long-online": Workload(
            "long-online",
            (Part("arxiv_long_online", 0.3, "yi-6b-200k", 2 if q else 4),)
            + tuple(Part("arxiv_summarization", r, "llama3-8b", 8) for r in rates),
            max_batch_size=64, max_seq_len=60_000, chunk_size=4096, memory_budget=40 * GiB,
        ),  # fmt: skip
        "sync-vs-async": Workload("sync-vs-async", (Part("sync_vs_async", INF, "llama3-8b", 16 if q else 32),),
                                  max_batch_size=64, max_seq_len=5120, chunk_size=4096,
                                  memory_budget=24 * GiB),  # fmt: skip
        "capacity": Workload("capacity", (Part("arxiv_summarization", INF, "llama3-8b", 32 if q else 64),),
                             max_batch_size=256, max_seq_len=8192, chunk_size=4096, memory_budget=4 * GiB),  # fmt: skip
        # Issue 12: 128 requests sharing a 4K-token system prompt, 256 unique tokens each, 128 out.
        "prefix": Workload("prefix", (Part("shared_prompt", INF, "llama3-8b", 64 if q else 128, (4096 + 256, 128),
                                           4096),),
                           max_batch_size=128, max_seq_len=4096 + 256 + 129, chunk_size=4096,
                           memory_budget=40 * GiB),  # fmt: skip
        "parallel": Workload("parallel", (Part("n8", INF, "llama3-8b", 16 if q else 32, (1024, 256), n=8),),
                             max_batch_size=256, max_seq_len=1024 + 257, chunk_size=4096,
                             memory_budget=40 * GiB),  # fmt: skip
    }


def check_traces(names: Sequence[str], scale: str, traces: str) -> list[str]:
    """``--traces`` (comma-separated) as a list; ``ValueError`` naming the traces
    a selected workload has when none of its parts is of a trace given, or
    naming every selected workload's traces when a trace given is in none (a typo
    would otherwise drop its parts without a word)."""
    given = [t.strip() for t in traces.split(",") if t.strip()]
    table = workloads(scale, "cpu")
    every: set[str] = set()
    for name in names:
        have = sorted({p.trace for p in table[name].parts})
        every.update(have)
        if not set(given) & set(have):
            fail("--traces", f"a trace of workload {name!r} ({', '.join(have)})", traces)
    unknown = [t for t in given if t not in every]
    if unknown:
        fail("--traces", f"traces of the workloads selected ({', '.join(sorted(every))})", traces)
    return given
