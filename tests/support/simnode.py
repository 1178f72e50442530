"""A simulated node on the broker: status (with its Last Will) and reported documents.

It speaks the documents of docs/registry.md with a plain paho client, so the
registry is tested against what is on the wire, not against the agent.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import cbor2
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from .mqttclient import connect, make_client, new_client_id

__all__ = ["SimNode", "SimNodes", "reported_doc", "status_doc"]

PREFIX = "edge/v1"


def status_doc(state: str, *, boot: float, conn: int, ts: float | None = None,
               heartbeat: float = 60.0, depth: int = 0,
               oldest_age: float | None = None) -> dict[str, Any]:
    """A status document as the agent publishes it."""
    doc: dict[str, Any] = {"state": state, "ts": time.time() if ts is None else ts,
                           "boot": boot, "conn": conn, "heartbeat": heartbeat}
    if state == "online":
        doc["queue"] = {"depth": depth, "oldest_age": oldest_age}
    return doc


def reported_doc(node: str, version: int, **fields: Any) -> dict[str, Any]:
    """A reported document of `node` at `version`; `fields` override or add keys."""
    doc: dict[str, Any] = {
        "v": 1, "node": node, "version": version, "ts": time.time(), "agent": "0.1.0",
        "profile": "generic-x86", "labels": {},
        "services": [{"name": "web", "state": "running", "reason": None, "pid": 10,
                      "restarts": 0, "last_exit": None, "source": "config"},
                     {"name": "db", "state": "failed", "reason": "exit 1", "pid": None,
                      "restarts": 3, "last_exit": 1, "source": "desired"}],
        "peers": [], "queue": {"depth": 0, "bytes": 0, "oldest_age": None, "dropped": 0,
                               "expired": 0, "dead": 0},
        "uplink": {"state": "online", "since": time.time(), "connects": 1, "last_error": None},
        "desired_applied": 0, "desired": None, "desired_rejected": None,
    }
    doc.update(fields)
    return doc


class SimNode:
    """One node's MQTT 5 client with an `offline` Last Will made at connect time."""

    def __init__(self, port: int, node: str, *, heartbeat: float = 60.0,
                 boot: float | None = None, conn: int = 1) -> None:
        self.port = port
        self.node = node
        self.heartbeat = heartbeat
        self.boot = time.time() if boot is None else boot
        self.conn = conn
        self._client = make_client(new_client_id(f"sim-{node}"))
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)
        self._connected = threading.Event()
        self._stopped = False
        self._client.on_connect = lambda *a: self._connected.set()

    def topic(self, kind: str) -> str:
        return f"{PREFIX}/nodes/{self.node}/{kind}"

    def start(self) -> SimNode:
        """Connect with the Will set (its ts: now, before every heartbeat of this connection)."""
        will = status_doc("offline", boot=self.boot, conn=self.conn, heartbeat=self.heartbeat)
        self._client.will_set(self.topic("status"), cbor2.dumps(will), qos=1, retain=True)
        connect(self._client, self.port)
        self._client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError(f"sim node {self.node} did not connect")
        return self

    def publish(self, kind: str, payload: bytes, *, retain: bool = True) -> None:
        """Publish raw bytes on the node's `kind` topic and wait for the PUBACK."""
        info = self._client.publish(self.topic(kind), payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def online(self, **kw: Any) -> None:
        """Publish a retained online status (a heartbeat)."""
        kw.setdefault("heartbeat", self.heartbeat)
        self.publish("status", cbor2.dumps(status_doc("online", boot=self.boot,
                                                      conn=self.conn, **kw)))

    def reported(self, version: int, **fields: Any) -> None:
        """Publish a retained reported document."""
        self.publish("reported", cbor2.dumps(reported_doc(self.node, version, **fields)))

    def die(self) -> None:
        """End the connection so that the broker sends the Last Will."""
        self._stop(ReasonCode(PacketTypes.DISCONNECT, identifier=4))

    def close(self) -> None:
        """A clean goodbye (no Will); nothing after die() or an earlier close()."""
        self._stop(None)

    def _stop(self, reason: ReasonCode | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._client.disconnect(reasoncode=reason)
        self._client.loop_stop()


class SimNodes:
    """Makes started SimNodes and closes every one of them at the end."""

    def __init__(self) -> None:
        self._made: list[SimNode] = []

    def __call__(self, port: int, node: str, **kw: Any) -> SimNode:
        made = SimNode(port, node, **kw)
        self._made.append(made)
        return made.start()

    def close(self) -> None:
        for node in reversed(self._made):
            node.close()
