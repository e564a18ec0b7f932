"""``python -m torch_vkv bench serve`` in process: every workload at --smoke
size on the CPU (a subprocess, OMP_NUM_THREADS=1), the report's schema, and
the pieces (configurations, roofline, sync step, model restore) on their own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from torch_vkv.bench import serve, serve_client
from torch_vkv.bench.roofline import IterationRecord, ModelCost, run_floor
from torch_vkv.bench.serve_engine import CONFIGS, EngineConfig, parse_config, random_prompts, run_engine
from torch_vkv.bench.workloads import make_requests, workload_lengths

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

SUMMARY_KEYS = set(serve_client.summarize([], 1.0, ttft_slo_s=1.0, tpot_slo_s=1.0))
POSITIVE = ["output_tokens_per_s", "total_tokens_per_s", "request_throughput", "makespan_s", "duration_s",
            "iter_mean_s", "busy_s", "roofline_floor_s", "pct_roofline", "peak_committed_bytes", "peak_running"] + [
    f"{m}_{s}_s" for m in ("ttft", "tpot", "itl", "e2e", "norm_latency") for s in ("mean", "p50", "p90", "p99")]


def _smoke(tmp_path, *extra: str) -> tuple[dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)  # plain torch appends: the interpreter is far too slow for models
    cmd = [sys.executable, "-m", "torch_vkv", "bench", "serve", "--smoke", "--out", str(tmp_path), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((tmp_path / "serve.json").read_text()), (tmp_path / "serve.md").read_text()


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    return _smoke(tmp_path_factory.mktemp("serve"))


def test_smoke_every_workload_schema_and_numbers(smoke_report):
    report, md = smoke_report
    assert set(report["workloads"]) == set(serve.SERVE_WORKLOADS)
    for key in ("env", "command", "device_rates", "slo_s", "configs", "skipped", "rows", "plots"):
        assert key in report
    assert report["device_rates"]["copy_bytes_per_s"] > 0 and report["device_rates"]["matmul_flops_per_s"] > 0
    assert any(s["config"] == "hf-generate_batch" or s["config"] == "flashinfer" for s in report["skipped"])
    for name, w in report["workloads"].items():
        assert f"## {name}" in md
        assert w["rows"], name
        assert not [s for s in w["skipped"] if s["reason"].startswith("failed")], w["skipped"]
        configs = {r["config"] for r in w["rows"]}
        if name == "sync-vs-async":
            assert configs == {f"{c}+{m}" for c in CONFIGS if c.startswith("virtual") for m in ("sync", "async")}
        elif name in serve.CACHING_WORKLOADS:
            assert configs == {f"{c}+{m}" for c in serve.CACHE_CONFIGS for m in ("cache", "nocache")}
        else:
            assert configs == set(CONFIGS)
        for row in w["rows"]:
            assert SUMMARY_KEYS <= set(row), "the load client's schema"
            assert row["completed"] == row["requests"] > 0 and row["failed"] == 0
            for k in POSITIVE:
                v = row[k]
                assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (name, row["config"], k)
            assert 0 <= row["host_pct"] <= 100 and row["host_s_per_iter"] >= 0
            assert 0 < row["kv_grow_pct"] <= row["host_pct"], "page commits are a part of the engine's host time"
            assert row["kv_prewarm_pct"] >= 0 and (row["kv_prewarm_pct"] == 0 or row["config"].startswith("virtual"))
            assert 0 <= row["goodput_fraction"] <= 1
            assert 0 <= row["queue_p50_s"] <= row["queue_p99_s"] and row["queue_mean_s"] <= row["ttft_mean_s"]
        for part in w["parts"]:
            for cfg, run in part["runs"].items():
                assert len(run["requests"]) == part["num_requests"]
                for q in run["requests"]:
                    assert q["ok"] and q["finish_reason"] == "length"
                    assert q["output_tokens"] == q["expected_output_tokens"]
                    # n > 1: output_tokens counts every completion, ITL is completion 0's
                    assert len(q["itl_s"]) == q["output_tokens"] // part["n"] - 1 and all(x >= 0 for x in q["itl_s"])
                    assert 0 < q["ttft_s"] <= q["e2e_s"]
                    assert 0 <= q["queue_s"] < q["ttft_s"], "waiting to be scheduled is a part of TTFT"
                mem = run["memory"]
                assert mem and all(m["committed_bytes"] >= 0 for m in mem)
                assert [m["t_s"] for m in mem] == sorted(m["t_s"] for m in mem)
                its = run["iterations"]
                stats = run["engine_stats"]
                computed = (part["prompt_tokens"] - stats["prefix_hit_tokens"] + part["output_tokens"]
                            - part["num_requests"] * part["n"])  # fmt: skip
                assert sum(i["num_tokens"] for i in its) == stats["num_computed_tokens"]
                assert stats["num_computed_tokens"] >= computed  # more after a preemption
                assert sum(i["num_decode"] for i in its) > 0 and sum(i["num_prefill_tokens"] for i in its) > 0


def test_smoke_ratios_and_capacity(smoke_report):
    report, _ = smoke_report
    for name in ("offline", "long-offline", "long-online", "capacity"):
        for group in {r["group"] for r in report["workloads"][name]["rows"]}:
            rows = [r for r in report["workloads"][name]["rows"] if r["group"] == group]
            best = max((r for r in rows if r["config"].startswith("paged")), key=lambda r: r["output_tokens_per_s"])
            assert all(r["best_paged"] == best["config"] for r in rows)
            assert best["x_best_paged_tput"] == pytest.approx(1.0)
            for r in rows:
                assert r["x_best_paged_tput"] == pytest.approx(r["output_tokens_per_s"] / best["output_tokens_per_s"])
    online = report["workloads"]["long-online"]["rows"]
    assert {r["trace"] for r in online} == {"arxiv_long_online", "arxiv_summarization"}
    assert all(r["x_best_paged_norm_p99"] > 0 for r in online)
    asyncs = [r for r in report["workloads"]["sync-vs-async"]["rows"] if r["config"].endswith("+async")]
    assert len(asyncs) == 2 and all(r["x_sync_tput"] > 0 and r["x_sync_iter_time"] > 0 for r in asyncs)
    cap = {r["config"]: r for r in report["workloads"]["capacity"]["rows"]}
    budget = report["workloads"]["capacity"]["parts"][0]["memory_budget"]
    # 128 KiB of a tiny model's KV (512 B a token): one block of 256 tokens, or 16 of 16 tokens.
    assert cap["paged-256"]["peak_running"] == 1
    assert cap["paged-16"]["peak_running"] > 1
    assert cap["paged-16"]["x_paged16_concurrency"] == 1.0
    assert cap["paged-16"]["x_paged16_mean_running"] == 1.0
    p16_mean = cap["paged-16"]["mean_running_while_queued"]
    for row in cap.values():
        assert row["x_paged16_mean_running"] == pytest.approx(row["mean_running_while_queued"] / p16_mean)
    for cfg, r in cap.items():
        assert r["peak_committed_bytes"] <= budget, cfg
    assert cap["virtual-interleaved"]["num_preemptions"] >= 0


def test_smoke_prefix_caching_and_parallel_sampling(smoke_report):
    report, md = smoke_report
    rows = {r["config"]: r for r in report["workloads"]["prefix"]["rows"]}
    part = report["workloads"]["prefix"]["parts"][0]
    shared, n_req = part["shared_prefix_tokens"], part["num_requests"]
    for cfg in serve.CACHE_CONFIGS:
        on, off = rows[f"{cfg}+cache"], rows[f"{cfg}+nocache"]
        assert off["prefix_hit_rate"] == 0 and on["prefix_hit_rate"] > 0
        # Every request after the first finds the shared prompt's full blocks (64 tokens: whole blocks here).
        assert on["prefix_hit_tokens"] == (n_req - 1) * shared
        assert on["num_computed_tokens"] == off["num_computed_tokens"] - on["prefix_hit_tokens"]
        assert on["x_nocache_tput"] > 0 and on["x_paged16_tput"] > 0 and on["x_paged16_memory"] > 0
    assert rows["paged-16+cache"]["x_paged16_tput"] == 1.0
    par = report["workloads"]["parallel"]
    p = par["parts"][0]
    for r in par["rows"]:  # the prompt prefilled once per request, then n streams decode
        assert r["num_computed_tokens"] == p["prompt_tokens"] + p["output_tokens"] - p["num_requests"] * p["n"]
        assert r["output_tokens"] == p["output_tokens"]
    assert "## prefix" in md and "## parallel" in md


def test_smoke_one_workload_and_configs(tmp_path):
    report, md = _smoke(tmp_path, "--workload", "capacity", "--configs", "virtual-interleaved,paged-16",
                        "--num-requests", "3")  # fmt: skip
    assert list(report["workloads"]) == ["capacity"]
    rows = report["workloads"]["capacity"]["rows"]
    assert [r["config"] for r in rows] == ["virtual-interleaved", "paged-16"]
    assert all(r["requests"] == 3 for r in rows)
    assert "| virtual-interleaved |" in md


def test_traces_pick_the_parts_of_a_workload(tmp_path, capsys):
    """``--traces``: only those traces' parts run (long-online's rate sweep
    without its long-prompt part); a workload with no part of them is a usage
    error naming its traces."""
    report, md = _smoke(tmp_path, "--workload", "long-online", "--traces", "arxiv_summarization",
                        "--configs", "virtual-interleaved", "--num-requests", "2")  # fmt: skip
    parts = report["workloads"]["long-online"]["parts"]
    assert parts and {p["trace"] for p in parts} == {"arxiv_summarization"}
    assert "arxiv_long_online" not in md
    with pytest.raises(SystemExit) as e:
        serve.main(["--smoke", "--workload", "offline", "--traces", "arxiv_summarization"])
    assert e.value.code == 2
    assert "--traces: expected a trace of workload 'offline' (uniform), got 'arxiv_summarization'" in capsys.readouterr().err
    # A misspelt trace beside a right one was dropped without a word (its parts did not run).
    with pytest.raises(SystemExit) as e:
        serve.main(["--smoke", "--workload", "long-online", "--traces", "arxiv_summarization,arxiv_long_onlin"])
    assert e.value.code == 2
    assert ("--traces: expected traces of the workloads selected (arxiv_long_online, arxiv_summarization), got "
            "'arxiv_summarization,arxiv_long_onlin'") in capsys.readouterr().err


def test_repeats_pool_rounds_of_fresh_requests(tmp_path):
    """``--repeats 2``: every configuration runs each part twice, in turn, round 2
    with fresh requests (seed + 1); a row pools both rounds' requests (its
    throughput over the summed durations) and lists each round's ratios."""
    report, md = _smoke(tmp_path, "--workload", "long-online", "--traces", "arxiv_summarization",
                        "--configs", "virtual-interleaved,paged-16", "--num-requests", "3", "--repeats", "2")  # fmt: skip
    wrep = report["workloads"]["long-online"]
    (part,) = wrep["parts"]
    assert part["repeats"] == 2 and part["num_requests"] == 6
    for row in wrep["rows"]:
        assert row["repeats"] == 2 and row["requests"] == 6 and row["completed"] == 6
        run = part["runs"][row["config"]]
        assert len(run["requests"]) == 6
        # Round 2's requests are not round 1's again (fresh arrivals and lengths).
        first, second = run["requests"][:3], run["requests"][3:]
        assert [(q["arrival_s"], q["prompt_tokens"]) for q in first] != [(q["arrival_s"], q["prompt_tokens"]) for q in second]
        out = sum(q["output_tokens"] for q in run["requests"])
        assert row["output_tokens_per_s"] == pytest.approx(out / run["duration_s"], rel=1e-9)
        for key in ("x_best_paged_norm_p50_rounds", "x_best_paged_norm_p99_rounds", "x_best_paged_tput_rounds"):
            assert len(row[key]) == 2 and all(math.isfinite(v) and v > 0 for v in row[key])
    p16 = next(r for r in wrep["rows"] if r["config"] == "paged-16")
    assert p16["x_best_paged_tput_rounds"] == [1.0, 1.0]
    assert "6 requests in 2 rounds" in md and "virtual-interleaved, each round: x_best_paged_norm_p50 " in md
    with pytest.raises(ValueError, match="repeats: expected an int >= 1, got 0"):
        serve.run(["offline"], "smoke", ["paged-16"], device="cpu", repeats=0)

def test_repeats_partial_reports_compare_finished_rounds(no_interpreted_triton):
    """A report written in the middle of a round (a time limit may end the process there) pools,
    for every configuration of the part, only the rounds all of them finished: its ratios never
    set one configuration's two rounds against another's one."""
    import copy

    snapshots = []
    report = serve.run(["long-online"], "smoke", ["virtual-interleaved", "paged-16"], device="cpu", num_requests=2,
                       traces=["arxiv_summarization"], request_rates=[4.0], repeats=2, log=lambda *a: None,
                       on_workload=lambda r: snapshots.append(copy.deepcopy(r)))  # fmt: skip
    seen = []
    for snap in snapshots:
        rows = snap["workloads"]["long-online"]["rows"] if "long-online" in snap["workloads"] else []
        seen.append(sorted((r["config"], r["repeats"]) for r in rows))
        assert len({r["repeats"] for r in rows}) <= 1, seen[-1]
        for r in rows:
            run = snap["workloads"]["long-online"]["parts"][0]["runs"][r["config"]]
            assert r["requests"] == len(run["requests"]) == 2 * r["repeats"]
    # After round 2's first configuration the rows still pool round 1 only.
    assert [("paged-16", 1), ("virtual-interleaved", 1)] in seen[2:]
    final = report["workloads"]["long-online"]["rows"]
    assert sorted((r["config"], r["repeats"]) for r in final) == [("paged-16", 2), ("virtual-interleaved", 2)]


def test_repeats_a_configuration_failing_in_a_later_round_leaves_the_others_pooled(monkeypatch):
    """A configuration that fails in round 2 loses its row; the others, which finished every
    round, pool all of them (rows and ``*_rounds`` alike), even when the failing one runs last."""
    from torch_vkv.bench import serve_engine

    real, calls = serve_engine.run_engine, {}

    def flaky(model, cfg, *args, **kwargs):
        calls[cfg.name] = calls.get(cfg.name, 0) + 1
        if cfg.name == "paged-256" and calls[cfg.name] == 2:
            raise RuntimeError("boom in round 2")
        return real(model, cfg, *args, **kwargs)

    monkeypatch.setattr(serve_engine, "run_engine", flaky)
    report = serve.run(["long-online"], "smoke", ["virtual-interleaved", "paged-16", "paged-256"], device="cpu",
                       num_requests=2, traces=["arxiv_summarization"], request_rates=[4.0], repeats=2,
                       log=lambda *a: None)  # fmt: skip
    wrep = report["workloads"]["long-online"]
    assert [s["config"] for s in wrep["skipped"] if s["reason"].startswith("failed")] == ["paged-256"]
    rows = sorted(wrep["rows"], key=lambda r: r["config"])
    assert [(r["config"], r["repeats"], r["requests"]) for r in rows] == [("paged-16", 2, 4),
                                                                         ("virtual-interleaved", 2, 4)]
    for r in rows:
        assert len(wrep["parts"][0]["runs"][r["config"]]["requests"]) == 4
        assert len(r["x_best_paged_tput_rounds"]) == 2
        assert r["best_paged"] == "paged-16"


def test_smoke_compiled_decode(tmp_path):
    """``--compile``: every engine compiles its decode steps, the report says so,
    and every request gets as many tokens as in the eager run (token values are
    checked by tests/test_serving_compile.py)."""
    args = ("--workload", "offline", "--configs", "virtual-per_layer,paged-16", "--num-requests", "3")
    compiled, md = _smoke(tmp_path / "compiled", *args, "--compile")
    eager, md_eager = _smoke(tmp_path / "eager", *args)
    assert compiled["compile"] is True and eager["compile"] is False
    assert "- decode steps: compiled (Engine(compile=True))" in md and "- decode steps: eager" in md_eager
    for report in (compiled, eager):
        rows = report["workloads"]["offline"]["rows"]
        assert [r["config"] for r in rows] == ["virtual-per_layer", "paged-16"] and all(r["completed"] == 3 for r in rows)
    runs = [r["workloads"]["offline"]["parts"][0]["runs"] for r in (compiled, eager)]
    for name in ("virtual-per_layer", "paged-16"):
        assert [q["output_tokens"] for q in runs[0][name]["requests"]] == [q["output_tokens"] for q in runs[1][name]["requests"]]


def test_parse_config():
    assert parse_config("virtual-per_layer") == EngineConfig("virtual-per_layer", "virtual", "per_layer")
    assert parse_config("paged-256:triton") == EngineConfig("paged-256:triton", "paged", block_size=256,
                                                            attention_backend="triton")  # fmt: skip
    for bad in ("virtual", "virtual-flat", "paged-0", "paged-x", "paged-16:nope", "hf"):
        with pytest.raises(ValueError, match="expected"):
            parse_config(bad)


def test_cli_errors(capsys):
    with pytest.raises(SystemExit):
        serve.main(["--smoke", "--quick"])
    assert "pick one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.main(["--smoke", "--configs", "paged-0"])
    assert "expected" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            serve.main(["--workload", "offline"])
        assert "--smoke" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.main(["--smoke", "--trace", "uniform"])
    assert "--trace apply to the load client" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.main(["--smoke", "--request-rates", "0"])
    assert "expected a rate > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected"):
        serve.workloads("huge")


@pytest.mark.parametrize("argv, message", [
    (["--ttft-slo", "-1"], "--ttft-slo: expected seconds > 0"),
    (["--tpot-slo", "nan"], "--tpot-slo: expected seconds > 0"),
    (["--tpot-slo", "inf"], "--tpot-slo: expected seconds > 0"),
    (["--ttft-slo", "0"], "--ttft-slo: expected seconds > 0"),  # off --smoke, 0 silently became the 2 s default
    (["--timeout", "-5"], "--timeout: expected seconds > 0"),
    (["--configs", ","], "--configs: expected at least one configuration"),
    (["--repeats", "0"], "--repeats: expected an int >= 1, got 0"),
    (["--vocab-size", "5"], "--vocab-size apply to the load client"),
    (["--no-ignore-eos"], "--no-ignore-eos apply to the load client"),
])  # fmt: skip
def test_cli_refuses_arguments_that_meant_nothing(argv, message, capsys):
    """Negative, zero, NaN or infinite SLOs made goodput meaningless without a
    word, ``--configs ,`` ran no configuration and exited 0 with "(no rows)",
    and the load client's ``--vocab-size`` / ``--no-ignore-eos`` / ``--timeout``
    were silently ignored in process. Each is a usage error now."""
    with pytest.raises(SystemExit) as e:
        serve.main(["--smoke", "--workload", "offline", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_roofline_floor_by_hand():
    cost = ModelCost(weight_bytes=1000, linear_flops_per_token=10, kv_bytes_per_token=4, num_layers=2, num_heads=3,
                     head_dim=5)  # fmt: skip
    dev = {"copy_bytes_per_s": 100.0, "matmul_flops_per_s": 1000.0}
    # A prefill chunk of 4 tokens after 2 computed (pairs 4*2 + 4*5/2 = 18) and one decode at context 7.
    rec = IterationRecord(t_s=1.0, wall_s=0.5, host_s=0.1, num_tokens=5, num_decode=1, num_prefill_tokens=4,
                          kv_tokens_read=6 + 7, prefill_attn_pairs=18)  # fmt: skip
    expect = (1000 + 13 * 4) / 100.0 + (4 * 10 + 4 * 2 * 3 * 5 * 18) / 1000.0
    assert rec.floor_s(cost, dev) == pytest.approx(expect)
    assert run_floor([rec, rec], cost, dev) == pytest.approx(2 * expect)


def _tiny_specs(n=3):
    return make_requests(workload_lengths("uniform", n), max_prompt_tokens=24, max_output_tokens=4)


def test_run_engine_records_work_restores_attention_and_sync(monkeypatch):
    from torch_vkv.bench.models import build_model
    from torch_vkv.cache import KVCache

    model = build_model("tiny", device="cpu", dtype=torch.float32)
    before = model.config._attn_implementation
    specs = _tiny_specs()
    prompts = random_prompts(specs, model.config.vocab_size)
    calls = {"step": 0, "step_async": 0}
    step, step_async = KVCache.step, KVCache.step_async

    def counting(name, fn):
        def wrapped(self, *a, **k):
            calls[name] += 1
            return fn(self, *a, **k)

        return wrapped

    monkeypatch.setattr(KVCache, "step", counting("step", step))
    monkeypatch.setattr(KVCache, "step_async", counting("step_async", step_async))
    kw = dict(max_batch_size=4, max_seq_len=64, chunk_size=16, memory_budget=None, page_size=4096, warmup=False)
    res = run_engine(model, parse_config("virtual-interleaved").with_sync(True), specs, prompts, **kw)
    assert calls["step"] > 0 and calls["step_async"] == 0
    assert model.config._attn_implementation == before
    its = res.iterations
    # Every prompt token is computed once (no preemption at this size) and every output but the last decoded.
    assert sum(i.num_prefill_tokens for i in its) == sum(s.prompt_tokens for s in specs)
    assert sum(i.num_decode for i in its) == sum(s.output_tokens - 1 for s in specs)
    assert all(r.ok and r.output_tokens == s.output_tokens for r, s in zip(res.results, specs))
    calls.update(step=0, step_async=0)
    run_engine(model, parse_config("virtual-interleaved"), specs, prompts, **kw)
    assert calls["step_async"] > 0
    assert model.config._attn_implementation == before


def test_models_random_weights_and_rotary():
    from torch_vkv.bench.models import MODELS, build_model, model_config, weight_bytes

    assert {"llama3-8b", "yi-6b-200k", "tiny"} <= set(MODELS)
    c = model_config("llama3-8b")
    assert (c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == (32, 8, 128256)
    m = build_model("tiny", device="cpu", dtype=torch.float32, seed=1)
    ref = model_config("tiny")
    from transformers import LlamaForCausalLM

    fresh = LlamaForCausalLM(ref)
    torch.testing.assert_close(m.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq, rtol=0, atol=0)
    w = m.lm_head.weight
    assert torch.isfinite(w).all() and abs(w.std().item() - 0.02) < 0.002
    emb = m.get_input_embeddings().weight
    assert weight_bytes(m) == sum(p.numel() * 4 for p in m.parameters()) - emb.numel() * 4
    with pytest.raises(ValueError, match="expected"):
        model_config("gpt-5")


@pytest.mark.cuda
def test_smoke_on_cuda(tmp_path):
    """The in-process benchmark end to end on CUDA, our four engine configurations, two workloads
    (one offline, one at a memory budget of 2 MiB pages); the CPU tests cover every workload.

    FlashInfer's configuration and transformers' ``generate_batch`` peer are left to their own tests
    (the flashinfer attention tests, test_generate_batch_peer_on_cuda). This test once never ended on
    the H200 (2026-12-03): paged-256's default budget held one block for five slots and the CUDA graphs'
    scratch slot took it, so ``Engine.generate`` waited for ever (fixed: ``static_budget`` gives every
    slot whole blocks, the scratch slot's pages are pinned, and the engine aborts a request it can never
    schedule; tests/test_serving.py). A hang now fails with the child's Python stacks."""
    from _subprocess import run_argv

    args = ["-m", "torch_vkv", "bench", "serve", "--smoke", "--device", "cuda", "--out", str(tmp_path),
            "--workload", "offline", "--workload", "capacity",
            "--configs", "virtual-per_layer,virtual-interleaved,paged-16,paged-256"]  # fmt: skip
    p = run_argv(args, env={"OMP_NUM_THREADS": "1"}, timeout=400)  # a hang fails with the child's stacks
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report["env"]["gpu"]
    for row in report["rows"]:
        assert row["completed"] == row["requests"] and row["output_tokens_per_s"] > 0


def test_a_hung_child_fails_with_its_stacks():
    """The helper the CUDA smoke test runs through: a child that outlives its
    timeout fails the test, and the failure shows where the child was."""
    from _subprocess import run_python

    with pytest.raises(pytest.fail.Exception, match="(?s)did not finish.*in sleep_here"):
        run_python("import time\ndef sleep_here():\n    time.sleep(120)\nsleep_here()", timeout=3)


@pytest.mark.cuda
def test_generate_batch_peer_on_cuda():
    """transformers' continuous batching as the outside peer: every request
    gets its tokens (slow on a CPU: 30-70 s of set-up, hence CUDA only)."""
    from torch_vkv.bench.models import build_model
    from torch_vkv.bench.serve_engine import run_generate_batch

    model = build_model("tiny", device="cuda", dtype=torch.bfloat16)
    before = model.config._attn_implementation
    specs = _tiny_specs(4)
    torch.cuda.synchronize()
    start = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    # Sizes given: by default its cache and batch take 60-90% of the free GPU memory (75 GB here with
    # transformers 5.17), which made other test processes on the GPU run out (thirtieth session).
    res = run_generate_batch(model, specs, random_prompts(specs, model.config.vocab_size), 4, num_blocks=64,
                             max_batch_tokens=256)  # fmt: skip
    assert res.duration_s > 0 and all(r.ok and r.output_tokens == 4 for r in res.results)
    assert model.config._attn_implementation == before
    assert torch.cuda.max_memory_reserved() - start < 2 << 30, torch.cuda.max_memory_reserved() - start


def test_generate_batch_peer_cache_size_reaches_transformers():
    """``run_generate_batch(num_blocks=, max_batch_tokens=)`` size transformers' paged cache and
    batch: on the generation config (where earlier versions read them) and, where ``generate_batch``
    takes one, in its continuous batching config; a size below one is refused before anything runs."""
    from torch_vkv.bench.serve_engine import run_generate_batch

    seen = {}

    class Output:
        generated_tokens = [1, 2]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None):
            seen.update(gen=generation_config, cb=continuous_batching_config)
            return {i: Output() for i in range(len(inputs))}

    specs = _tiny_specs(2)
    res = run_generate_batch(Model(), specs, [[1, 2, 3]] * 2, 2, num_blocks=64, max_batch_tokens=256)
    assert all(r.ok and r.output_tokens == 2 for r in res.results)
    assert (seen["gen"].num_blocks, seen["gen"].max_batch_tokens) == (64, 256)
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        assert seen["cb"] is None
    else:
        assert (seen["cb"].num_blocks, seen["cb"].max_batch_tokens) == (64, 256)
    run_generate_batch(Model(), specs, [[1, 2, 3]] * 2, 2)
    assert seen["cb"] is None and getattr(seen["gen"], "num_blocks", None) is None
    with pytest.raises(ValueError, match="num_blocks"):
        run_generate_batch(Model(), specs, [[1, 2, 3]] * 2, 2, num_blocks=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        run_generate_batch(Model(), specs, [[1, 2, 3]] * 2, 2, max_batch_tokens=-1)


def test_profile_adds_the_split_and_top_operators(tmp_path):
    """``--profile``: every engine row gets the profiled split (on the CPU: no
    device kernels, the engine's host share, operators ranked by CPU time) and
    serve.md a line per configuration."""
    report, md = _smoke(tmp_path, "--workload", "offline", "--configs", "virtual-per_layer,paged-16", "--profile")
    rows = report["workloads"]["offline"]["rows"]
    assert {r["config"] for r in rows} == {"virtual-per_layer", "paged-16"}
    for r in rows:
        p = r["profile"]
        assert p["ranked_by"] == "cpu" and p["kernel_pct"] is None and r["profile_kernel_pct"] is None
        # The window opens once every request is admitted (a few chunked-prefill iterations in) and
        # this short run ends inside it.
        first = p["first_iteration"]
        assert 0 <= first < 16 and p["num_iterations"] == r["num_iterations"] - first > 0
        assert 0 < p["host_pct"] < 100 and p["host_s"] <= p["busy_s"]
        names = [t["name"] for t in p["top"]]
        assert "torch_vkv::append_kv" in names and all(t["self_ms"] > 0 and t["calls"] > 0 for t in p["top"])
        last = r["num_iterations"] - 1
        assert f"- profile uniform@inf {r['config']}, iterations {first}-{last} (" in md
        assert "decode-only): no device kernels" in md


def test_profile_window_covers_its_iterations_only():
    """The window opens at ``start_by`` while requests wait (earlier once none does), covers
    ``num_iterations`` iterations, and sums their wall and host time only."""
    from torch_vkv.bench.roofline import IterationRecord
    from torch_vkv.bench.serve_profile import ProfileWindow

    def record(i, prefill):
        return IterationRecord(t_s=float(i), wall_s=0.1 * (i + 1), host_s=0.01, num_tokens=prefill or 4,
                               num_decode=0 if prefill else 4, num_prefill_tokens=prefill, kv_tokens_read=64,
                               prefill_attn_pairs=0)  # fmt: skip

    window = ProfileWindow(torch.device("cpu"), num_iterations=3, start_by=2)
    iterations = []
    for i in range(8):
        window.before_step(len(iterations), requests_wait=i < 6)
        torch.randn(64, 64) @ torch.randn(64, 64)  # something for the profiler to see
        iterations.append(record(i, prefill=32 if i == 2 else 0))
        window.after_step(iterations)
    window.finish(iterations)  # closed already: no effect
    p = window.summary
    assert p["first_iteration"] == 2 and p["num_iterations"] == 3 and p["num_decode_only"] == 2
    assert p["busy_s"] == pytest.approx(0.3 + 0.4 + 0.5) and p["host_s"] == pytest.approx(0.03)
    assert any(t["name"] == "aten::mm" for t in p["top"])

    early = ProfileWindow(torch.device("cpu"), num_iterations=5, start_by=16)
    its = []
    for i in range(3):  # no request waits after the first iteration; the run ends inside the window
        early.before_step(len(its), requests_wait=i == 0)
        its.append(record(i, prefill=0))
        early.after_step(its)
    early.finish(its)
    assert early.summary["first_iteration"] == 1 and early.summary["num_iterations"] == 2


def test_profile_counts_each_kernel_once():
    """The device time is the kernels' own: host ranges that report the device time of the kernels they
    launched (an operator, inductor's "## Call CompiledFxGraph ##") are not added again (on an H200
    they were, and bench hf reported kernels at 129-139% of the wall time)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from torch_vkv.bench.serve_profile import summarize_profile

    def ev(key, device_type, self_device_us, self_cpu_us=1.0, count=1):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_device_us,
                               self_cpu_time_total=self_cpu_us, count=count)  # fmt: skip

    events = [ev("## Call CompiledFxGraph abc ##", DeviceType.CPU, 900.0), ev("aten::mm", DeviceType.CPU, 300.0),
              ev("gemm_kernel", DeviceType.CUDA, 700.0, count=7), ev("_decode_split_kernel", DeviceType.CUDA, 200.0),
              ev("copy_kernel", DeviceType.CUDA, 100.0)]  # fmt: skip
    prof = SimpleNamespace(stop=lambda: None, key_averages=lambda: events)
    p = summarize_profile(prof, busy_s=0.002, host_s=None, num_iterations=4, top=2)
    assert p["kernel_s"] == pytest.approx(1000e-6) and p["kernel_pct"] == pytest.approx(50.0)
    assert p["kernel_ms_per_iteration"] == pytest.approx(0.25) and p["host_pct"] is None
    assert [(t["name"], t["calls"]) for t in p["top"]] == [("gemm_kernel", 7), ("_decode_split_kernel", 1)]


def test_report_is_written_after_every_configuration():
    """A device call cut by its time limit keeps every configuration it finished: ``on_workload``
    gets the report after each configuration (its workload marked partial), then the whole workload."""
    from torch_vkv.bench.serve import run

    calls = []
    report = run(["offline"], "smoke", ["virtual-per_layer", "paged-16"], device="cpu", log=lambda *a: None,
                 on_workload=calls.append)  # fmt: skip
    assert [c["workloads"]["offline"].get("partial", False) for c in calls] == [True, True, False]
    assert [[r["config"] for r in c["workloads"]["offline"]["rows"]] for c in calls] == [
        ["virtual-per_layer"], ["virtual-per_layer", "paged-16"], ["virtual-per_layer", "paged-16"]]
    assert list(calls[0]["workloads"]["offline"]["parts"][0]["runs"]) == ["virtual-per_layer"]
    assert "partial" not in report["workloads"]["offline"] and len(report["rows"]) == 2
