"""MQTT topic filter matching, without building an object per check."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FilterSet", "filters_overlap", "topic_matches"]

_CACHE_MAX = 4096  # distinct topics remembered by a FilterSet


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches the MQTT `topic_filter` (`+` one level, `#` the rest)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # wildcards at the first level never match $SYS and the like
    want = topic_filter.split("/")
    have = topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True  # also matches the parent: "a/#" matches "a"
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def filters_overlap(first: str, second: str) -> str | None:
    """A topic that both filters match, or None when there is none."""
    a, b = first.split("/"), second.split("/")
    topic: list[str] = []
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == "#" or y == "#":
            rest = (b if x == "#" else a)[i:]  # the other filter's remaining levels
            topic += ["x" if level == "+" else level for level in rest if level != "#"]
            return "/".join(topic) or "x"
        if x is None or y is None:
            return None  # one is longer, and the shorter has no "#"
        if x != y and "+" not in (x, y):
            return None
        topic.append(x if x != "+" else y if y != "+" else "x")
    return "/".join(topic)


class FilterSet:
    """A fixed set of filters; answers for a topic are remembered (topics repeat)."""

    def __init__(self, filters: Iterable[str]) -> None:
        self.filters = tuple(filters)
        self._known: dict[str, bool] = {}

    def matches(self, topic: str) -> bool:
        known = self._known.get(topic)
        if known is None:
            known = any(topic_matches(f, topic) for f in self.filters)
            if len(self._known) >= _CACHE_MAX:
                self._known.clear()
            self._known[topic] = known
        return known
