"""The demo and ``bench hf`` (CPU smoke tests)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402


from _hf_models import generate, prompts, tiny_config, tiny_model  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")


@pytest.fixture
def keep_threads():
    """demo/bench set torch's CPU thread count for their run: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_runs_on_cpu(capsys, keep_threads):
    from torch_vkv.demo import main

    assert main(["--device", "cpu", "--batch", "2", "--prompt-len", "12", "--new-tokens", "6",
                 "--max-cache-len", "256"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "VirtualKVCache" in out and "StaticCache" in out and "DynamicCache" in out
    assert "same tokens from all three caches: yes (exact equality, float32 on the CPU)" in out
    assert main(["--device", "cpu", "--no-transformers", "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--max-cache-len", "128"]) == 0  # fmt: skip
    assert "KVCache committed" in capsys.readouterr().out


@pytest.mark.cuda
def test_demo_on_cuda_is_compiled_and_states_its_agreement(capsys, keep_threads):
    """What a new user sees first on a GPU: both compiled caches on the compiled path (CUDA graphs),
    and the comparison judged against a float32 reference with its tolerance, never a bare "no"."""
    from torch_vkv.demo import main

    assert main(["--device", "cuda", "--batch", "2", "--prompt-len", "24", "--new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count("compiled, CUDA graphs") >= 2, out  # VirtualKVCache and StaticCache
    assert "agreement with a float32 reference" in out, out
    assert "outside the tolerance" not in out and "from all three caches: no" not in out, out


def test_demo_without_transformers_says_so(capsys, keep_threads, monkeypatch):
    import sys

    from torch_vkv.demo import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert main(["--device", "cpu", "--batch", "2", "--prompt-len", "6", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "transformers is not installed" in out and "KVCache committed" in out


def test_bench_hf_tiny_smoke(tmp_path, keep_threads):
    import json

    from torch_vkv.bench.hf import main

    assert main(["--tiny", "--quick", "--device", "cpu", "--variants", "dynamic", "vkv", "--new-tokens", "4",
                 "--prompt", "16", "--batch", "2", "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "hf.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dynamic", "vkv"]
    assert all(r["same_tokens_as_dynamic"] == 1.0 for r in rows)
    assert rows[1]["kv_bytes"] > 0
    assert rows[1]["capacity"] == "server" and rows[1]["max_cache_len"] == 8192


def test_bench_hf_profile_splits_each_variant(tmp_path, keep_threads):
    """``--profile``: each row carries torch.profiler's split (on the CPU: operators by CPU time,
    no kernel split) and the markdown says what took the longest, per variant and capacity."""
    import json

    from torch_vkv.bench.hf import main

    assert main(["--tiny", "--quick", "--device", "cpu", "--variants", "static", "vkv", "--new-tokens", "4",
                 "--prompt", "16", "--batch", "2", "--capacities", "exact", "--profile",
                 "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "hf.json").read_text())["rows"]
    for r in rows:
        p = r["profile"]
        assert p["ranked_by"] == "cpu" and p["kernel_pct"] is None and p["host_pct"] is None
        assert p["num_iterations"] == 4 and p["busy_s"] == r["seconds"] and p["top"]
    md = (tmp_path / "hf.md").read_text()
    assert "- profile static exact: no device kernels" in md and "- profile vkv exact:" in md
    assert "torch_vkv::" in md  # our attention ops are named among the vkv variant's top operators


def test_bench_hf_capacities_side_by_side(tmp_path, keep_threads):
    import json

    from torch_vkv.bench.hf import main

    assert main(["--tiny", "--quick", "--device", "cpu", "--variants", "dynamic", "static", "vkv_compiled",
                 "vkv_interleaved_compiled", "--new-tokens", "4", "--prompt", "16", "--batch", "2",
                 "--max-cache-len", "256", "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "hf.json").read_text())
    got = [(r["variant"], r["capacity"], r["max_cache_len"]) for r in report["rows"]]
    assert got == [("dynamic", "server", 256)] + [
        (v, kind, cap) for v in ("static", "vkv_compiled", "vkv_interleaved_compiled")
        for kind, cap in (("server", 256), ("exact", 20))
    ]  # fmt: skip
    assert all(r["same_tokens_as_dynamic"] == 1.0 for r in report["rows"])
    inter = [r for r in report["rows"] if r["variant"] == "vkv_interleaved_compiled"]
    assert all(r["kv_buffers"] == 1 for r in inter)


def test_demo_local_checkpoint(tmp_path, capsys, keep_threads):
    from torch_vkv.demo import main

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(tmp_path / "ckpt")
    assert main(["--model", str(tmp_path / "ckpt"), "--device", "cpu", "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--max-cache-len", "64"]) == 0  # fmt: skip
    assert str(tmp_path / "ckpt") in capsys.readouterr().out


def test_demo_agreement_report_judges_each_token(capsys):
    """The GPU comparison of the demo, run on the CPU: a float32 model agrees
    with its float32 copy on every token; a token the reference ranks far
    below its argmax is reported as outside the tolerance, not as a bare "no"."""
    from torch_vkv.demo import _print_agreement

    model = tiny_model("llama", "sdpa")
    ids, mask = prompts(2)
    out = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=6)
    bad = out.clone()
    with torch.no_grad():
        logits = model(out[:, :-1], attention_mask=torch.cat([mask, torch.ones_like(out[:, 8:])], 1)).logits
    bad[0, -1] = logits[0, -1].argmin()  # the reference's worst token
    _print_agreement(model, {"good": out, "bad": bad}, mask, ids.shape[1])
    text = capsys.readouterr().out
    assert "good            12/12 argmax, 0 near ties: agrees" in text
    assert "bad             11/12 argmax, 0 near ties: 1 token(s) outside the tolerance" in text


def test_bench_hf_gemma3_tiny_smoke(tmp_path, keep_threads):
    """``bench hf --workload gemma3 --tiny``: the three caches give the same tokens, the
    per-step KV series is recorded for each, StaticCache holds its preallocation from the
    first step, and VirtualKVCache's sliding layers stop growing once past the window."""
    import json

    from torch_vkv.bench.hf import main

    assert main(["--workload", "gemma3", "--tiny", "--device", "cpu", "--prompt", "24", "--new-tokens", "56",
                 "--batch", "1", "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "hf_gemma3.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["vkv", "dynamic", "static"]  # ours first: a cut run keeps it
    assert all(r["same_tokens_as_dynamic"] == 1.0 and r["first_divergence_from_dynamic"] == -1 and r["tok_s"] > 0
               for r in rows)  # fmt: skip
    series = json.loads((tmp_path / "hf_gemma3_series.json").read_text())["per_step"]
    assert {k: len(v) for k, v in series.items()} == {"dynamic": 56, "static": 56, "vkv": 56}
    static = [s[0] for s in series["static"]]
    assert len(set(static)) == 1  # preallocated
    vkv_total = [s[0] for s in series["vkv"]]
    vkv_sliding = [s[1] for s in series["vkv"]]
    assert vkv_total == sorted(vkv_total) and vkv_total[-1] > vkv_total[0]  # the global layer grows
    # 4 KiB host pages hold 16 tokens of a buffer; window 32: at most 2 + 2 pages per sliding buffer.
    assert 0 < max(vkv_sliding) <= 5 * 2 * 4 * 4096
    assert vkv_sliding[-1] < vkv_total[-1]
    assert (tmp_path / "hf_gemma3.md").exists()


def test_bench_hf_beam_smoke(tmp_path, keep_threads):
    import json

    from torch_vkv.bench.hf import main

    assert main(["--tiny", "--beam", "--device", "cpu", "--num-beams", "3", "--prompt", "48", "--new-tokens", "4",
                 "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "hf_beam.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dynamic", "copy", "remap"]
    assert all(r["same_sequences_as_dynamic"] for r in rows)
    copy, remap = rows[1], rows[2]
    assert remap["shared_pages"] > 0 and copy["shared_pages"] == 0
    assert remap["copied_bytes"] < copy["copied_bytes"] and remap["kv_bytes"] < copy["kv_bytes"]


def test_gemma3_first_divergence():
    from torch_vkv.bench.gemma3 import first_divergence

    a = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    assert first_divergence(a, a.clone()) == -1
    b = a.clone()
    b[1, 2] = 9  # row 1 differs from step 2 on
    b[0, 3] = 0
    assert first_divergence(b, a) == 2
