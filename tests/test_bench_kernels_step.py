"""``bench kernels``' ``step`` section: decode per layer of a CUDA-graph step over an L-layer KVCache,
its FlashInfer ratio and its small-batch target line; on a GPU every row timed from one graph."""

from __future__ import annotations

import pytest

from torch_vkv.bench import flashinfer_paged, kernels
from torch_vkv.bench.kernels_step import step_rows


def test_step_rows_summary_and_ratio():
    """The ``step`` section's rows (decode per layer of a step graph) get the anchor ratio and the
    small-batch target line: the fastest virtual-memory backend per shape at batch 1-4, >= 16K."""
    from torch_vkv.bench.kernels_step import step_summary

    base = dict(section="step", model="m", layers=32, timer="cuda graph")
    rows = [
        dict(base, batch=1, context=16384, backend="triton", memory="vm", us=24.3, pct_copy=65.1),
        dict(base, batch=1, context=16384, backend="flashinfer", memory="vm", us=30.0, pct_copy=52.7),
        dict(base, batch=1, context=16384, backend="flashinfer_paged", memory="paged", block=16, us=27.7, pct_copy=57.1),
        dict(base, batch=2, context=16384, backend="triton", memory="vm", us=39.2, pct_copy=80.5),
        dict(base, batch=8, context=16384, backend="triton", memory="vm", us=140.0, pct_copy=90.0),  # batch > 4
    ]
    flashinfer_paged.annotate(rows)
    assert rows[0]["x_flashinfer_paged"] == round(27.7 / 24.3, 3) and "x_flashinfer_paged" not in rows[3]
    (line,) = step_summary(rows)
    assert "triton 65% at B=1 S=16384" in line and "triton 80% at B=2 S=16384" in line
    assert "flashinfer 53%" not in line and "B=8" not in line and "NOT met" in line
    rows[0]["pct_copy"] = 71.0
    assert "(target >= 70%: met)" in step_summary(rows)[0]
    assert step_summary([r for r in rows if r["batch"] == 8]) == []


@pytest.mark.cuda
def test_cuda_step_rows_time_one_graph_per_shape():
    cfg = kernels._config(kernels._parser().parse_args(["--quick", "--no-plots"]))
    cfg.step_cases, cfg.step_layers, cfg.decode_rep_ms, cfg.warmup_ms = [(1, 1024), (2, 2048)], 3, 5, 2
    caches = kernels.Caches(cfg, lambda msg: None)
    rows = step_rows(cfg, caches, kernels.copy_bandwidth(cfg), lambda msg: None)
    triton = [r for r in rows if r.get("backend") == "triton"]
    assert [(r["batch"], r["context"]) for r in triton] == [(1, 1024), (2, 2048)]
    assert not [r for r in rows if "error" in str(r.get("note", ""))], rows
    assert all(r["timer"] == "cuda graph" and r["us"] > 0 and r["layers"] == 3 and r["memory"] == "vm" for r in triton)
