"""The registry's HTTP API: desired PUTs and their publishing, filters, health."""

from __future__ import annotations

import threading
from typing import Any

import cbor2
import pytest

from edge.documents import parse_desired
from edge.errors import DocumentError
from tests.conftest import RegistryFactory
from tests.support.broker import Broker
from tests.support.mqttclient import connect, make_client, new_client_id
from tests.support.net import wait_until
from tests.support.registry import Registry
from tests.support.simnode import PREFIX, SimNodes

WEB = {"services": {"web": {"command": ["sleep", "60"]}}}



def retained(port: int, topic: str, timeout: float = 5.0) -> tuple[dict[str, Any], bool]:
    """The retained message on `topic` as a fresh subscriber gets it: (document, retain)."""
    got: list[tuple[dict[str, Any], bool]] = []
    arrived = threading.Event()
    client = make_client(new_client_id("retained"))

    def on_message(c: Any, u: Any, msg: Any) -> None:
        got.append((cbor2.loads(msg.payload), bool(msg.retain)))
        arrived.set()

    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    connect(client, port)
    client.loop_start()
    try:
        if not arrived.wait(timeout):
            raise AssertionError(f"no retained message on {topic}")
        return got[0]
    finally:
        client.disconnect()
        client.loop_stop()


def put(reg: Registry, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    return reg.request("PUT", path, body, raw)


def test_put_desired_with_a_bad_document_answers_400_with_the_parsers_message(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    bad = {"services": {"web": {"command": "sleep 60"}}}
    with pytest.raises(DocumentError) as parser:
        parse_desired(bad, need_version=False)
    status, body = put(reg, "/api/v1/nodes/n1/desired", bad)
    assert (status, body["error"]) == (400, {"code": "invalid_desired",
                                             "message": str(parser.value)})
    status, body = put(reg, "/api/v1/nodes/n1/desired", raw=b"{not json")
    assert (status, body["error"]["code"]) == (400, "bad_json")
    status, body = put(reg, "/api/v1/nodes/n1/desired",
                       {"services": {}, "config": {"x": "y" * 300_000}})
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert reg.get("/api/v1/stats")["nodes"] == 0  # nothing stored


def test_put_desired_bumps_above_applied_stores_and_publishes_retained(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    node = sim_nodes(cloud.port, "n1")
    node.reported(1, desired_applied=7)
    wait_until(lambda: "n1" in reg.nodes(), 10, what="node stored")
    assert put(reg, "/api/v1/nodes/n1/desired", WEB) == (
        200, {"node": "n1", "version": 8, "published": True})
    status, answer = put(reg, "/api/v1/nodes/n1/desired", {"services": {}})
    assert (status, answer["version"]) == (200, 9)
    doc, retain = retained(cloud.port, f"{PREFIX}/nodes/n1/desired")
    assert retain is True
    assert parse_desired(doc).version == 9 and doc["services"] == {}
    detail = reg.get("/api/v1/nodes/n1")
    assert detail["desired_version"] == 9 and detail["desired"]["version"] == 9
    assert detail["desired_published"] is True


def test_desired_put_while_the_broker_is_down_is_published_on_reconnect(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    cloud.stop()
    wait_until(lambda: reg.get("/healthz")["broker"] == "offline", 10, what="broker offline")
    status, answer = put(reg, "/api/v1/nodes/n1/desired?provision=true", WEB)
    assert (status, answer) == (200, {"node": "n1", "version": 1, "published": False})
    assert reg.get("/api/v1/nodes/n1")["desired_published"] is False
    cloud.start()
    wait_until(lambda: reg.get("/api/v1/nodes/n1")["desired_published"], 15,
               what="published after the reconnect")
    doc, retain = retained(cloud.port, f"{PREFIX}/nodes/n1/desired")
    assert retain and doc["version"] == 1 and doc["services"] == WEB["services"]


def test_a_put_for_a_node_never_heard_of_is_refused_unless_provisioning(
    cloud: Broker, registry_factory: RegistryFactory, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    status, answer = put(reg, "/api/v1/nodes/typo-node/desired", WEB)
    assert status == 404 and answer["error"]["code"] == "unknown_node"
    assert "provision=true" in answer["error"]["message"]
    assert reg.nodes() == {}
    status, answer = put(reg, "/api/v1/nodes/new-pi/desired?provision=true", WEB)
    assert status == 200 and answer["version"] == 1
    node = reg.get("/api/v1/nodes/new-pi")
    # The registry's own document is no sign of the node's life.
    assert node["last_seen"] is None and node["health"] == "offline"


def test_deeply_nested_json_and_bad_node_ids_get_400(
    cloud: Broker, registry_factory: RegistryFactory, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    status, answer = put(reg, "/api/v1/nodes/n1/desired", raw=b"[" * 100_000)
    assert status == 400 and answer["error"]["code"] == "bad_json"
    status, answer = reg.request("GET", "/api/v1/nodes/bad%20id")
    assert status == 400 and answer["error"]["code"] == "bad_node"
    assert reg.get("/healthz")["ok"] is True  # and it goes on serving


def test_label_group_put_sets_desired_on_every_node_with_the_label(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url)
    for name, site in (("a", "x"), ("b", "x"), ("c", "y")):
        sim_nodes(cloud.port, name).reported(1, labels={"site": site})
    wait_until(lambda: len(reg.nodes()) == 3, 10, what="3 nodes stored")
    status, answer = put(reg, "/api/v1/labels/site/x/desired", WEB)
    assert status == 200
    assert answer == {"nodes": [{"node": "a", "version": 1, "published": True},
                                {"node": "b", "version": 1, "published": True}]}
    assert reg.nodes()["c"]["desired_version"] is None
    status, answer = put(reg, "/api/v1/labels/site/z/desired", WEB)
    assert (status, answer["error"]["code"]) == (404, "no_nodes")


def test_nodes_filter_by_health_and_label(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url, extra=["--backlog-depth", "100",
                                                          "--backlog-age", "10m"])
    ok = sim_nodes(cloud.port, "ok")
    ok.online(depth=100)
    ok.reported(1, labels={"role": "gw"})
    sim_nodes(cloud.port, "deep").online(depth=101)
    sim_nodes(cloud.port, "old").online(depth=1, oldest_age=601.0)
    gone = sim_nodes(cloud.port, "gone")
    gone.reported(1, labels={"role": "gw"})
    gone.die()
    wait_until(lambda: len(reg.nodes()) == 4, 10, what="4 nodes stored")

    def names(query: str) -> list[str]:
        return sorted(reg.nodes(query))

    wait_until(lambda: names("?health=offline") == ["gone"], 10, what="gone offline")
    assert names("?health=healthy") == ["ok"]
    assert names("?health=online-backlogged") == ["deep", "old"]
    assert names("?label=role=gw") == ["gone", "ok"]
    assert names("?label=role=gw&health=healthy") == ["ok"]
    status, body = reg.request("GET", "/api/v1/nodes?health=sleepy")
    assert (status, body["error"]["code"]) == (400, "bad_request")
    status, body = reg.request("GET", "/api/v1/nodes/nobody")
    assert (status, body["error"]["code"]) == (404, "unknown_node")


def test_online_node_without_heartbeats_goes_stale(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, db_url: str
) -> None:
    reg = registry_factory(cloud, db_url, extra=["--stale-after", "2"])
    node = sim_nodes(cloud.port, "n1", heartbeat=0.5)
    node.online()
    assert wait_until(lambda: reg.nodes().get("n1", {}).get("health") == "healthy", 10,
                      what="healthy") < 1.0
    took = wait_until(lambda: reg.nodes()["n1"]["health"] == "stale", 10, what="stale")
    assert took > 0.5  # not before 2 heartbeats (1 s after the last word) have passed
    node.online()
    wait_until(lambda: reg.nodes()["n1"]["health"] == "healthy", 10, what="healthy again")


def test_dashboard_pages_render_the_fleet_and_404_an_unknown_node(
    cloud: Broker, registry_factory: RegistryFactory, sim_nodes: SimNodes, tmp_path: Any
) -> None:
    import urllib.error
    import urllib.request
    reg = registry_factory(cloud, f"sqlite://{tmp_path / 'r.db'}")
    sim_nodes(cloud.port, "n1").reported(3)
    wait_until(lambda: "n1" in reg.nodes(), 10, what="node stored")
    with urllib.request.urlopen(reg.url + "/?health=offline", timeout=10) as resp:
        assert resp.status == 200 and "n1" in resp.read().decode()
    # A filter on another health hides the row but still counts the whole fleet.
    with urllib.request.urlopen(reg.url + "/?health=healthy", timeout=10) as resp:
        page = resp.read().decode()
    assert 'data-node="n1"' not in page
    assert 'data-filter="offline">offline<span class="count">1</span>' in page
    with urllib.request.urlopen(reg.url + "/nodes/n1", timeout=10) as resp:
        assert resp.status == 200 and "n1" in resp.read().decode()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(reg.url + "/nodes/nobody", timeout=10)
    with err.value:
        assert err.value.code == 404
