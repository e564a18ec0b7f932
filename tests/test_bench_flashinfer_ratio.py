"""``bench kernels``: every decode and prefill row carries its speed against FlashInfer's paged anchor
of the same shape (``x_flashinfer_paged``, issue 13: "every row ... against FlashInfer"), only where
the two were timed the same way; no anchor, no ratio."""

from __future__ import annotations

from torch_vkv.bench import flashinfer_paged, kernels


def test_rows_get_the_anchor_time_over_their_own():
    dec = dict(section="decode", model="m", batch=32, context=4096)
    pre = dict(section="prefill", model="m", batch=1, context=8192)
    rows = [
        dict(dec, backend="flashinfer_paged", memory="paged", block=16, us=130.0, timer="cuda graph"),
        dict(dec, backend="triton", memory="vm", us=125.0, timer="cuda graph"),
        dict(dec, backend="torch_fa2", memory="vm", us=260.0, timer="cuda graph"),
        dict(dec, backend="flex", memory="vm", us=100.0, timer="eager (capture failed: ...)"),  # timed otherwise
        dict(dec, batch=8, backend="triton", memory="vm", us=40.0, timer="cuda graph"),  # no anchor at batch 8
        dict(dec, backend="sdpa", memory="vm", note="error: ..."),  # not timed
        dict(pre, backend="flashinfer_paged", memory="paged", block=16, us=1100.0),
        dict(pre, backend="triton", memory="vm", us=1000.0),
        dict(section="vm_vs_malloc", model="m", batch=32, context=4096, backend="triton", us=125.0),
    ]
    flashinfer_paged.annotate(rows)
    ratios = [r.get("x_flashinfer_paged") for r in rows]
    assert ratios == [1.0, 1.04, 0.5, None, None, None, 1.0, 1.1, None]
    assert "x_flashinfer_paged" in kernels.COLUMNS


def test_no_anchor_no_ratio():
    rows = [dict(section="decode", model="m", batch=1, context=4096, backend="triton", memory="vm", us=10.0)]
    flashinfer_paged.annotate(rows)
    assert "x_flashinfer_paged" not in rows[0]


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
