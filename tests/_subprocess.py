"""Run a Python snippet in a fresh interpreter, so a crash fails one test instead of killing pytest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Runs ``code`` (dedented) with ``args`` in ``sys.argv[1:]``; returns its stdout.

    Fails the calling test, with the child's output, when the child dies from a
    signal (a segfault is reported as SIGSEGV), exits non-zero or outlives ``timeout``.
    """
    cmd = [sys.executable, "-c", textwrap.dedent(code), *args]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the child did not finish within {timeout} s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    if out.returncode != 0:
        how = f"signal {signal.Signals(-out.returncode).name}" if out.returncode < 0 else f"exit code {out.returncode}"
        raise AssertionError(f"the child failed with {how}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}")
    return out.stdout
