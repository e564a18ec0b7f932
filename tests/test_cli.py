"""python -m torch_vkv {info,demo,bench}: argument handling and the info command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from torch_vkv.cli import main


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend host: memfd + mmap" in out
    assert "backend cuda" in out  # available or the reason it is not


def test_info_takes_no_arguments():
    with pytest.raises(SystemExit) as e:
        main(["info", "--extra"])
    assert e.value.code == 2


def test_unknown_benchmark_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "torch_vkv", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch_vkv" in out.stdout
