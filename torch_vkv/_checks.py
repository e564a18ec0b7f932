"""One place for input checks, so every message reads "expected X, got Y"."""

from __future__ import annotations

import numbers
from typing import Any, NoReturn


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. It is both a ``TypeError`` and a
    ``ValueError``: callers that catch either for bad input catch it."""


def fail(what: str, expected: str, got: Any, exc: type[Exception] = ValueError) -> NoReturn:
    raise exc(f"{what}: expected {expected}, got {got!r}")


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
