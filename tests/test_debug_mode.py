"""Tests rerun with ``TORCH_VKV_DEBUG=1``, where the host backend keeps
uncommitted pages unreadable: a read of a page behind a sliding window, of a
decommitted or never committed row, is a segfault there, as it is a fault
that kills the context on CUDA (where the host's default, a page of zeros,
would hide it). Each runs in a child pytest, so a crash is a failed test."""

from __future__ import annotations

import pytest

from _subprocess import describe, run_argv

# Tests that read caches whose windows gave pages back, or rows past what is committed.
CASES = [
    "tests/test_cache_window.py",
    "tests/test_hf_review.py",
    "tests/test_hf_window.py",
    "tests/test_attention_window.py",
    "tests/test_cache_fences.py",
]


@pytest.mark.parametrize("path", CASES)
def test_reads_only_committed_rows(path):
    r = run_argv(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
                 env={"TORCH_VKV_DEBUG": "1"}, timeout=900)  # fmt: skip
    assert r.returncode == 0, f"{path} under TORCH_VKV_DEBUG=1: {describe(r.returncode)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
