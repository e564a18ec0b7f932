"""The ``torch_vkv.attention`` package: its names, the module/function clash, its size, its imports."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_public_names_and_signatures():
    import inspect

    import torch_vkv
    from torch_vkv.attention import BACKENDS, append_kv, attention, available_backends, select_backend

    assert torch_vkv.attention is attention and torch_vkv.append_kv is append_kv
    assert torch_vkv.select_backend is select_backend and torch_vkv.available_backends is available_backends
    assert torch_vkv.BACKENDS is BACKENDS == ("auto", "torch_fa2", "flash_attn", "flashinfer", "triton", "flex", "sdpa")
    params = list(inspect.signature(attention).parameters)
    assert params == ["q", "k_cache", "v_cache", "cache_seqlens", "cu_seqlens_q", "slots", "causal", "scale",
                      "backend", "block_table", "max_seqlen_q", "num_splits", "window_left", "softcap"]  # fmt: skip
    assert list(inspect.signature(append_kv).parameters) == [
        "k_cache", "v_cache", "k_new", "v_new", "cache_seqlens", "cu_seqlens_q", "slots", "block_table"]  # fmt: skip
    assert list(inspect.signature(select_backend).parameters) == [
        "q", "k_cache", "v_cache", "decode", "block_table", "softcap", "window", "host_metadata"]  # fmt: skip


def test_private_names_kept_for_old_callers():
    """Names the former single module had, still importable (hf.py, tests/test_paged.py, bench)."""
    from torch_vkv.attention import (  # noqa: F401
        _flash_attn_fn,
        _has_torch_fa2,
        _has_triton,
        _triton_kernels,
        _triton_usable,
    )

    assert _triton_usable(torch.device("cuda")) == (importlib.util.find_spec("triton") is not None)


def test_attention_stays_the_function_after_importing_submodules():
    """The clash is resolved one way: ``torch_vkv.attention`` is the function, whatever was imported."""
    r = run_python(
        "import torch_vkv.attention.sdpa, torch_vkv.attention.inputs\n"
        "import torch_vkv, importlib\n"
        "assert callable(torch_vkv.attention) and torch_vkv.attention.__name__ == 'attention', torch_vkv.attention\n"
        "import torch_vkv.attention.flex\n"
        "assert callable(torch_vkv.attention)\n"
        "pkg = importlib.import_module('torch_vkv.attention')\n"
        "assert pkg.__name__ == 'torch_vkv.attention' and pkg.attention is torch_vkv.attention\n"
        "print('ok')\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_compile_traces_a_call_to_torch_vkv_attention():
    """``torch.compile(fullgraph=True)`` traces ``torch_vkv.attention(...)`` reached through the package attribute."""
    import torch._dynamo

    import torch_vkv

    torch.manual_seed(0)
    q = torch.randn(3, 4, 16)
    k = torch.randn(3, 8, 2, 16)
    v = torch.randn(3, 8, 2, 16)
    lens = torch.tensor([2, 8, 5], dtype=torch.int32)

    def step(q, k, v, lens):
        return torch_vkv.attention(q, k, v, lens, backend="sdpa")

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(q, k, v, lens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, lens)
    torch.testing.assert_close(out, step(q, k, v, lens), atol=1e-5, rtol=1e-5)  # fp32, same math


def test_import_is_lean():
    """Importing the package imports neither triton, nor our kernels, nor flash-attn, nor dynamo."""
    r = run_python(
        "import sys, torch_vkv.attention\n"
        "bad = [m for m in ('triton', 'torch_vkv.triton_kernels', 'flash_attn', 'flashinfer', 'torch._dynamo') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="torch_vkv.triton_kernels imports triton")
def test_triton_kernels_is_one_plain_import():
    """``torch_vkv.triton_kernels`` comes from the installed mapping of ``triton_kernels/`` (setup.py)."""
    r = run_python(
        "import torch_vkv.triton_kernels as tk, os\n"
        "print(os.path.dirname(tk.__file__))\n"
    )
    assert r.returncode == 0, r.stderr
    assert os.path.basename(r.stdout.strip()) == "triton_kernels"
    src = (ROOT / "torch_vkv" / "attention" / "deps.py").read_text()
    assert "spec_from_file_location" not in src  # no fallback loader


def test_no_module_over_600_lines():
    files = [f for d in ("torch_vkv/attention", "torch_vkv/bench", "triton_kernels") for f in sorted((ROOT / d).glob("*.py"))]
    assert files
    long = {f.name: n for f in files if (n := len(f.read_text().splitlines())) > 600}
    assert not long, long


def test_debug_enabled_reads_the_environment_at_call_time(monkeypatch):
    from torch_vkv.attention import debug_enabled

    monkeypatch.delenv("TORCH_VKV_DEBUG", raising=False)
    assert not debug_enabled()
    monkeypatch.setenv("TORCH_VKV_DEBUG", "1")
    assert debug_enabled()
    monkeypatch.setenv("TORCH_VKV_DEBUG", "0")
    assert not debug_enabled()


def test_append_kv_into_a_kv_cache_refuses_aot_eager_and_plain_tensors_compile():
    """``torch_vkv.append_kv`` into a ``KVCache``'s buffers under
    ``torch.compile(backend="aot_eager")`` raises a RuntimeError naming the
    backend (aot_eager copies the whole reservation around the in-place write,
    uncommitted pages included: a fault), while ordinary tensors still compile
    with aot_eager and the cache compiles with inductor. In a child process."""
    from _subprocess import check_scenario

    check_scenario("""
        import torch, torch_vkv
        from torch_vkv import KVCache

        def write(k, v, k_new, v_new, lens):
            torch_vkv.append_kv(k, v, k_new, v_new, lens)

        torch.manual_seed(0)
        k_new, v_new = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
        lens = torch.tensor([3, 1], dtype=torch.int32)
        with KVCache(1, 2, 16, max_batch_size=2, max_seq_len=4096, dtype=torch.float32, device="cpu",
                     page_size=4096) as cache:
            for s in (cache.alloc(), cache.alloc()):
                cache.commit(s, 3)
            k, v = cache.key(0), cache.value(0)
            try:
                torch.compile(write, fullgraph=True, backend="aot_eager")(k, v, k_new, v_new, lens)
            except RuntimeError as e:
                assert "aot_eager" in str(e), str(e)
            else:
                raise AssertionError("aot_eager compiled a write into a virtual KV cache")
            torch._dynamo.reset()
            torch.compile(write, fullgraph=True)(k, v, k_new, v_new, lens)  # inductor: in place
            torch.testing.assert_close(k[0, 2], k_new[0]) ; torch.testing.assert_close(v[1, 0], v_new[1])
        plain_k, plain_v = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
        torch._dynamo.reset()
        torch.compile(write, fullgraph=True, backend="aot_eager")(plain_k, plain_v, k_new, v_new, lens)
        torch.testing.assert_close(plain_k[0, 2], k_new[0])
    """, timeout=600)


def test_eager_calls_skip_the_dispatcher_only_where_nothing_can_tell():
    """``dispatch_free``: plain eager calls run the op's implementation directly (the dispatcher
    costs 10-20 us a call); a compile trace, a dispatch mode (fake tensors) or an input autograd
    tracks goes through the custom op. Both paths give the same result."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torch_vkv.attention import attention
    from torch_vkv.attention.common import dispatch_free

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 16, generator=g)
    k, v = torch.randn(2, 8, 2, 16, generator=g), torch.randn(2, 8, 2, 16, generator=g)
    lens = torch.tensor([5, 8], dtype=torch.int32)
    assert dispatch_free(q, k, v)
    with FakeTensorMode():
        assert not dispatch_free(q, k, v)
    with torch.profiler.profile():  # profiles name our ops
        assert not dispatch_free(q, k, v)
    needs_grad = q.clone().requires_grad_()
    assert not dispatch_free(needs_grad, k, v)
    with torch.no_grad():
        assert dispatch_free(needs_grad, k, v)
    from torch_vkv.attention import append_kv, deps

    if not deps.triton_usable(q.device):
        pytest.skip("the direct path is the Triton backend's: needs TRITON_INTERPRET=1 on the CPU")
    direct = attention(q, k, v, lens, backend="triton")
    through_op = attention(needs_grad, k, v, lens, backend="triton")
    torch.testing.assert_close(through_op.detach(), direct, rtol=0, atol=0)
    k_new = torch.randn(2, 2, 16, generator=g)
    caches = [(k.clone(), v.clone()), (k.clone(), v.clone())]
    append_kv(*caches[0], k_new, k_new, lens)  # direct
    append_kv(*caches[1], k_new.clone().requires_grad_(), k_new, lens)  # through the op
    for a, b in zip(*caches):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(caches[0][0][1, 7], k_new[1]) and not torch.equal(caches[0][0][1, 7], k[1, 7])


@pytest.mark.parametrize("capability, want", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_torch_fa2_only_on_ampere_or_newer(monkeypatch, capability, want):
    """PyTorch's FA2 raises on GPUs older than Ampere: ``auto`` must not pick it there (a T4 or V100 with
    head_dim 80/96 would have failed every call). A stand-in for a CUDA query on this CPU machine."""
    import types

    fa2 = importlib.import_module("torch_vkv.attention.torch_fa2")
    deps = importlib.import_module("torch_vkv.attention.deps")
    monkeypatch.setattr(deps, "HAS_TORCH_FA2", True)
    monkeypatch.setattr(deps, "_CAPABILITY", {0: capability})  # what the driver would answer
    q = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float16, shape=(4, 8, 96))
    k = torch.zeros(2, 16, 2, 96)
    assert fa2.fa2_supported(q, k, k, None) is want
    # Under torch.compile the rule is a constant (a tuple compared in traced code failed in dynamo on 2.11);
    # constants are not guarded, so each capability gets a fresh dynamo cache.
    torch._dynamo.reset()
    traced = torch.compile(lambda x: x + 1 if deps.ampere_or_newer(0) else x - 1, fullgraph=True, backend="eager")
    assert traced(torch.zeros(1)).item() == (1 if want else -1)
    # available_backends("cuda") lists it only there too (a CUDA machine stood in for after the compile above,
    # which must not see one).
    selection = importlib.import_module("torch_vkv.attention.selection")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(deps, "has_flash_attn", lambda: False)
    monkeypatch.setattr(deps, "has_flashinfer", lambda: False)
    monkeypatch.setattr(deps, "triton_usable", lambda device: False)
    assert ("torch_fa2" in selection.available_backends("cuda")) is want
