"""Store-and-forward end to end: socket API -> outbox -> uplink -> mosquitto -> subscriber.

Each test drives the real agent process against a real mosquitto. The
subscriber's persistent session is made before the agent can reach the broker
(`primed_subscriber`), so what it receives is exactly what the broker accepted.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import pytest

from tests.conftest import AgentFactory, SubscriberFactory
from tests.support.agent import Agent
from tests.support.broker import Broker
from tests.support.expect import (
    accepted_seqs,
    assert_duplicates_identical,
    assert_error,
    publish_items,
)
from tests.support.subscriber import Subscriber

INFLIGHT = 50
MiB = 1024 * 1024


def test_offline_backlog_is_delivered_complete_and_in_order_once_the_broker_appears(
    broker: Broker, primed_subscriber: Subscriber, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(broker)  # the broker's port is reserved, nothing listens
    backlog_answers = agent.publish_many(publish_items(10_000, "sensors/t", "m"))
    urgent_answers = agent.publish_many(publish_items(5, "alerts/x", "u", prio=5))
    backlog, urgent = accepted_seqs(backlog_answers), accepted_seqs(urgent_answers)
    ids = {a["seq"]: a["id"] for a in backlog_answers + urgent_answers}
    assert backlog[-1] < urgent[0]
    status = agent.status()
    assert status["uplink"]["state"] == "offline"
    assert status["queue"]["depth"] == 10_005

    broker.start()
    primed_subscriber.wait_for_seqs(backlog + urgent, timeout=90)

    assert primed_subscriber.undecodable == []
    expected = {seq: ("sensors/t", f"m{i}", 0) for i, seq in enumerate(backlog)}
    expected |= {seq: ("alerts/x", f"u{i}", 5) for i, seq in enumerate(urgent)}
    for r in primed_subscriber.received:
        env = r.envelope
        topic, data, prio = expected[env["seq"]]
        assert r.topic == f"edge/v1/nodes/node-a/up/{topic}"
        assert env["v"] == 1 and env["node"] == "node-a"
        assert env["topic"] == topic and env["data"] == data and env["ct"] == "text/plain"
        assert env.get("prio", 0) == prio
        assert isinstance(env["id"], bytes) and env["id"].hex() == ids[env["seq"]]
    assert primed_subscriber.duplicate_count() <= INFLIGHT
    assert_duplicates_identical(primed_subscriber)

    first = [r.envelope for r in primed_subscriber.first_arrivals()]
    # FIFO within one priority.
    assert [e["seq"] for e in first if e.get("prio", 0) == 0] == backlog
    assert [e["seq"] for e in first if e.get("prio", 0) == 5] == urgent
    # Higher priority first: the urgent ones, though accepted last, overtake the backlog.
    order = [e.get("prio", 0) for e in first]
    assert order[:5] == [5] * 5, f"first arrivals by prio: {order[:10]}"

    assert agent.wait_drained(timeout=10)["queue"]["dropped"] == 0


def test_a_steady_link_delivers_each_message_once(
    broker: Broker, primed_subscriber: Subscriber, agent_factory: AgentFactory
) -> None:
    """Duplicates are for reconnects and crashes only: a link that stays up sends each once.

    A few publishes at a time make many small commits, each racing the uplink's
    next read of the outbox (a read whose snapshot predates the commit of an ack).
    """
    broker.start()
    agent = agent_factory(broker)
    agent.wait_online()
    seqs: list[int] = []
    with agent.connect() as api:
        for i in range(0, 3000, 4):
            items = publish_items(4, "sensors/t", f"r{i}-")
            api.send_raw(b"".join(json.dumps(item).encode() + b"\n" for item in items))
            seqs += accepted_seqs([api.read_response() for _ in items])
    primed_subscriber.wait_for_seqs(seqs, timeout=60)
    agent.wait_drained(timeout=10)
    assert agent.status()["uplink"]["connects"] == 1  # no reconnect to excuse a duplicate
    assert primed_subscriber.duplicate_count() == 0


def test_envelope_carries_the_request_fields(
    broker: Broker, subscriber_factory: SubscriberFactory, agent_factory: AgentFactory
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    agent = agent_factory(broker)
    agent.wait_online()
    before = time.time()
    text = agent.publish_ok("sensors/t", "21.5")
    raw = agent.publish_ok(
        "cam/1", data_b64=base64.b64encode(b"\x00\x01\xffbin").decode(), prio=2, ttl=3600
    )
    typed = agent.publish_ok("sensors/h", '{"h": 40}', ct="application/json")
    after = time.time()
    sub.wait_for_seqs([text["seq"], raw["seq"], typed["seq"]], timeout=10)

    envs = {r.envelope["seq"]: r.envelope for r in sub.received}
    t, b, j = envs[text["seq"]], envs[raw["seq"]], envs[typed["seq"]]
    assert t["data"] == "21.5" and t["ct"] == "text/plain" and t["id"].hex() == text["id"]
    assert t.get("prio", 0) == 0 and "exp" not in t
    assert before - 1 <= t["ts"] <= after + 1
    assert b["data"] == b"\x00\x01\xffbin" and b["ct"] == "application/octet-stream"
    assert b["prio"] == 2 and b["id"].hex() == raw["id"] and b["topic"] == "cam/1"
    assert abs(b["exp"] - (b["ts"] + 3600)) < 1.0
    assert j["data"] == '{"h": 40}' and j["ct"] == "application/json"


def test_no_seq_missing_across_three_broker_restarts_while_publishing(
    broker: Broker, subscriber_factory: SubscriberFactory, agent_factory: AgentFactory
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    agent = agent_factory(broker)
    agent.wait_online()

    responses: list[dict[str, Any]] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with agent.connect() as api:
                i = 0
                while not stop.is_set():
                    responses.append(
                        api.request({"op": "publish", "topic": "s/t", "data": f"p{i}"})
                    )
                    i += 1
                    time.sleep(0.005)
        except BaseException as exc:
            failure.append(exc)

    producer = threading.Thread(target=produce, name="producer", daemon=True)
    producer.start()
    try:
        for _ in range(3):
            time.sleep(0.7)
            broker.restart()  # SIGTERM (persistence saved), then start on the same port
            agent.wait_status(
                lambda s: s["uplink"]["state"] == "online", 10, what="uplink back online"
            )
        time.sleep(0.7)
    finally:
        stop.set()
        producer.join(timeout=15)
    assert not failure, f"producer failed: {failure[0]!r}"
    seqs = accepted_seqs(responses)
    assert len(seqs) > 200

    sub.wait_for_seqs(seqs, timeout=30)
    assert sub.undecodable == []
    first = [r.envelope["seq"] for r in sub.first_arrivals()]
    assert first == seqs
    # Each restart may repeat at most one in-flight window.
    assert sub.duplicate_count() <= 3 * INFLIGHT
    assert_duplicates_identical(sub)


def test_backlog_drains_within_seconds_of_the_broker_becoming_reachable(
    broker: Broker, primed_subscriber: Subscriber, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(broker)
    seqs = accepted_seqs(agent.publish_many(publish_items(10)))
    time.sleep(2.0)  # let the reconnect backoff reach its cap (1s)
    t0 = time.monotonic()
    broker.start()
    # No new publish nudges the agent: the reconnect alone must drain the backlog.
    agent.wait_drained(timeout=5.0)
    primed_subscriber.wait_for_seqs(seqs, timeout=max(0.1, 5.0 - (time.monotonic() - t0)))
    assert time.monotonic() - t0 <= 5.0


@pytest.mark.slow
def test_memory_stays_bounded_while_queuing_and_draining_70k_messages(
    broker: Broker, primed_subscriber: Subscriber, agent_factory: AgentFactory
) -> None:
    budget = 8 * MiB
    agent = agent_factory(broker)
    pad = "x" * 100
    seqs = accepted_seqs(agent.publish_many(publish_items(5_000, prefix=f"{pad}-")))
    base = agent.rss()
    peak_queuing = base
    for start in range(5_000, 70_000, 5_000):
        seqs += accepted_seqs(
            agent.publish_many(publish_items(5_000, prefix=f"{pad}-", start=start))
        )
        peak_queuing = max(peak_queuing, agent.rss())
    assert len(seqs) == 70_000 and agent.status()["queue"]["depth"] == 70_000
    assert peak_queuing - base <= budget, (
        f"RSS grew {(peak_queuing - base) / MiB:.1f} MiB queuing 65k more messages "
        f"(base {base / MiB:.1f} MiB)"
    )

    broker.start()
    peak_draining = base
    deadline = time.monotonic() + 180
    wanted = set(seqs)
    while not wanted <= primed_subscriber.distinct_seqs():
        assert time.monotonic() < deadline, (
            f"only {len(primed_subscriber.distinct_seqs())} of 70000 delivered in 180s"
        )
        agent.assert_alive()
        peak_draining = max(peak_draining, agent.rss())
        time.sleep(0.2)
    print(
        f"RSS base {base / MiB:.1f} MiB, peak queuing +{(peak_queuing - base) / MiB:.1f} MiB,"
        f" peak draining +{(peak_draining - base) / MiB:.1f} MiB"
    )
    assert peak_draining - base <= budget, (
        f"RSS grew {(peak_draining - base) / MiB:.1f} MiB while draining "
        f"(base {base / MiB:.1f} MiB)"
    )
    assert primed_subscriber.duplicate_count() <= INFLIGHT
    assert agent.wait_drained(timeout=10)["queue"]["dropped"] == 0


def test_expired_messages_are_dropped_not_sent_and_counted(
    broker: Broker, primed_subscriber: Subscriber, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(broker)
    short = agent.publish_ok("sensors/t", "stale", ttl=1)
    durable = agent.publish_ok("sensors/t", "fresh")
    time.sleep(2.0)
    broker.start()
    primed_subscriber.wait_for_seqs([durable["seq"]], timeout=15)
    status = agent.wait_drained(timeout=10)
    assert status["queue"]["expired"] == 1
    assert status["queue"]["dropped"] == 0
    assert short["seq"] not in primed_subscriber.distinct_seqs()
    assert [r.envelope["data"] for r in primed_subscriber.received] == ["fresh"]


def test_full_outbox_drop_oldest_evicts_oldest_and_keeps_newest(
    broker: Broker, primed_subscriber: Subscriber, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(
        broker, overrides={"queue": {"max_bytes": "64KiB", "on_full": "drop-oldest"}}
    )
    total = 1000
    seqs = accepted_seqs(agent.publish_many(publish_items(total, prefix="y" * 200 + "-")))
    queue = agent.status()["queue"]
    assert queue["dropped"] > 0
    assert queue["bytes"] <= 64 * 1024
    assert queue["depth"] + queue["dropped"] == total
    survivors = seqs[queue["dropped"] :]
    assert survivors[-1] == seqs[-1]

    broker.start()
    primed_subscriber.wait_for_seqs(survivors, timeout=30)
    agent.wait_drained(timeout=10)
    time.sleep(0.3)
    assert primed_subscriber.distinct_seqs() == set(survivors)
    first = [r.envelope["seq"] for r in primed_subscriber.first_arrivals()]
    assert first == survivors
    assert agent.status()["queue"]["dropped"] == queue["dropped"]


def test_full_outbox_reject_answers_queue_full_and_loses_nothing_accepted(
    broker: Broker, primed_subscriber: Subscriber, agent_factory: AgentFactory
) -> None:
    agent: Agent = agent_factory(
        broker, overrides={"queue": {"max_bytes": "64KiB", "on_full": "reject"}}
    )
    responses = agent.publish_many(publish_items(1000, prefix="z" * 200 + "-"))
    accepted = [r for r in responses if r.get("ok") is True]
    assert 0 < len(accepted) < len(responses), "the outbox never filled"
    # Nothing leaves an offline outbox, so once full it stays full.
    assert responses[: len(accepted)] == accepted
    for r in responses[len(accepted) :]:
        assert_error(r, "queue_full")
    seqs = accepted_seqs(accepted)
    queue = agent.status()["queue"]
    assert queue["depth"] == len(accepted) and queue["dropped"] == 0
    assert queue["bytes"] <= 64 * 1024

    broker.start()
    primed_subscriber.wait_for_seqs(seqs, timeout=30)
    agent.wait_drained(timeout=10)
    # Room again once drained.
    later = agent.publish_ok("sensors/t", "after")
    primed_subscriber.wait_for_seqs([later["seq"]], timeout=10)
    assert [r.envelope["seq"] for r in primed_subscriber.first_arrivals()] == [*seqs, later["seq"]]
