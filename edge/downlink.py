"""Cloud to device: down messages from the uplink, through the inbox, to local programs.

A down message is committed to the inbox before the cloud broker gets its
PUBACK, then published on the local broker (it leaves the inbox on the
local PUBACK) and streamed to socket API subscribers as it arrives. With no
local bus, a message leaves the inbox once a matching socket subscriber has
been handed it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import cbor2

from edge.api import validate_topic
from edge.envelope import load_map
from edge.errors import CborError, EnvelopeError, MessageTooLarge, RequestError, StorageError
from edge.inbox import Inbox, InboxRow
from edge.localbus import LocalBus
from edge.rejections import Rejections
from edge.subscribers import Delivery, Subscribers

__all__ = ["MAX_DOWN_BYTES", "Downlink", "parse_down"]

log = logging.getLogger("edge.downlink")

MAX_DOWN_BYTES = 1024 * 1024
_WINDOW = 20  # down messages in flight to the local broker at once
_IDLE = 1.0  # seconds between looks at waiting messages when nothing wakes the loop


def parse_down(frame: bytes) -> tuple[bytes, str, bytes | None, float | None, float | None]:
    """Decode a down envelope: (payload, ct, id, ts, exp), or EnvelopeError saying why not."""
    obj = load_map(frame, MAX_DOWN_BYTES)
    if obj.get("v") != 1 or isinstance(obj.get("v"), bool):
        raise EnvelopeError(f"envelope 'v' must be 1, got {obj.get('v')!r}")
    if "data" not in obj:
        raise EnvelopeError("envelope lacks the key 'data'")
    data = obj["data"]
    if isinstance(data, str):
        payload, default_ct = data.encode("utf-8", "surrogatepass"), "text/plain"
    elif isinstance(data, bytes):
        payload, default_ct = data, "application/octet-stream"
    else:
        try:
            payload, default_ct = bytes(cbor2.dumps(data)), "application/cbor"
        except Exception as exc:
            raise EnvelopeError(f"envelope 'data' cannot be re-encoded: {exc}") from exc
    ct = obj.get("ct", default_ct)
    if not isinstance(ct, str) or not ct or len(ct) > 255:
        raise EnvelopeError("envelope 'ct' must be a non-empty text under 256 characters")
    msg_id = obj.get("id")
    if msg_id is not None and (not isinstance(msg_id, bytes) or len(msg_id) != 16):
        raise EnvelopeError("envelope 'id' must be 16 bytes")
    return payload, ct, msg_id, _number(obj, "ts"), _number(obj, "exp")


def _number(obj: dict[Any, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < 1e12:
        raise EnvelopeError(f"envelope {key!r} must be a number of seconds since the epoch")
    return float(value)


class Downlink:
    """Store down messages, then deliver them to the local bus and socket subscribers."""

    def __init__(
        self,
        inbox: Inbox,
        local: LocalBus,
        subscribers: Subscribers,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox
        self.local = local
        self.subscribers = subscribers
        self._clock = clock
        self.received = 0
        self.delivered = 0
        self.expired = 0
        self.rejected = Rejections(log, "down message")
        self._wake = asyncio.Event()
        self._inflight: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def snapshot(self) -> dict[str, Any]:
        return {
            "received": self.received, "delivered": self.delivered, "pending": len(self.inbox),
            "expired": self.expired, "dropped": self.inbox.dropped,
            "rejected": dict(self.rejected.counts), "subscribers": len(self.subscribers),
        }

    def wake(self) -> None:
        """Look at the inbox again now (a subscriber came, the local broker is back)."""
        self._wake.set()

    # ---- from the uplink ---------------------------------------------------------

    def receive(self, local_topic: str, frame: bytes) -> asyncio.Future[None] | None:
        """Take one down message; the future resolves once it is stored (then PUBACK it).

        None means it was rejected: acknowledge it anyway, so the broker does not
        send it again and again.
        """
        try:
            topic = validate_topic(local_topic)
            payload, ct, msg_id, ts, exp = parse_down(frame)
        except RequestError as exc:
            why = "no local topic after down/" if not local_topic else str(exc)
            self.rejected("bad_topic", f"down/{local_topic}: {why}")
            return None
        except MessageTooLarge as exc:
            self.rejected("too_large", f"down/{local_topic}: {exc}")
            return None
        except CborError as exc:
            self.rejected(exc.kind, f"down/{local_topic}: {exc}")  # cbor_depth, cbor_tag, ...
            return None
        except EnvelopeError as exc:
            self.rejected("bad_envelope", f"down/{local_topic}: {exc}")
            return None
        if exp is not None and exp <= self._clock():
            self.expired += 1
            return None
        return asyncio.ensure_future(self._store(topic, payload, ct, msg_id, ts, exp))

    async def _store(
        self, topic: str, payload: bytes, ct: str, msg_id: bytes | None, ts: float | None,
        exp: float | None,
    ) -> None:
        try:
            row = await self.inbox.add(topic, payload, ct, msg_id, ts, exp)
        except StorageError as exc:
            self.rejected("storage_error", str(exc))
            raise
        self.received += 1
        taken = self.subscribers.offer(_delivery(row))
        if taken and not self.local.enabled:
            await self.inbox.remove([row.key])
            self.delivered += 1
        self._wake.set()

    # ---- delivery ------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver what the inbox holds, for as long as the agent runs."""
        try:
            while True:
                self._wake.clear()
                await self._deliver_round()
                # Messages waiting (a publish that failed, an expiry to come) are looked
                # at again each second; an empty inbox waits for news.
                try:
                    async with asyncio.timeout(_IDLE if len(self.inbox) else None):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for task in self._tasks:
                task.cancel()

    async def _deliver_round(self) -> None:
        now = self._clock()
        expired = [r.key for r in self.inbox.pending()
                   if r.exp is not None and r.exp <= now and r.key not in self._inflight]
        if expired:
            await self._remove(expired)
            self.expired += len(expired)
        if not self.local.enabled:
            handed = [r.key for r in self.inbox.pending() if self.subscribers.offer(_delivery(r))]
            if handed:
                await self._remove(handed)
                self.delivered += len(handed)
            return
        if not self.local.online.is_set():
            return
        for row in self.inbox.pending():
            if len(self._inflight) >= _WINDOW:
                break
            if row.key in self._inflight:
                continue
            self._inflight.add(row.key)
            task = asyncio.create_task(self._to_local(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _to_local(self, row: InboxRow) -> None:
        try:
            expiry = None if row.exp is None else max(1.0, row.exp - self._clock())
            result = await self.local.publish(row.topic, row.payload, row.ct, expiry)
            if result.ok:
                await self._remove([row.key])
                self.delivered += 1
                self._wake.set()
            else:
                log.debug("down message for %s not delivered yet: %s", row.topic, result.reason)
        finally:
            self._inflight.discard(row.key)

    async def _remove(self, keys: list[int]) -> None:
        try:
            await self.inbox.remove(keys)
        except StorageError as exc:
            # Delivered but still stored: it goes out again later (at least once).
            self.rejected("storage_error", str(exc))


def _delivery(row: InboxRow) -> Delivery:
    return Delivery(row.topic, row.payload, row.ct, row.id, row.ts)
