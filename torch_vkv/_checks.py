"""One place for input checks, so every message reads "expected X, got Y"."""

from __future__ import annotations

import numbers
import re
from typing import Any, NoReturn, Optional

import numpy as np
import torch

#: Exact types of the integers that vectorised checks take as they are (bool,
#: unsigned and arbitrary integer types go through :func:`check_int`).
INT_TYPES = frozenset({int, np.int64, np.int32, np.int16, np.int8})


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. It is both a ``TypeError`` and a
    ``ValueError``: callers that catch either for bad input catch it."""


class Described(str):
    """A ``got`` that describes the value (``"rows [0, 256)"``) rather than
    being it: :func:`fail` shows it without quotes."""

    def __repr__(self) -> str:
        return str(self)


def fail(what: str, expected: str, got: Any, exc: type[Exception] = ValueError) -> NoReturn:
    """Raises ``exc("what: expected X, got Y")``; ``got`` as its ``repr`` (a
    :class:`Described` string as it is)."""
    raise exc(f"{what}: expected {expected}, got {got!r}")


def is_int(value: Any) -> bool:
    """An integer as an index takes it: a Python or NumPy int, not a bool (``True`` is no row 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_stream(stream: Any) -> Any:
    """``None`` or a CUDA stream (``torch.cuda.Stream``/``ExternalStream``: it has an
    integer ``cuda_stream``). Checked on every device, so a bad one fails on the CPU too."""
    handle = getattr(stream, "cuda_stream", None)
    if stream is not None and (isinstance(handle, bool) or not isinstance(handle, int)):
        fail("stream", "None or a torch.cuda.Stream", stream, ArgumentTypeError)
    return stream


def check_int(what: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Checks that ``value`` is an integer (not a bool) in ``[low, high]`` and returns it as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(what, "an int", value, ArgumentTypeError)
    value = int(value)
    if low is not None and value < low:
        fail(what, f"an int >= {low}", value)
    if high is not None and value > high:
        fail(what, f"an int <= {high}", value)
    return value


def check_int_array(what: str, values: Any, *, low: int, high: int) -> np.ndarray:
    """Checks a 1-D array-like of integers in ``[low, high]`` and returns it as int64.

    Vectorised for integer arrays (the per-step hot path); any other input
    (bools, floats, huge Python ints, mixed types) goes through
    :func:`check_int` entry by entry, so the message names the first bad entry
    as ``what[i]`` with its true value (an unsigned 2**64 - 1 is never
    reported as -1).
    """
    if isinstance(values, np.ndarray):
        arr = values
    elif set(map(type, values)) <= INT_TYPES:
        try:
            arr = np.array(values, dtype=np.int64)
        except OverflowError:  # a Python int beyond int64: checked one by one below
            arr = np.array(values, dtype=object)
    else:
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
    if arr.dtype.kind in "iu":
        bad = (arr < low) | (arr > high)  # compared before any cast, so nothing wraps
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            check_int(f"{what}[{i}]", arr[i].item(), low=low, high=high)
        return arr.astype(np.int64, copy=False)
    items = arr.tolist()
    for i, value in enumerate(items):
        check_int(f"{what}[{i}]", value, low=low, high=high)
    return np.array(items, dtype=np.int64).reshape(arr.shape)


def int_arg(low: int, high: int | None = None):
    """An ``argparse`` type: an int >= ``low`` (and <= ``high``), with "expected X, got Y" on failure."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected an int in [{low}, {high}], got {value}")
        return value

    return parse


def int_list_arg(low: int):
    """An ``argparse`` type: a comma list of ints >= ``low`` ("8,16,32"), with "expected X, got Y" on failure."""
    import argparse

    one = int_arg(low)

    def parse(text: str) -> list[int]:
        items = [t.strip() for t in text.split(",")]
        if not text.strip() or "" in items:
            raise argparse.ArgumentTypeError(f"expected a comma list of ints >= {low} such as '8,16', got {text!r}")
        return [one(t) for t in items]

    return parse


def point_list_arg(allow_empty: bool = False):
    """An ``argparse`` type: a comma list of ``BATCHxCONTEXT`` points ("1x16384,4x16384") as ``(batch,
    context)`` pairs of ints >= 1; with ``allow_empty`` an empty text is no point (``--decode=``)."""
    import argparse

    def parse(text: str) -> list[tuple[int, int]]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected a comma list of BATCHxCONTEXT such as '1x16384,4x4096', got {text!r}")
        points = []
        for item in items:
            parts = item.lower().split("x")
            if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
                raise argparse.ArgumentTypeError(f"expected BATCHxCONTEXT with two ints >= 1 such as '4x16384', got {item!r}")
            points.append((int(parts[0]), int(parts[1])))
        return points

    return parse


#: ``argparse`` types for counts (>= 1) and sizes that may be 0.
positive_int_arg = int_arg(1)
non_negative_int_arg = int_arg(0)
#: ``argparse`` type of a TCP ``--port``.
port_arg = int_arg(0, 65535)


def _not_a_folder(path: str) -> str:
    """Why ``path`` is not a checkpoint folder ("" when it is one)."""
    import os

    if os.path.isdir(path):
        return ""
    return "a file" if os.path.exists(path) else "no such folder"


def local_dir_arg(text: str) -> str:
    """``argparse`` type of a local checkpoint or tokenizer folder (``--model``, ``--tokenizer``): it must exist,
    so that a typo is a usage error, not a Hugging Face hub lookup and its traceback."""
    import argparse

    why = _not_a_folder(text)
    if why:
        raise argparse.ArgumentTypeError(f"expected a local checkpoint folder, got {text!r} ({why})")
    return text


#: What the Hugging Face hub takes as a repo id: ``name`` or ``namespace/name``.
_REPO_ID = re.compile(r"[\w.\-]+(/[\w.\-]+)?")


def check_checkpoint_path(what: str, source: Any) -> None:
    """A model or tokenizer source that is a filesystem path (an ``os.PathLike``; a ``str`` that is absolute,
    starts with ``.`` or ``~``, names an existing file, or is no hub repo id, such as ``"runs/exp1/final"``)
    must be a folder: ``FileNotFoundError`` naming it otherwise, instead of the hub's "Repo id must be in the
    form ..." for a typo. A bare name such as ``"org/model"`` goes to ``from_pretrained`` as it is (the
    Hugging Face cache resolves it)."""
    import os

    path = os.fspath(source)
    if not isinstance(path, str):  # bytes paths
        path = os.fsdecode(path)
    expanded = os.path.expanduser(path)
    looks_like_path = (not isinstance(source, str) or os.path.isabs(expanded) or path.startswith((".", "~"))
                       or os.path.exists(expanded) or not _REPO_ID.fullmatch(path))  # fmt: skip
    why = _not_a_folder(expanded) if looks_like_path else ""
    if why:
        raise FileNotFoundError(f"{what}: expected a local checkpoint folder, got {path!r} ({why})")


def check_device(device: Any) -> Optional[torch.device]:
    """``None`` or a usable ``torch.device`` (CPU, or a CUDA device that exists here)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        fail("device", "None, a torch.device or a string such as 'cpu' or 'cuda:0'", device, ArgumentTypeError)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail("device", "'cpu' (this torch has no usable CUDA device)", str(dev))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail("device index", f"< {torch.cuda.device_count()} (CUDA devices here)", dev.index)
    elif dev.type != "cpu":
        fail("device", "'cpu' or 'cuda[:N]'", str(dev))
    return dev


def device_arg(text: str) -> torch.device:
    """``argparse`` type of the command line's ``--device``: :func:`check_device`,
    its error shown as a usage error (exit status 2), not a traceback."""
    import argparse

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):  # not check_device's message: it speaks of the Python API
        raise argparse.ArgumentTypeError(f"expected 'cpu' or 'cuda[:N]', got {text!r}")
    try:
        return check_device(dev)  # type: ignore[return-value]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device: ")) from None


def report_name_arg(text: str) -> str:
    """``argparse`` type of a report's ``--name``: a file name (the report's files are ``--out/NAME.*``),
    so a name with a path in it cannot write outside ``--out``."""
    import argparse
    import os

    if not text or text in (".", "..") or os.sep in text or (os.altsep and os.altsep in text):
        raise argparse.ArgumentTypeError(f"expected a file name without a folder (the report goes to --out), "
                                         f"got {text!r}")  # fmt: skip
    return text


def out_dir_arg(text: str) -> str:
    """``argparse`` type of the benchmarks' ``--out``: a folder that exists or is made now, and can be written,
    so that a bad path is a usage error before the run, not a traceback when the report is written."""
    import argparse
    import os

    if text:
        if os.path.exists(text) and not os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"expected a writable folder, got {text!r} (a file)")
        try:
            os.makedirs(text, exist_ok=True)
        except OSError as e:
            raise argparse.ArgumentTypeError(f"expected a writable folder, got {text!r} ({e.strerror})") from None
        if not os.access(text, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"expected a writable folder, got {text!r} (permission denied)")
    return text


def page_size_arg(text: str) -> int:
    """``argparse`` type of a host ``--page-size``: a positive multiple of the OS page size."""
    import argparse

    from torch_vkv.pool import check_host_page_size

    try:
        return check_host_page_size(positive_int_arg(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
