"""A cloud-side MQTT 5 client over TLS with a certificate of its own (paho, its own thread).

It stands for a cloud application, the registry, or a node misbehaving: it
subscribes and records what arrives, and publishes QoS 1 returning the
broker's PUBACK reason code. mosquitto 2.0.11 answers an MQTT 5 publish its ACL
refuses with 0x87 "Not authorized", delivers it to nobody, and then closes the
connection; paho reconnects (quickly, here) to the same session.
"""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .mqttclient import new_client_id
from .pki import CertFiles

__all__ = ["TlsPeer", "tls_context"]


def tls_context(ca_file: Path, identity: CertFiles | None) -> ssl.SSLContext:
    """A client context trusting `ca_file`, presenting `identity` when given."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    return context


class TlsPeer:
    """One MQTT 5 connection over TLS to 127.0.0.1:`port`; use it as a context manager."""

    def __init__(self, port: int, ca_file: Path, identity: CertFiles | None, *,
                 client_id: str | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        self.port = port
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=client_id or new_client_id("tls-peer"),
                                   protocol=mqtt.MQTTv5)
        self._client.tls_set_context(tls_context(ca_file, identity))
        self._client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        self.connects = 0
        if username is not None:
            self._client.username_pw_set(username, password)
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes]] = []
        self._connected = threading.Event()
        self._connack: Any = None
        self._subscribed: dict[int, list[int]] = {}
        self._acked: dict[int, int] = {}
        self._done = threading.Condition(self._lock)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish

    # -- paho callbacks (network thread) -------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        self._connack = rc
        if not rc.is_failure:
            self.connects += 1
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._done:
            self._messages.append((msg.topic, bytes(msg.payload)))
            self._done.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any,
                      props: Any) -> None:
        with self._done:
            self._subscribed[mid] = [int(code.value) for code in codes]
            self._done.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any,
                    props: Any) -> None:
        with self._done:
            self._acked[mid] = int(rc.value)
            self._done.notify_all()

    # -- the test's side ------------------------------------------------------

    def __enter__(self) -> TlsPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 10.0) -> TlsPeer:
        """Connect and wait for a successful CONNACK.

        The session outlives a broker restart (paho reconnects by itself), so the
        subscriptions and what arrives for them meanwhile are kept. (mosquitto 2.0.11
        does not save a session begun with clean start; client ids are unique anyway.)
        """
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self._client.connect("127.0.0.1", self.port, keepalive=30, clean_start=False,
                             properties=props)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"no CONNACK within {timeout}s")
        if self._connack.is_failure:
            raise ConnectionRefusedError(f"broker refused the connection: {self._connack}")
        return self

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _wait(self, table: dict[int, Any], mid: int, timeout: float, what: str) -> Any:
        with self._done:
            if not self._done.wait_for(lambda: mid in table, timeout):
                raise TimeoutError(f"no {what} within {timeout}s")
            return table.pop(mid)

    def subscribe(self, topic_filter: str, timeout: float = 5.0) -> list[int]:
        """Subscribe with QoS 1; the SUBACK's reason codes."""
        _, mid = self._client.subscribe(topic_filter, qos=1)
        assert mid is not None
        codes: list[int] = self._wait(self._subscribed, mid, timeout, "SUBACK")
        return codes

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                timeout: float = 5.0) -> int:
        """Publish QoS 1; the PUBACK's reason code (0 = accepted)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        code: int = self._wait(self._acked, info.mid, timeout, f"PUBACK for {topic}")
        return code

    def messages(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of everything received so far, in order."""
        with self._lock:
            return list(self._messages)

    def wait_for(self, topic: str, timeout: float = 5.0) -> bytes:
        """The payload of the first message on `topic`, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._done:
            while True:
                for got, payload in self._messages:
                    if got == topic:
                        return payload
                left = deadline - time.monotonic()
                if left <= 0 or not self._done.wait(left):
                    raise TimeoutError(f"nothing on {topic} within {timeout}s;"
                                       f" got {[t for t, _ in self._messages]}")
