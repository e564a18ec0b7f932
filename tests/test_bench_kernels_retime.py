"""``bench kernels``: the first decode shape is timed again at the end of its section, and a first
timing out of line with it is replaced (and said so), never silently kept or dropped; the same shape's
host time per call is reported beside it."""

from __future__ import annotations

import pytest
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


def _recorder_cfg(device: str):
    cfg = kernels.Config.__new__(kernels.Config)
    cfg.decode_rep_ms, cfg.warmup_ms, cfg.device = 1.0, 0.5, torch.device(device)
    return cfg


def test_decode_rows_take_the_graph_time_and_keep_the_eager_one(monkeypatch):
    """On CUDA ``us`` is the CUDA-graph replay, ``us_eager`` the eager call; a backend whose capture
    fails keeps its eager time and says why (no GPU needed: both timers are stand-ins)."""
    monkeypatch.setattr(kernels, "_time", lambda cfg, fn, rep_ms: (fn(), 80.0)[1])

    def graph_time(fn, device, *, rep_ms, warmup_ms, l2_flush):
        assert l2_flush == "write"  # the run's choice (bench kernels --l2-flush), passed through
        if fn() == "sync":
            raise RuntimeError("operation not permitted when stream is capturing")
        return 20.0

    monkeypatch.setattr(kernels_decode, "time_us_graph", graph_time)
    rows: list = []
    base = dict(section="decode", model="m", batch=1, context=4096)
    record = kernels_decode._decode_recorder(_recorder_cfg("cuda"), rows, base, 4 << 20, 4.0, lambda m: None)
    record("triton", "vm", None, lambda: "ok")
    record("sdpa", "vm", None, lambda: "sync")
    record("flex", "vm", None, lambda: 1 / 0)  # a timing error stays an error row
    assert rows[0]["us"] == 20.0 and rows[0]["us_eager"] == 80.0 and rows[0]["timer"] == "cuda graph"
    assert rows[0]["tb_s"] == pytest.approx((4 << 20) / 20e-6 / 1e12) and "note" not in rows[0]
    assert rows[1]["us"] == rows[1]["us_eager"] == 80.0 and "capture failed: RuntimeError" in rows[1]["note"]
    assert "error: ZeroDivisionError" in rows[2]["note"] and "us" not in rows[2]
    cpu_rows: list = []
    kernels_decode._decode_recorder(_recorder_cfg("cpu"), cpu_rows, base, 4 << 20, 4.0, lambda m: None)(
        "triton", "vm", None, lambda: "ok")  # fmt: skip
    assert cpu_rows[0]["us"] == cpu_rows[0]["us_eager"] == 80.0 and cpu_rows[0]["timer"] == "host loop"


def test_decode_summary_states_the_targets_against_the_same_timer():
    def row(backend, memory, batch, context, us, pct=50.0, timer="cuda graph"):
        return dict(section="decode", model="m", backend=backend, memory=memory, batch=batch, context=context,
                    us=us, pct_copy=pct, timer=timer)  # fmt: skip

    rows = [
        row("flashinfer_paged", "paged", 32, 4096, 100.0), row("triton", "vm", 32, 4096, 104.0),
        row("flashinfer", "vm", 32, 4096, 95.0),
        row("flashinfer_paged", "paged", 128, 16384, 400.0), row("triton", "vm", 128, 16384, 380.0),
        row("flashinfer", "vm", 128, 16384, 300.0, timer="eager (capture failed: X)"),  # not compared
        row("triton", "vm", 1, 16384, 30.0, pct=62.0), row("flashinfer", "vm", 1, 16384, 25.0, pct=74.0),
        row("triton", "vm", 4, 32768, 30.0, pct=81.0),
    ]  # fmt: skip
    lines = "\n".join(kernels_decode.decode_summary(rows))
    assert "triton on vm memory against flashinfer_paged/16" in lines
    assert "0.962x - 1.053x the speed (target >= 1.02x: NOT met; worst at B=32 S=4096)" in lines
    assert "flashinfer on vm memory against flashinfer_paged/16, batch >= 8, context >= 4K: 1.053x - 1.053x" in lines
    assert "flashinfer 74% at B=1 S=16384, triton 81% at B=4 S=32768 of copy bandwidth (target >= 70%: met)" in lines
    assert kernels_decode.decode_summary([]) == []


@pytest.mark.cuda
def test_time_us_graph_times_the_replay_and_refuses_a_host_sync():
    from torch_vkv.bench.timing import time_us, time_us_graph

    dev = torch.device("cuda", torch.cuda.current_device())
    src = torch.randn(1 << 22, device=dev)
    dst = torch.empty_like(src)
    # Ten small launches: eager pays the host per launch, the replay does not.
    fn = lambda: [dst.copy_(src) for _ in range(10)]  # noqa: E731
    graph_us = time_us_graph(fn, dev, rep_ms=20, warmup_ms=5)
    eager_us = time_us(fn, dev, rep_ms=20, warmup_ms=5)
    assert 0 < graph_us < 1.5 * eager_us
    with pytest.raises(RuntimeError):
        time_us_graph(lambda: src.sum().item(), dev, rep_ms=5, warmup_ms=1)
    torch.testing.assert_close(dst, src)  # the stream still works after a failed capture
    dst.zero_()
    time_us_graph(fn, dev, rep_ms=5, warmup_ms=1)
    torch.testing.assert_close(dst, src)
