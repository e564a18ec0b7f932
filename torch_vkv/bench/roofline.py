"""The roofline of a serving run: the least time its iterations could take.

Each iteration reads every weight once and the K/V of every scheduled
request's context, and computes the matmul FLOPs of its prefill tokens. Its
floor is::

    (weight bytes + K/V bytes read) / copy bandwidth  +  prefill FLOPs / matmul rate

with the copy bandwidth and the matmul rate measured in the same run, on the
same device (:func:`measure_device`). Summed over a run's iterations
(:class:`IterationRecord`), the floor over the run's busy time is the
configuration's throughput as a percentage of the roofline.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

__all__ = ["IterationRecord", "ModelCost", "copy_bandwidth", "matmul_rate", "measure_device", "run_floor"]


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: Any, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes/s of ``dst.copy_(src)``, read + write bytes counted (1 GiB on CUDA, 64 MiB else)."""
    device = torch.device(device)
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), device, repeats)


def matmul_rate(device: Any, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` (n 8192 on CUDA, 512 else)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _time(lambda: torch.mm(a, b), device, repeats)


def measure_device(device: Any, dtype: torch.dtype) -> dict[str, float]:
    """``{"copy_bytes_per_s", "matmul_flops_per_s"}`` measured now on ``device``."""
    return {"copy_bytes_per_s": copy_bandwidth(device), "matmul_flops_per_s": matmul_rate(device, dtype)}


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a model: ``weight_bytes`` read per forward,
    ``linear_flops_per_token`` (2 x the non-embedding parameters), and the
    attention shape for K/V bytes and attention FLOPs."""

    weight_bytes: int
    linear_flops_per_token: int
    kv_bytes_per_token: int
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: torch.nn.Module, kv_bytes_per_token: int) -> "ModelCost":
        from torch_vkv.bench.models import weight_bytes

        c = model.config
        emb = model.get_input_embeddings()
        skip = {id(p) for p in emb.parameters()}
        params = sum(p.numel() for p in model.parameters() if id(p) not in skip)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(weight_bytes(model), 2 * params, kv_bytes_per_token, c.num_hidden_layers,
                   c.num_attention_heads, head_dim)  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IterationRecord:
    """One engine iteration: wall time (``step()`` in full), host time (the
    engine's own bookkeeping, forward and sampling excluded), tokens computed,
    and the work the roofline counts."""

    t_s: float  # end of the iteration, seconds from the run's start
    wall_s: float
    host_s: float
    num_tokens: int
    num_decode: int
    num_prefill_tokens: int
    kv_tokens_read: int  # sum over scheduled requests of their context after the step
    prefill_attn_pairs: int  # sum over prefill chunks of (query, key) pairs under the causal mask

    def floor_s(self, cost: ModelCost, device: dict[str, float]) -> float:
        read = cost.weight_bytes + self.kv_tokens_read * cost.kv_bytes_per_token
        flops = self.num_prefill_tokens * cost.linear_flops_per_token
        flops += 4 * cost.num_layers * cost.num_heads * cost.head_dim * self.prefill_attn_pairs
        return read / device["copy_bytes_per_s"] + flops / device["matmul_flops_per_s"]


def run_floor(records: Sequence[IterationRecord], cost: ModelCost, device: dict[str, float]) -> float:
    """Seconds the run's iterations take at the roofline."""
    return sum(r.floor_s(cost, device) for r in records)
