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


def _run_gpu_diag(name, tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)  # fmt: skip


def _gpu_diag_rows(name, tmp_path, *args):
    """Run a GPU diagnostic; the rows of its ``$OUT/<name>.json`` once it exited cleanly."""
    proc = _run_gpu_diag(name, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["diag_decode", "diag_maps", "diag_prefill", "diag_ab", "diag_read"])
def test_gpu_diagnostic_without_a_gpu_says_what_it_needs(name, tmp_path):
    if _cuda_available():
        pytest.skip(f"a GPU is present: {name}.py runs (its test_cuda_* test)")
    proc = _run_gpu_diag(name, tmp_path)
    assert proc.returncode != 0
    assert "expected a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_point_lists_parse_and_a_malformed_point_is_named():
    """``--points`` / ``--decode`` of the decode diagnostics: BATCHxCONTEXT pairs of ints >= 1; a bad one is
    an argparse error naming the item (the scripts exit with a usage line, no traceback)."""
    import argparse

    from torch_vkv._checks import point_list_arg

    assert point_list_arg()("1x16384, 4X4096") == [(1, 16384), (4, 4096)]
    assert point_list_arg(allow_empty=True)("") == []
    for bad in ("", "4y5", "0x128", "4x", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            point_list_arg()(bad)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "diag_decode.py"), "--points", "4y5"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and "'4y5'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.cuda
def test_cuda_diag_decode_sweeps_and_writes_every_row(tmp_path):
    rows = _gpu_diag_rows("diag_decode", tmp_path, "--points", "1x1024,2x512", "--splits", "1,4", "--block-n", "64",
                          "--warps", "4", "--stages", "2,3", "--rep-ms", "2")  # fmt: skip
    decode = [r for r in rows if r["kind"] == "decode"]
    assert len(decode) == 2 * 2 * 2  # points x splits x stages
    assert all(r["us"] > 0 and r["pct_copy"] > 0 for r in decode)
    assert {r["kind"] for r in rows} == {"copy_k", "reduce", "decode"}


@pytest.mark.parametrize("tma", [False, True])
def test_diag_read_kernels_read_every_byte_once(tma, monkeypatch):
    """The read-ceiling kernels (``scripts/diag_read.py``) under the Triton interpreter: both the flat
    stride and the per-head reads sum the whole cache (uniform values, float64 sum as the reference)."""
    if not os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("runs the kernels under TRITON_INTERPRET=1 (the conftest's CPU setting)")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import diag_read

    torch = pytest.importorskip("torch")
    B, S, H_kv, D = 2, 192, diag_read.NUM_KV_HEADS, diag_read.HEAD_DIM
    x = torch.rand((B, S, H_kv, D), generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = float(x.double().sum())
    flat, rows = x.view(-1, D), 64
    out = torch.zeros(3)
    desc = diag_read._descriptor(flat, rows, D) if tma else flat
    diag_read._read_flat_kernel[(3,)](flat, desc, out, flat.shape[0] // rows, ROWS=rows, COLS=D, STAGES=2,
                                      USE_TMA=tma)  # fmt: skip
    assert float(out.double().sum()) == pytest.approx(want, rel=1e-5)
    x2d = x.view(B * S, H_kv * D)
    per_head = torch.zeros(B * H_kv)
    desc = diag_read._descriptor(x2d, rows, D) if tma else x2d
    diag_read._read_heads_kernel[(B, H_kv)](x2d, desc, per_head, S, H_kv, ROWS=rows, HEAD=D, STAGES=2, USE_TMA=tma)
    assert per_head.double().tolist() == pytest.approx(x.double().sum(dim=(1, 3)).flatten().tolist(), rel=1e-5)


def test_diag_tail_models_the_8k_launch_the_stamps_measured(tmp_path, monkeypatch):
    """``scripts/diag_tail.py`` (CPU): with the twenty-ninth session's per-tile and per-block costs, the
    head-after-head launch of an 8K prompt ends with SMs finishing between 854 and 935 us, as the
    H100's stamps measured, and the grouped launch (``block_order``) has almost no tail; bad head
    counts are refused with what was expected."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import diag_tail

    head, grouped = diag_tail.model(8192, 32, 8, 132, 1.64, 3.9)
    assert head["order"] == "head after head" and grouped["order"] == "grouped"
    assert head["first_idle_us"] == pytest.approx(854.3, abs=0.1) and head["span_us"] == pytest.approx(935.3, abs=0.1)
    assert grouped["ideal_us"] == pytest.approx(head["ideal_us"])  # the same blocks, dealt in another order
    assert grouped["tail_pct"] < 0.5 < 5 < head["tail_pct"]
    with pytest.raises(ValueError, match="expected num_heads a multiple of num_kv_heads, got 32 and 5"):
        diag_tail.model(8192, 32, 5, 132, 1.64, 3.9)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "diag_tail.py"), "--contexts", "1024"],
                          capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "diag_tail.json").read_text())
    assert [r["order"] for r in rows] == ["head after head", "grouped"]


@pytest.mark.cuda
def test_cuda_diag_read_times_every_kind_against_the_copy(tmp_path):
    rows = _gpu_diag_rows("diag_read", tmp_path, "--points", "4x1024", "--rows", "64", "--warps", "4",
                          "--stages", "2", "--programs-per-sm", "1", "--rep-ms", "2", "--l2-flush", "read")  # fmt: skip
    assert {r["l2_flush"] for r in rows} == {"read"}
    assert [r["kind"] for r in rows[:3]] == ["copy", "copy_caches", "torch_sum"]
    triton_rows = rows[3:]
    assert {(r["kind"], r["tma"]) for r in triton_rows} == {(k, t) for k in ("flat", "heads") for t in (False, True)}
    assert all("error" not in r and r["us"] > 0 and r["pct_copy"] > 0 for r in triton_rows), triton_rows


@pytest.mark.cuda
def test_cuda_diag_ab_times_both_copies_of_the_kernels(tmp_path):
    """The A/B diagnostic with the current kernels as their own baseline: every row timed, outputs equal;
    ``--profile``: each step graph's kernels and idle time per layer."""
    proc = _run_gpu_diag("diag_ab", tmp_path, "--baseline", str(ROOT / "triton_kernels"), "--decode", "2x1024",
                         "--prefill", "512", "--layers", "2", "--rounds", "2", "--rep-ms", "2", "--profile",
                         "--prefill-launch", "64,64,4,2,0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "diag_ab.json").read_text())
    decode = {r["kernel"]: r for r in rows if r["kind"] == "decode"}
    prefill = {r["kernel"]: r for r in rows if r["kind"] == "prefill"}
    assert {"baseline", "current", "current, tma=False"} <= set(decode)
    # On Hopper also the Triton kernel beside the Gluon one (", kernel=triton") and the Gluon variants.
    assert {"baseline", "current", "current 64x64 w4 s2"} <= set(prefill)
    for name, r in prefill.items():  # bf16; other tiles or kernels: another summation order
        assert r["max_diff_vs_first"] < 2e-2, (name, r["max_diff_vs_first"])
        assert r["host_us"] > 0, name
    for r in list(decode.values()) + list(prefill.values()):
        assert "error" not in r, r
    assert all(r["graph_us"] > 0 and r["step_us"] > 0 and r["layers"] == 2 for r in decode.values())
    assert decode["current"]["max_diff_vs_first"] == 0 and prefill["current"]["max_diff_vs_first"] == 0
    assert all(len(r["rounds_us"]) == 2 for r in prefill.values())
    profile = {r["kernel"]: r["us_per_layer"] for r in rows if r["kind"] == "decode_profile"}
    assert {"baseline", "current"} <= set(profile)
    assert any(k.startswith("_decode_split_kernel") and us > 0 for k, us in profile["current"].items())
    assert profile["current"]["idle between kernels"] >= 0


def _diag_ab():
    import importlib.util

    spec = importlib.util.spec_from_file_location("diag_ab_under_test", ROOT / "scripts" / "diag_ab.py")
    diag_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag_ab)
    return diag_ab


def test_diag_ab_prefill_launches_parse():
    """``--prefill-launch``: ';'-separated BLOCK_M,BLOCK_N,WARPS,STAGES,TMA tuples; a wrong count is an error."""
    diag_ab = _diag_ab()
    assert diag_ab._launches("256,64,16,2,1; 128,128,8,3,0;") == [(256, 64, 16, 2, True), (128, 128, 8, 3, False)]
    assert diag_ab._launches("") == []
    with pytest.raises(SystemExit, match="expected BLOCK_M,BLOCK_N,WARPS,STAGES,TMA, got '128,64'"):
        diag_ab._launches("128,64")
    with pytest.raises(SystemExit, match="got '128,64,8,x,1'"):
        diag_ab._launches("128,64,8,x,1")


def test_diag_ab_flashinfer_pages_restores_the_page_size_when_the_call_fails():
    """``--flashinfer-rows`` sets the backend's largest decode page for its call only: also when
    the call raises (here on the CPU, where the ``flashinfer`` backend refuses the tensors)."""
    import torch

    from torch_vkv.attention import flashinfer_backend

    diag_ab = _diag_ab()
    default = flashinfer_backend.DECODE_PAGE_ROWS
    q = torch.randn(2, 4, 64)
    k = torch.randn(2, 32, 2, 64)
    with pytest.raises(ValueError, match="flashinfer"):
        diag_ab._flashinfer_pages(16)(q, k, torch.randn_like(k), torch.full((2,), 8, dtype=torch.int32))
    assert flashinfer_backend.DECODE_PAGE_ROWS == default


@pytest.mark.cuda
def test_cuda_diag_ab_flashinfer_page_sizes(tmp_path):
    """The flashinfer backend's decode with pages of 16 and 64 rows: both timed, both within bf16
    rounding of the Triton kernels' output (FlashInfer's wheels are carried to the GPU machine only)."""
    from torch_vkv.attention import deps

    if not deps.has_flashinfer():
        pytest.skip("flashinfer is not importable (scripts/gpu_check.sh installs it when .whl/ is carried)")
    proc = _run_gpu_diag("diag_ab", tmp_path, "--baseline", str(ROOT / "triton_kernels"), "--decode", "1x2048",
                         "--prefill", ",", "--layers", "2", "--rep-ms", "2", "--flashinfer-rows", "16,64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads((tmp_path / "diag_ab.json").read_text()) if r["kind"] == "decode"}
    for name in ("flashinfer, pages of 16", "flashinfer, pages of 64"):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["graph_us"] > 0 and rows[name]["max_diff_vs_first"] < 2e-2


@pytest.mark.cuda
def test_cuda_diag_maps_times_every_mode(tmp_path):
    proc = _run_gpu_diag("diag_maps", tmp_path, "--batch", "2", "--context", "2048", "--layers", "4", "--pages", "8",
                         "--replays", "20")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "diag_maps.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert set(rows) == {"idle", "maps_thread", "maps_between"}
    assert all(r["ms_per_replay"] > 0 for r in report["rows"])
    assert rows["idle"]["pages_mapped"] == 0 and rows["maps_between"]["pages_mapped"] == 20 * 8


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_nvidia_compiler() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:  # no CUDA backend in this Triton, or no ptxas shipped with it
        return False


@pytest.mark.skipif(not _has_nvidia_compiler(), reason="this Triton ships no CUDA backend or ptxas to compile with")
def test_diag_sass_prefill_compiles_for_hopper_with_asynchronous_mma(tmp_path):
    """Compiled for sm90 on this machine (no GPU): the prefill's main loop issues tensor-core MMAs
    (HGMMA) and ptxas does not serialize them (its C7511 warning makes every MMA wait for the one
    before: a slower kernel that is still correct, so no GPU test would notice)."""
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "diag_sass.py"), "--launch", "128,64,8,2"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "diag_sass.json").read_text())
    assert row["launch"] == [128, 64, 8, 2] and 0 < row["registers"] <= 255
    assert not row["wgmma_serialized"], row
    assert any(loop["HGMMA"] > 0 and loop["MUFU.EX2"] > 0 for loop in row["loops"]), row["loops"]
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "diag_sass.py"), "--launch", "128,64"], check=True,
                       capture_output=True, timeout=120, env=env, cwd=ROOT)  # fmt: skip


@pytest.mark.skipif(not _has_nvidia_compiler(), reason="this Triton ships no CUDA backend or ptxas to compile with")
def test_diag_sass_gluon_against_a_copy_of_itself_finds_no_change(tmp_path):
    """``diag_sass.py --gluon-against``: the Gluon kernel's default launch compiled for sm90 from two
    folders and its SASS compared with registers and addresses blanked (a variant that leaves the
    default's code alone shows 0; one unused barrier once moved 686 lines and cost 5%). A copy of
    the kernels folder against itself: 0 lines; the same copy with the grouped launch order turned
    off by default: some lines change."""
    from torch_vkv.triton_kernels import prefill_hopper

    if prefill_hopper.GLUON_IMPORT_ERROR is not None:
        pytest.skip(f"this Triton lacks Gluon: {prefill_hopper.GLUON_IMPORT_ERROR}")
    import shutil

    copy = tmp_path / "copy" / "triton_kernels"
    shutil.copytree(ROOT / "triton_kernels", copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="0")
    script = [sys.executable, str(ROOT / "scripts" / "diag_sass.py"), "--launch=", "--kernels", str(ROOT / "triton_kernels")]
    proc = subprocess.run([*script, "--gluon-against", str(copy)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "diag_sass.json").read_text())
    assert row["changed_lines"] == 0 and row["instructions"] == row["instructions_against"] > 1000, row
    source = (copy / "prefill.py").read_text()
    assert "return bool(causal) and group > 1" in source
    (copy / "prefill.py").write_text(source.replace("return bool(causal) and group > 1", "return False"))
    proc = subprocess.run([*script, "--gluon-against", str(copy)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "diag_sass.json").read_text())
    assert row["changed_lines"] > 0, row


@pytest.mark.skipif(not _has_nvidia_compiler(), reason="this Triton ships no CUDA backend or ptxas to compile with")
def test_decode_evict_first_reaches_unpipelined_loads_in_the_sm90_ptx():
    """``decode_attention(evict_first=True)`` compiled for sm90 on this machine (no GPU): without a
    software pipeline every K/V load carries the L2 policy, without the flag none does; pipelined, the
    copies are cp.async (Triton 3.6 drops the policy there, 3.9 keeps it: counted, not asserted)."""
    code = ("import json, torch_vkv.triton_kernels.decode as d; print(json.dumps("
            "[d.compile_decode_for_sm90(s, e) for s, e in ((1, True), (1, False), (3, True))]))")  # fmt: skip
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain_hinted, plain, piped = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain_hinted["l2_hinted_loads"] > 0 and plain_hinted["async_copies"] == 0, plain_hinted
    assert plain == dict(l2_hinted_loads=0, async_copies=0), plain
    assert piped["async_copies"] > 0, piped
