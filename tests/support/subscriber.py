"""An MQTT v5 subscriber standing for the cloud application, decoding envelopes.

It keeps a persistent session (clean_start=False, long session expiry), so
messages the broker accepts while the subscriber is away, or while the broker
itself restarts, are still delivered to it: what the tests count is then what
the broker accepted from the agent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cbor2
import paho.mqtt.client as mqtt

from .mqttclient import SessionSubscriber, connect, make_client, new_client_id

__all__ = [
    "UP_FILTER", "Received", "Subscriber", "publish_retained", "read_retained", "read_status",
    "wait_status",
]

UP_FILTER = "edge/v1/nodes/+/up/#"
_POLL = 0.02


@dataclass(frozen=True)
class Received:
    """One message as it arrived: its MQTT topic, flags and decoded envelope."""

    topic: str
    envelope: dict[str, Any]
    dup: bool
    retain: bool


class Subscriber(SessionSubscriber):
    """A QoS 1 subscriber to `filter`, recording every envelope in arrival order."""

    def __init__(self, port: int, topic_filter: str = UP_FILTER, client_id: str | None = None):
        super().__init__(port, topic_filter, client_id or new_client_id("test-sub"), "5")
        self._received: list[Received] = []
        self._distinct: set[int] = set()
        self._undecodable: list[tuple[str, bytes, str]] = []

    # -- paho callbacks (network thread) -------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            envelope = cbor2.loads(msg.payload)
            if not isinstance(envelope, dict):
                raise TypeError(f"envelope is a {type(envelope).__name__}, not a map")
            if not isinstance(envelope.get("seq"), int):
                raise TypeError(f"envelope has no int seq: {envelope!r:.200}")
        except Exception as exc:  # record, never raise in paho's thread
            with self._lock:
                self._undecodable.append((msg.topic, bytes(msg.payload), repr(exc)))
            return
        item = Received(msg.topic, envelope, bool(msg.dup), bool(msg.retain))
        with self._lock:
            self._received.append(item)
            self._distinct.add(envelope["seq"])

    # -- reading what arrived -------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """Every message so far, duplicates included, in arrival order."""
        with self._lock:
            return list(self._received)

    @property
    def undecodable(self) -> list[tuple[str, bytes, str]]:
        """Payloads that were not a CBOR map with an int seq: (topic, payload, error)."""
        with self._lock:
            return list(self._undecodable)

    def envelopes(self) -> list[dict[str, Any]]:
        """Every envelope, duplicates included, in arrival order."""
        return [r.envelope for r in self.received]

    def seqs(self) -> list[int]:
        """Every envelope's seq, duplicates included, in arrival order."""
        return [r.envelope["seq"] for r in self.received]

    def distinct_seqs(self) -> set[int]:
        """The set of seqs seen."""
        with self._lock:
            return set(self._distinct)

    def first_arrivals(self) -> list[Received]:
        """One message per seq, the first copy that arrived, in arrival order."""
        seen: set[int] = set()
        out: list[Received] = []
        for r in self.received:
            seq = r.envelope["seq"]
            if seq not in seen:
                seen.add(seq)
                out.append(r)
        return out

    def duplicate_count(self) -> int:
        """How many messages arrived for a seq already seen."""
        received = self.received
        return len(received) - len({r.envelope["seq"] for r in received})

    # Waits poll instead of waking on every message: with tens of thousands of
    # messages, re-checking on each one would starve paho's thread of the GIL.

    def wait_until(self, predicate: Any, timeout: float, what: str = "condition") -> None:
        """Wait until predicate(list of Received) is true, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while not predicate(self.received):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{what}: not reached within {timeout:.1f}s "
                    f"({len(self._received)} messages received)"
                )
            time.sleep(_POLL)

    def wait_for(self, count: int, timeout: float) -> None:
        """Wait until at least `count` distinct seqs have arrived."""
        deadline = time.monotonic() + timeout
        while len(self._distinct) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{count} distinct seqs not received within {timeout:.1f}s "
                    f"(got {len(self._distinct)})"
                )
            time.sleep(_POLL)

    def wait_for_seqs(self, seqs: Iterable[int], timeout: float) -> None:
        """Wait until every seq in `seqs` has arrived at least once."""
        missing = set(seqs)
        total = len(missing)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._lock:
                new = self._received[seen:]
                seen = len(self._received)
            missing.difference_update(r.envelope["seq"] for r in new)
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{total} expected seqs not all received within {timeout:.1f}s: "
                    f"{len(missing)} missing, first {sorted(missing)[:20]}"
                )
            time.sleep(_POLL)


def read_status(port: int, node: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """Read the retained `edge/v1/nodes/NODE/status` with a fresh, clean client."""
    return read_retained(port, f"edge/v1/nodes/{node}/status", timeout)


def read_retained(port: int, topic: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """Read the retained CBOR map on `topic` with a fresh, clean client (None: none there)."""
    got: list[dict[str, Any]] = []
    done = threading.Event()
    client = make_client(new_client_id("test-retained"))

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            c.subscribe(topic, qos=1)

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain and not done.is_set():
            try:
                value = cbor2.loads(msg.payload)
            except Exception as exc:
                value = {"undecodable": repr(exc), "payload": bytes(msg.payload)}
            got.append(value if isinstance(value, dict) else {"not_a_map": value})
            done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    connect(client, port)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


def publish_retained(port: int, topic: str, payload: bytes, timeout: float = 10.0) -> None:
    """Publish `payload` retained with QoS 1 and wait for the PUBACK."""
    client = make_client(new_client_id("test-pub"))
    connect(client, port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"no PUBACK for {topic} in {timeout}s")
    finally:
        client.disconnect()
        client.loop_stop()


def wait_status(port: int, node: str, state: str, timeout: float) -> dict[str, Any]:
    """Poll the retained status (a fresh client each time) until its state is `state`."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        last = read_status(port, node, timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        if last is not None and last.get("state") == state:
            return last
        time.sleep(0.1)
    raise TimeoutError(f"retained status of {node} not {state!r} within {timeout}s; last {last!r}")
