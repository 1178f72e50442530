"""What the tests' own MQTT clients share: one paho client on a broker, started and closed.

`PahoClient` connects to a broker on 127.0.0.1 with MQTT 5 or 3.1.1, clean or
with a persistent session, and its start() returns once the client is ready
(subclasses say when). `SessionSubscriber` is such a client holding one QoS 1
subscription in a persistent session, so what a broker accepted for it while
it was away, or while the broker restarted, still reaches it; subclasses say
what they record of each message.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["PahoClient", "SessionSubscriber", "connect", "make_client", "new_client_id"]

_SESSION_EXPIRY = 24 * 3600
_ids = itertools.count(1)


def new_client_id(prefix: str) -> str:
    """A client id no other client in this test process has: `PREFIX-N`."""
    return f"{prefix}-{next(_ids)}"


def make_client(client_id: str, protocol: str = "5", persistent: bool = False) -> mqtt.Client:
    """A paho client (not connected) for MQTT `protocol` "5" or "3.1.1"."""
    if protocol == "5":
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
    elif protocol == "3.1.1":
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
        )
    else:
        raise ValueError(f"protocol must be '5' or '3.1.1', got {protocol!r}")
    # Reconnect quickly after a broker restart; a persistent session carries the messages.
    # (paho's hint says int; it only ever sleeps for the value.)
    client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
    return client


def connect(
    client: mqtt.Client, port: int, protocol: str = "5", persistent: bool = False
) -> None:
    """Connect `client` to 127.0.0.1:`port`; a persistent session outlives disconnects."""
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            props.SessionExpiryInterval = _SESSION_EXPIRY
        client.connect(
            "127.0.0.1", port, keepalive=30, clean_start=not persistent, properties=props
        )
    else:
        client.connect("127.0.0.1", port, keepalive=30)


class PahoClient:
    """One paho client on a broker: start() connects and waits until `_ready` is set.

    `not_ready` is what start() says when that does not happen in time, such as
    "subscription to 'cmd/#' not granted".
    """

    def __init__(
        self, port: int, client_id: str, protocol: str, persistent: bool, not_ready: str
    ) -> None:
        self.port = port
        self.client_id = client_id
        self.protocol = protocol
        self.persistent = persistent
        self._not_ready = not_ready
        self._client = make_client(client_id, protocol, persistent)
        self._ready = threading.Event()
        self._started = False

    def start(self, timeout: float = 10.0) -> Self:
        """Connect, start the network thread, and return once the client is ready."""
        connect(self._client, self.port, self.protocol, self.persistent)
        self._client.loop_start()
        self._started = True
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self._not_ready} in {timeout}s")
        return self

    def close(self) -> None:
        """Disconnect (a persistent session stays on the broker) and stop the network thread."""
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()


class SessionSubscriber(PahoClient):
    """A QoS 1 subscriber to `topic_filter` with a persistent session, ready once granted.

    Subclasses record messages in `_on_message`, which runs on paho's network
    thread and must not raise.
    """

    def __init__(self, port: int, topic_filter: str, client_id: str, protocol: str) -> None:
        super().__init__(
            port,
            client_id,
            protocol,
            persistent=True,
            not_ready=f"subscription to {topic_filter!r} not granted",
        )
        self.topic_filter = topic_filter
        self.connects = 0
        self._lock = threading.Lock()
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            return
        self.connects += 1
        # Re-subscribing on every connect is harmless with a present session and
        # needed when the broker lost it (a kill -9 before its autosave).
        client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: Any, codes: Any, props: Any
    ) -> None:
        if all(not code.is_failure for code in codes):
            self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Record one message that arrived (each subclass keeps what it needs)."""
        raise NotImplementedError
