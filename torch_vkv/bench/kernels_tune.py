"""``bench kernels`` sections that sweep our Triton kernels' launch parameters.

* ``decode_tune``: split-KV decode over ``num_splits``, ``block_n`` and
  ``num_warps`` at a few (batch, context) points and at batch 1 with the
  longest context, replayed from a CUDA graph (the kernels' time), as % of the
  run's copy bandwidth; the row marked ``default`` is what
  :func:`decode_attention` picks.
  Then the ``flashinfer`` backend's decode over the page size of its page table
  (CUDA-graph replay), where FlashInfer is importable.
* ``prefill_tune``: causal prefill (batch 1) over ``block_m``, ``block_n``,
  ``num_warps``, ``num_stages`` and ``tma`` (full key tiles through tensor
  descriptors), in TFLOP/s of the causal half; the row
  marked ``default`` is what :func:`prefill_attention` picks. Configurations
  that do not fit the GPU's shared memory are rows with an ``error`` note.

Both exist to check or retune the defaults on a new GPU in one call; they read
the same virtual cache as the ``decode``/``prefill`` sections.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

__all__ = ["decode_tune_rows", "prefill_tune_rows", "prefill_tune_summary"]


def _log_best_decode(point: list, B: int, S: int, log: Callable[[str], None]) -> None:
    best = _best(point, "us", higher=False)
    if best:
        log(f"  decode_tune B={B} S={S}: best {best['backend']} {best['us']:.1f} us ({best['pct_copy']:.0f}% of copy)")


def _decode_inputs(cfg: Any, caches: Any, B: int, S: int, H: int, H_kv: int, D: int) -> tuple:
    """(q ``[B, H, D]``, lengths ``[B]`` all S, K+V bytes, k, v, keepalive) of one decode sweep point,
    on the contiguous cache (virtual when available)."""
    q = torch.randn((B, H, D), dtype=cfg.dtype, device=cfg.device)
    lens = torch.full((B,), S, dtype=torch.int32, device=cfg.device)
    kv_bytes = 2 * B * S * H_kv * D * torch.empty((), dtype=cfg.dtype).element_size()
    k, v, keep = caches.contiguous("vm" if caches.KVCache is not None else "malloc", B, S, H_kv, D)
    return q, lens, kv_bytes, k, v, keep


def _decode_tune_points(cfg: Any) -> list:
    """``cfg.tune`` and batch 1 at the longest context (where the split heuristic matters most)."""
    return list(dict.fromkeys(list(cfg.tune) + [(1, max(cfg.contexts))]))


def _timed(cfg: Any, row: dict, fn: Callable[[], Any], rep_ms: float, graph: bool = False) -> "float | None":
    """Times ``fn`` into ``row`` (``us``), or notes its error (a configuration that does not
    compile or fit) and returns None. ``graph``: replayed from a CUDA graph on CUDA (the
    kernels alone: batch-1 decode is host-bound eagerly)."""
    from torch_vkv.bench.kernels import _time  # loaded: it imports this module
    from torch_vkv.bench.timing import time_us_graph

    try:
        if graph and cfg.device.type == "cuda":
            row["us"] = time_us_graph(fn, cfg.device, rep_ms=rep_ms, warmup_ms=cfg.warmup_ms, l2_flush=cfg.l2_flush)
        else:
            row["us"] = _time(cfg, fn, rep_ms)
    except Exception as e:
        row["note"] = f"error: {type(e).__name__}: {str(e)[:100]}"
        return None
    return row["us"]


def _best(rows: list, key: str, higher: bool) -> "dict | None":
    """The fastest timed row of one sweep point (``key``: ``us``, or ``tflop_s`` with ``higher``)."""
    done = [r for r in rows if r.get(key)]
    return (max if higher else min)(done, key=lambda r: r[key], default=None)


def decode_tune_rows(cfg: Any, caches: Any, copy_bw: float, log: Callable[[str], None]) -> list:
    """Triton split-KV decode over its launch parameters, at ``cfg.tune`` (batch, context) points."""
    from torch_vkv.attention import deps
    from torch_vkv.bench.kernels import MODELS, _close

    if not deps.triton_usable(cfg.device):
        return []
    tk = deps.triton_kernels()
    rows = []
    model = cfg.models[0]
    H, H_kv, D = MODELS.get(model, (8, 2, 64))
    for B, S in _decode_tune_points(cfg):
        q, lens, kv_bytes, k, v, keep = _decode_inputs(cfg, caches, B, S, H, H_kv, D)
        default = tk.default_num_splits(B, H_kv, S, cfg.device)
        default_block_n = tk.default_decode_block_n(B, H_kv, D, default, cfg.device, False, S)  # pointer loads
        split_set = {max(1, default // 2), default, default * 2, default * 4}
        point = []
        for splits in sorted(split_set):
            for block_n in (32, 64, 128) if cfg.tune_full else (64, 128):
                for warps in (4, 8):
                    name = f"triton splits={splits} block_n={block_n} warps={warps}"
                    row = dict(section="decode_tune", model=model, backend=name, batch=B, context=S)
                    us = _timed(cfg, row, lambda: tk.decode_attention(q, k, v, lens, num_splits=splits, block_n=block_n,
                                                                      num_warps=warps), cfg.decode_rep_ms, graph=True)  # fmt: skip
                    if us is not None:
                        tb = kv_bytes / (us * 1e-6) / 1e12
                        row.update(tb_s=tb, pct_copy=100 * tb / copy_bw,
                                   note="default" if (splits, block_n, warps) == (default, default_block_n, 4) else None)  # fmt: skip
                    point.append(row)
        rows += point
        _log_best_decode(point, B, S, log)
        del k, v
        _close(keep)
    return rows + _flashinfer_page_rows(cfg, caches, copy_bw, log)


#: Page sizes (rows) of the ``flashinfer`` backend's decode page table that ``decode_tune`` tries.
FLASHINFER_PAGE_ROWS = (16, 32, 64, 128, 256)


def _flashinfer_page_rows(cfg: Any, caches: Any, copy_bw: float, log: Callable[[str], None]) -> list:
    """The ``flashinfer`` backend's decode over the page size of its page table on the contiguous
    rows (``flashinfer_pages.DECODE_PAGE_ROWS``), at ``cfg.tune`` and at batch 1 with the longest
    context, replayed from a CUDA graph (batch 1 is host-bound eagerly)."""
    from torch_vkv.attention import attention, available_backends, flashinfer_pages as fip
    from torch_vkv.bench.kernels import MODELS, _close

    if "flashinfer" not in available_backends(cfg.device):
        return []
    rows = []
    model = cfg.models[0]
    H, H_kv, D = MODELS.get(model, (8, 2, 64))
    default = fip.DECODE_PAGE_ROWS
    for B, S in _decode_tune_points(cfg):
        q, lens, kv_bytes, k, v, keep = _decode_inputs(cfg, caches, B, S, H, H_kv, D)
        point = []
        try:
            for page_rows in FLASHINFER_PAGE_ROWS:
                fip.DECODE_PAGE_ROWS = page_rows
                row = dict(section="decode_tune", model=model, backend=f"flashinfer page_rows={page_rows}", batch=B,
                           context=S, note="default" if page_rows == default else None)  # fmt: skip
                us = _timed(cfg, row, lambda: attention(q, k, v, lens, backend="flashinfer"), cfg.decode_rep_ms,
                            graph=True)  # fmt: skip
                if us is not None:
                    tb = kv_bytes / (row["us"] * 1e-6) / 1e12
                    row.update(tb_s=tb, pct_copy=100 * tb / copy_bw)
                point.append(row)
        finally:
            fip.DECODE_PAGE_ROWS = default
        rows += point
        _log_best_decode(point, B, S, log)
        del k, v
        _close(keep)
    return rows


def _prefill_grid(full: bool) -> list:
    """(block_m, block_n, num_warps, num_stages, tma) to try; the defaults of head_dim 128 bf16 are among them."""
    if full:
        return list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4), (False, True)))
    plain = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3),
             (64, 128, 4, 3)]  # fmt: skip
    return [c + (False,) for c in plain] + [c + (True,) for c in plain[:4]]


def prefill_tune_rows(cfg: Any, caches: Any, log: Callable[[str], None]) -> list:
    """Triton causal prefill (batch 1) over its launch parameters, at ``cfg.prefill_tune`` contexts."""
    from torch_vkv.attention import deps
    from torch_vkv.bench.kernels import MODELS, _close

    if not deps.triton_usable(cfg.device) or not cfg.prefill_tune:
        return []
    tk = deps.triton_kernels()
    rows = []
    model = cfg.models[0]
    H, H_kv, D = MODELS.get(model, (8, 2, 64))
    on_gpu = cfg.device.type == "cuda"
    for S in cfg.prefill_tune:
        q = torch.randn((S, H, D), dtype=cfg.dtype, device=cfg.device)
        lens = torch.full((1,), S, dtype=torch.int32, device=cfg.device)
        cu = torch.tensor([0, S], dtype=torch.int32, device=cfg.device)
        flops = 4 * H * D * S * S / 2
        k, v, keep = caches.contiguous("vm" if caches.KVCache is not None else "malloc", 1, S, H_kv, D)
        # What prefill_attention picks by itself (CPU: the interpreter's small tiles).
        default = tk.default_launch(D, q.element_size(), on_gpu) + (tk.default_tma(q, k, v, None),)
        grid = _prefill_grid(cfg.tune_full) if on_gpu else [default, (16, 32, 4, 2, True)]
        point = []
        for bm, bn, warps, stages, tma in grid:
            name = f"triton block_m={bm} block_n={bn} warps={warps} stages={stages}" + (" tma" if tma else "")
            row = dict(section="prefill_tune", model=model, backend=name, batch=1, context=S)
            us = _timed(cfg, row, lambda: tk.prefill_attention(q, k, v, lens, cu, S, block_m=bm, block_n=bn, num_warps=warps,
                                                               num_stages=stages, tma=tma), cfg.prefill_rep_ms)  # fmt: skip
            if us is not None:
                row.update(tflop_s=flops / (us * 1e-6) / 1e12,
                           note="default" if (bm, bn, warps, stages, tma) == default else None)  # fmt: skip
            point.append(row)
        rows += point
        best = _best(point, "tflop_s", higher=True)
        if best:
            log(f"  prefill_tune S={S}: best {best['backend']} {best['tflop_s']:.1f} TFLOP/s")
        del k, v
        _close(keep)
    return rows


def prefill_tune_summary(rows: list) -> list:
    """One line per swept context: the best configuration against the default (target: 600 TFLOP/s)."""
    lines = []
    for S in sorted({r["context"] for r in rows if r["section"] == "prefill_tune"}):
        done = [r for r in rows if r["section"] == "prefill_tune" and r["context"] == S and r.get("tflop_s")]
        best = _best(done, "tflop_s", higher=True)
        if best is None:
            continue
        default = next((r for r in done if r.get("note") == "default"), None)
        vs = f", {best['tflop_s'] / default['tflop_s']:.2f}x the default's {default['tflop_s']:.0f}" if default else ""
        lines.append(f"- Triton prefill, batch 1, S={S}: best {best['backend']}: {best['tflop_s']:.0f} TFLOP/s{vs} "
                     f"(target >= 600).")  # fmt: skip
    return lines
