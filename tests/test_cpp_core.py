"""Builds csrc/tests/test_core.cpp under ThreadSanitizer and runs it.

The C++ program exercises the core on the host backend without Python:
reserve / commit / decommit / alias semantics, unbacked pages (read-only zero
pages, PROT_NONE in strict mode), close, out of pages, held fences, and a
background Committer racing the main thread on one pool. It must exit 0 with
no ThreadSanitizer report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# Every core source but the pybind11 bindings.
SOURCES = sorted(p.name for p in CSRC.glob("*.cpp") if p.name != "bindings.cpp")


def test_core_under_thread_sanitizer(tmp_path: Path) -> None:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ (a C++17 compiler with -fsanitize=thread) to build csrc/tests/test_core.cpp")
    exe = tmp_path / "test_core"
    cmd = [cxx, "-std=c++17", "-fsanitize=thread", "-g", "-O1", f"-I{CSRC}", str(CSRC / "tests" / "test_core.cpp")]
    cmd += [str(CSRC / s) for s in SOURCES] + ["-ldl", "-pthread", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{build.stderr}"

    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    out = run.stdout + run.stderr
    assert "WARNING: ThreadSanitizer" not in out, out[-20000:]
    assert run.returncode == 0, out[-20000:]
    assert "all " in run.stdout and "checks passed" in run.stdout, out[-5000:]
