"""Accept and send rates over a sliding window, for `edge status`."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

__all__ = ["RateMeter"]


class _Counts(Protocol):
    accepted_total: int
    sent_total: int


class RateMeter:
    """Messages per second in and out, averaged over the last `window` seconds."""

    def __init__(self, window: float = 10.0, tick: float = 1.0) -> None:
        self.window = window
        self.tick = tick
        self._samples: deque[tuple[float, int, int]] = deque()
        self.rate_in = 0.0
        self.rate_out = 0.0

    def add(self, now: float, accepted: int, sent: int) -> None:
        """Record the running totals at `now` (monotonic seconds)."""
        self._samples.append((now, accepted, sent))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        t0, a0, s0 = self._samples[0]
        span = now - t0
        if span > 0:
            self.rate_in = (accepted - a0) / span
            self.rate_out = (sent - s0) / span

    async def run(self, source: _Counts) -> None:
        """Sample `source` every tick until cancelled."""
        while True:
            self.add(time.monotonic(), source.accepted_total, source.sent_total)
            await asyncio.sleep(self.tick)
