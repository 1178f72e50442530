"""The registry's ingest against a real mosquitto and a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from tests.conftest import AgentFactory, RegistryFactory
from tests.support.broker import Broker
from tests.support.mqttclient import connect, make_client, new_client_id
from tests.support.net import wait_until
from tests.support.registry import Registry
from tests.support.simnode import PREFIX, SimNodes, reported_doc, status_doc


def node_of(reg: Registry, node: str) -> dict[str, Any] | None:
    status, body = reg.request("GET", f"/api/v1/nodes/{node}")
    return body if status == 200 else None


def wait_node(reg: Registry, node: str, what: str, ok: Any, timeout: float = 10.0) -> None:
    def check() -> bool:
        found = node_of(reg, node)
        return found is not None and bool(ok(found))
    try:
        wait_until(check, timeout, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: node {node} is {node_of(reg, node)}") from None


def rejected(reg: Registry) -> dict[str, int]:
    counts: dict[str, int] = reg.get("/api/v1/stats")["rejected"]
    return counts


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish retained QoS 1 messages as fast as the broker takes them, then wait."""
    client = make_client(new_client_id("bulk"))
    client.max_inflight_messages_set(200)
    connect(client, port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1, retain=True) for t, p in messages]
        for info in infos:
            info.wait_for_publish(20)
    finally:
        client.disconnect()
        client.loop_stop()


def test_spoofed_reported_document_is_rejected_and_counted(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    node = sim_nodes(cloud.port, "honest")
    node.publish("reported", cbor2.dumps(reported_doc("victim", 99)))
    node.reported(5)
    wait_node(reg, "honest", "good document stored", lambda n: n["reported_version"] == 5)
    assert rejected(reg)["spoofed"] == 1
    assert node_of(reg, "victim") is None
    assert "victim" not in reg.nodes()


def test_malformed_and_oversized_documents_are_counted_and_the_next_good_one_served(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    node = sim_nodes(cloud.port, "n1")
    node.publish("reported", b"\xff\x00 not cbor")
    node.publish("status", cbor2.dumps(status_doc("online", boot=1, conn=1)
                                       | {"pad": "x" * 5000}))  # over the status size limit
    node.publish("reported", cbor2.dumps(reported_doc("n1", 3, services="web")))
    node.publish("status", cbor2.dumps({"state": "maybe"}))
    node.reported(4)
    node.online()
    wait_node(reg, "n1", "good documents stored",
              lambda n: n["reported_version"] == 4 and n["online"])
    assert rejected(reg)["invalid"] == 4
    assert reg.get("/api/v1/stats")["documents"] == 2


def test_late_older_reported_document_never_overwrites_the_newer(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    node = sim_nodes(cloud.port, "n1")
    node.reported(10, profile="newest")
    wait_node(reg, "n1", "version 10", lambda n: n["reported_version"] == 10)
    node.reported(7, profile="late")
    wait_until(lambda: rejected(reg)["older"] >= 1, 10, what="older document counted")
    found = node_of(reg, "n1")
    assert found is not None
    assert (found["reported_version"], found["profile"]) == (10, "newest")
    assert found["reported"]["version"] == 10


def test_many_versions_in_a_burst_keep_the_newest(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    versions = [5, 9, 2, 8, 7, 1]
    publish_all(cloud.port, [
        (f"{PREFIX}/nodes/n{i}/reported", cbor2.dumps(reported_doc(f"n{i}", v)))
        for v in versions for i in range(20)
    ])
    wait_until(lambda: len(reg.nodes()) == 20, 10, what="20 nodes stored")
    wait_until(lambda: reg.get("/api/v1/stats")["documents"] == 120, 10,
               what="every document handled")
    # Handled means decoded; the batch holding a node's 9 may still be committing.
    wait_until(lambda: {n["reported_version"] for n in reg.nodes().values()} == {9}, 10,
               what="each node at version 9")
    time.sleep(0.3)  # and no later, older document undoes it
    assert {n["reported_version"] for n in reg.nodes().values()} == {9}


def test_will_made_before_later_heartbeats_still_wins(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    node = sim_nodes(cloud.port, "n1")  # the Will's ts: now
    time.sleep(0.05)
    node.online()
    node.online()  # heartbeats, newer ts than the Will
    wait_node(reg, "n1", "online", lambda n: n["health"] == "healthy")
    node.die()
    wait_node(reg, "n1", "offline by the Will", lambda n: n["health"] == "offline")
    assert node_of(reg, "n1")["status"]["state"] == "offline"  # type: ignore[index]


def test_older_online_after_offline_does_not_win(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    node = sim_nodes(cloud.port, "n1", boot=1000.0, conn=2)
    node.publish("status", cbor2.dumps(status_doc("offline", boot=1000.0, conn=2, ts=1500.0)))
    wait_node(reg, "n1", "offline", lambda n: n["status"] is not None)
    # A heartbeat of the same connection sent later than the Will's ts, and one of an
    # earlier connection: both older than the offline.
    node.publish("status", cbor2.dumps(status_doc("online", boot=1000.0, conn=2, ts=1600.0)))
    node.publish("status", cbor2.dumps(status_doc("online", boot=1000.0, conn=1, ts=1700.0)))
    wait_until(lambda: rejected(reg)["older"] >= 2, 10, what="two older statuses counted")
    assert node_of(reg, "n1")["online"] is False  # type: ignore[index]
    node.publish("status", cbor2.dumps(status_doc("online", boot=1000.0, conn=3, ts=1000.0)))
    wait_node(reg, "n1", "online again on a new connection", lambda n: n["online"])


def test_two_workers_on_one_shared_subscription_store_each_node_once_with_its_newest(
    cloud: Broker, registry_factory: RegistryFactory, postgres_url: str
) -> None:
    one = registry_factory(cloud, postgres_url)
    two = registry_factory(cloud, postgres_url)
    time.sleep(0.5)  # both retained reads over (--catchup-idle 0.3s): only live traffic below
    publish_all(cloud.port, [
        (f"{PREFIX}/nodes/n{i:02d}/{kind}", doc)
        for v in range(1, 6) for i in range(50)
        for kind, doc in (("reported", cbor2.dumps(reported_doc(f"n{i:02d}", v))),
                          ("status", cbor2.dumps(status_doc("online", boot=1, conn=v))))
    ])

    def done() -> bool:
        seen = one.get("/api/v1/stats")["documents"] + two.get("/api/v1/stats")["documents"]
        return seen >= 500
    wait_until(done, 20, what="500 documents handled by the two workers")
    # "handled" counts a document when it is decoded: its batch may still be committing.
    def stored() -> bool:
        nodes = one.get("/api/v1/nodes")["nodes"]
        return len(nodes) == 50 and all(n["reported_version"] == 5 and n["online"]
                                        for n in nodes)
    wait_until(stored, 10, what="the last batches committed")
    nodes = one.get("/api/v1/nodes")["nodes"]
    assert [n["node"] for n in nodes] == [f"n{i:02d}" for i in range(50)]
    assert {n["reported_version"] for n in nodes} == {5}
    assert all(n["online"] for n in nodes)
    assert [n["reported_version"] for n in two.get("/api/v1/nodes")["nodes"]] == [5] * 50
    assert one.get("/api/v1/stats")["documents"] > 0
    assert two.get("/api/v1/stats")["documents"] > 0


def test_registries_in_different_share_groups_each_get_every_document(
    cloud: Broker, registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    prod = registry_factory(cloud, f"sqlite://{tmp_path / 'prod.db'}",
                            extra=["--share-group", "prod"])
    staging = registry_factory(cloud, f"sqlite://{tmp_path / 'staging.db'}",
                               extra=["--share-group", "staging"])
    time.sleep(0.5)  # both retained reads over: only live traffic below
    publish_all(cloud.port, [
        (f"{PREFIX}/nodes/n{i:02d}/reported", cbor2.dumps(reported_doc(f"n{i:02d}", v)))
        for v in range(1, 4) for i in range(20)
    ])
    for reg in (prod, staging):
        wait_until(lambda r=reg: r.get("/api/v1/stats")["documents"] >= 60, 20,
                   what="every document in each registry")
        # Counted when decoded; stored once its batch commits.
        wait_until(lambda r=reg: [n["reported_version"] for n in r.get("/api/v1/nodes")["nodes"]]
                   == [3] * 20, 10, what="each node at its newest version in each registry")


def test_registry_on_an_empty_database_rebuilds_its_view_from_retained_messages(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str,
    tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    first = registry_factory(cloud, db_url)
    nodes = [sim_nodes(cloud.port, f"n{i}") for i in range(3)]
    for i, node in enumerate(nodes):
        node.online(depth=i)
        node.reported(100 + i, labels={"site": "lab"})
    wait_until(lambda: len(first.nodes()) == 3, 10, what="3 nodes stored")
    status, put = first.request("PUT", "/api/v1/nodes/n1/desired",
                                {"services": {"web": {"command": ["sleep", "60"]}}})
    assert status == 200 and put["published"] is True
    first.stop()

    if db_url.startswith("sqlite"):
        empty = f"sqlite://{tmp_path / 'empty.db'}"
    else:
        empty = request.getfixturevalue("postgres_server").create_database()
    second = registry_factory(cloud, empty)

    def rebuilt() -> bool:
        got = second.nodes()
        return len(got) == 3 and all(n["online"] and n["reported_version"] for n in
                                     got.values()) and got["n1"]["desired_version"] == 1
    wait_until(rebuilt, 10, what="view rebuilt from the broker")
    got = second.nodes()
    assert [got[f"n{i}"]["reported_version"] for i in range(3)] == [100, 101, 102]
    assert [got[f"n{i}"]["queue_depth"] for i in range(3)] == [0, 1, 2]
    assert got["n2"]["labels"] == {"site": "lab"}
    detail = node_of(second, "n1")
    assert detail is not None
    assert detail["desired"]["services"] == {"web": {"command": ["sleep", "60"]}}
    assert detail["desired_published"] is True



def test_a_registry_restart_does_not_move_last_seen_of_a_node_that_is_gone(
    cloud: Broker, registry_factory: RegistryFactory, agent_factory: AgentFactory,
    db_url: str, tmp_path: Path,
) -> None:
    first = registry_factory(cloud, db_url)
    agent = agent_factory(cloud, node_id="gone", overrides={"state": {"debounce": "0.2s"}})
    wait_node(first, "gone", "healthy", lambda n: n["health"] == "healthy"
              and n["reported_version"])
    agent.kill9()
    killed_at = time.time()
    wait_node(first, "gone", "offline", lambda n: n["health"] == "offline")
    before = first.nodes()["gone"]["last_seen"]
    assert before <= killed_at
    first.stop()
    time.sleep(1.5)

    # The same database: the retained documents come again, and say nothing new.
    again = registry_factory(cloud, db_url)
    wait_until(lambda: again.get("/api/v1/stats")["documents"] >= 2, 10,
               what="the retained status and reported documents read")
    assert again.nodes()["gone"]["last_seen"] == before
    # An empty database: the node is first heard of now, but it last spoke before the kill.
    fresh = registry_factory(cloud, f"sqlite://{tmp_path / 'fresh.db'}")
    wait_node(fresh, "gone", "rebuilt", lambda n: n["reported_version"])
    assert fresh.nodes()["gone"]["last_seen"] <= killed_at


async def test_a_long_write_queue_pauses_reading_and_loses_nothing(
    cloud: Broker, tmp_path: Path
) -> None:
    """Past `queue_high` waiting documents the ingest stops reading; all are stored after."""
    import asyncio

    from edge.registry.ingest import Ingest
    from edge.registry.settings import RegistrySettings
    from edge.registry.store import open_store

    store = await open_store(f"sqlite://{tmp_path / 'r.db'}")
    settings = RegistrySettings(broker_port=cloud.port, db_url="sqlite:///unused",
                                client_id="paused-ingest", batch_max=5, queue_high=40,
                                catchup_idle=0.2)
    ingest = Ingest(settings, store)
    task = asyncio.create_task(ingest.run())
    try:
        await asyncio.to_thread(wait_until, lambda: ingest.online, 10, what="ingest online")
        from edge.mqtt import MqttConnection

        sender = MqttConnection(host="127.0.0.1", port=cloud.port, client_id="bulk",
                                keepalive=30, max_inflight=200)
        await sender.connect(10)
        await asyncio.gather(*(
            sender.publish(f"{PREFIX}/nodes/n{i:03d}/reported",
                           cbor2.dumps(reported_doc(f"n{i:03d}", 7)), retain=True)
            for i in range(600)))
        await sender.disconnect()
        for _ in range(300):
            if ingest.stats.documents >= 600:
                break
            await asyncio.sleep(0.05)
        nodes = await store.nodes()
        assert len(nodes) == 600 and {n["reported_version"] for n in nodes} == {7}
        assert ingest.stats.pauses >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
