"""The test peers themselves work, checked without the agent (a plain paho publisher)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import SubscriberFactory
from tests.support.agent import Agent, ApiClient
from tests.support.broker import Broker
from tests.support.net import port_accepts
from tests.support.subscriber import Subscriber, read_status, wait_status


class Publisher:
    """A plain MQTT v5 client publishing QoS 1, standing in for the agent."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="test-publisher", protocol=mqtt.MQTTv5
        )
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(timeout=5)
            assert info.is_published(), f"no PUBACK for {topic}"
        return info

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher_factory() -> Iterator[Any]:
    made: list[Publisher] = []

    def make(broker: Broker) -> Publisher:
        made.append(Publisher(broker.port))
        return made[-1]

    yield make
    for pub in made:
        pub.close()


def envelope(seq: int, topic: str = "sensors/t", data: Any = "x") -> bytes:
    return cbor2.dumps(
        {
            "v": 1,
            "id": os.urandom(16),
            "node": "n1",
            "seq": seq,
            "ts": time.time(),
            "topic": topic,
            "ct": "text/plain",
            "data": data,
        }
    )


def test_broker_starts_stops_and_restarts_on_the_same_port(broker: Broker) -> None:
    assert not port_accepts(broker.port)
    broker.start()
    port = broker.port
    assert port_accepts(port)
    for _ in range(3):
        broker.restart()
        assert broker.port == port and port_accepts(port)
    broker.stop()
    assert not broker.running and not port_accepts(port)
    assert (broker.persistence_dir / "mosquitto.db").exists()


def test_subscriber_decodes_envelopes_in_order(
    broker: Broker, subscriber_factory: SubscriberFactory, publisher_factory: Any
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    pub = publisher_factory(broker)
    for seq in range(1, 101):
        pub.publish(f"edge/v1/nodes/n1/up/sensors/{seq % 3}", envelope(seq), wait=False)
    sub.wait_for(100, timeout=10)
    assert sub.seqs() == list(range(1, 101))
    assert sub.received[0].topic == "edge/v1/nodes/n1/up/sensors/1"
    assert sub.envelopes()[0]["data"] == "x"
    assert sub.duplicate_count() == 0


def test_subscriber_session_survives_broker_restart(
    broker: Broker, primed_subscriber: Subscriber, publisher_factory: Any
) -> None:
    # primed_subscriber left the broker stopped with the session saved.
    assert not broker.running
    broker.start()
    pub = publisher_factory(broker)
    # Published possibly before the subscriber has reconnected: the session keeps it.
    for seq in range(1, 6):
        pub.publish("edge/v1/nodes/n1/up/t", envelope(seq))
    broker.restart()
    pub2 = publisher_factory(broker)
    pub2.publish("edge/v1/nodes/n1/up/t", envelope(6))
    primed_subscriber.wait_for(6, timeout=10)
    assert sorted(primed_subscriber.distinct_seqs()) == [1, 2, 3, 4, 5, 6]


def test_many_queued_messages_are_not_dropped_by_the_broker(
    broker: Broker,
    primed_subscriber: Subscriber,
    subscriber_factory: SubscriberFactory,
    publisher_factory: Any,
) -> None:
    # mosquitto's default max_queued_messages (1000) would drop most of these.
    broker.start()
    primed_subscriber.close()
    pub = publisher_factory(broker)
    infos = [pub.publish("edge/v1/nodes/n1/up/t", envelope(s), wait=False) for s in range(3000)]
    for info in infos:
        info.wait_for_publish(timeout=10)
    sub = subscriber_factory(broker, client_id=primed_subscriber.client_id)
    sub.wait_for(3000, timeout=20)
    assert sub.seqs() == list(range(3000))


def test_paused_broker_delivers_after_resume(
    broker: Broker, subscriber_factory: SubscriberFactory, publisher_factory: Any
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    pub = publisher_factory(broker)
    broker.pause()
    info = pub.publish("edge/v1/nodes/n1/up/t", envelope(1), wait=False)
    time.sleep(0.5)
    assert sub.received == [] and not info.is_published()
    broker.resume()
    sub.wait_for(1, timeout=10)
    info.wait_for_publish(timeout=5)


def test_paused_broker_is_reaped_at_close(broker: Broker) -> None:
    broker.start()
    pid = broker.pid
    assert pid is not None
    broker.pause()
    broker.close()
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_undecodable_payload_is_recorded_not_raised(
    broker: Broker, subscriber_factory: SubscriberFactory, publisher_factory: Any
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    pub = publisher_factory(broker)
    pub.publish("edge/v1/nodes/n1/up/t", b"\xff\x00garbage")
    pub.publish("edge/v1/nodes/n1/up/t", envelope(1))
    sub.wait_for(1, timeout=5)
    assert len(sub.undecodable) == 1


def test_read_status_reads_the_retained_map(broker: Broker, publisher_factory: Any) -> None:
    broker.start()
    assert read_status(broker.port, "n1", timeout=0.3) is None
    pub = publisher_factory(broker)
    topic = "edge/v1/nodes/n1/status"
    pub.publish(topic, cbor2.dumps({"state": "online", "ts": 1.0}), retain=True)
    assert read_status(broker.port, "n1") == {"state": "online", "ts": 1.0}
    pub.publish(topic, cbor2.dumps({"state": "offline", "ts": 2.0}), retain=True)
    assert wait_status(broker.port, "n1", "offline", timeout=5)["ts"] == 2.0


def test_agent_config_is_valid_toml_with_overrides(tmp_path: Path) -> None:
    agent = Agent(
        tmp_path / "a",
        uplink="mqtt://127.0.0.1:1",
        node_id="node-b",
        overrides={"queue": {"max_bytes": "64KiB", "on_full": "reject"}, "extra": {"k": 1}},
    )
    config = tomllib.loads(agent.config_path.read_text())
    assert config["node"] == {"id": "node-b", "data_dir": str(tmp_path / "a" / "data")}
    assert config["uplink"]["url"] == "mqtt://127.0.0.1:1"
    assert config["uplink"]["keepalive"] == "2s"
    assert config["uplink"]["inflight"] == 50
    assert config["queue"] == {"max_bytes": "64KiB", "on_full": "reject"}
    assert config["api"]["socket"] == str(tmp_path / "a" / "agent.sock")
    assert config["telemetry"] == {"interval": "0s"}
    assert config["discovery"] == {"enabled": False}
    assert config["extra"] == {"k": 1}


def test_pipeline_does_not_deadlock_against_a_line_at_a_time_server(tmp_path: Path) -> None:
    # A server that reads one line, then blocks writing its answer, like the agent:
    # writing every request before reading any answer would deadlock.
    path = tmp_path / "fake.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            for n, line in enumerate(lines, start=1):
                req = json.loads(line)
                conn.sendall(
                    json.dumps({"ok": True, "seq": n, "topic": req["topic"]}).encode() + b"\n"
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    count = 20_000
    try:
        with ApiClient(path, timeout=10) as api:
            lines = [
                json.dumps({"op": "publish", "topic": f"t/{i}", "data": "x" * 200}).encode() + b"\n"
                for i in range(count)
            ]
            answers = api.pipeline(lines)
    finally:
        server.close()
    thread.join(timeout=10)
    assert [a["seq"] for a in answers] == list(range(1, count + 1))
    assert answers[-1]["topic"] == f"t/{count - 1}"
