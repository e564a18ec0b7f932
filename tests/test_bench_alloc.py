"""CPU smoke test of ``python -m torch_vkv bench alloc`` (host backend)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torch_vkv.bench.alloc import MODES, main

LATENCY = (
    "create_page",
    "commit_first_touch_batched",
    "commit_single",
    "commit_batched",
    "decommit_single",
    "decommit_batched",
    "decommit_ordered_batched",
)


def test_bench_alloc_quick_cpu(tmp_path: Path) -> None:
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path)]
    argv += ["--steps", "8", "--repeats", "1", "--warmup", "1", "--pages", "4", "--latency-repeats", "1"]
    assert main(argv) == 0

    report = json.loads((tmp_path / "alloc.json").read_text())
    assert report["command"].startswith("python -m torch_vkv bench alloc --device cpu --quick")
    assert (tmp_path / "alloc.md").read_text().startswith("# alloc")
    rows = report["rows"]

    latency = {r["name"].split(" ")[0]: r for r in rows if r["section"] == "latency"}
    assert set(latency) == set(LATENCY)
    for name, r in latency.items():
        assert r["us_per_call"] > 0 and r["us_per_page"] > 0, (name, r)
    # Batching: one set-access per contiguous run, one unmap per run.
    assert latency["commit_batched"]["pages"] == 4
    assert latency["commit_batched"]["map_calls"] == 4
    assert latency["commit_batched"]["set_access_calls"] == 1
    assert latency["commit_single"]["set_access_calls"] == 1
    assert latency["decommit_batched"]["unmap_calls"] == 1
    assert latency["decommit_single"]["unmap_calls"] == 1

    # The per-step call's host cost, per layout at batch 64 and 256.
    calls = {(r["layout"], r["batch"]): r for r in rows if r["section"] == "step_call"}
    assert set(calls) == {(layout, b) for layout in ("per_layer", "interleaved") for b in (64, 256)}
    for r in calls.values():
        assert r["name"] == "step_async_unchanged" and 0 < r["us_per_call"] < 1e4, r
    assert "step_async host cost with unchanged lengths" in (tmp_path / "alloc.md").read_text()

    decode = [r for r in rows if r["section"] == "decode"]
    assert {(r["layout"], r["name"]) for r in decode} == {
        (layout, mode) for layout in ("per_layer", "interleaved") for mode in MODES
    }
    for r in decode:
        assert r["batch"] == 64 and r["steps"] == 8, r
        assert r["ms_per_step"] > 0 and r["ms_per_step_median"] > 0 and r["host_ms_per_step"] > 0, r
        assert r["tokens_per_page"] > 0, r
        assert r["output_matches_precommitted"] is True, r
        if r["name"] == "precommitted":
            assert r["overhead_pct"] == 0, r
        if r["name"].startswith("precommitted"):
            assert r["pages_committed_per_run"] == 0, r  # nothing left to commit in the run
        else:
            assert r["pages_committed_per_run"] > 0, r  # the run crossed page boundaries


@pytest.mark.parametrize("max_len", ["100000000", "99999999999"])
def test_a_max_len_beyond_memory_is_refused_before_the_run(max_len, capsys):
    """--max-len whose K/V cannot fit in this machine's memory is refused up front with "expected ..., got ...",
    not a KVCache ValueError traceback (or an out-of-memory) after the latency part has run: a usage error."""
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--quick", "--max-len", max_len])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--max-len" in err and "expected" in err
