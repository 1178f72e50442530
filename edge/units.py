"""Sizes ("256MiB") and durations ("30s") as people write them in config files."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

__all__ = ["integer_in", "parse_duration", "parse_size", "show"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_QUANTITY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")

_SIZE_EXPECTED = 'expected a size like "256MiB"'
_DURATION_EXPECTED = 'expected a duration like "30s"'


def integer_in(low: int, high: int) -> Callable[[Any], int]:
    """A parser for a whole number from `low` to `high` (true and false are not numbers)."""

    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {show(value)}")
        return value

    return parse


def parse_size(text: str | int) -> int:
    """Return the number of bytes in `text` ("256MiB", "10MB", "4096"); an int is bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if isinstance(text, str):
        match = _QUANTITY.fullmatch(text)
        if match and match[2].lower() in _SIZE_UNITS:
            size = float(match[1]) * _SIZE_UNITS[match[2].lower()]
            if math.isfinite(size):  # "9999...9GiB" is inf, which no int holds
                return round(size)
    raise ValueError(f"{_SIZE_EXPECTED}, got {show(text)}")


def parse_duration(text: str | float) -> float:
    """Return the seconds in `text` ("30s", "500ms", "7d"); a number is seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if math.isfinite(text) and text >= 0:
            return float(text)
    elif isinstance(text, str):
        match = _QUANTITY.fullmatch(text)
        # A bare number string is refused: "30" could mean seconds or milliseconds.
        if match and match[2] in _DURATION_UNITS:
            seconds = float(match[1]) * _DURATION_UNITS[match[2]]
            if math.isfinite(seconds):
                return seconds
    raise ValueError(f"{_DURATION_EXPECTED}, got {show(text)}")


def show(value: object) -> str:
    """A value for an error message: JSON-quoted, on one line."""
    # JSON quoting keeps a message on one line even when the value holds a newline.
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):  # keys JSON cannot have; a deep value
        return repr(value)[:200]
