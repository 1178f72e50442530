"""Figures as people read them in tables: ages and sizes."""

from __future__ import annotations

import math

__all__ = ["age", "size"]


def age(seconds: float | None) -> str:
    """`42s`, `5m`, `3.5h`, `2.0d`; `-` for None or a value that is not a number."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(seconds, 0.0)  # a clock a little behind is "now", not "-3s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def size(n: int) -> str:
    """`512B`, `1.5KiB`, `256.0MiB`, `2.0GiB`."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"
