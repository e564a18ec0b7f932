"""The host cost of one ``KVCache.step_async`` call when no slot crosses a page.

Part of ``python -m torch_vkv bench alloc`` (``section = "step_call"``): the
per-iteration call of a decode loop, with an int64 NumPy array of lengths
that asks for nothing new (the common step: every slot's next token lands in
a page already committed, and the prefetch has nothing to add). That call is
one pass of the C++ slot table over the lengths (docs/design.md, "The slot
table"); its cost is what every decode step pays for lazy commit. Timed with
``time.perf_counter`` over a loop of calls, the median of ``repeats`` loops.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

__all__ = ["BATCHES", "bench_step_call"]

#: Batch sizes always measured (the issue's targets are stated at 256).
BATCHES = (64, 256)


def bench_step_call(
    device: torch.device, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, page_size: int | None,
    layout: str, batches: tuple[int, ...] = BATCHES, calls: int = 2000, repeats: int = 5, length: int = 100,
) -> list[dict[str, Any]]:
    """Median host microseconds per ``step_async(lens)`` with unchanged ``lens``, per batch size.

    Parameters
    ----------
    device, layers, kv_heads, head_dim, dtype, page_size, layout
        The cache (as for :class:`~torch_vkv.KVCache`).
    batches : tuple of int
        Slots, all active, named in every call.
    calls, repeats : int
        Calls per timed loop, and loops (the median is reported).
    length : int
        Tokens of every slot (its pages, and the lookahead's, committed beforehand).
    """
    from torch_vkv import KVCache

    rows = []
    for batch in batches:
        cache = KVCache(layers, kv_heads, head_dim, max_batch_size=batch, max_seq_len=length + 2, dtype=dtype,
                        device=device, layout=layout, page_size=page_size)
        try:
            for _ in range(batch):
                cache.alloc()
            lens = np.full(batch, length, dtype=np.int64)
            cache.step(lens + 1)  # the lookahead's page too: the timed calls find everything committed
            cache.step_async(lens)
            before = cache.memory_stats()["commit_calls"]
            per_call = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(calls):
                    cache.step_async(lens)
                per_call.append((time.perf_counter() - t0) / calls)
            if cache.memory_stats()["commit_calls"] != before:
                raise RuntimeError("bench step_call: a timed call committed pages; the measurement is not the fast path")
        finally:
            cache.close()
        rows.append({"section": "step_call", "name": "step_async_unchanged", "layout": layout, "batch": batch,
                     "us_per_call": statistics.median(per_call) * 1e6, "calls": calls, "repeats": repeats})
    return rows
