"""Run a test scenario in a fresh Python interpreter.

Scenarios that could crash the interpreter (a segfault, a hang, an abort) run
in a child process, so a regression is a failed test with the child's output,
not a dead pytest session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``code`` (dedented) with this interpreter; never raises on failure.

    ``env`` entries are added to the current environment; a value of ``""``
    removes the variable. A child still running after ``timeout`` seconds is
    reported as a failed test with every thread's Python stack (see
    :func:`run_argv`).
    """
    return run_argv(["-c", textwrap.dedent(code)], env=env, timeout=timeout)


def run_argv(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs this interpreter with ``args`` (``["-m", "torch_vkv", ...]``) and
    ``env`` as in :func:`run_python`; never raises on failure. The child runs
    with ``faulthandler`` on: one still running after ``timeout`` seconds gets
    SIGABRT, which prints every thread's Python stack, and the test fails with
    that output (where it hung, not only that it did)."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), child_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name, value in (env or {}).items():
        if value == "":
            child_env.pop(name, None)
        else:
            child_env[name] = value
    argv = [sys.executable, "-X", "faulthandler", *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler: the stacks go to stderr
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"the child process did not finish within {timeout} s (a hang; its stacks are in stderr)\n"
                        f"{_output(out, err)}")  # fmt: skip
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def check_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Runs ``code`` like :func:`run_python` and fails the test, with the
    child's output, unless it exits with status 0. Returns its stdout."""
    r = run_python(code, env=env, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"the child process failed: {describe(r.returncode)}\n{_output(r.stdout, r.stderr)}")
    return r.stdout


def check_scenario(code: str, *, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """:func:`check_python` for a scenario that checks itself with asserts:
    also fails unless the child ran to its last line. Returns its stdout."""
    marker = "-- scenario ran to its end --"
    out = check_python(f"{textwrap.dedent(code)}\nprint({marker!r})\n", env=env, timeout=timeout)
    if not out.rstrip().endswith(marker):
        pytest.fail(f"the child exited with status 0 before the end of its scenario\n--- stdout\n{out[-5000:]}")
    return out


def _output(stdout: str | bytes | None, stderr: str | bytes | None) -> str:
    def text(s: str | bytes | None) -> str:
        return s.decode(errors="replace") if isinstance(s, bytes) else (s or "")

    return f"--- stdout\n{text(stdout)[-5000:]}\n--- stderr\n{text(stderr)[-5000:]}"


def run_script(code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Runs ``code`` (dedented) with ``args`` in ``sys.argv[1:]``; returns its
    stdout. Fails the calling test, with the child's output, when the child
    dies from a signal (a segfault shows as SIGSEGV), exits non-zero or
    outlives ``timeout``."""
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), child_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                           env=child_env, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child process did not finish within {timeout} s (a hang)\n{_output(e.stdout, e.stderr)}")
    if r.returncode != 0:
        pytest.fail(f"the child process failed: {describe(r.returncode)}\n{_output(r.stdout, r.stderr)}")
    return r.stdout


# The driver of run_cases: runs the prelude once, then each case's code at module level in a namespace of its
# own, printing a record before and after each (a crash leaves the case it was running without an end record).
_CASES_DRIVER = """
import json, sys, traceback
{prelude}
_ns = dict(globals())
for _name, _code in json.loads(sys.argv[1]):
    print("\\x1estart " + json.dumps(_name), flush=True)
    try:
        exec(compile(_code, _name, "exec"), dict(_ns))
    except BaseException:
        print("\\x1efail " + json.dumps([_name, traceback.format_exc()]), flush=True)
    else:
        print("\\x1epass " + json.dumps(_name), flush=True)
"""


def run_cases(cases: dict[str, str], prelude: str = "", *, env: dict[str, str] | None = None,
              timeout: float = 300) -> dict[str, str | None]:  # fmt: skip
    """Runs each of ``cases`` (name -> code, run at module level after ``prelude``) in as few child
    interpreters as possible: one child runs them in order, each in a namespace of its own, and a child
    that dies (a segfault) fails the case it was running; the cases after it run in a new child. Returns
    name -> ``None`` (ran to its end) or the failure (traceback, or how the child died and its output).

    For many small crash-prone scenarios: a child's start (importing torch) is most of its time."""
    results: dict[str, str | None] = {}
    todo = [(name, textwrap.dedent(code)) for name, code in cases.items()]
    driver = _CASES_DRIVER.format(prelude=textwrap.dedent(prelude))
    while todo:
        r = run_argv(["-c", driver, json.dumps(todo)], env=env, timeout=timeout)
        died = f"{describe(r.returncode)}\n{_output(r.stdout, r.stderr)}"
        running, ran = None, []
        for line in r.stdout.split("\n"):  # not splitlines(): it splits at the \x1e marking a record too
            kind, _, payload = line.partition(" ")
            if kind == "\x1estart":
                running = json.loads(payload)
            elif kind in ("\x1epass", "\x1efail"):
                name, trace = json.loads(payload) if kind == "\x1efail" else (json.loads(payload), None)
                results[name], running = trace, None
                ran.append(name)
        if running is not None:  # a crash inside a case
            results[running] = f"the child died running it: {died}"
        elif r.returncode != 0 or not ran:  # died in the prelude, between two cases or at exit: all its cases fail
            for name in ran or [n for n, _ in todo]:
                results[name] = f"the child failed: {died}"
            if not ran:
                return results
        todo = [(n, c) for n, c in todo if n not in results]
    return results
