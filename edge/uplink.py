"""The uplink: moves rows from the outbox to the cloud broker, at least once.

It owns the connection's lifetime (reconnect with backoff, keepalive
watchdog, retained status and Last Will) and decides when a row may leave
the outbox: only after the broker's PUBACK for it. At most `inflight` rows
are unacknowledged (or acknowledged but not yet deleted) at any time, which
also bounds the duplicates a crash can cause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import cbor2

from edge.backoff import Backoff, reconnect_forever
from edge.config import parse_mqtt_url
from edge.downlink import MAX_DOWN_BYTES
from edge.errors import UplinkError
from edge.mqtt import Closed, Inbound, MqttConnection, PublishResult, publish_packet_size
from edge.outbox import Outbox, OutRow, QueueStats
from edge.settings import UplinkSettings
from edge.tls import Login, TlsFiles

__all__ = ["Uplink", "UplinkState"]

log = logging.getLogger("edge.uplink")

# MQTT 5 DISCONNECT reasons that blame the packet just received, not the session.
_REFUSES_MESSAGE = {
    0x81: "malformed packet",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x99: "payload format invalid",
}
_PACKET_OVERHEAD = 64 * 1024  # a PUBLISH's header, topic and properties, generously
_STRIKE_WINDOW = 5.0  # seconds: a drop later than this after sending is not the message's fault
# Another client with our client id: the broker closes each connection soon after CONNACK.
_CLONE_EARLY = 30.0  # seconds after CONNACK: a close by the broker sooner than this is "early"
_CLONE_WINDOW = 120.0  # seconds over which early closes are counted
_CLONE_CLOSES = 3  # early closes within the window that make the diagnosis


@dataclass(frozen=True, slots=True)
class UplinkState:
    """What `edge status` shows of the uplink."""

    state: str  # "online" / "offline"
    since: float
    url: str
    connects: int
    last_error: str | None
    inflight: int


class Uplink:
    """Forward the outbox to `[uplink] url`, reconnecting for as long as it runs."""

    def __init__(
        self,
        settings: UplinkSettings,
        node: str,
        outbox: Outbox,
        *,
        boot: float,
        clock: Callable[[], float] = time.time,
        on_down: Callable[[str, bytes], asyncio.Future[None] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_down = on_down  # takes (local topic, payload); the future: stored, PUBACK it
        # Takes a desired document's payload; the future: persisted (or refused), PUBACK it.
        self.on_desired: Callable[[bytes], asyncio.Future[None] | None] | None = None
        self.on_online: Callable[[], None] | None = None  # each time a connection is up
        self.node = node
        self.outbox = outbox
        self.boot = boot
        self.bootn: int | None = None  # the boot number (edge/bootcount.py), set before run()
        self._clock = clock
        self.base = f"{settings.prefix}/nodes/{node}"
        self._state = "offline"
        self._since = clock()
        self._connects = 0
        self._last_error: str | None = None if settings.url else "no uplink configured"
        self._conn: MqttConnection | None = None
        self._busy = 0  # window slots in use: unacknowledged, or acknowledged but not deleted
        self._slot_free = asyncio.Event()
        self._held: dict[int, OutRow] = {}  # leased rows not yet acknowledged
        self._sent_at: dict[int, float] = {}  # row key -> monotonic time it was published
        self._strikes: dict[int, int] = {}  # row key -> connections that died on it
        self._stopping = False
        self._ack_batch: list[OutRow] = []
        self._early_closes: deque[float] = deque()  # monotonic times of early closes
        self._clone: str | None = None  # the diagnosis while the pattern lasts
        self.down_error: str | None = None  # why the down/# subscription failed, if it did

    # ---- state for status ---------------------------------------------------

    def snapshot(self) -> UplinkState:
        """The current connection state."""
        return UplinkState(
            self._state, self._since, self.settings.url, self._connects, self._last_error,
            len(self._held),
        )

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self._since = self._clock()

    def _status_payload(self, state: str, conn: int, queue: QueueStats | None = None) -> bytes:
        doc: dict[str, object] = {
            "state": state, "ts": self._clock(), "boot": self.boot, "conn": conn,
            "heartbeat": self.settings.heartbeat,
        }
        if self.bootn is not None:  # what the registry orders by; boot is for people
            doc["bootn"] = self.bootn
        if queue is not None:
            doc["queue"] = {"depth": queue.depth, "oldest_age": queue.oldest_age}
        return bytes(cbor2.dumps(doc))

    async def _online_status(self) -> bytes:
        try:
            queue: QueueStats | None = await self.outbox.stats()
        except Exception:  # a failing database must not keep the node from saying it is up
            queue = None
        return self._status_payload("online", self._connects, queue)

    def publish_retained(self, suffix: str, payload: bytes) -> bool:
        """Publish `{base}/{suffix}` retained (QoS 1) if online; False when offline."""
        conn = self._conn
        if conn is None or conn.closed.done():
            return False
        conn.publish(f"{self.base}/{suffix}", payload, retain=True)
        return True

    # ---- the connection loop -----------------------------------------------------

    async def run(self) -> None:
        """Connect, forward, and reconnect with backoff, until cancelled."""
        if not self.settings.url:
            log.info("no [uplink] url: messages are kept in the outbox")
            await asyncio.Event().wait()
        scheme, host, port = parse_mqtt_url(self.settings.url)
        s = self.settings
        tls = None
        if scheme == "mqtts":
            tls = TlsFiles(s.ca_file, s.cert_file, s.key_file, s.tls_verify)
            if not s.tls_verify:
                log.warning("uplink %s: tls_verify = false: the broker's certificate is not"
                            " checked, anyone on the path can pose as the broker", s.url)
        login = Login(s.username, s.password_file) if s.username else None
        await reconnect_forever(
            partial(self._session, host, port, tls, login),
            Backoff(self.settings.backoff_initial, self.settings.backoff_max),
            failed=self._session_failed, ended=self._session_ended,
            stopping=lambda: self._stopping, stable_after=max(self.settings.keepalive, 10.0),
            what="uplink",
        )

    def _session_failed(self, message: str) -> None:
        if self._clone is not None and message == self._clone:
            self._last_error = self._clone  # said once already
        else:
            self._note_error(message)

    def _session_ended(self) -> None:
        self._conn = None
        self._set_state("offline")
        self._abandon_held()

    def _note_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("uplink %s: %s", self.settings.url, message)
        self._last_error = message

    async def _session(
        self, host: str, port: int, tls: TlsFiles | None, login: Login | None
    ) -> None:
        v5 = self.settings.protocol == "5"
        conn: MqttConnection

        def down(message: Inbound) -> None:
            self._on_down(conn, message)

        conn = MqttConnection(
            host=host, port=port, client_id=self.node, keepalive=self.settings.keepalive,
            v5=v5, session_expiry=self.settings.session_expiry,
            # The Will carries the number this connection will have once it is up.
            will=(f"{self.base}/status", self._status_payload("offline", self._connects + 1)),
            max_inflight=self.settings.inflight + 4,
            connect_timeout=self.settings.connect_timeout,
            on_message=down, tls=tls, login=login,
            # Larger down messages are refused anyway: better the broker never sends them
            # than paho buffers one whole first.
            max_packet_size=MAX_DOWN_BYTES + _PACKET_OVERHEAD,
        )
        connack = await conn.connect(self.settings.connect_timeout)
        self._conn = conn
        self._connects += 1
        self._busy = 0  # the old connection's slots died with it
        self._set_state("online")
        online_at = time.monotonic()
        if self._clone is None:
            self._last_error = None
        log.info("uplink online: %s (session present: %s)", self.settings.url,
                 connack.session_present)
        status = conn.publish(f"{self.base}/status", await self._online_status(), retain=True)
        if self.on_online is not None:
            self.on_online()
        async with asyncio.TaskGroup() as tg:
            wire = self.settings.inflight
            if connack.receive_maximum is not None:
                # MQTT 5: the broker may refuse more; keep one slot for status publishes.
                wire = max(1, min(wire, connack.receive_maximum - 1))
            if wire < self.settings.inflight:
                log.info("broker takes %d messages in flight at most (inflight %d): the rest"
                         " of the window covers acknowledged rows being deleted",
                         wire, self.settings.inflight)
            pump = tg.create_task(self._pump(conn, status, connack.max_packet_size, wire))
            beat = tg.create_task(self._heartbeat(conn))
            dog = tg.create_task(self._watchdog(conn))
            sub = tg.create_task(self._subscribe_down(conn))
            closed = await asyncio.shield(conn.closed)  # a cancel must not mark it closed
            for task in (pump, beat, dog, sub):
                task.cancel()
        refused = self._status_refused(status)
        if refused is not None:  # the broker then closes the link: not a clone, not a row
            raise UplinkError(refused)
        # A close right after sending is first the message's to answer for (MQTT 3.1.1).
        just_sent = any(time.monotonic() - t < _STRIKE_WINDOW for t in self._sent_at.values())
        if self._closed_early(closed, online_at, count=not just_sent):
            self._strikes.clear()  # the other client's doing, not the message's
            assert self._clone is not None
            raise UplinkError(self._clone)
        self._judge_oldest_held(closed)
        raise UplinkError(closed.reason)

    def _status_refused(self, status: asyncio.Future[PublishResult]) -> str | None:
        """Why the broker refused this connection's status (MQTT 5), if it did."""
        if not status.done() or status.cancelled() or status.result().ok:
            return None
        return (f"the broker refused this node's status on {self.base}/status"
                f" ({status.result().reason}): its ACL does not let this client publish under"
                f" {self.base}/; is the node id {self.node!r} the user name the broker knows"
                " this device by (the CN of its certificate)?")

    def _closed_early(self, closed: Closed, online_at: float, *, count: bool = True) -> bool:
        """Tell whether connections keep being closed by the broker right after CONNACK.

        mosquitto 2.0 closes the older of two connections with one client id without
        a DISCONNECT saying so: all we see is the link closing again and again.
        """
        now = time.monotonic()
        lasted = now - online_at
        ours = not closed.by_peer or closed.code not in (None, 0x8E)
        if ours or lasted > _CLONE_EARLY:
            if lasted > _CLONE_WINDOW and self._clone is not None:
                log.info("uplink %s: the connection held for %.0fs; the client id clash"
                         " seems to be over", self.settings.url, lasted)
                self._clone = None
            if lasted > _CLONE_WINDOW:
                self._early_closes.clear()
            return False
        if count:
            self._early_closes.append(now)
        while self._early_closes and now - self._early_closes[0] > _CLONE_WINDOW:
            self._early_closes.popleft()
        if len(self._early_closes) < _CLONE_CLOSES and self._clone is None:
            return False
        if self._clone is None:
            self._clone = (
                f"the broker closed the connection {len(self._early_closes)} times within"
                f" {_CLONE_WINDOW:.0f}s, each soon after accepting it ({closed.reason}):"
                f" another client is probably using the same client id {self.node!r}, which"
                " is this agent's node id (cloned images share /etc/machine-id); give each"
                " device its own [node] id"
            )
            log.warning("uplink %s: %s", self.settings.url, self._clone)
        return True

    async def _subscribe_down(self, conn: MqttConnection) -> None:
        """Ask for `{base}/down/#` and `{base}/desired` on every connection (the session
        may be new; a fresh subscription also brings the retained desired document)."""
        topics = ([f"{self.base}/down/#"] if self.on_down is not None else []) + (
            [f"{self.base}/desired"] if self.on_desired is not None else [])
        if not topics:
            return
        try:
            await conn.subscribe(topics, timeout=self.settings.connect_timeout)
        except UplinkError as exc:
            if str(exc) != self.down_error:
                log.warning("uplink %s: no down messages or desired state: %s",
                            self.settings.url, exc)
            self.down_error = str(exc)
            return
        self.down_error = None

    def _on_down(self, conn: MqttConnection, message: Inbound) -> None:
        prefix = f"{self.base}/down/"
        stored = None
        try:
            if self.on_down is not None and message.topic.startswith(prefix):
                stored = self.on_down(message.topic[len(prefix):], message.payload)
            elif self.on_desired is not None and message.topic == f"{self.base}/desired":
                stored = self.on_desired(message.payload)
        except Exception:
            # A bug of ours on one message: refused (acknowledged, or the broker would send
            # it again at every reconnect), and the connection lives on.
            log.exception("uplink: handling %s failed; the message is dropped", message.topic)
        if stored is None:
            conn.ack(message)  # rejected or not ours: never to be sent again
            return

        def settled(fut: asyncio.Future[None]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                conn.ack(message)
            # else not acknowledged: the broker sends it again on the next connection

        stored.add_done_callback(settled)

    async def _heartbeat(self, conn: MqttConnection) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            conn.publish(f"{self.base}/status", await self._online_status(), retain=True)

    async def _watchdog(self, conn: MqttConnection) -> None:
        """Treat a broker that stops answering as gone within 1.5x keepalive."""
        keepalive = self.settings.keepalive
        while True:
            await asyncio.sleep(keepalive / 8)
            silent = time.monotonic() - conn.last_inbound
            if silent >= keepalive:
                conn.abort(f"no answer from the broker for {silent:.1f}s (keepalive)")
                return
            if silent >= keepalive / 2:
                conn.probe()

    # ---- moving rows -------------------------------------------------------------

    async def _pump(
        self,
        conn: MqttConnection,
        status: asyncio.Future[PublishResult],
        max_packet: int | None,
        wire: int,
    ) -> None:
        """Send rows: at most `wire` unacknowledged by the broker, and at most `inflight`
        unacknowledged or acknowledged but not yet deleted (what a crash may resend)."""
        v5 = conn.v5
        # No row goes out before the link has carried one PUBACK (the retained status):
        # a broker that reads a refused message together with the status may drop the
        # link before it writes the status PUBACK, and then nothing would tell a broken
        # link from a refused message (see _judge_oldest_held).
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                accepted = await status
        except TimeoutError:
            conn.abort(f"no PUBACK for the status within {self.settings.connect_timeout:.0f}s")
            return
        if not accepted.ok:  # not allowed here (the ACL): nor are the rows (_status_refused)
            conn.abort(f"the broker refused the status: {accepted.reason}")
            return
        while True:
            window = self.settings.inflight
            rows = await self.outbox.fetch(window)
            if not rows:
                await self.outbox.wait_more()
                continue
            for row in rows:
                self._held[row.key] = row
            for row in rows:
                while self._busy >= window or len(self._sent_at) >= wire:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                self._busy += 1
                topic = f"{self.base}/{row.topic}"
                size = publish_packet_size(topic, row.body, v5=v5)
                if max_packet is not None and size > max_packet:
                    self._dead_letter(
                        row, f"packet of {size} bytes exceeds the broker's maximum packet size"
                        f" of {max_packet} bytes",
                    )
                    continue
                self._sent_at[row.key] = time.monotonic()
                if not conn.send(topic, row.body, partial(self._on_puback, row)):
                    # The connection is going down; the row goes out again on the next one.
                    self._release(1)
                    return

    def _on_puback(self, row: OutRow, result: PublishResult) -> None:
        self._strikes.pop(row.key, None)
        self._held.pop(row.key, None)
        self._sent_at.pop(row.key, None)
        self._slot_free.set()  # one more may go on the wire
        if result.ok:
            self._ack_batch.append(row)
            if len(self._ack_batch) == 1:
                asyncio.get_running_loop().call_soon(self._flush_acks)
        else:
            self._dead_letter(row, f"broker refused it: {result.reason}")

    def _flush_acks(self) -> None:
        batch, self._ack_batch = self._ack_batch, []
        fut = self.outbox.ack(batch)
        fut.add_done_callback(partial(self._after_commit, len(batch), self._connects))

    def _dead_letter(self, row: OutRow, reason: str, *, holds_slot: bool = True) -> None:
        """Move a row to the dead letters; its window slot comes free once that is durable."""
        self._held.pop(row.key, None)
        fut = self.outbox.dead_letter(row, reason)
        fut.add_done_callback(partial(self._after_commit, int(holds_slot), self._connects))

    def _after_commit(self, slots: int, session: int, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error("outbox commit after PUBACK failed: %s", fut.exception())
        if session == self._connects:  # slots of an earlier connection died with it
            self._release(slots)

    def _release(self, slots: int) -> None:
        self._busy = max(0, self._busy - slots)
        self._slot_free.set()

    def _abandon_held(self) -> None:
        """The connection is gone: rows not yet acknowledged go out again later."""
        if self._held:
            self.outbox.release(list(self._held.values()))
            self._held.clear()
        self._sent_at.clear()

    def _judge_oldest_held(self, closed: Closed) -> None:
        """Decide whether the connection ended because of the oldest message in flight.

        An MQTT 5 broker says so in its DISCONNECT. An MQTT 3.1.1 broker can only
        close the socket: a row is blamed when the broker (not a keepalive) closed a
        link that had carried a PUBACK (the pump sends no row before the status is
        acknowledged), within seconds of the row being sent, and that happened
        `refused_limit` times running. A flaky network or a broker
        outage never dead-letters anything.
        """
        if not self._held:
            return
        row = min(self._held.values(), key=lambda r: r.key)
        if closed.code in _REFUSES_MESSAGE:
            self._dead_letter(
                row, f"the broker disconnected on it: {closed.reason}", holds_slot=False
            )
            return
        sent_at = self._sent_at.get(row.key)
        suspicious = (
            self.settings.protocol == "3.1.1"
            and closed.by_peer
            and sent_at is not None
            and time.monotonic() - sent_at < _STRIKE_WINDOW
        )
        if not suspicious:
            self._strikes.clear()
            return
        strikes = self._strikes.get(row.key, 0) + 1
        self._strikes = {row.key: strikes}
        if strikes >= self.settings.refused_limit:
            self._strikes.clear()
            self._dead_letter(
                row, f"the broker closed the connection each of the {strikes} times right"
                f" after this message was sent ({closed.reason}); it is likely over the"
                " broker's size limit or not allowed",
                holds_slot=False,
            )

    # ---- shutdown ----------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Publish a retained `offline` status and disconnect cleanly."""
        self._stopping = True
        conn = self._conn
        if conn is None or conn.closed.done():
            return
        try:
            async with asyncio.timeout(timeout):
                await conn.publish(
                    f"{self.base}/status", self._status_payload("offline", self._connects),
                    retain=True,
                )
        except TimeoutError:
            log.warning("broker did not acknowledge the offline status in %.1fs", timeout)
        await conn.disconnect(timeout)
