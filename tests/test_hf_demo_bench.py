"""The demo and ``bench hf`` (CPU smoke tests)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import torch_vkv.hf as vkv_hf  # noqa: E402
import torch_vkv.hf.attention as vkv_attn  # noqa: E402
from torch_vkv.hf import VirtualKVCache, forward_kwargs, generate_kwargs  # noqa: E402

from _hf_models import (  # noqa: E402
    FAMILIES, IMPLS, PAGE, TOL, _assert_greedy_equivalent, _close, _expected_committed, _generate_logits, _loop,
    _page_crossing_model, _ref_model, _step, generate, prompts, tiny_config, tiny_model, vcache,
)  # fmt: skip


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
    assert "same tokens from all three caches: yes" in out
    assert main(["--device", "cpu", "--no-transformers", "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--max-cache-len", "128"]) == 0  # fmt: skip
    assert "KVCache committed" in capsys.readouterr().out


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


def test_demo_local_checkpoint(tmp_path, capsys, keep_threads):
    from torch_vkv.demo import main

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(tmp_path / "ckpt")
    assert main(["--model", str(tmp_path / "ckpt"), "--device", "cpu", "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--max-cache-len", "64"]) == 0  # fmt: skip
    assert str(tmp_path / "ckpt") in capsys.readouterr().out
