"""Documents from the broker into the store: shared subscriptions, batched writes, acks after.

One `MqttConnection` at a time holds the shared subscriptions (`$share/edge-registry/...`,
so several workers split the documents). At each connection a second,
short-lived connection with plain subscriptions reads the retained documents,
which brokers do not send to shared subscriptions. Callbacks only queue
messages; one writer task turns what has queued into rows, writes them in one
batch, and only then acknowledges them (PUBACK).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from edge.backoff import Backoff, reconnect_forever
from edge.errors import RegistryError, UplinkError
from edge.mqtt import Inbound, MqttConnection
from edge.registry.records import KINDS, Rejected, ReportedRow, Row, parse_topic, to_row
from edge.registry.settings import RegistrySettings
from edge.registry.store import Store, kind_of
from edge.rejections import Rejections
from edge.signing import Keyring
from edge.tls import Login, TlsFiles

__all__ = ["Ingest", "IngestStats"]

log = logging.getLogger("edge.registry.ingest")


@dataclass
class IngestStats:
    """This process's counters (GET /api/v1/stats)."""

    rejections: Rejections = field(
        default_factory=lambda: Rejections(log, "document"))
    documents: int = 0   # valid documents handled (stored, or older than stored)
    written: int = 0     # of those, stored
    batches: int = 0
    catchups: int = 0    # retained reads done
    pauses: int = 0      # times reading stopped because too much waited to be written


class _Source:
    """One connection's side of the queue: what it delivered and has not acked yet."""

    def __init__(self, queue: Callable[[_Source, Inbound], None], *, retained_only: bool) -> None:
        self.conn: MqttConnection | None = None
        self.pending = 0
        self.last_message = time.monotonic()
        self._queue = queue
        self._retained_only = retained_only

    def deliver(self, msg: Inbound) -> None:
        if self._retained_only and not msg.retain:
            if self.conn is not None:
                self.conn.ack(msg)  # live traffic: the shared subscription has it
            return
        self.pending += 1
        self.last_message = time.monotonic()
        self._queue(self, msg)

    def ack(self, msg: Inbound) -> None:
        self.pending -= 1
        if self.conn is not None:
            self.conn.ack(msg)


class Ingest:
    """Keeps a connection to the broker and the store up to date with its documents."""

    def __init__(
        self, settings: RegistrySettings, store: Store, *,
        on_connected: Callable[[], Coroutine[Any, Any, None]] | None = None,
        on_report: Callable[[str, int, int | None], None] | None = None,
        desired_keys: Keyring | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._desired_keys = desired_keys  # the registry's own key: desired taken only signed
        self.stats = IngestStats()
        self._on_connected = on_connected
        self._on_report = on_report  # (node, desired_applied, rejected version) of a report
        self._queue: deque[tuple[_Source, Inbound, float]] = deque()
        self._wake = asyncio.Event()
        self._conn: MqttConnection | None = None
        self._stopping = False
        self._store_errors = Rejections(log, "batch write", every=30.0)
        self._last_failure: str | None = None
        self._paused: set[_Source] = set()  # connections not read while the queue is long

    @property
    def online(self) -> bool:
        """Whether the shared subscriptions are up on a live connection."""
        return self._conn is not None and not self._conn.closed.done()

    def filters(self, *, shared: bool) -> list[str]:
        """The topic filters: shared ones for the live feed, plain ones for retained."""
        head = f"$share/{self.settings.share_group}/" if shared else ""
        return [f"{head}{self.settings.prefix}/nodes/+/{kind}" for kind in KINDS]

    async def publish(self, topic: str, payload: bytes) -> bool:
        """Publish retained with QoS 1; True once the broker acknowledged it."""
        conn = self._conn
        if conn is None or conn.closed.done():
            return False
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                result = await conn.publish(topic, payload, retain=True)
        except TimeoutError:
            return False
        return result.ok

    async def run(self) -> None:
        """Ingest until cancelled: the writer and the reconnecting session."""
        s = self.settings
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer())
                await reconnect_forever(
                    self._session, Backoff(s.reconnect_initial, s.reconnect_max),
                    failed=self._failed, ended=self._ended, stopping=lambda: self._stopping,
                    stable_after=10.0, what="registry ingest",
                )
        finally:
            await self._goodbye()

    def _failed(self, why: str) -> None:
        # Once per reason: a broker down for an hour is one line, not one per attempt.
        if why != self._last_failure:
            log.warning("broker %s:%d: %s; reconnecting", self.settings.broker_host,
                        self.settings.broker_port, why)
        self._last_failure = why

    def _ended(self) -> None:
        self._conn = None

    async def _goodbye(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)

    def _connection(self, client_id: str, source: _Source) -> MqttConnection:
        s = self.settings
        conn = MqttConnection(
            host=s.broker_host, port=s.broker_port, client_id=client_id, keepalive=s.keepalive,
            v5=True, clean=True, connect_timeout=s.connect_timeout,
            receive_maximum=s.receive_maximum, max_inflight=100, on_message=source.deliver,
            tls=TlsFiles(s.ca_file, s.cert_file, s.key_file,
                         names=("--ca-file", "--cert-file", "--key-file"))
            if s.broker_tls else None,
            login=Login(s.username, s.password_file, "--password-file") if s.username else None,
        )
        source.conn = conn
        return conn

    async def _session(self) -> None:
        s = self.settings
        source = _Source(self._enqueue, retained_only=False)
        conn = self._connection(s.client_id, source)
        await conn.connect(s.connect_timeout)
        try:
            await conn.subscribe(self.filters(shared=True))
            self._conn = conn
            self._last_failure = None
            log.info("connected to %s:%d, subscribed to %s", s.broker_host, s.broker_port,
                     ", ".join(self.filters(shared=True)))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._catch_up())
                if self._on_connected is not None:
                    tg.create_task(self._on_connected())
            closed = await asyncio.shield(conn.closed)  # a cancel must not mark it closed
        finally:
            self._conn = None
            if not conn.closed.done():
                await _close(conn)
        raise UplinkError(closed.reason)

    async def _catch_up(self) -> None:
        """Read every retained document once, through a connection of its own."""
        s = self.settings
        source = _Source(self._enqueue, retained_only=True)
        conn = self._connection(f"{s.client_id}-catchup"[:64], source)
        started = time.monotonic()
        try:
            await conn.connect(s.connect_timeout)
            await conn.subscribe(self.filters(shared=False))
            source.last_message = time.monotonic()
            while not conn.closed.done():
                now = time.monotonic()
                if now - started > s.catchup_max:
                    log.warning("retained read still busy after %.0fs; ended", s.catchup_max)
                    break
                if source.pending == 0 and now - source.last_message >= s.catchup_idle:
                    break
                await asyncio.sleep(min(0.1, s.catchup_idle / 4))
            self.stats.catchups += 1
            log.info("read the retained documents in %.1fs", time.monotonic() - started)
        except UplinkError as exc:
            log.warning("retained read failed: %s", exc)
        finally:
            await _close(conn)

    def _enqueue(self, source: _Source, msg: Inbound) -> None:
        self._queue.append((source, msg, time.time()))
        self._wake.set()
        # A broker that sends past our Receive Maximum (mosquitto 2.0 does) must not
        # grow this queue without end: stop reading until the writer catches up.
        if len(self._queue) >= self.settings.queue_high and source.conn is not None \
                and source not in self._paused:
            self._paused.add(source)
            self.stats.pauses += 1
            source.conn.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused and len(self._queue) <= self.settings.queue_high // 4:
            for source in self._paused:
                if source.conn is not None:
                    source.conn.resume_reading()
            self._paused.clear()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                n = min(len(self._queue), self.settings.batch_max)
                batch = [self._queue.popleft() for _ in range(n)]
                rows, valid = self._rows(batch)
                if rows:
                    await self._write(rows)
                self.stats.documents += valid  # handled: stored, or older than what is
                for source, msg, _ in batch:
                    source.ack(msg)
                self._resume_reading()
                await asyncio.sleep(0)  # let the connections read (and ack) between batches

    def _rows(self, batch: list[tuple[_Source, Inbound, float]]) -> tuple[list[Row], int]:
        """Decode, reject what is bad, and keep only the newest row per node and kind;
        also say how many documents were valid."""
        best: dict[tuple[str, str], Row] = {}
        valid = 0
        reject = self.stats.rejections
        for _, msg, seen in batch:
            where = parse_topic(msg.topic, self.settings.prefix)
            if where is None or not msg.payload:
                continue  # not a document topic, or a retained document being cleared
            row = to_row(where[0], where[1], msg.payload, seen, keys=self._desired_keys,
                         retained=msg.retain)
            if isinstance(row, Rejected):
                reject(row.kind, row.reason)
                continue
            valid += 1
            slot = (row.node, kind_of(row))
            other = best.get(slot)
            if other is None or other.key < row.key:
                if other is not None:
                    reject("older", f"node {row.node}: {slot[1]} {other.key} after {row.key}")
                best[slot] = row
            elif other.key > row.key:
                reject("older", f"node {row.node}: {slot[1]} {row.key} after {other.key}")
        return list(best.values()), valid

    async def _write(self, rows: list[Row]) -> None:
        """Write until it works: nothing is acknowledged before it is stored."""
        s = self.settings
        backoff = Backoff(s.reconnect_initial, s.reconnect_max)
        while True:
            try:
                older = await self.store.write(rows)
                break
            except RegistryError as exc:
                self._store_errors("store", f"{exc}; retrying")
                await asyncio.sleep(backoff.next())
        self.stats.batches += 1
        for row, was_older in zip(rows, older, strict=True):
            if was_older:
                self.stats.rejections("older", f"node {row.node}: {kind_of(row)} {row.key}"
                                               " is older than the one stored")
                continue
            self.stats.written += 1
            if isinstance(row, ReportedRow) and self._on_report is not None:
                self._on_report(row.node, row.desired_applied,
                                _rejected_version(row.desired_rejected))


async def _close(conn: MqttConnection) -> None:
    """Disconnect; when cancelled meanwhile, finish the goodbye first, then be cancelled."""
    goodbye = asyncio.ensure_future(conn.disconnect(timeout=1.0))
    try:
        await asyncio.shield(goodbye)
    except asyncio.CancelledError:
        await asyncio.wait({goodbye})
        raise


def _rejected_version(text: str | None) -> int | None:
    """The version in a reported `desired_rejected` (stored as JSON), if any."""
    if not text:
        return None
    try:
        version = json.loads(text).get("version")
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None
