"""``scripts/unpack_fi_cache.sh``: FlashInfer's JIT cache packed on one GPU call
(``gpu_check.sh`` with ``FI_CACHE_OUT=1``) and unpacked on the next, after its wheels were
installed again, must leave ninja nothing to rebuild. FlashInfer runs ninja on every first use of
a module (``deps = gcc``, as in its ``build.ninja``); a toy build of the same shape stands in
for its kernels here."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CC = shutil.which("gcc") or shutil.which("cc")

pytestmark = pytest.mark.skipif(not (shutil.which("ninja") and CC and shutil.which("tar")),
                                reason="needs ninja, a C compiler and tar")  # fmt: skip


def _ninja(cache: Path, *args: str) -> str:
    p = subprocess.run(["ninja", "-C", str(cache), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def test_unpacked_cache_needs_no_rebuild(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    (site / "inc").mkdir(parents=True)
    cache.mkdir()
    header = site / "inc" / "h.h"
    header.write_text("static inline int f(void) { return 1; }\n")
    (cache / "a.c").write_text('#include "h.h"\nint g(void) { return f(); }\n')
    (cache / "build.ninja").write_text(
        "rule cc\n"
        f"  command = {CC} -MMD -MF $out.d -I{site / 'inc'} -c $in -o $out\n"
        "  depfile = $out.d\n"
        "  deps = gcc\n"
        f"build {cache / 'a.o'}: cc {cache / 'a.c'}\n"
    )  # fmt: skip
    _ninja(cache)
    assert "no work to do" in _ninja(cache, "-n")
    tgz = tmp_path / "fi_cache.tgz"
    subprocess.run(["tar", "czf", str(tgz), "-C", str(cache), "."], check=True)
    shutil.rmtree(cache)
    # The next call: a fresh machine installs the wheels (the headers get this moment's time stamps),
    # then unpacks the cache.
    time.sleep(1.1)
    header.write_text(header.read_text())
    time.sleep(1.1)
    subprocess.run(["bash", str(ROOT / "scripts" / "unpack_fi_cache.sh"), str(tgz), str(cache), str(site)],
                   check=True, timeout=60)  # fmt: skip
    out = _ninja(cache, "-n", "-d", "explain")
    assert "no work to do" in out, out
    # An edited header is still seen: the cache is kept only while its inputs are unchanged.
    header.write_text("static inline int f(void) { return 2; }\n")
    assert "no work to do" not in _ninja(cache, "-n")
