"""Socket API subscribers: live streams of down messages by MQTT topic filter."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

from edge.config import is_topic_filter
from edge.errors import RequestError
from edge.topics import topic_matches

__all__ = ["Delivery", "Subscribers", "Subscription", "validate_filter"]

_QUEUE = 1000  # lines a subscriber may fall behind before it loses messages
_MAX_FILTER = 1024


@dataclass(frozen=True, slots=True)
class Delivery:
    """A down message as local programs get it."""

    topic: str  # the local topic
    payload: bytes
    ct: str
    id: bytes | None
    ts: float | None

    def line(self) -> dict[str, Any]:
        """The socket API's stream line for it: text as `data`, anything else `data_b64`."""
        out: dict[str, Any] = {"event": "message", "topic": self.topic, "ct": self.ct}
        text = _as_text(self.payload) if self.ct.startswith("text/") else None
        if text is not None:
            out["data"] = text
        else:
            out["data_b64"] = base64.b64encode(self.payload).decode()
        out["id"] = None if self.id is None else self.id.hex()
        out["ts"] = self.ts
        return out


def _as_text(payload: bytes) -> str | None:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return None


def validate_filter(value: object) -> str:
    """An MQTT topic filter as `subscribe` accepts it, or RequestError saying why not."""
    if not isinstance(value, str) or not value or len(value) > _MAX_FILTER:
        raise RequestError(
            "bad_request", f"'filter' must be an MQTT topic filter of 1 to {_MAX_FILTER} characters"
        )
    if not is_topic_filter(value):
        raise RequestError(
                "bad_request", f"'filter' {value!r}: '+' must fill a whole level and '#' must"
                " be the whole last level"
            )
    return value


class Subscription:
    """One listener: async iteration gives its stream lines; `close` when done."""

    def __init__(self, topic_filter: str, subs: list[Subscription]) -> None:
        self.filter = topic_filter
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(_QUEUE)
        self.dropped = 0
        self._subs: list[Subscription] | None = subs

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._subs is None:
            raise StopAsyncIteration
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            return {"event": "dropped", "count": dropped}
        return (await self.queue.get()).line()

    def close(self) -> None:
        """Stop listening (idempotent)."""
        if self._subs is not None:
            self._subs.remove(self)
            self._subs = None


class Subscribers:
    """Everyone listening on the socket API; `offer` hands a message to the matching ones."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []

    def __len__(self) -> int:
        return len(self._subs)

    def offer(self, message: Delivery) -> int:
        """Queue the message for each matching subscriber; returns how many took it."""
        taken = 0
        for sub in self._subs:
            if not topic_matches(sub.filter, message.topic):
                continue
            try:
                sub.queue.put_nowait(message)
                taken += 1
            except asyncio.QueueFull:
                sub.dropped += 1
        return taken


    def subscribe(self, topic_filter: str) -> Subscription:
        """Start listening to `topic_filter` now; iterate the result for the lines."""
        sub = Subscription(topic_filter, self._subs)
        self._subs.append(sub)
        return sub
