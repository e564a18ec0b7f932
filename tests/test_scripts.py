"""The diagnostic scripts under ``scripts/`` that can run on a CPU: they are
run on the GPU machine with little time to spare, so a broken one costs a
device call. Each runs here at its smoke size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_diag_host_reports_host_time_and_functions_per_configuration(tmp_path):
    # Whole models on the CPU attend with plain torch: not the Triton interpreter that conftest may turn on.
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "diag_host.py"), "--model", "tiny", "--requests", "6",
         "--max-batch-size", "4", "--configs", "virtual-per_layer,paged-16", "--top", "5"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "diag_host.json").read_text())
    assert set(report["results"]) == {"virtual-per_layer", "paged-16"}
    for name, r in report["results"].items():
        assert r["iterations"] > 0 and r["step_wall_ms"] > 0 and r["host_ms_per_iter"] > 0, name
        assert r["kv_grow_ms_per_iter"] >= 0 and 0 < len(r["top"]) <= 5
        assert all(f["own_ms_per_iter"] >= 0 and "torch_vkv" in f["function"] or "tolist" in f["function"]
                   for f in r["top"])
        assert f"{name}: " in proc.stdout
    assert report["results"]["paged-16"]["kv_prewarm_ms_per_iter"] == 0  # eager allocation is virtual's
