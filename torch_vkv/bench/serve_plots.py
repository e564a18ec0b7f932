"""Plots of the in-process serving benchmark (``bench serve``): committed KV
memory over time, latency CDFs and throughput vs request rate, per workload
(split from :mod:`.serve` to keep modules small)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

__all__ = ["plots"]


def _label(cfg: str, part: dict, w: dict) -> str:
    return f"{cfg} ({part['trace']}@{part['request_rate']:g})" if len(w["parts"]) > 1 else cfg


def plots(report: dict[str, Any], out: Path, log: Callable[[str], Any] = print) -> dict[str, str]:
    """Throughput vs request rate, latency CDFs and committed KV memory over
    time, per workload; ``{}`` (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        log("matplotlib not importable: no plots")
        report["skipped"].append({"config": "plots", "reason": "matplotlib not importable"})
        return {}
    paths: dict[str, str] = {}

    def save(fig, key: str, fname: str) -> None:
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths[key] = str(out / fname)

    for name, w in report["workloads"].items():
        slug = name.replace("-", "_")
        runs = [(p, cfg, r) for p in w["parts"] for cfg, r in p["runs"].items()]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for p, cfg, r in runs:
            mem = r["memory"]
            if mem:
                ax.plot([m["t_s"] for m in mem], [m["committed_bytes"] / 2**20 for m in mem], drawstyle="steps-post",
                        label=_label(cfg, p, w))
        ax.set(xlabel="time (s)", ylabel="committed KV memory (MiB)", title=f"{name}: committed KV memory")
        ax.legend(fontsize=6)
        save(fig, f"{name}:memory", f"serve_{slug}_memory.png")
        fig, ax = plt.subplots(figsize=(7, 4))
        for p, cfg, r in runs:
            lat = sorted(q["e2e_s"] / q["output_tokens"] for q in r["requests"] if q["ok"] and q["output_tokens"])
            if lat:
                ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post",
                        label=_label(cfg, p, w))
        ax.set(xlabel="e2e latency per output token (s)", ylabel="fraction of requests", title=f"{name}: latency CDF")
        ax.legend(fontsize=6)
        save(fig, f"{name}:latency_cdf", f"serve_{slug}_latency_cdf.png")
        online = [r for r in w["rows"] if math.isfinite(r["request_rate"])]
        if online:
            fig, ax = plt.subplots(figsize=(7, 4))
            for trace in sorted({r["trace"] for r in online}):
                for cfg in sorted({r["config"] for r in online}):
                    pts = sorted((r["request_rate"], r["output_tokens_per_s"]) for r in online
                                 if r["trace"] == trace and r["config"] == cfg)  # fmt: skip
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{cfg} ({trace})")
            ax.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title=f"{name}: throughput vs rate",
                   xscale="log")  # fmt: skip
            ax.legend(fontsize=6)
            save(fig, f"{name}:throughput_vs_rate", f"serve_{slug}_throughput_vs_rate.png")
    return paths
