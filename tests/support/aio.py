"""Waiting on the event loop in tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

__all__ = ["until"]


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "it") -> None:
    """Poll `predicate` on the loop until it holds; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)
