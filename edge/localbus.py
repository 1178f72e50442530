"""The local bus: the device's own MQTT broker, bridged durably to the outbox.

Up: the agent subscribes to `[local] forward` with QoS 1 on a persistent
session and acknowledges each message only once the outbox has committed
it, so the local broker keeps (and later resends) whatever is not yet safe.
When the outbox will not take a message (`on_full = "reject"`, or storage
failing) the message is held unacknowledged and tried again: the broker
stops sending once `inflight` messages wait for their PUBACK, which is the
back-pressure.

Down: `publish` puts messages from the cloud on the local broker. They must
never come back up: MQTT 5 subscriptions say *no local*; over 3.1.1 the
agent remembers what it published for a while and skips it when it returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from edge.api import validate_topic
from edge.backoff import Backoff, reconnect_forever
from edge.config import parse_mqtt_url
from edge.errors import EnvelopeError, MessageTooLarge, RequestError, StorageError, UplinkError
from edge.mqtt import Inbound, MqttConnection, PublishResult
from edge.outbox import Outbox
from edge.rejections import Rejections
from edge.settings import LocalSettings
from edge.topics import FilterSet

__all__ = ["LocalBus", "LocalState"]

log = logging.getLogger("edge.localbus")

_RETRY = 1.0  # seconds between attempts to store a held message
_OWN_ECHO = 30.0  # seconds a message we published may take to come back (MQTT 3.1.1)
_OWN_MAX = 10_000  # remembered own messages at most


@dataclass(frozen=True, slots=True)
class LocalState:
    """What `edge status` shows of the local bus."""

    state: str  # "online" / "offline" / "disabled"
    since: float
    url: str
    connects: int
    last_error: str | None
    forwarded: int
    held: int
    rejected: dict[str, int]


class LocalBus:
    """Subscribe to the local broker and feed the outbox; publish down messages on it."""

    def __init__(
        self,
        settings: LocalSettings,
        node: str,
        outbox: Outbox,
        *,
        state_path: Path | None = None,
        cloud_prefix: str = "edge/v1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        # The filters subscribed last time: a persistent session keeps them, so ones
        # taken out of [local] forward since must be unsubscribed.
        self.state_path = state_path
        self.outbox = outbox
        self.client_id = settings.client_id or f"edge-agent-{node}"
        self.v5 = settings.protocol == "5"
        self._forward = FilterSet(settings.forward)
        # Never forward what looks like the agent's own cloud traffic (a loop).
        self._cloud_topics = f"{cloud_prefix}/nodes/"
        self._resumed = False  # the broker kept our session at this connection
        self._clock = clock
        self._state = "offline" if settings.url else "disabled"
        self._since = clock()
        self._connects = 0
        self._last_error: str | None = None
        self._conn: MqttConnection | None = None
        self.online = asyncio.Event()
        self.forwarded = 0
        self.rejected = Rejections(log, "local message")
        self._held: deque[tuple[MqttConnection, Inbound]] = deque()
        self._retry: asyncio.TimerHandle | None = None
        self._own: dict[tuple[str, bytes], deque[float]] = {}
        self._own_count = 0
        self._stopping = False
        self._closing = False
        self._committing = 0  # messages handed to the outbox, not yet committed
        self._all_committed = asyncio.Event()
        self._all_committed.set()
        self.on_online: Callable[[], None] | None = None  # told when the broker is back

    @property
    def enabled(self) -> bool:
        return bool(self.settings.url)

    def snapshot(self) -> LocalState:
        return LocalState(
            self._state, self._since, self.settings.url, self._connects, self._last_error,
            self.forwarded, len(self._held), dict(self.rejected.counts),
        )

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self._since = self._clock()

    # ---- the connection loop -----------------------------------------------------

    async def run(self) -> None:
        """Connect, forward, and reconnect with backoff, until cancelled."""
        if not self.enabled:
            await asyncio.Event().wait()
        _, host, port = parse_mqtt_url(self.settings.url)
        await reconnect_forever(
            partial(self._session, host, port),
            Backoff(self.settings.backoff_initial, self.settings.backoff_max),
            failed=self._note_error, ended=self._session_ended,
            stopping=lambda: self._stopping, stable_after=max(self.settings.keepalive, 10.0),
            what="local bus",
        )

    def _session_ended(self) -> None:
        self._conn = None
        self.online.clear()
        self._set_state("offline")
        self._held.clear()  # not acknowledged: the broker sends them again

    def _note_error(self, message: str) -> None:
        if self._stopping:
            return  # our own goodbye
        if message != self._last_error:
            log.warning("local broker %s: %s", self.settings.url, message)
        self._last_error = message

    async def _session(self, host: str, port: int) -> None:
        conn: MqttConnection

        def deliver(message: Inbound) -> None:
            self._on_message(conn, message)

        conn = MqttConnection(
            host=host, port=port, client_id=self.client_id, keepalive=self.settings.keepalive,
            v5=self.v5, session_expiry=self.settings.session_expiry,
            max_inflight=self.settings.inflight, connect_timeout=self.settings.connect_timeout,
            receive_maximum=self.settings.inflight, on_message=deliver,
        )
        await self._end_former_sessions(host, port)
        connack = await conn.connect(self.settings.connect_timeout)
        self._resumed = connack.session_present
        try:
            await self._subscribe(conn, connack.session_present)
        except UplinkError:
            conn.abort()
            raise
        self._conn = conn
        self._connects += 1
        self._last_error = None
        self._set_state("online")
        self.online.set()
        if self.on_online is not None:
            self.on_online()
        log.info("local broker online: %s as %s (session present: %s), forwarding %s",
                 self.settings.url, self.client_id, connack.session_present,
                 ", ".join(self.settings.forward))
        closed = await asyncio.shield(conn.closed)  # a cancel must not mark it closed
        raise UplinkError(closed.reason)

    async def _subscribe(self, conn: MqttConnection, resumed: bool) -> None:
        """Subscribe to `forward`, first dropping what a kept session holds from before.

        The broker keeps a session's subscriptions, with the options they were made
        with: filters since taken out of `forward` are unsubscribed, and after a
        change of protocol (MQTT 5 *no local* or not) every one is made afresh.
        """
        sessions = self._read_sessions()
        before = sessions.get(self.client_id)
        forward = list(self.settings.forward)
        old = [f for f in before.get("filters", []) if isinstance(f, str)] if before else []
        same_protocol = before is not None and before.get("protocol") == self.settings.protocol
        timeout = self.settings.connect_timeout
        if resumed and not same_protocol:
            # Options of a kept subscription are not changed by subscribing again: drop
            # and make each one afresh, the two packets back to back so that the broker
            # has no subscription for as short a time as possible.
            stale = sorted({*old, *forward})
            log.info("local broker: subscriptions made afresh for protocol %s: %s",
                     self.settings.protocol, ", ".join(stale))
            dropping = asyncio.ensure_future(conn.unsubscribe(stale, timeout=timeout))
            await asyncio.sleep(0)  # the UNSUBSCRIBE goes out first, the SUBSCRIBE right after
            await self._subscribe_forward(conn, forward)
            await dropping
        else:
            # New filters first, then the ones left out: no moment without a subscription.
            await self._subscribe_forward(conn, forward)
            stale = sorted(set(old) - set(forward)) if resumed else []
            if stale:
                log.info("local broker: unsubscribing from %s (no longer in [local] forward)",
                         ", ".join(stale))
                await conn.unsubscribe(stale, timeout=timeout)
        now = {"protocol": self.settings.protocol, "filters": forward}
        if before != now:
            sessions[self.client_id] = now
            self._write_sessions(sessions)

    async def _end_former_sessions(self, host: str, port: int) -> None:
        """End the broker's sessions of client ids this agent used before.

        A kept session goes on queueing every message its filters match, for nobody,
        until it expires: memory on the broker, and a flood of old messages forwarded
        again should that client id ever come back.
        """
        sessions = self._read_sessions()
        former = [cid for cid in sessions if cid != self.client_id]
        for cid in former:
            goodbye = MqttConnection(
                host=host, port=port, client_id=cid, keepalive=self.settings.keepalive,
                v5=self.v5, session_expiry=0, clean=True,
                connect_timeout=self.settings.connect_timeout,
            )
            await goodbye.connect(self.settings.connect_timeout)  # a clean start ends it
            await goodbye.disconnect()
            log.warning("local broker: ended the session of the former client id %r"
                        " ([local] client_id changed); what it still held is dropped", cid)
            del sessions[cid]
        if former:
            self._write_sessions(sessions)

    async def _subscribe_forward(self, conn: MqttConnection, forward: list[str]) -> None:
        if forward:
            await conn.subscribe(forward, no_local=True, retain_once=True,
                                 timeout=self.settings.connect_timeout)

    def _read_sessions(self) -> dict[str, dict[str, Any]]:
        """What the agent subscribed to last time, by client id (local-session.json)."""
        if self.state_path is None:
            return {}
        try:
            record = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        sessions = record.get("sessions") if isinstance(record, dict) else None
        if not isinstance(sessions, dict):
            return {}
        return {k: v for k, v in sessions.items() if isinstance(k, str) and isinstance(v, dict)}

    def _write_sessions(self, sessions: dict[str, dict[str, Any]]) -> None:
        if self.state_path is None:
            return
        try:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"sessions": sessions}) + "\n")
            tmp.replace(self.state_path)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state_path, exc.strerror)

    # ---- up: local messages into the outbox -----------------------------------------

    def _on_message(self, conn: MqttConnection, message: Inbound) -> None:
        if self._closing:
            return  # not acknowledged: the broker sends it again at the next start
        skip = None
        if not self._forward.matches(message.topic):
            skip = "outside_forward"  # a subscription another config left in the session
        elif message.topic.startswith(self._cloud_topics):
            skip = "agent_topic"  # the cloud's own topics: the uplink broker is this one?
        elif not self.v5 and (message.retain and self._resumed):
            conn.ack(message)  # 3.1.1 resends retained messages at every subscription
            return
        elif not self.v5 and self._is_own(message):
            conn.ack(message)
            return
        if skip is not None:
            self.rejected(skip, f"{message.topic!r}: not forwarded")
            conn.ack(message)
            return
        if self._held or not self._offer(conn, message):
            self._hold(conn, message)

    def _offer(self, conn: MqttConnection, message: Inbound) -> bool:
        """Hand one message to the outbox; False when it must wait (not acknowledged)."""
        try:
            topic = validate_topic(message.topic)
            ct = message.content_type or "application/octet-stream"
            _, committed = self.outbox.submit(topic, message.payload, ct, 0, message.expiry)
        except StorageError:
            return False  # full under on_full = "reject", or storage failing: hold it
        except (RequestError, EnvelopeError) as exc:
            # It can never be stored: acknowledged, so the broker does not resend it forever.
            kind = "too_large" if isinstance(exc, MessageTooLarge) else "bad_topic"
            self.rejected(kind, f"{message.topic!r}: {exc}")
            conn.ack(message)
            return True

        self._committing += 1
        self._all_committed.clear()

        def settled(fut: asyncio.Future[None]) -> None:
            self._committing -= 1
            if not self._committing:
                self._all_committed.set()
            if fut.cancelled() or fut.exception() is not None:
                self._hold(conn, message, front=True)  # the commit failed: try again
                return
            self.forwarded += 1
            conn.ack(message)

        committed.add_done_callback(settled)
        return True

    def _hold(self, conn: MqttConnection, message: Inbound, *, front: bool = False) -> None:
        if conn.closed.done():
            return  # that link is gone; the broker sends the message again on the next
        if front:
            self._held.appendleft((conn, message))
        else:
            self._held.append((conn, message))
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(_RETRY, self._drain_held)

    def _drain_held(self) -> None:
        self._retry = None
        while self._held:
            conn, message = self._held[0]
            if conn.closed.done():
                self._held.popleft()
                continue
            if not self._offer(conn, message):
                self._retry = asyncio.get_running_loop().call_later(_RETRY, self._drain_held)
                return
            self._held.popleft()

    # ---- down: cloud messages onto the local broker ---------------------------------

    async def publish(
        self, topic: str, payload: bytes, ct: str, expiry: float | None
    ) -> PublishResult:
        """Publish with QoS 1 on the local broker; the result says whether it got a PUBACK."""
        conn = self._conn
        if conn is None or conn.closed.done():
            return PublishResult(False, "the local broker is offline")
        if not self.v5 and self._forward.matches(topic):
            self._remember_own(topic, payload)  # it will come back to us: skip it then
        fut = conn.publish(topic, payload, content_type=ct, expiry=expiry)
        either: list[asyncio.Future[Any]] = [fut, conn.closed]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if fut.done():
            return fut.result()
        fut.cancel()
        return PublishResult(False, "the local broker connection closed")

    @staticmethod
    def _key(topic: str, payload: bytes) -> tuple[str, bytes]:
        return topic, hashlib.blake2b(payload, digest_size=16).digest()

    def _remember_own(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        if self._own_count >= _OWN_MAX:
            self._prune_own(now)
        self._own.setdefault(self._key(topic, payload), deque()).append(now)
        self._own_count += 1

    def _prune_own(self, now: float) -> None:
        for key in list(self._own):
            self._take_own(key, now, expired_only=True)
        while self._own_count >= _OWN_MAX and self._own:
            self._take_own(next(iter(self._own)), now)

    def _take_own(self, key: tuple[str, bytes], now: float, *, expired_only: bool = False) -> bool:
        """Drop expired copies of `key`, then take one live copy; True if one was taken."""
        times = self._own.get(key)
        if times is None:
            return False
        while times and now - times[0] > _OWN_ECHO:
            times.popleft()
            self._own_count -= 1
        taken = bool(times) and not expired_only
        if taken:
            times.popleft()
            self._own_count -= 1
        if not times:
            del self._own[key]
        return taken

    def _is_own(self, message: Inbound) -> bool:
        return self._take_own(self._key(message.topic, message.payload), time.monotonic())

    # ---- shutdown ----------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly; unacknowledged messages stay with the local broker."""
        self._stopping = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        conn = self._conn
        if conn is not None:
            # Acknowledge what is being committed before saying goodbye, or the broker
            # sends it again at the next start and it would be forwarded twice.
            self._closing = True  # messages from now on are left unacknowledged
            try:
                async with asyncio.timeout(timeout):
                    await self._all_committed.wait()
            except TimeoutError:
                log.warning("local broker: %d message(s) not committed in %.0fs; the broker"
                            " sends them again at the next start", self._committing, timeout)
            await conn.disconnect(timeout)
