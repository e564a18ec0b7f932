"""One place for input checks, so every message reads "expected X, got Y"."""

from __future__ import annotations

from typing import Any, NoReturn


def fail(what: str, expected: str, got: Any, exc: type[Exception] = ValueError) -> NoReturn:
    raise exc(f"{what}: expected {expected}, got {got!r}")


def check_int(what: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Checks that ``value`` is an int (not bool) in ``[low, high]`` and returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numbers

            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            fail(what, "an int", value, TypeError)
    if low is not None and value < low:
        fail(what, f"an int >= {low}", value)
    if high is not None and value > high:
        fail(what, f"an int <= {high}", value)
    return value
