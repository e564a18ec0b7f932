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



def test_anchor_layers_empty_without_flashinfer():
    """The step section's anchor calls: none where FlashInfer cannot run (here: the CPU)."""
    import torch

    assert flashinfer_paged.anchor_layers("decode", torch.zeros(1, 8, 64), 1, 64, 2, 64, 3) == []
