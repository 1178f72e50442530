"""MQTT clients standing for the device's programs and the cloud application.

`Publisher` publishes QoS 1 and waits for its broker's PUBACK: a local program
on the local broker, or a cloud application sending down messages. `RawSubscriber`
records payloads as they are (the local topics carry no envelope) with a
persistent session, so what a broker accepted for it while it was away, or
while the broker restarted, still reaches it. `MqttClients` makes both and
disconnects them at teardown.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .broker import Broker
from .mqttclient import PahoClient, SessionSubscriber, new_client_id

__all__ = [
    "MqttClients",
    "Publisher",
    "RawMessage",
    "RawSubscriber",
    "down_envelope",
    "probe_until",
    "total",
]

_POLL = 0.05


def down_envelope(data: Any, **keys: Any) -> bytes:
    """A down envelope as a cloud application sends it: `v`, `data`, then `keys`."""
    return bytes(cbor2.dumps({"v": 1, "data": data, **keys}))


def total(counts: dict[str, int]) -> int:
    """The sum of a status `rejected` map ({KIND: N})."""
    assert isinstance(counts, dict), f"rejected is not a map by kind: {counts!r}"
    return sum(counts.values())


def probe_until(
    send: Callable[[int], None], arrived: Callable[[], bool], timeout: float, what: str
) -> int:
    """Call send(n) for n = 0, 1, ... every 2 s until arrived() is true; return how many were sent.

    A broker gives a client only what is published after its subscription
    exists, and on a fresh session that is some time after the client says it
    is connected. Probes sent until one comes through keep a test's own
    messages from racing that first SUBSCRIBE.
    """
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        send(n)
        n += 1
        probe_deadline = min(deadline, time.monotonic() + 2.0)
        while time.monotonic() < probe_deadline:
            if arrived():
                return n
            time.sleep(_POLL)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: none of {n} probes came through within {timeout}s")


class Publisher(PahoClient):
    """A QoS 1 publisher on one broker (clean session: it keeps nothing for later)."""

    def __init__(self, port: int, protocol: str = "5", client_id: str | None = None) -> None:
        super().__init__(
            port,
            client_id or new_client_id("test-pub"),
            protocol,
            persistent=False,
            not_ready=f"publisher not connected to port {port}",
        )
        self._client.max_inflight_messages_set(100)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if not rc.is_failure:
            self._ready.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        self._ready.clear()

    def send(
        self,
        topic: str,
        payload: bytes,
        *,
        content_type: str | None = None,
        expiry: int | None = None,
        retain: bool = False,
    ) -> mqtt.MQTTMessageInfo:
        """Queue one QoS 1 publish (retained if asked, MQTT 5 properties if given); do not wait."""
        props: Properties | None = None
        if content_type is not None or expiry is not None:
            if self.protocol != "5":
                raise ValueError("content type and expiry need MQTT 5")
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if content_type is not None:
                props.ContentType = content_type
            if expiry is not None:
                props.MessageExpiryInterval = expiry
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            reason = mqtt.error_string(info.rc)
            raise RuntimeError(f"publish to {topic!r} refused by paho: {reason}")
        return info

    @staticmethod
    def wait_acked(infos: Sequence[mqtt.MQTTMessageInfo], timeout: float) -> None:
        """Wait until the broker has PUBACKed every one of `infos`, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        for n, info in enumerate(infos):
            info.wait_for_publish(timeout=max(0.01, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(
                    f"only {n} of {len(infos)} publishes acknowledged within {timeout:.1f}s"
                )

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0, **props: Any) -> None:
        """Publish one message and wait for the broker's PUBACK."""
        self.wait_acked([self.send(topic, payload, **props)], timeout)

    def publish_many(self, items: Iterable[tuple[str, bytes]], timeout: float = 60.0) -> None:
        """Publish every (topic, payload) pipelined, then wait for all PUBACKs."""
        infos = [self.send(topic, payload) for topic, payload in items]
        self.wait_acked(infos, timeout)


@dataclass(frozen=True)
class RawMessage:
    """One message as a subscriber got it."""

    topic: str
    payload: bytes
    content_type: str | None
    dup: bool


class RawSubscriber(SessionSubscriber):
    """A QoS 1 subscriber with a persistent session, recording payloads as they are."""

    def __init__(
        self,
        port: int,
        topic_filter: str,
        protocol: str = "5",
        client_id: str | None = None,
    ) -> None:
        super().__init__(port, topic_filter, client_id or new_client_id("test-raw-sub"), protocol)
        self._messages: list[RawMessage] = []

    # -- paho callbacks (network thread) -------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
        item = RawMessage(msg.topic, bytes(msg.payload), content_type, bool(msg.dup))
        with self._lock:
            self._messages.append(item)

    # -- reading what arrived -------------------------------------------------

    @property
    def messages(self) -> list[RawMessage]:
        """Every message so far, duplicates included, in arrival order."""
        with self._lock:
            return list(self._messages)

    def on(self, topic: str) -> list[RawMessage]:
        """The messages that arrived on exactly `topic`."""
        return [m for m in self.messages if m.topic == topic]

    def wait_until(
        self, predicate: Callable[[list[RawMessage]], bool], timeout: float, what: str
    ) -> list[RawMessage]:
        """Poll until predicate(messages) is true; return those messages, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages
            if predicate(messages):
                return messages
            if time.monotonic() >= deadline:
                tail = [(m.topic, len(m.payload)) for m in messages[-3:]]
                raise TimeoutError(
                    f"{what}: not reached within {timeout:.1f}s "
                    f"({len(messages)} messages on {self.topic_filter!r}; "
                    f"last (topic, bytes): {tail!r})"
                )
            time.sleep(_POLL)

    def wait_for_topic(self, topic: str, timeout: float) -> RawMessage:
        """Wait for the first message on exactly `topic`; return it."""
        self.wait_until(
            lambda ms: any(m.topic == topic for m in ms), timeout, what=f"a message on {topic!r}"
        )
        return self.on(topic)[0]


class MqttClients:
    """Makes started publishers and subscribers; close() disconnects them all."""

    def __init__(self) -> None:
        self._made: list[Publisher | RawSubscriber] = []

    def publisher(self, broker: Broker, protocol: str = "5") -> Publisher:
        """A connected publisher on `broker` (which must be running)."""
        pub = Publisher(broker.port, protocol=protocol)
        self._made.append(pub)
        return pub.start()

    def subscriber(self, broker: Broker, topic_filter: str, protocol: str = "5") -> RawSubscriber:
        """A subscribed persistent-session subscriber on `broker` (which must be running)."""
        sub = RawSubscriber(broker.port, topic_filter, protocol=protocol)
        self._made.append(sub)
        return sub.start()

    def primed_subscriber(
        self, broker: Broker, topic_filter: str, protocol: str = "5"
    ) -> RawSubscriber:
        """A subscriber whose session exists on `broker`, which is left STOPPED.

        Whatever reaches the broker once it runs again is kept for this
        subscriber, so nothing slips past between the broker starting and a
        subscription.
        """
        broker.start()
        sub = self.subscriber(broker, topic_filter, protocol=protocol)
        broker.stop()
        return sub

    def close(self) -> None:
        """Disconnect every client made here, newest first."""
        for client in reversed(self._made):
            client.close()
        self._made.clear()

    def __enter__(self) -> MqttClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
