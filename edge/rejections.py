"""Counted rejections of outside input, logged at most once a minute per kind."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Rejections"]


class Rejections:
    """Counts by kind; the first of a kind and then one a minute reach the log."""

    def __init__(
        self, log: logging.Logger, what: str, *, every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._what = what
        self._every = every
        self._clock = clock
        self.counts: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self._since_log: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> None:
        """Count one rejection of `kind`, and log it unless one was logged lately."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._since_log[kind] = self._since_log.get(kind, 0) + 1
        now = self._clock()
        if now - self._logged_at.get(kind, -1e18) >= self._every:
            more = self._since_log[kind] - 1
            extra = f" ({more} more since the last report)" if more else ""
            self._log.warning("%s rejected (%s): %s%s", self._what, kind, message, extra)
            self._logged_at[kind] = now
            self._since_log[kind] = 0

    @property
    def total(self) -> int:
        """All rejections of every kind."""
        return sum(self.counts.values())
