"""A node's health as the registry sees it: a pure function of what it stored and the time."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["HEALTHS", "HealthPolicy", "classify"]

HEALTHS = ("offline", "stale", "online-backlogged", "healthy")


@dataclass(frozen=True)
class HealthPolicy:
    """When an online node counts as stale or backlogged (`--stale-after`, `--backlog-*`)."""

    stale_after: float = 3.0          # heartbeats without a word
    backlog_depth: int = 10_000       # queued messages
    backlog_age: float = 3600.0       # seconds, the oldest queued message
    default_heartbeat: float = 60.0   # for a status that does not say its heartbeat

    def __post_init__(self) -> None:
        for name in ("stale_after", "backlog_age", "default_heartbeat"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a number above 0, got {value!r}")
        if isinstance(self.backlog_depth, bool) or not isinstance(self.backlog_depth, int) \
                or self.backlog_depth < 0:
            raise ValueError(f"backlog_depth: expected an integer from 0, got"
                             f" {self.backlog_depth!r}")


def classify(
    *,
    online: bool | None,
    last_seen: float | None,
    heartbeat: float | None,
    queue_depth: int | None,
    oldest_age: float | None,
    now: float,
    policy: HealthPolicy,
) -> str:
    """offline, stale, online-backlogged or healthy (see docs/registry.md, Health)."""
    if not online:
        return "offline"  # no status yet counts as offline too
    beat = heartbeat if heartbeat is not None and heartbeat > 0 else policy.default_heartbeat
    if last_seen is None or now - last_seen > policy.stale_after * beat:
        return "stale"
    if (queue_depth is not None and queue_depth > policy.backlog_depth) or \
            (oldest_age is not None and oldest_age > policy.backlog_age):
        return "online-backlogged"
    return "healthy"
