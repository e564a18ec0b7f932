"""``python -m torch_vkv bench serve``: the serving benchmark.

With ``--url`` it is the load client (:mod:`.serve_client`): a workload sent
to any OpenAI-compatible server over HTTP. Without it, the engine runs in
process: the paper's end-to-end experiments, every configuration
(:data:`.serve_engine.CONFIGS`, FlashInfer and transformers' ``generate_batch``
where available) on one model object, side by side:

* ``offline``: nano-vllm's workload (lengths uniform in [100, 1024]), all at t=0, Llama-3-8B;
* ``long-offline``: ``arxiv_long_offline`` (64K-193K prompts), all at t=0, chunk 16384, Yi-6B-200k;
* ``long-online``: ``arxiv_long_online`` at Poisson rates (Yi-6B-200k) and a
  denser sweep on ``arxiv_summarization`` (Llama-3-8B);
* ``sync-vs-async``: ``sync_vs_async``, ``KVCache.step`` vs ``step_async`` (virtual configurations);
* ``capacity``: ``arxiv_summarization`` at a fixed KV budget: how many requests run at once;
* ``prefix``: requests sharing a 4K-token system prompt (256 unique tokens each), prefix caching on and off;
* ``parallel``: ``n=8`` parallel sampling (the prompt prefilled once, 8 completions), caching on and off.

Random bf16 weights (:mod:`.models`), every request to its trace length
(``ignore_eos``). One report: ``serve.json`` (every request's timings, committed
KV memory and host time of every iteration, the roofline), ``serve.md`` (a
table per workload, ratios vs the best paged configuration) and plots.
``--smoke``: a tiny model and tiny sizes (a few minutes on a CPU); ``--quick``: the
GPU preset of ``scripts/gpu_check.sh`` (on an H200 about 6 minutes per three workloads:
more than one 10-minute device call for all seven; pick them with ``--workload``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from torch_vkv._checks import check_int, device_arg, int_arg
from torch_vkv.bench import serve_client
from torch_vkv.bench.serve_workloads import (  # noqa: F401 (re-exported)
    CACHE_CONFIGS, CACHING_WORKLOADS, GiB, SERVE_WORKLOADS, Part, Workload, check_traces, workloads,
)  # fmt: skip

__all__ = ["SERVE_WORKLOADS", "Workload", "main", "run"]

# ----------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------


def _ratio(a: Any, b: Any) -> Optional[float]:
    if a is None or b is None or not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return None
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def _row(w: Workload, part: Part, cfg: str, run: Any, cost: Any, device_rates: dict, slo: dict) -> dict[str, Any]:
    from torch_vkv.bench.roofline import run_floor

    row = {"workload": w.name, "group": f"{part.trace}@{part.rate:g}", "config": cfg, "model": part.model,
           "trace": part.trace, "request_rate": part.rate}  # fmt: skip
    row.update(serve_client.summarize(run.results, run.duration_s, ttft_slo_s=slo["ttft"], tpot_slo_s=slo["tpot"]))
    row["makespan_s"] = _makespan(run)
    its = run.iterations
    if its:
        busy = sum(i.wall_s for i in its)
        floor = run_floor(its, cost, device_rates)
        row.update(
            num_iterations=len(its), iter_mean_s=busy / len(its), busy_s=busy,
            host_s_per_iter=sum(i.host_s for i in its) / len(its),
            host_pct=100 * sum(i.host_s for i in its) / busy if busy > 0 else math.nan,
            roofline_floor_s=floor, pct_roofline=100 * floor / busy if busy > 0 else math.nan,
        )  # fmt: skip
    if run.memory:
        row["peak_committed_bytes"] = max(m["committed_bytes"] for m in run.memory)
        row["peak_running"] = max(m["num_running"] for m in run.memory)
        queued = [m["num_running"] for m in run.memory if m["num_waiting"] > 0]
        row["mean_running_while_queued"] = sum(queued) / len(queued) if queued else math.nan
    if getattr(run, "profile", None):
        row.update(profile=run.profile, profile_kernel_pct=run.profile["kernel_pct"])
    if run.stats:
        row["num_preemptions"] = run.stats.get("num_preemptions")
        grow = run.stats.get("kv_grow_seconds")  # the timed run's (run_engine subtracts the warm-up)
        if grow is not None and its:
            busy = sum(i.wall_s for i in its)
            row.update(kv_grow_s_per_iter=grow / len(its), kv_grow_pct=100 * grow / busy if busy > 0 else math.nan)
        prewarm = run.stats.get("kv_prewarm_seconds")  # eager allocation, while the GPU runs (virtual)
        if prewarm is not None and its:
            busy = sum(i.wall_s for i in its)
            row["kv_prewarm_pct"] = 100 * prewarm / busy if busy > 0 else math.nan
        for k in ("prefix_hit_rate", "prefix_hit_tokens", "num_computed_tokens"):
            row[k] = run.stats.get(k)
    return row


def run(
    names: Sequence[str],
    scale: str,
    configs: Sequence[str],
    *,
    num_requests: Optional[int] = None,
    request_rates: Optional[Sequence[float]] = None,
    traces: Optional[Sequence[str]] = None,
    device: Any = None,
    dtype: Optional[torch.dtype] = None,
    ttft_slo_s: float = 2.0,
    tpot_slo_s: float = 0.1,
    seed: int = 0,
    log=print,
    on_workload=None,
    profile: bool = False,
    compile: bool = False,
    repeats: int = 1,
) -> dict[str, Any]:
    """Runs workloads ``names`` at ``scale`` over ``configs``; returns the
    report (see :func:`main`). ``num_requests`` / ``request_rates`` override
    every part's count / the online rates; ``traces``: only the parts of these
    traces (:func:`check_traces`); ``on_workload(report)`` is called
    after each configuration (the workload it is in marked ``"partial"``)
    and after each workload (``main`` writes the report so far: a run cut
    short by a time limit keeps every configuration it finished). ``compile``:
    every engine compiles its decode step (``Engine(compile=True)``).
    ``repeats``: every part runs that many times, round by round over the
    configurations (A B C, A B C, ...: drift of the machine falls on all of
    them alike), round ``k`` with fresh requests (``seed + k``); a row pools the
    requests of every round (percentiles over all of them, throughput over the
    summed durations) and lists each round's ratios (``*_rounds``)."""
    from torch_vkv.bench.models import build_model
    from torch_vkv.bench.roofline import ModelCost, measure_device
    from torch_vkv.bench.serve_engine import RunResult, peer_configs, run_engine, run_generate_batch

    check_int("repeats", repeats, low=1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    table = workloads(scale, device.type)
    engine_cfgs = [c for c in configs if c != "hf-generate_batch"]
    peers, skipped = peer_configs(device)
    if scale == "smoke":  # the smoke run exercises our own configurations only
        skipped += [{"config": p, "reason": "not run at --smoke size"} for p in peers if p not in engine_cfgs]
    elif "hf-generate_batch" in peers and "hf-generate_batch" not in configs:
        skipped.append({"config": "hf-generate_batch", "reason": "not selected (--configs)"})
    peer_gb = "hf-generate_batch" in configs and "hf-generate_batch" in peers and scale != "smoke"
    page_size = 4096 if device.type == "cpu" else None  # host backend: OS pages, so a tiny model spans many
    rates = measure_device(device, dtype)
    log(f"device {device}: copy {rates['copy_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
        f"{rates['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s ({dtype})")  # fmt: skip
    slo = {"ttft": ttft_slo_s, "tpot": tpot_slo_s}
    report: dict[str, Any] = {"device_rates": rates, "dtype": str(dtype), "scale": scale, "slo_s": slo, "compile": compile,
                              "configs": list(configs), "skipped": skipped, "workloads": {}, "rows": []}  # fmt: skip
    models: dict[str, Any] = {}
    for name in names:
        w = table[name]
        parts = list(w.parts)
        if request_rates and name == "long-online":
            parts = [parts[0]] + [replace(parts[-1], rate=r) for r in request_rates]
        if traces:
            parts = [p for p in parts if p.trace in traces]
        if num_requests:
            parts = [replace(p, num_requests=num_requests) for p in parts]
        wrep: dict[str, Any] = {"parts": [], "rows": [], "skipped": []}
        for part in parts:
            if part.model not in models:
                models.clear()  # one model on the device at a time
                _release(device)
                models[part.model] = build_model(part.model, device=device, dtype=dtype, seed=seed)
            model = models[part.model]
            rounds = [_part_requests(w, part, model.config.vocab_size, seed + k) for k in range(repeats)]
            specs, prompts = rounds[0]
            longest = max(s.prompt_tokens + s.output_tokens for specs_k, _ in rounds for s in specs_k)
            max_seq_len = min(w.max_seq_len, longest + 1)  # one engine shape for every round
            cost = None
            every = [s for specs_k, _ in rounds for s in specs_k]  # totals over the rounds
            prep = {"trace": part.trace, "request_rate": part.rate, "model": part.model,
                    "num_requests": len(every), "max_seq_len": max_seq_len, "max_batch_size": w.max_batch_size,
                    "chunk_size": w.chunk_size, "memory_budget": w.memory_budget,
                    "prompt_tokens": sum(s.prompt_tokens for s in every),
                    "output_tokens": part.n * sum(s.output_tokens for s in every),
                    "shared_prefix_tokens": part.shared_prefix_tokens, "n": part.n, "repeats": repeats,
                    "runs": {}}  # fmt: skip
            cfgs = [parse_config(c) for c in engine_cfgs]
            if name == "sync-vs-async":
                virt = [c for c in cfgs if c.kv == "virtual"]
                wrep["skipped"] += [{"config": c.name, "reason": "paged has no step_async"} for c in cfgs
                                    if c.kv != "virtual"]  # fmt: skip
                cfgs = [c.with_sync(s) for c in virt for s in (True, False)]
            if name in CACHING_WORKLOADS:
                keep = [c for c in cfgs if c.name.partition(":")[0] in CACHE_CONFIGS]
                wrep["skipped"] += [{"config": c.name, "reason": f"not one of {CACHE_CONFIGS}"} for c in cfgs
                                    if c not in keep]  # fmt: skip
                cfgs = [c.with_caching(on) for c in keep for on in (True, False)]
            done: dict[str, list[Any]] = {}  # config -> its runs so far, one a round
            part_rows: dict[str, dict[str, Any]] = {}
            group = f"{part.trace}@{part.rate:g}"

            def _pool_rows(cfg_names: list[str]) -> None:
                # Rows pool the rounds every configuration has finished, so that a report cut
                # short in the middle of a round compares like with like.
                n_rounds = min(len(runs) for runs in done.values())
                for cfg_name in cfg_names:
                    if repeats > 1 and part_rows.get(cfg_name, {}).get("repeats") == n_rounds:
                        continue  # already pooled over these rounds: the same row again
                    runs = done[cfg_name][:n_rounds]
                    pooled = RunResult.pool(runs)
                    row = _row(w, part, cfg_name, pooled, cost, rates, slo)
                    if repeats > 1:
                        row["repeats"] = len(runs)
                        row["makespan_s"] = sum(_makespan(r) for r in runs) / len(runs)
                    if cfg_name in part_rows:
                        wrep["rows"].remove(part_rows[cfg_name])
                    part_rows[cfg_name] = row
                    wrep["rows"].append(row)
                    prep["runs"][cfg_name] = _run_dict([s for sk, _ in rounds[: len(runs)] for s in sk], pooled)

            for k, (specs_k, prompts_k) in enumerate(rounds):
                for cfg in cfgs:
                    if k > 0 and cfg.name not in done:  # failed in an earlier round
                        continue
                    t = time.perf_counter()
                    try:
                        res = run_engine(model, cfg, specs_k, prompts_k, max_batch_size=w.max_batch_size,
                                         max_seq_len=max_seq_len, chunk_size=w.chunk_size,
                                         memory_budget=w.memory_budget, page_size=page_size, n=part.n,
                                         profile=profile, compile=compile)  # fmt: skip
                    except Exception as exc:  # one configuration failing must not lose the others
                        wrep["skipped"].append({"config": cfg.name, "group": group,
                                                "reason": f"failed: {type(exc).__name__}: {exc}"})  # fmt: skip
                        log(f"{name} {group} {cfg.name}: FAILED {type(exc).__name__}: {exc}")
                        log(traceback.format_exc(limit=-8))
                        done.pop(cfg.name, None)  # a configuration that failed once has no row
                        if cfg.name in part_rows:
                            wrep["rows"].remove(part_rows.pop(cfg.name))
                            prep["runs"].pop(cfg.name, None)
                        if repeats > 1 and done:  # the others may now have more rounds in common
                            _pool_rows(list(done))
                        continue
                    if cost is None:
                        cost = ModelCost.of(model, _kv_bytes_per_token(model, dtype))
                    done.setdefault(cfg.name, []).append(res)
                    _pool_rows(list(done) if repeats > 1 else [cfg.name])
                    when = f" round {k + 1}/{repeats}" if repeats > 1 else ""
                    log(f"{name} {group} {cfg.name}{when}: {_output_tokens(res) / res.duration_s:.1f} out tok/s, "
                        f"makespan {_makespan(res):.2f} s ({time.perf_counter() - t:.1f} s)")  # fmt: skip
                    if on_workload is not None:  # after every configuration: a time limit loses at most one
                        on_workload(_so_far(report, name, wrep, prep))
            if repeats > 1:
                _add_round_ratios(name, w, part, done, part_rows, cost, rates, slo)
            if name == "offline" and peer_gb:
                # The peer is slow (224 new tokens/s for 64 requests on an H200, docs/benchmarks.md):
                # a subset, with one output length (its generation config is per batch).
                n_peer = min(len(specs), 16 if scale == "quick" else 32)
                new = min(128, sorted(s.output_tokens for s in specs[:n_peer])[n_peer // 2])
                try:
                    with torch.inference_mode(False):
                        res = run_generate_batch(model, specs[:n_peer], prompts[:n_peer], new)
                    row = _row(w, part, "hf-generate_batch", res, cost, rates, slo)
                    row["note"] = f"{n_peer} requests, {new} new tokens each (one generation config)"
                    wrep["rows"].append(row)
                    prep["runs"]["hf-generate_batch"] = _run_dict(specs[:n_peer], res)
                    log(f"offline hf-generate_batch: {row['output_tokens_per_s']:.1f} out tok/s ({row['note']})")
                except Exception as exc:
                    reason = f"failed: {type(exc).__name__}: {exc}"
                    wrep["skipped"].append({"config": "hf-generate_batch", "reason": reason})
            wrep["parts"].append(prep)
        _add_ratios(name, wrep["rows"])
        report["workloads"][name] = wrep
        report["rows"] += wrep["rows"]
        if on_workload is not None:
            on_workload(report)
    models.clear()
    _release(device)
    return report


def _part_requests(w: Workload, part: Part, vocab_size: int, seed: int) -> tuple[list[Any], list[list[int]]]:
    """One round of ``part``: its request specs (lengths, arrival times) and prompts, drawn with ``seed``."""
    from torch_vkv.bench.serve_engine import random_prompts
    from torch_vkv.bench.workloads import make_requests, workload_lengths

    if part.lengths is not None:
        lengths = [part.lengths] * part.num_requests
    else:
        lengths = workload_lengths(part.trace, part.num_requests, seed)
    specs = make_requests(lengths, request_rate=part.rate, seed=seed, max_prompt_tokens=w.max_prompt_tokens,
                          max_output_tokens=w.max_output_tokens)  # fmt: skip
    return specs, random_prompts(specs, vocab_size, seed, part.shared_prefix_tokens)


def _makespan(run: Any) -> float:
    return max((r.start_s + r.e2e_s for r in run.results if r.e2e_s is not None), default=math.nan)


def _output_tokens(run: Any) -> int:
    return sum(r.output_tokens for r in run.results if r.ok)


def _add_round_ratios(name: str, w: Workload, part: Part, done: dict[str, list[Any]],
                      part_rows: dict[str, dict[str, Any]], cost: Any, rates: dict, slo: dict) -> None:  # fmt: skip
    """``x_*_rounds``: each round's ratios on its own (the spread the pooled ratio hides)."""
    keys = ("x_best_paged_tput", "x_best_paged_norm_p50", "x_best_paged_norm_p99", "x_sync_tput",
            "x_paged16_concurrency", "x_paged16_tput")  # fmt: skip
    per_round: dict[str, list[Optional[float]]] = {}
    for k in range(max((len(r) for r in done.values()), default=0)):
        rows = [_row(w, part, cfg, runs[k], cost, rates, slo) for cfg, runs in done.items() if len(runs) > k]
        _add_ratios(name, rows)
        for row in rows:
            for key in keys:
                if key in row:
                    per_round.setdefault(f"{row['config']}\0{key}", []).append(row[key])
    for tag, values in per_round.items():
        cfg, key = tag.split("\0")
        part_rows[cfg][f"{key}_rounds"] = values


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _kv_bytes_per_token(model: Any, dtype: torch.dtype) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _run_dict(specs: Sequence[Any], res: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "duration_s": res.duration_s,
        "requests": [dict(s.to_dict(), **r.to_dict()) for s, r in zip(specs, res.results)],
        "iterations": [asdict(i) for i in res.iterations],
        "memory": res.memory,
        "engine_stats": res.stats,
    }


def _so_far(report: dict[str, Any], name: str, wrep: dict[str, Any], prep: dict[str, Any]) -> dict[str, Any]:
    """``report`` with workload ``name`` as far as it got (``"partial": True``), for
    :func:`run`'s ``on_workload``; nothing of ``report`` or ``wrep`` is changed."""
    rows = [dict(r) for r in wrep["rows"]]
    _add_ratios(name, rows)
    part = dict(wrep, rows=rows, parts=wrep["parts"] + [dict(prep, runs=dict(prep["runs"]))], partial=True)
    return dict(report, workloads={**report["workloads"], name: part}, rows=report["rows"] + rows)


def _add_ratios(name: str, rows: list[dict[str, Any]]) -> None:
    """Per group: throughput (and, online, normalised latency) over the best
    paged configuration's; sync-vs-async: async over sync; capacity: peak
    concurrency over paged-16's."""
    for group in {r["group"] for r in rows}:
        g = [r for r in rows if r["group"] == group]
        paged = [r for r in g if r["config"].startswith("paged-")]
        best = max(paged, key=lambda r: r["output_tokens_per_s"], default=None)
        for r in g:
            if best is not None:
                r["best_paged"] = best["config"]
                r["x_best_paged_tput"] = _ratio(r["output_tokens_per_s"], best["output_tokens_per_s"])
                if name == "long-online":
                    for q in ("p50", "p99"):
                        lo = min((p[f"norm_latency_{q}_s"] for p in paged), default=None)
                        r[f"x_best_paged_norm_{q}"] = _ratio(r[f"norm_latency_{q}_s"], lo)
            if name == "sync-vs-async" and r["config"].endswith("+async"):
                sync = next((s for s in g if s["config"] == r["config"][: -len("async")] + "sync"), None)
                if sync is not None:
                    r["x_sync_tput"] = _ratio(r["output_tokens_per_s"], sync["output_tokens_per_s"])
                    r["x_sync_iter_time"] = _ratio(r.get("iter_mean_s"), sync.get("iter_mean_s"))
            if name == "capacity":
                p16 = next((p for p in g if p["config"] == "paged-16"), None)
                if p16 is not None:
                    r["x_paged16_concurrency"] = _ratio(r.get("peak_running"), p16.get("peak_running"))
                    # The peak can be a transient (admitted, then preempted): the mean while requests wait too.
                    r["x_paged16_mean_running"] = _ratio(r.get("mean_running_while_queued"),
                                                         p16.get("mean_running_while_queued"))
            if name in CACHING_WORKLOADS:
                base, _, mode = r["config"].rpartition("+")
                p16 = next((p for p in g if p["config"] == f"paged-16+{mode}"), None)
                if p16 is not None:  # the targets: vs paged-16 with the same caching
                    r["x_paged16_tput"] = _ratio(r["output_tokens_per_s"], p16["output_tokens_per_s"])
                    r["x_paged16_memory"] = _ratio(r.get("peak_committed_bytes"), p16.get("peak_committed_bytes"))
                off = next((p for p in g if p["config"] == f"{base}+nocache"), None)
                if off is not None and mode == "cache":
                    r["x_nocache_tput"] = _ratio(r["output_tokens_per_s"], off["output_tokens_per_s"])


def parse_config(spec: str):
    from torch_vkv.bench.serve_engine import parse_config as parse

    return parse(spec)


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

COLUMNS = {
    "offline": ["config", "completed", "output_tokens_per_s", "total_tokens_per_s", "makespan_s",
                "x_best_paged_tput", "pct_roofline", "iter_mean_s", "host_pct", "kv_grow_pct", "peak_committed_bytes",
                "note"],
    "long-offline": ["config", "completed", "makespan_s", "output_tokens_per_s", "total_tokens_per_s",
                     "x_best_paged_tput", "pct_roofline", "ttft_mean_s", "host_pct", "kv_grow_pct",
                     "peak_committed_bytes"],
    "long-online": ["group", "config", "completed", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "queue_p50_s",
                    "queue_p99_s", "kv_grow_pct", "kv_prewarm_pct", "tpot_p50_s",
                    "tpot_p99_s", "itl_p99_s", "e2e_p50_s", "e2e_p99_s", "norm_latency_p50_s", "norm_latency_p99_s",
                    "x_best_paged_norm_p50", "x_best_paged_norm_p99", "goodput_requests_per_s", "pct_roofline"],
    "sync-vs-async": ["config", "completed", "output_tokens_per_s", "iter_mean_s", "host_s_per_iter", "host_pct",
                      "x_sync_tput", "x_sync_iter_time", "pct_roofline"],
    "capacity": ["config", "completed", "peak_running", "mean_running_while_queued", "x_paged16_concurrency",
                 "x_paged16_mean_running", "num_preemptions", "peak_committed_bytes", "output_tokens_per_s",
                 "makespan_s"],
    "prefix": ["config", "completed", "output_tokens_per_s", "x_paged16_tput", "x_nocache_tput", "ttft_p50_s",
               "ttft_p99_s", "peak_committed_bytes", "x_paged16_memory", "prefix_hit_rate", "num_computed_tokens",
               "num_preemptions", "makespan_s"],
    "parallel": ["config", "completed", "output_tokens_per_s", "x_paged16_tput", "x_nocache_tput", "ttft_p50_s",
                 "ttft_p99_s", "peak_committed_bytes", "x_paged16_memory", "num_computed_tokens", "num_preemptions",
                 "makespan_s"],
}  # fmt: skip


def _finite(obj: Any) -> Any:
    """NaN and inf become None: the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write(report: dict[str, Any], out_dir: Any, command: str, log=print) -> Path:
    """``serve.json``, ``serve.md`` and the plots under ``out_dir``; returns the md path."""
    from torch_vkv.bench.report import environment, markdown_table
    from torch_vkv.bench.serve_profile import profile_lines

    out = Path(out_dir or os.environ.get("TORCH_VKV_BENCH_DIR", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report, env=environment(), command=command)
    from torch_vkv.bench.serve_plots import plots as make_plots

    plots = make_plots(report, out, log)
    report["plots"] = plots
    (out / "serve.json").write_text(json.dumps(_finite(report), indent=1))
    r = report["device_rates"]
    md = ["# serve", "", f"- command: `{command}`"] + [f"- {k}: {v}" for k, v in report["env"].items()]
    md += [f"- copy bandwidth {r['copy_bytes_per_s'] / 1e12:.3f} TB/s, matmul {r['matmul_flops_per_s'] / 1e12:.2f} "
           f"TFLOP/s ({report['dtype']}), measured in this run",
           f"- goodput targets: TTFT <= {report['slo_s']['ttft']} s and TPOT <= {report['slo_s']['tpot']} s",
           f"- decode steps: {'compiled (Engine(compile=True))' if report.get('compile') else 'eager'}, "
           "in CUDA graphs on a GPU",
           "- `x_best_paged_*`: over the best paged configuration of the same group (throughput: higher is better; "
           "normalised latency: lower is better); `pct_roofline`: the run's roofline floor over its busy "
           "time"]  # fmt: skip
    md += [f"- skipped: {s['config']}: {s['reason']}" for s in report["skipped"]]
    for name, w in report["workloads"].items():
        md += ["", f"## {name}", ""]
        for p in w["parts"]:
            rounds = f" in {p['repeats']} rounds" if p.get("repeats", 1) > 1 else ""
            md.append(f"- {p['trace']} at {p['request_rate']:g} req/s: {p['num_requests']} requests{rounds} "
                      f"({p['prompt_tokens']} prompt + {p['output_tokens']} output tokens), {p['model']}, "
                      f"max_batch_size {p['max_batch_size']}, max_seq_len {p['max_seq_len']}, "
                      f"chunk {p['chunk_size']}, KV budget {_gib(p['memory_budget'])}")  # fmt: skip
        md += [f"- skipped: {s['config']}: {s['reason']}" for s in w["skipped"]]
        md += ["", markdown_table(w["rows"], COLUMNS[name])]
        md += profile_lines(w["rows"])
        md += [f"- {r['group']} {r['config']}, each round: " + "; ".join(
            f"{k[:-7]} " + ", ".join("-" if v is None else f"{v:.3f}" for v in r[k]) for k in sorted(r)
            if k.endswith("_rounds")) for r in w["rows"] if any(k.endswith("_rounds") for k in r)]  # fmt: skip
        md += [f"![{k}]({Path(v).name})" for k, v in plots.items() if k.startswith(name + ":")]
    path = out / "serve.md"
    path.write_text("\n".join(md) + "\n")
    log("\n".join(md))
    return path


def _gib(n: Optional[int]) -> str:
    return "engine default" if n is None else f"{n / GiB:.3g} GiB"


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from torch_vkv.bench.serve_engine import CONFIGS

    p = serve_client.build_parser()
    p.description = ("Serving benchmark. With --url: the load client over HTTP. Without: the engine in process, "
                     "virtual vs paged configurations side by side.")  # fmt: skip
    for action in p._actions:  # the load client's --smoke help says what it does over HTTP
        if action.dest == "smoke":
            action.help += "; in process: every workload with a 2-layer model, minutes on a CPU"
    p.add_argument("--workload", action="append", choices=SERVE_WORKLOADS, default=None,
                   help="in process: a workload (repeat for several; default all)")  # fmt: skip
    p.add_argument("--configs", default=None,
                   help=f"in process: comma-separated configurations (default: {','.join(CONFIGS)} plus FlashInfer "
                        "and hf-generate_batch where available); NAME:BACKEND picks an attention backend")  # fmt: skip
    p.add_argument("--profile", action="store_true",
                   help="in process: torch.profiler over each timed loop: kernel vs host time, top operators "
                        "(slows the host: take timings from a run without it)")
    p.add_argument("--compile", action="store_true",
                   help="in process: every engine compiles its decode step (Engine(compile=True); about a "
                        "minute of compiling before the first configuration of a kind)")
    p.add_argument("--quick", action="store_true",
                   help="in process: the GPU preset of scripts/gpu_check.sh (about 2 minutes a workload on an H200)")
    p.add_argument("--request-rates", default=None, help="in process: long-online sweep rates, comma-separated")
    p.add_argument("--traces", default=None, help="in process: only the parts of these traces, comma-separated "
                   "(e.g. --workload long-online --traces arxiv_summarization: the rate sweep alone)")  # fmt: skip
    p.add_argument("--device", default=None, type=device_arg, help="in process: default cuda when present, else cpu")
    p.add_argument("--repeats", type=int_arg(1), default=1,
                   help="in process: run every part this many rounds (configurations in turn, fresh requests "
                        "each round) and pool the rounds' requests; default 1")  # fmt: skip
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch_vkv.bench.serve_engine import CONFIGS, peer_configs

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.url is not None:
        return serve_client.main(argv, serve_client.build_parser())
    client_only = ("trace", "request_rate", "max_prompt_tokens", "max_output_tokens", "model", "vocab_size",
                   "no_ignore_eos", "timeout")  # fmt: skip
    given = ["--" + n.replace("_", "-") for n in client_only if getattr(args, n) != parser.get_default(n)]
    if given:
        parser.error(f"{', '.join(given)} apply to the load client (--url); in process, pick --workload, "
                     "--num-requests and --request-rates")  # fmt: skip
    if args.quick and args.smoke:
        parser.error("--quick and --smoke are different sizes: pick one")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        parser.error("without a GPU only --smoke runs in process (the full sizes are Llama-3-8B / Yi-6B-200k); "
                     "to load a running server instead, pass --url http://HOST:PORT")
    scale = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        if not configs:
            parser.error(f"--configs: expected at least one configuration, got {args.configs!r}")
        for c in configs:
            if c != "hf-generate_batch":
                try:
                    parse_config(c)
                except ValueError as exc:
                    parser.error(str(exc))
    else:
        configs = list(CONFIGS) + peer_configs(device)[0]
    rates = None
    if args.request_rates:
        try:
            rates = [serve_client._rate(x) for x in args.request_rates.split(",")]
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --request-rates: {exc}")
    names = args.workload or list(SERVE_WORKLOADS)
    traces = None
    if args.traces is not None:
        try:
            traces = check_traces(names, scale, args.traces)
        except ValueError as exc:
            parser.error(str(exc))
    slo = {"ttft_slo_s": args.ttft_slo, "tpot_slo_s": args.tpot_slo}
    if scale == "smoke":  # a CPU second is not a GPU second: targets the tiny model meets
        slo = {k: v if v is not None else 60.0 for k, v in slo.items()}
    else:
        slo = {"ttft_slo_s": slo["ttft_slo_s"] or serve_client.DEFAULT_TTFT_SLO_S,
               "tpot_slo_s": slo["tpot_slo_s"] or serve_client.DEFAULT_TPOT_SLO_S}
    t = time.perf_counter()
    command = "python -m torch_vkv bench serve " + " ".join(sys.argv[3:] if argv is None else argv)

    def write_so_far(report: dict[str, Any]) -> None:
        write(dict(report, wall_s=time.perf_counter() - t), args.out, command, log=lambda *a: None)

    report = run(names, scale, configs, num_requests=args.num_requests, request_rates=rates, traces=traces,
                 device=device, seed=args.seed, on_workload=write_so_far, profile=args.profile, compile=args.compile,
                 repeats=args.repeats,
                 **slo)  # fmt: skip
    report["wall_s"] = time.perf_counter() - t
    write(report, args.out, command)
    failed = [s for w in report["workloads"].values() for s in w["skipped"] if s["reason"].startswith("failed")]
    return 1 if failed else 0
