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
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; return the md path.

    ``out_dir`` defaults to ``$TORCH_VKV_BENCH_DIR`` or ``./bench_out``.
    """
    out = Path(out_dir or os.environ.get("TORCH_VKV_BENCH_DIR", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / f"{name}.json").write_text(json.dumps({"env": env, "command": command, "rows": list(rows)}, indent=1))
    md = [f"# {name}", "", f"- command: `{command}`"]
    md += [f"- {k}: {v}" for k, v in env.items()]
    md += ["", summary, "", markdown_table(rows, columns)] if summary else ["", markdown_table(rows, columns)]
    path = out / f"{name}.md"
    path.write_text("\n".join(md))
    print("\n".join(md))
    return path
