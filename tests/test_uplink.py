"""Uplink behaviours beyond plain delivery: telemetry, MQTT 3.1.1 refusals, shutdown."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.conftest import AgentFactory, BrokerFactory
from tests.support.broker import Broker
from tests.support.expect import accepted_seqs, publish_items
from tests.support.net import wait_until
from tests.support.proxy import FlakyProxy
from tests.support.subscriber import wait_status

KEEPALIVE = 2.0


TELEMETRY_FILTER = "edge/v1/nodes/+/telemetry"


def test_telemetry_sampled_offline_arrives_later_with_its_original_timestamps(
    broker: Broker, subscriber_factory: Any, agent_factory: AgentFactory
) -> None:
    broker.start()
    sub = subscriber_factory(broker, topic_filter=TELEMETRY_FILTER)  # persistent session
    broker.stop()
    agent = agent_factory(broker, overrides={"telemetry": {"interval": "1s"}})
    agent.wait_status(lambda s: s["telemetry"]["samples"] >= 2, 10, what="2 samples")
    assert agent.status()["queue"]["depth"] >= 2  # nowhere to send them yet
    broker_started = time.time()
    broker.start()
    sub.wait_for(2, timeout=15)

    taken_offline = [e for e in sub.envelopes() if e["ts"] < broker_started]
    assert len(taken_offline) >= 2, "samples taken offline were not delivered"
    for env in sub.envelopes():
        assert env["topic"] == "telemetry" and env["node"] == "node-a"
        assert env["data"]["ts"] == env["ts"], "ts must be the sample time, not the send time"
        assert {"cpu", "load", "memory", "disk", "net", "uptime", "temperatures",
                "facts"} <= set(env["data"])
        assert "memory" in env["data"]["facts"]  # the firmware profile's facts, fresh
    stamps = [e["ts"] for e in sub.envelopes()]
    assert stamps == sorted(stamps)
    # Telemetry has its own topic, never under up/.
    assert all(r.topic == "edge/v1/nodes/node-a/telemetry" for r in sub.received)


def test_mqtt311_broker_dropping_the_link_on_one_message_gets_it_dead_lettered(
    broker_factory: BrokerFactory, subscriber_factory: Any, agent_factory: AgentFactory
) -> None:
    broker = broker_factory(extra=["max_packet_size 2048"])
    broker.start()
    sub = subscriber_factory(broker)
    agent = agent_factory(broker, overrides={"uplink": {"protocol": "3.1.1", "refused_limit": 3}})
    agent.wait_online()
    small1 = agent.publish_ok("sensors/t", "small-1")["seq"]
    big = agent.publish_ok("sensors/t", "B" * 8192)["seq"]
    small2 = agent.publish_ok("sensors/t", "small-2")["seq"]
    sub.wait_for_seqs([small1, small2], timeout=30)
    status = agent.wait_drained(timeout=15)

    first = [r.envelope["seq"] for r in sub.first_arrivals()]
    assert first == [small1, small2]
    assert status["queue"]["dead"] == 1
    [dead] = agent.queue()["dead_letters"]
    assert dead["seq"] == big
    assert "closed the connection" in dead["reason"]
    # Exactly refused_limit failed connections, then one that works: no loop.
    connects = status["uplink"]["connects"]
    assert connects <= 4, f"{connects} connects for one refused message"
    time.sleep(1.5)
    assert agent.status()["uplink"]["connects"] == connects


def test_half_open_broker_is_detected_while_messages_are_in_flight(
    broker: Broker, subscriber_factory: Any, agent_factory: AgentFactory
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    agent = agent_factory(broker, overrides={"uplink": {"keepalive": f"{KEEPALIVE:.0f}s"}})
    agent.wait_online()

    stop = threading.Event()
    seqs: list[int] = []

    def produce() -> None:
        i = 0
        while not stop.is_set():
            seqs.extend(accepted_seqs(agent.publish_many(publish_items(20, start=i))))
            i += 20
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        time.sleep(0.5)
        broker.pause()
        t0 = time.monotonic()
        agent.wait_status(
            lambda s: s["uplink"]["state"] == "offline", 1.5 * KEEPALIVE + 2, what="offline"
        )
        detected = time.monotonic() - t0
        time.sleep(0.3)
    finally:
        stop.set()
        producer.join(timeout=30)
    assert detected <= 1.5 * KEEPALIVE + 0.5, f"noticed after {detected:.2f}s"
    broker.resume()
    sub.wait_for_seqs(seqs, timeout=30)
    assert sub.distinct_seqs() >= set(seqs)


def test_sigterm_publishes_offline_status_and_exits_zero_keeping_the_backlog(
    broker: Broker, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(broker)  # broker not started yet: the backlog stays queued
    seqs = accepted_seqs(agent.publish_many(publish_items(50)))
    broker.start()
    wait_status(broker.port, "node-a", "online", timeout=10)
    assert agent.terminate() == 0
    status = wait_status(broker.port, "node-a", "offline", timeout=5)
    assert status["state"] == "offline"
    agent.start()
    assert agent.wait_drained(timeout=15)["queue"]["depth"] == 0
    assert seqs  # every one was accepted before the stop


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_flaky_link_never_dead_letters_a_good_message(
    protocol: str, broker: Broker, subscriber_factory: Any, agent_factory: AgentFactory
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    proxy = FlakyProxy(broker.port, cut_after=0.5).start()
    try:
        agent = agent_factory(
            proxy.url,
            overrides={"uplink": {"protocol": protocol, "refused_limit": 2,
                                  "backoff_max": "0.2s"}},
        )
        seq = agent.publish_ok("valid/important", "perfectly fine message")["seq"]
        wait_until(lambda: proxy.connections >= 6, timeout=20, what="6 cut connections")
        assert agent.queue()["dead"] == 0, agent.queue()["dead_letters"]
        proxy.flaky = False  # the network heals
        sub.wait_for_seqs([seq], timeout=20)
        assert agent.wait_drained(timeout=10)["queue"]["dead"] == 0
    finally:
        proxy.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_two_agents_with_one_node_id_are_told_apart_in_the_log_and_status_once(
    broker: Broker, agent_factory: AgentFactory, protocol: str
) -> None:
    broker.start()
    overrides = {"uplink": {"protocol": protocol}}
    twins = [
        agent_factory(broker, node_id="cloned", name=name, overrides=overrides)
        for name in ("twin-a", "twin-b")
    ]
    for twin in twins:
        accepted_seqs(twin.publish_many(publish_items(20)))
    needle = "another client is probably using the same client id 'cloned'"

    def diagnosed() -> bool:
        return all(needle in t.log_path.read_text() for t in twins)

    wait_until(diagnosed, 30, what="both twins log the client id clash")
    time.sleep(3.0)  # the clash goes on: the log must not repeat it
    for twin in twins:
        log = twin.log_path.read_text()
        assert log.count(needle) == 1, f"{twin.workdir.name} logged it {log.count(needle)} times"
        status = twin.status()
        assert needle in (status["uplink"]["last_error"] or ""), status["uplink"]
        assert "[node] id" in status["uplink"]["last_error"]
        assert status["queue"]["dead"] == 0, "a message was dead-lettered for the clash"
