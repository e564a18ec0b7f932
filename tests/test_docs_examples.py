"""The python examples of docs/hf.md and docs/serving.md run as written on a
machine without a GPU, as tests/test_readme.py does for the README.

Only what an example cannot hold is supplied: a tiny random model or checkpoint
for the names the text leaves to the reader (``model``, ``prompts``, ``path``,
``"path/to/checkpoint"``). Fragments of a larger program (the hand-written
compiled loop, the cache-keyword lines, the attention contract) are not run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from _tiny_checkpoint import build_checkpoint  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")


def example(doc: str, marker: str) -> str:
    """The one python example of ``docs/<doc>`` that contains ``marker``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (DOCS / doc).read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"{doc}: expected one python example containing {marker!r}, got {len(blocks)}"
    return blocks[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("docs_ckpt"))


def run(code: str, doc: str, names: dict) -> dict:
    namespace = dict(names)
    exec(compile(code, str(DOCS / doc), "exec"), namespace)
    return namespace


def test_hf_usage_example_runs(ckpt, capsys):
    code = example("hf.md", "VirtualKVCache(model.config")
    assert 'path = "path/to/checkpoint"' in code
    code = code.replace('"path/to/checkpoint"', repr(str(ckpt)))
    ns = run(code.replace("max_new_tokens=256", "max_new_tokens=8"), "hf.md", {})
    assert int(capsys.readouterr().out.split()[-1]) == ns["cache"].memory_stats()["committed_bytes"] > 0
    assert ns["cache"].mode == "vkv"


def test_serving_engine_example_runs(capsys):
    from torch_vkv.bench.models import build_model

    code = example("serving.md", "with Engine(model")
    model = build_model("tiny", device="cpu", dtype=torch.float32)
    run(code.replace("max_tokens=128", "max_tokens=8"), "serving.md", {"model": model, "prompts": [[1, 2, 3], [4, 5]]})
    printed = capsys.readouterr().out
    assert "length" in printed and "num_running" in printed


def test_serving_host_time_example_runs(capsys):
    """The measurement loop of "Host time": its names are the reader's (a tiny
    Llama, random prompts), its imports those of the first example."""
    from torch_vkv.bench.models import build_model
    from torch_vkv.serving import Engine, SamplingParams

    code = example("serving.md", "host_seconds")
    generator = torch.Generator().manual_seed(0)
    names = {
        "Engine": Engine,
        "SamplingParams": SamplingParams,
        "tiny_llama": build_model("tiny", device="cpu", dtype=torch.float32),
        "random_prompt": lambda n: torch.randint(0, 512, (n,), generator=generator).tolist(),
    }
    ns = run(code, "serving.md", names)
    ns["engine"].close()
    assert float(capsys.readouterr().out.split()[-1]) > 0


def test_serving_text_api_example_runs(ckpt, capsys):
    code = example("serving.md", "LLM(")
    assert '"path/to/checkpoint"' in code
    ns = run(code.replace('"path/to/checkpoint"', repr(str(ckpt))), "serving.md", {})
    ns["llm"].close()
    assert ns["outs"][1].outputs[0].token_ids and ns["outs"][0].finish_reason in ("length", "stop")
    assert capsys.readouterr().out.strip()
