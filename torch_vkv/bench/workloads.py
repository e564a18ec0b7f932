"""Serving workloads: request lengths (traces or synthetic) and arrival times.

Shared by the load client (``bench serve --url``, over HTTP) and the
in-process serving benchmark: a workload is a list of :class:`RequestSpec`
(prompt length, output length, arrival time), independent of who serves it.

Traces (``traces/``, see its README): length-only CSVs of the vAttention
authors' experiments, ``num_prefill_tokens,num_decode_tokens,...`` a row.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from torch_vkv._checks import check_int, fail

__all__ = [
    "TRACES",
    "WORKLOADS",
    "RequestSpec",
    "load_trace",
    "make_requests",
    "poisson_arrivals",
    "trace_path",
    "uniform_lengths",
    "workload_lengths",
]

TRACE_DIR = Path(__file__).with_name("traces")
TRACES = ("arxiv_summarization", "arxiv_long_online", "arxiv_long_offline", "sync_vs_async")
# "uniform": nano-vllm's bench.py workload, prompt and output lengths uniform in [100, 1024].
WORKLOADS = ("uniform", *TRACES)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: ``prompt_tokens`` in, ``output_tokens`` out
    (run to that length: ``ignore_eos``), sent ``arrival_s`` after the start."""

    index: int
    prompt_tokens: int
    output_tokens: int
    arrival_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def trace_path(name: str) -> Path:
    if name not in TRACES:
        fail("trace", f"one of {TRACES}", name)
    return TRACE_DIR / f"{name}.csv"


@lru_cache(maxsize=None)
def load_trace(name: str) -> tuple[tuple[int, int], ...]:
    """The (prompt tokens, output tokens) rows of a trace, in file order."""
    with open(trace_path(name), newline="") as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    return tuple(rows)


def uniform_lengths(n: int, low: int = 100, high: int = 1024, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (prompt, output) lengths, each uniform in ``[low, high]``."""
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(n)]


def workload_lengths(name: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (prompt, output) lengths of a workload: ``"uniform"``, or a seeded
    sample of a trace's rows (without replacement while the trace lasts)."""
    check_int("num_requests", n, low=1)
    if name == "uniform":
        return uniform_lengths(n, seed=seed)
    if name not in TRACES:
        fail("workload", f"one of {WORKLOADS}", name)
    rows = list(load_trace(name))
    rng = random.Random(seed)
    out: list[tuple[int, int]] = []
    while len(out) < n:
        rng.shuffle(rows)
        out += rows[: n - len(out)]
    return out


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the start) of ``n`` requests: a Poisson
    process of ``rate`` requests/s; ``inf`` puts every request at t=0."""
    if not rate > 0:
        fail("request_rate", "a rate > 0 (inf: all at once)", rate)
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def make_requests(
    lengths: Sequence[tuple[int, int]],
    *,
    request_rate: float = math.inf,
    seed: int = 0,
    max_prompt_tokens: Optional[int] = None,
    max_output_tokens: Optional[int] = None,
) -> list[RequestSpec]:
    """Requests from (prompt, output) lengths, clipped to the maxima when given
    (a small server, a smoke run), arriving as :func:`poisson_arrivals`."""
    if max_prompt_tokens is not None:
        check_int("max_prompt_tokens", max_prompt_tokens, low=1)
    if max_output_tokens is not None:
        check_int("max_output_tokens", max_output_tokens, low=1)
    arrivals = poisson_arrivals(len(lengths), request_rate, seed)
    specs = []
    for i, ((p, o), t) in enumerate(zip(lengths, arrivals)):
        p, o = max(p, 1), max(o, 1)
        if max_prompt_tokens is not None:
            p = min(p, max_prompt_tokens)
        if max_output_tokens is not None:
            o = min(o, max_output_tokens)
        specs.append(RequestSpec(i, p, o, t))
    return specs
