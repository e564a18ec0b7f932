"""``bench kernels``' ``step`` section: decode as one layer of a CUDA-graph decode step.

The ``decode`` section replays one attention call per CUDA graph, so at a small batch its time
includes the replay's own launch and timing floor (about 8 us on the H200, a third of a 67 MB
read). A serving engine's decode step replays every layer's attention from one graph instead: the
launch is shared and each layer's kernels start as the previous layer's end. Here each shape gets a
``step_layers``-layer :class:`torch_vkv.KVCache` (``per_layer``, virtual memory; fewer layers where
their K/V would pass ``step_mem_gib``), one graph of ``L`` decode calls (call ``i`` reads layer
``i``), and the per-layer time is the graph's time over ``L``; FlashInfer's paged anchor the same
way, ``L`` pools of its own. Rows: ``section="step"``, ``us`` per layer, ``tb_s`` and ``pct_copy``
of one layer's K+V bytes, ``layers``. Off CUDA (``--smoke``) a host loop over the ``L`` calls.

Shared pieces (``Config``, ``MODELS``, the timer) come from :mod:`torch_vkv.bench.kernels` at call
time: that module imports this one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from torch_vkv.bench import flashinfer_paged
from torch_vkv.bench.timing import time_us_graph

__all__ = ["step_rows", "step_summary"]

#: Backends timed per layer of a step graph (those a CUDA-graph decode step of the engine runs).
STEP_BACKENDS = ("triton", "flashinfer")


def _k():
    from torch_vkv.bench import kernels

    return kernels


def step_rows(cfg: Any, caches: Any, copy_bw: float, log: Callable[[str], None]) -> list:
    """Per-layer decode time in a step graph for each ``(batch, context)`` of ``cfg.step_cases``."""
    from torch_vkv.attention import attention

    if caches.KVCache is None:
        return [dict(section="step", note=f"skipped: {caches.vm_error}")]
    rows: list = []
    dev = cfg.device
    model = cfg.models[0]
    H, H_kv, D = _k().MODELS.get(model, (8, 2, 64))
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    for B, S in cfg.step_cases:
        kv_bytes = 2 * B * S * H_kv * D * itemsize
        L = max(1, min(cfg.step_layers, int(cfg.step_mem_gib * 2**30 // kv_bytes)))
        base = dict(section="step", model=model, batch=B, context=S, layers=L)
        q = torch.randn((B, H, D), dtype=cfg.dtype, device=dev)
        lens = torch.full((B,), S, dtype=torch.int32, device=dev)
        cache = None
        try:
            cache = caches.KVCache(L, H_kv, D, max_batch_size=B, max_seq_len=S, dtype=cfg.dtype, device=dev,
                                   layout="per_layer")  # fmt: skip
            for _ in range(B):
                cache.reserve(cache.alloc(), S)
            layers = [(cache.key(i).as_subclass(torch.Tensor), cache.value(i).as_subclass(torch.Tensor)) for i in range(L)]
            for k, v in layers:
                k.normal_()
                v.normal_()
            for backend in [b for b in STEP_BACKENDS if _k()._available(b, dev)]:
                calls = [lambda k=k, v=v, b=backend: attention(q, k, v, lens, backend=b) for k, v in layers]
                rows.append(_timed(cfg, dict(base, backend=backend, memory="vm"), calls, kv_bytes, copy_bw, log))
            anchors = flashinfer_paged.anchor_layers("decode", q, B, S, H_kv, D, L)
            if anchors:
                row = dict(base, backend="flashinfer_paged", memory="paged", block=flashinfer_paged.BLOCK)
                rows.append(_timed(cfg, row, anchors, kv_bytes, copy_bw, log))
        except Exception as e:  # one shape failing must not stop the run
            rows.append(dict(base, note=f"error: {type(e).__name__}: {str(e)[:120]}"))
            log(f"  step B={B} S={S}: {rows[-1]['note']}")
        finally:
            if cache is not None:
                cache.close()  # pages back now; the views left in `layers` are not used again
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _timed(cfg: Any, row: dict, calls: list, kv_bytes: int, copy_bw: float, log) -> dict:
    """``row`` with the per-layer time of ``calls`` run back to back (one CUDA graph on the GPU)."""
    step = lambda: [c() for c in calls]  # noqa: E731
    L = len(calls)
    try:
        step()
        if cfg.device.type == "cuda":
            us, timer = time_us_graph(step, cfg.device, rep_ms=cfg.decode_rep_ms, warmup_ms=cfg.warmup_ms,
                                       l2_flush=cfg.l2_flush) / L, "cuda graph"
        else:
            us, timer = _k()._time(cfg, step, cfg.decode_rep_ms) / L, "host loop"
    except Exception as e:  # a backend failing (or not capturable) is said in its row
        row["note"] = f"error: {type(e).__name__}: {str(e)[:120]}"
        log(f"  step {row['backend']} B={row['batch']} S={row['context']}: {row['note']}")
        return row
    tb = kv_bytes / (us * 1e-6) / 1e12
    row.update(us=us, tb_s=tb, pct_copy=100 * tb / copy_bw, timer=timer, note=f"per layer of a {L}-layer step graph"
               if timer == "cuda graph" else f"per call of {L} back to back")  # fmt: skip
    log(f"  step {row['backend']:16s} B={row['batch']:4d} S={row['context']:6d} {us:9.1f} us per layer "
        f"({row['pct_copy']:5.1f}% of copy, {L} layers)")  # fmt: skip
    return row


def step_summary(rows: list) -> list:
    """The small-batch decode target measured per layer of a step graph: the fastest virtual-memory
    backend's share of copy bandwidth at batch 1-4 and context >= 16K (target >= 70%)."""
    best: dict = {}
    for r in rows:
        if r.get("section") == "step" and r.get("us") and r.get("memory") == "vm" and r["batch"] <= 4 \
                and r["context"] >= 16384 and r["pct_copy"] > best.get((r["batch"], r["context"]), {}).get("pct_copy", 0):  # fmt: skip
            best[(r["batch"], r["context"])] = r
    if not best:
        return []
    pct = [r["pct_copy"] for r in best.values()]
    return ["- Decode per layer of a CUDA-graph step (`step`), batch 1-4, context >= 16K: " + ", ".join(
        f"{r['backend']} {r['pct_copy']:.0f}% at B={r['batch']} S={r['context']}" for r in best.values())
        + f" of copy bandwidth (target >= 70%: {'met' if min(pct) >= 70 else 'NOT met'})."]  # fmt: skip
