"""Faults: the agent crashing, the broker hanging or refusing, a damaged database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

from tests.conftest import AgentFactory, BrokerFactory, SubscriberFactory
from tests.support.broker import Broker
from tests.support.expect import accepted_seqs, assert_duplicates_identical, publish_items
from tests.support.subscriber import Subscriber, wait_status

INFLIGHT = 50
KEEPALIVE = 2.0


def test_row_survives_kill9_between_accept_and_any_uplink(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    seqs = accepted_seqs(agent.publish_many(publish_items(100)))
    agent.kill9()
    agent.start()
    assert agent.status()["queue"]["depth"] == 100
    later = agent.publish_ok("sensors/t", "after-crash")
    assert later["seq"] > seqs[-1]


def test_seq_keeps_increasing_across_orderly_restarts(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    last = agent.publish_ok("sensors/t", "a")["seq"]
    for _ in range(2):
        agent.restart()
        seq = agent.publish_ok("sensors/t", "b")["seq"]
        assert seq > last
        last = seq


def test_no_row_lost_and_duplicates_bounded_when_agent_is_killed_mid_drain(
    broker: Broker, primed_subscriber: Subscriber, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(broker)
    seqs = accepted_seqs(agent.publish_many(publish_items(20_000)))
    broker.start()
    primed_subscriber.wait_for(1_000, timeout=30)
    agent.kill9()
    delivered_before_kill = len(primed_subscriber.distinct_seqs())
    assert delivered_before_kill < len(seqs), "backlog drained before the kill: nothing tested"

    agent.start()
    primed_subscriber.wait_for_seqs(seqs, timeout=90)
    agent.wait_drained(timeout=15)
    time.sleep(0.5)  # let any last repeated copy reach the subscriber

    assert primed_subscriber.undecodable == []
    assert primed_subscriber.distinct_seqs() == set(seqs)
    duplicates = primed_subscriber.duplicate_count()
    assert duplicates <= INFLIGHT, f"{duplicates} duplicates after one kill -9"
    assert_duplicates_identical(primed_subscriber)
    first = [r.envelope["seq"] for r in primed_subscriber.first_arrivals()]
    assert first == seqs


def test_half_open_broker_is_detected_within_one_and_a_half_keepalives(
    broker: Broker, subscriber_factory: SubscriberFactory, agent_factory: AgentFactory
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    agent = agent_factory(broker, overrides={"uplink": {"keepalive": "2s"}})
    agent.wait_online()
    before = agent.publish_ok("sensors/t", "before")
    sub.wait_for_seqs([before["seq"]], timeout=10)

    broker.pause()  # TCP stays up, nobody answers
    t0 = time.monotonic()
    agent.wait_status(
        lambda s: s["uplink"]["state"] == "offline", 1.5 * KEEPALIVE + 2.0, what="uplink offline"
    )
    detected = time.monotonic() - t0
    assert detected <= 1.5 * KEEPALIVE + 0.5, f"half-open link noticed after {detected:.2f}s"

    during = accepted_seqs(agent.publish_many(publish_items(20, prefix="during-")))
    broker.resume()
    sub.wait_for_seqs(during, timeout=20)
    first = [r.envelope["seq"] for r in sub.first_arrivals()]
    assert first == [before["seq"], *during]
    agent.wait_status(lambda s: s["uplink"]["state"] == "online", 10, what="uplink back online")


def test_last_will_marks_the_node_offline_after_kill9(
    broker: Broker, agent_factory: AgentFactory
) -> None:
    broker.start()
    agent = agent_factory(broker)
    online = wait_status(broker.port, "node-a", "online", timeout=10)
    assert {"ts", "boot", "heartbeat"} <= online.keys()
    agent.kill9()
    offline = wait_status(broker.port, "node-a", "offline", timeout=10)
    assert offline["state"] == "offline"


def test_message_refused_by_the_broker_is_dead_lettered_and_later_ones_flow(
    broker_factory: BrokerFactory,
    subscriber_factory: SubscriberFactory,
    agent_factory: AgentFactory,
) -> None:
    broker = broker_factory(extra=["max_packet_size 2048"])
    broker.start()
    sub = subscriber_factory(broker)
    agent = agent_factory(broker)
    agent.wait_online()

    small1 = agent.publish_ok("sensors/t", "small-1")
    big = agent.publish_ok("sensors/t", "B" * 8192)
    small2 = agent.publish_ok("sensors/t", "small-2")
    small3 = agent.publish_ok("sensors/t", "small-3")
    smalls = [small1["seq"], small2["seq"], small3["seq"]]
    sub.wait_for_seqs(smalls, timeout=15)
    status = agent.wait_drained(timeout=10)

    first = [r.envelope["seq"] for r in sub.first_arrivals()]
    assert first == smalls
    assert big["seq"] not in sub.distinct_seqs()
    assert status["queue"]["dead"] == 1
    assert status["uplink"]["connects"] <= 2, "the refused message caused reconnects"
    queue = agent.queue()
    assert queue["dead"] == 1
    [dead] = queue["dead_letters"]
    assert dead["seq"] == big["seq"] and dead["id"] == big["id"]
    assert dead["topic"] == "sensors/t"
    assert isinstance(dead["reason"], str) and dead["reason"].strip()
    assert isinstance(dead["ts"], int | float)

    # Not retried in a loop: nothing changes while the link stays up.
    time.sleep(1.5)
    after = agent.status()
    assert after["uplink"]["connects"] == status["uplink"]["connects"]
    assert after["uplink"]["state"] == "online"
    assert agent.queue()["dead_letters"] == queue["dead_letters"]


def test_corrupt_outbox_is_moved_aside_and_a_fresh_one_is_used(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None, start=False)
    agent.data_dir.mkdir(parents=True)
    garbage = b"this is not an sqlite database\x00\xff" * 2048
    (agent.data_dir / "outbox.db").write_bytes(garbage)

    agent.start()
    status = agent.status()
    assert status["queue"]["depth"] == 0
    kept = [p for p in agent.data_dir.iterdir() if "corrupt" in p.name]
    assert len(kept) == 1, f"files in data dir: {sorted(p.name for p in agent.data_dir.iterdir())}"
    moved = status["queue"]["moved_aside"]
    assert moved["path"] == str(kept[0]) and abs(moved["ts"] - time.time()) < 60, moved
    table = subprocess.run(
        [sys.executable, "-m", "edge", "status", "--socket", str(agent.socket_path)],
        capture_output=True, text=True, check=True, timeout=20,
    ).stdout
    assert f"moved aside  the outbox was corrupt: moved to {kept[0]}" in table, table
    assert kept[0].read_bytes() == garbage
    seq = agent.publish_ok("sensors/t", "after-corruption")["seq"]
    assert isinstance(seq, int)

    db = sqlite3.connect(f"file:{agent.data_dir / 'outbox.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
    finally:
        db.close()

    agent.restart()
    assert agent.status()["queue"]["depth"] == 1
    assert [p.name for p in agent.data_dir.iterdir() if "corrupt" in p.name] == [kept[0].name]


def test_data_dir_and_outbox_files_are_not_readable_by_others(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    agent.publish_ok("sensors/t", "private")
    modes = {
        p.name: p.stat().st_mode & 0o777
        for p in agent.data_dir.iterdir() if p.name.startswith("outbox.db")
    }
    assert agent.data_dir.stat().st_mode & 0o777 == 0o750
    assert set(modes) >= {"outbox.db", "outbox.db-wal", "outbox.db-shm", "outbox.db.seq"}, modes
    assert all(mode == 0o640 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}
