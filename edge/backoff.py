"""Capped, jittered exponential backoff (a pure schedule), and a reconnect loop using it."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from edge.errors import UplinkError

__all__ = ["Backoff", "reconnect_forever"]

log = logging.getLogger("edge.backoff")


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


async def reconnect_forever(
    session: Callable[[], Awaitable[None]],
    backoff: Backoff,
    *,
    failed: Callable[[str], None],
    ended: Callable[[], None],
    stopping: Callable[[], bool],
    stable_after: float,
    what: str,
) -> None:
    """Run `session` again and again, `backoff` apart, until `stopping()` says so.

    A session ends by raising: UplinkError with its reason, or anything else
    (a bug, a surprise from paho), which is logged and must not end the loop.
    A session that lasted `stable_after` seconds starts the backoff afresh.
    """
    while not stopping():
        started = time.monotonic()
        try:
            await session()
        except UplinkError as exc:
            failed(str(exc))
        except Exception as exc:
            log.exception("%s session failed unexpectedly", what)
            failed(f"internal error: {exc!r}")
        finally:
            ended()
        if time.monotonic() - started > stable_after:
            backoff.reset()
        await asyncio.sleep(backoff.next())
