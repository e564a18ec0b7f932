"""The README's "Use" example runs as written on a machine without a GPU."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_use_example_runs(capsys):
    text = README.read_text()
    use = text[text.index("## Use") :]
    code = re.findall(r"```python\n(.*?)```", use, re.S)[0]
    assert "KVCache(" in code and 'device="cuda"' not in code
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "committed_bytes" in printed
