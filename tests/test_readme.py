"""The README's "Use" example runs as written on a machine without a GPU."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_use_example_runs(capsys):
    text = README.read_text()
    use = text[text.index("## Use") :]
    code = re.findall(r"```python\n(.*?)```", use, re.S)[0]
    assert "KVCache(" in code and 'device="cuda"' not in code
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "committed_bytes" in printed


def test_readme_serve_example_runs_and_hands_the_model_back(capsys):
    """The "Serve" snippet with a tiny random model as ``model``: it serves,
    and after its ``with`` block the model generates on its own again."""
    import torch

    from torch_vkv.bench.models import build_model

    text = README.read_text()
    serve = text[text.index("## Serve") :]
    code = re.findall(r"```python\n(.*?)```", serve, re.S)[0]
    assert "with Engine(" in code
    model = build_model("tiny", device="cpu", dtype=torch.float32)
    before = model.config._attn_implementation
    exec(compile(code, str(README), "exec"), {"model": model})
    assert "length" in capsys.readouterr().out
    assert model.config._attn_implementation == before
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
