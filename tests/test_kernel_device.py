"""Triton launches on the *current* CUDA device whatever device its arguments are on, so every
launcher of ``torch_vkv.triton_kernels`` makes its first tensor's device current first
(``_common.on_tensor_device``): a cache on ``cuda:1`` with ``cuda:0`` current would otherwise run
the kernel on the wrong GPU (an illegal address, and the CUDA context is lost)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton")
common = importlib.import_module("torch_vkv.triton_kernels._common")
tk = importlib.import_module("torch_vkv.triton_kernels")


def test_launchers_switch_to_their_tensors_device(monkeypatch):
    """The guard's rule with stand-ins for a second GPU (this machine may have none)."""
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device.index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    calls = []
    launch = common.on_tensor_device(lambda t, x, *, y=0: calls.append((t.device.index, x, y)) or "out")
    on = lambda i: types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", i))  # noqa: E731
    assert launch(on(1), 5, y=2) == "out" and entered == [1]  # another GPU: made current for the launch
    assert launch(on(0), 6) == "out" and entered == [1]  # the current one: nothing to switch
    assert launch(torch.zeros(1), 7) == "out" and entered == [1]  # CPU (the interpreter): nothing
    assert [c[1:] for c in calls] == [(5, 2), (6, 0), (7, 0)]


@pytest.mark.parametrize("name", ["append_kv", "zero_tail", "decode_attention", "prefill_attention",
                                  "decode_page_entries"])  # fmt: skip
def test_every_launcher_is_guarded(name):
    fn = getattr(tk, name)
    assert getattr(fn, "__wrapped__", None) is not None, f"{name} launches without on_tensor_device"
    assert list(inspect.signature(fn).parameters) == list(inspect.signature(fn.__wrapped__).parameters)


@pytest.mark.cuda
def test_decode_on_the_second_gpu_while_the_first_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    torch.cuda.set_device(0)
    g = torch.Generator(device="cuda:1").manual_seed(0)
    B, S, H, H_kv, D = 3, 256, 8, 2, 64
    k = torch.randn(B, S, H_kv, D, device="cuda:1", generator=g)
    v = torch.randn(B, S, H_kv, D, device="cuda:1", generator=g)
    q = torch.randn(B, H, D, device="cuda:1", generator=g)
    lens = torch.tensor([256, 17, 100], dtype=torch.int32, device="cuda:1")
    out = tk.decode_attention(q, k, v, lens)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    ref = tk.decode_reference(q.double(), k.double(), v.double(), lens)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
