"""Write benchmark results as JSON and a markdown table (and plots on request)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence


def environment() -> dict[str, Any]:
    """What the numbers were measured on: GPU, torch version, date."""
    import torch

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def report_dir(out_dir: str | os.PathLike | None) -> Path:
    """``out_dir``, else ``$TORCH_VKV_BENCH_DIR``, else ``./bench_out``; created if missing."""
    out = Path(out_dir or os.environ.get("TORCH_VKV_BENCH_DIR", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(
    name: str,
    rows: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike | None = None,
    *,
    command: str = "",
    columns: Sequence[str] | None = None,
    summary: str = "",
) -> Path:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; return the md path."""
    out = report_dir(out_dir)
    env = environment()
    (out / f"{name}.json").write_text(json.dumps({"env": env, "command": command, "rows": list(rows)}, indent=1))
    md = [f"# {name}", "", f"- command: `{command}`"]
    md += [f"- {k}: {v}" for k, v in env.items()]
    md += ["", summary, "", markdown_table(rows, columns)] if summary else ["", markdown_table(rows, columns)]
    path = out / f"{name}.md"
    path.write_text("\n".join(md))
    print("\n".join(md))
    return path


def plot_kernels(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike | None, log) -> None:
    """``kernels_decode_<model>.png`` (% of copy bandwidth per batch, a panel per context) and
    ``kernels_prefill.png`` (TFLOP/s per context) from ``bench kernels`` rows; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        log("matplotlib not importable: no plots")
        return
    out = report_dir(out_dir)
    dec = [r for r in rows if r["section"] == "decode" and r.get("us")]
    for model in sorted({r["model"] for r in dec}):
        ctxs = sorted({r["context"] for r in dec if r["model"] == model})
        fig, axes = plt.subplots(1, len(ctxs), figsize=(5 * len(ctxs), 4), squeeze=False)
        # One colour per variant across every panel, so panels read alike.
        variants = sorted({(r["backend"], r["block"]) for r in dec if r["model"] == model}, key=str)
        colour = {v: f"C{i % 10}" for i, v in enumerate(variants)}
        for ax, S in zip(axes[0], ctxs):
            sel = [r for r in dec if r["model"] == model and r["context"] == S]
            for name in sorted({(r["backend"], r["block"]) for r in sel}, key=str):
                pts = sorted((r["batch"], r["pct_copy"]) for r in sel if (r["backend"], r["block"]) == name)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour[name],
                        label=name[0] + (f"/{name[1]}" if name[1] else ""))  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model} decode, context {S}")
            ax.set_xlabel("batch")
            ax.set_ylabel("% of copy bandwidth")
            ax.axhline(80, color="gray", ls="--", lw=0.8)
        for ax in axes[0]:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"kernels_decode_{model}.png", dpi=120)
        plt.close(fig)
    pre = [r for r in rows if r["section"] == "prefill" and r.get("us")]
    if pre:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted({(r["model"], r["backend"], r["block"]) for r in pre}, key=str):
            pts = sorted((r["context"], r["tflop_s"]) for r in pre if (r["model"], r["backend"], r["block"]) == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{name[0]} {name[1]}" + (f"/{name[2]}" if name[2] else ""))  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (batch 1, causal)")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "kernels_prefill.png", dpi=120)
        plt.close(fig)
