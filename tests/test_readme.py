"""The README's "Use" example runs as written on a machine without a GPU."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_use_example_runs(capsys):
    text = README.read_text()
    use = text[text.index("## Use") :]
    code = re.findall(r"```python\n(.*?)```", use, re.S)[0]
    assert "KVCache(" in code and 'device="cuda"' not in code
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    printed = capsys.readouterr().out
    assert "committed_bytes" in printed and "commit_seconds" in printed  # "... commit times"
    # the shapes its comments state
    assert "# [16, 4096, 8, 128] tensors" in code and tuple(ns["k"].shape) == (16, 4096, 8, 128)
    assert "# [512, 32, 128]" in code and tuple(ns["out"].shape) == (512, 32, 128)


def test_readme_hugging_face_example_runs_on_a_local_checkpoint(tmp_path, capsys, monkeypatch):
    """The "Use" section's transformers snippet as written, a tiny local checkpoint for the hub name
    (the snippet says "any causal LM checkpoint or local path"), bf16 on the CPU."""
    pytest.importorskip("transformers")
    from _tiny_checkpoint import build_checkpoint
    from torch_vkv.attention import deps

    monkeypatch.setattr(deps, "triton_usable", lambda device: False)  # conftest's no_interpreted_triton
    text = README.read_text()
    code = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "VirtualKVCache(model.config" in b]
    assert len(code) == 1 and 'name = "Qwen/Qwen2.5-0.5B-Instruct"' in code[0]
    ckpt = build_checkpoint(tmp_path / "ckpt")
    ns: dict = {}
    exec(compile(code[0].replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(ckpt))), str(README), "exec"), ns)
    decoded = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])  # the printed list of strings
    assert len(decoded) == 1 and decoded[0].startswith("The capital of France is")
    prompt_len = ns["inputs"]["input_ids"].shape[1]
    assert ns["cache"].mode == "vkv" and prompt_len < ns["out"].shape[1] <= prompt_len + 32


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
