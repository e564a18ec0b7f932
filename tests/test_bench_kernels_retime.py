"""``bench kernels``: the first decode shape is timed again at the end of its section, and a first
timing out of line with it is replaced (and said so), never silently kept or dropped; the same shape's
host time per call is reported beside it."""

from __future__ import annotations

import torch

from torch_vkv.bench import kernels, kernels_decode


def test_first_shape_retimed_and_out_of_line_rows_replaced(monkeypatch):
    later = {"triton": 16.0, "torch_fa2": 35.0}

    def fake_contiguous(cfg, caches, record, q, lens, B, S, H_kv, D, flex_here):
        for backend, us in later.items():
            record(backend, "vm", None, lambda us=us: us)

    monkeypatch.setattr(kernels_decode, "_contiguous_decode", fake_contiguous)
    monkeypatch.setattr(kernels, "_time", lambda cfg, fn, rep_ms: fn())
    base = dict(section="decode", model="m", batch=1, context=4096)
    rows = [
        dict(base, backend="triton", memory="vm", us=88.0, tb_s=0.2, pct_copy=4.5),  # out of line: replaced
        dict(base, backend="torch_fa2", memory="vm", us=36.0, tb_s=0.5, pct_copy=11.0),  # within 20%: kept
        dict(base, backend="triton_paged", memory="paged", block=16, us=250.0),  # not re-timed
        dict(base, batch=32, backend="triton", memory="vm", us=143.0),  # another shape
    ]
    cfg = kernels.Config.__new__(kernels.Config)
    cfg.decode_rep_ms, cfg.device = 1.0, torch.device("cpu")
    first = (base, torch.zeros(1), torch.zeros(1), 16 << 20, 8, 128, False)
    host = kernels_decode._recheck_first(cfg, None, rows, first, 4.2, lambda msg: None)
    assert rows[0]["us"] == 16.0 and rows[0]["us_first"] == 88.0 and "out of line" in rows[0]["note"]
    assert rows[0]["tb_s"] == (16 << 20) / 16e-6 / 1e12
    assert rows[1]["us"] == 36.0 and "us_first" not in rows[1] and "note" not in rows[1]
    assert rows[2]["us"] == 250.0 and rows[3]["us"] == 143.0
    assert [(r["section"], r["backend"]) for r in host] == [("decode_host", "triton"), ("decode_host", "torch_fa2")]


def test_host_rows_time_calls_without_a_sync(monkeypatch):
    calls = []
    cfg = kernels.Config.__new__(kernels.Config)
    cfg.device = torch.device("cpu")
    base = dict(section="decode", model="m", batch=1, context=4096)
    rows = [kernels_decode._host_row(cfg, base, "triton", "vm", None, lambda: calls.append("triton"), lambda m: None),
            kernels_decode._host_row(cfg, base, "sdpa", "vm", None, lambda: 1 / 0, lambda m: None)]  # fmt: skip
    assert [r["section"] for r in rows] == ["decode_host", "decode_host"]
    assert rows[0]["us"] > 0 and len(calls) == 1 + 3  # a warm-up call, then the timed ones
    assert "ZeroDivisionError" in rows[1]["note"] and "us" not in rows[1]  # a failing backend becomes a note
    summary = kernels._summary([dict(base, backend="triton", memory="vm", us=88.0)] + rows, 4.2,
                               type("C", (), {"vm_error": None})(), 1.0)  # fmt: skip
    assert "Host time per decode call, batch 1, context 4096: triton" in summary and "(timed 88.0 us)" in summary
