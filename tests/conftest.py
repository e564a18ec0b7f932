"""Shared test set-up.

Tests marked ``cuda`` (or parametrised with the ``cuda`` device) are skipped
cleanly when no CUDA GPU is present; nothing touches the GPU at import or
collection time beyond ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on CPU tensors only under its interpreter, and Triton reads the variable when it is
# first imported: set it here, before any test module imports Triton, so every subset of the suite (any
# file order) sees the same mode. Only where CUDA is absent, as the test modules that need it do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n auto`), each worker process gets its share of the cores for torch's
# intra-op threads, so that the workers together use each core once rather than competing for it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker a core, at most 8 (each worker holds its own torch, transformers and caches;
    the suite is short enough that more workers mostly add start-up time)."""
    return max(1, min(os.cpu_count() or 1, 8))


@pytest.fixture
def no_interpreted_triton(monkeypatch):
    """On the CPU, ``append_kv`` (and ``backend="triton"``) take Triton's
    interpreter when it is on: far too slow for whole models. Tests that run
    models turn Triton off for CPU tensors. Not by unsetting TRITON_INTERPRET:
    Triton reads it when its modules are first imported, and a process that
    imported part of Triton with it set and part without breaks."""
    from torch_vkv.attention import deps

    if not torch.cuda.is_available():
        monkeypatch.setattr(deps, "triton_usable", lambda device: False)


def pytest_runtest_logreport(report):
    """``TORCH_VKV_FAILURE_LOG=FILE``: append each failure's traceback as it happens, so a run that
    is cut short (a GPU machine's time limit) still tells why tests failed. ``TORCH_VKV_DURATIONS_LOG=FILE``:
    append each test's seconds as it ends (``--durations`` prints only at the end of a run that was not cut),
    to plan how to split the GPU suite."""
    path = os.environ.get("TORCH_VKV_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"\n===== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
    durations = os.environ.get("TORCH_VKV_DURATIONS_LOG")
    if durations and report.when == "call":
        with open(durations, "a") as f:
            f.write(f"{report.duration:9.2f} {report.outcome:8} {report.nodeid}\n")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none available here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Runs a test on the host backend and, where a GPU exists, on CUDA."""
    return request.param


def small_page(device: str) -> int | None:
    """A 64 KiB host page keeps CPU tests small; CUDA uses the driver's granularity."""
    return 64 << 10 if device == "cpu" else None
