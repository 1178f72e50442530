"""Capped, jittered exponential backoff: a pure schedule, no sleeping."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays that double from `initial` up to `cap`, with "full jitter" on each."""

    def __init__(
        self, initial: float, cap: float, *, rand: Callable[[], float] = random.random
    ) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"backoff needs 0 < initial <= cap, got {initial} and {cap}")
        self.initial = initial
        self.cap = cap
        self._rand = rand
        self._attempt = 0

    def next(self) -> float:
        """The delay before the next attempt; each call widens the window."""
        ceiling = min(self.cap, self.initial * (2 ** min(self._attempt, 32)))
        self._attempt += 1
        # Never below half the ceiling, so a fleet spreads out but no one hammers.
        return float(ceiling / 2 + self._rand() * ceiling / 2)

    def reset(self) -> None:
        """Start again from `initial` (after a connection that worked)."""
        self._attempt = 0
