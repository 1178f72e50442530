"""The registry's HTTP API: desired PUTs and their publishing, filters, health."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import cbor2
import pytest

from edge.documents import parse_desired
from edge.errors import DocumentError
from tests.conftest import RegistryFactory
from tests.support.broker import Broker
from tests.support.mqttclient import connect, make_client, new_client_id
from tests.support.net import free_port, wait_until
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


# ---- access: the token, the Host, a write's Origin and Content-Type ---------------------

TOKEN = "s3cret-token-0123456789abcdef"


def call(reg: Registry, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """(status, JSON or text, response headers) of one request with exactly these headers."""
    data = None if body is None else (body if isinstance(body, bytes)
                                      else json.dumps(body).encode())
    req = urllib.request.Request(reg.url + path, data=data, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw, status, got = resp.read(), resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        with exc:
            raw, status, got = exc.read(), exc.code, exc.headers
    try:
        return status, json.loads(raw), got
    except ValueError:
        return status, raw.decode(errors="replace"), got


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


@pytest.fixture
def token_file(tmp_path: Any) -> Any:
    path = tmp_path / "api-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def locked(cloud: Broker, registry_factory: RegistryFactory, tmp_path: Any,
           token_file: Any) -> Registry:
    """A registry with --api-token-file."""
    return registry_factory(cloud, f"sqlite://{tmp_path / 'locked.db'}",
                            extra=["--api-token-file", str(token_file)])


def test_with_a_token_every_api_request_needs_it(locked: Registry) -> None:
    json_only = {"Content-Type": "application/json"}
    for method, path, body in (("GET", "/api/v1/nodes", None),
                               ("GET", "/api/v1/stats", None),
                               ("PUT", "/api/v1/nodes/n1/desired?provision=true", WEB)):
        status, answer, headers = call(locked, method, path, body, json_only)
        assert (status, answer["error"]["code"]) == (401, "unauthorized"), (method, path)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert "--token-file" in answer["error"]["message"]
        status, answer, _ = call(locked, method, path, body, bearer("wrong-token-0123456789"))
        assert (status, answer["error"]) == (401, {"code": "unauthorized",
                                                   "message": "the API token is wrong"})
    assert call(locked, "GET", "/api/v1/nodes", None, bearer())[:2] == (200, {"nodes": []})
    status, answer, _ = call(locked, "PUT", "/api/v1/nodes/n1/desired?provision=true", WEB,
                             bearer())
    assert (status, answer) == (200, {"node": "n1", "version": 1, "published": True})
    status, answer, _ = call(locked, "GET", "/api/v1/stats", None, bearer())
    assert status == 200 and answer["refused"]["unauthorized"] == 6
    assert answer["nodes"] == 1  # only the PUT with the token was stored
    # Refusals are logged, but not one line each.
    assert locked.log_tail(400).count("HTTP request rejected (unauthorized)") == 1
    assert TOKEN not in locked.log_tail(400)


def test_the_dashboards_basic_auth_never_authorizes_a_write(locked: Registry) -> None:
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    status, _, headers = call(locked, "GET", "/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    status, page, _ = call(locked, "GET", "/", None, {"Authorization": basic})
    assert status == 200 and "<!doctype html>" in page.lower()
    assert call(locked, "GET", "/nodes/n1", None, bearer())[0] == 404  # Bearer works too
    # A browser sends cached Basic credentials along with any site's request: not enough.
    status, answer, _ = call(locked, "PUT", "/api/v1/nodes/n1/desired?provision=true", WEB,
                             {"Authorization": basic, "Content-Type": "application/json"})
    assert (status, answer["error"]["code"]) == (401, "unauthorized")


def test_healthz_stays_open_but_names_the_database_only_with_the_token(
    locked: Registry,
) -> None:
    status, open_, _ = call(locked, "GET", "/healthz")
    assert status == 200 and open_["ok"] is True and "db" not in open_
    assert set(open_) == {"ok", "broker", "signing_key"}
    status, full, _ = call(locked, "GET", "/healthz", None, bearer())
    assert status == 200 and full["db"].startswith("sqlite://")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.2:{port}",
                                  "localhost:1"])
def test_a_host_header_not_the_registrys_is_refused(
    cloud: Broker, registry_factory: RegistryFactory, tmp_path: Any, host: str,
) -> None:
    reg = registry_factory(cloud, f"sqlite://{tmp_path / 'r.db'}")
    spoofed = {"Host": host.format(port=reg.port)}
    for path in ("/api/v1/nodes", "/", "/healthz"):
        status, answer, _ = call(reg, "GET", path, None, spoofed)
        assert (status, answer["error"]["code"]) == (421, "bad_host"), path
    status, answer, _ = call(reg, "PUT", "/api/v1/nodes/n1/desired?provision=true", WEB,
                             {**spoofed, "Content-Type": "application/json"})
    assert status == 421 and reg.nodes() == {}
    assert reg.get("/api/v1/stats")["refused"]["bad_host"] == 4


def test_loopback_names_and_allow_host_names_are_answered(
    cloud: Broker, registry_factory: RegistryFactory, tmp_path: Any,
) -> None:
    reg = registry_factory(cloud, f"sqlite://{tmp_path / 'r.db'}",
                           extra=["--allow-host", "Registry.Example", "--allow-host",
                                  "proxy.example:8443"])
    for host in (f"localhost:{reg.port}", f"127.0.0.1:{reg.port}", "registry.example",
                 f"REGISTRY.example:{reg.port}", "proxy.example:8443"):
        assert call(reg, "GET", "/api/v1/nodes", None, {"Host": host})[0] == 200, host
    assert call(reg, "GET", "/", None, {"Host": "proxy.example"})[0] == 421


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/toml", None])
def test_a_put_that_is_not_json_gets_415(
    cloud: Broker, registry_factory: RegistryFactory, tmp_path: Any,
    content_type: str | None,
) -> None:
    reg = registry_factory(cloud, f"sqlite://{tmp_path / 'r.db'}")
    headers = {} if content_type is None else {"Content-Type": content_type}
    # urllib sends application/x-www-form-urlencoded when no Content-Type is given.
    status, answer, _ = call(reg, "PUT", "/api/v1/nodes/n1/desired?provision=true",
                             json.dumps(WEB).encode(), headers)
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
    assert reg.nodes() == {}
    status, _, _ = call(reg, "PUT", "/api/v1/nodes/n1/desired?provision=true", WEB,
                        {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def test_a_put_from_a_foreign_origin_gets_403(
    cloud: Broker, registry_factory: RegistryFactory, tmp_path: Any,
) -> None:
    reg = registry_factory(cloud, f"sqlite://{tmp_path / 'r.db'}")
    for origin in ("http://evil.example", f"http://evil.example:{reg.port}", "null"):
        status, answer, _ = call(reg, "PUT", "/api/v1/nodes/n1/desired?provision=true", WEB,
                                 {"Content-Type": "application/json", "Origin": origin})
        assert (status, answer["error"]["code"]) == (403, "bad_origin"), origin
    assert reg.nodes() == {}
    assert reg.get("/api/v1/stats")["refused"]["bad_origin"] == 3
    status, _, _ = call(reg, "PUT", "/api/v1/nodes/n1/desired?provision=true", WEB,
                        {"Content-Type": "application/json",
                         "Origin": f"http://127.0.0.1:{reg.port}"})
    assert status == 200


def test_a_public_http_address_without_a_token_refuses_to_start(tmp_path: Any) -> None:
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "edge", "registry", "serve",
                           "--db", f"sqlite://{tmp_path / 'r.db'}", "--http",
                           f"0.0.0.0:{port}"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"edge registry serve: --http 0.0.0.0:{port} without --api-token-file: anyone who"
        " reaches the port could change every node's desired state; give --api-token-file"
        " FILE (its first line is the token), or --insecure-no-token to run without one"
        " anyway")
    assert not (tmp_path / "r.db").exists()


def test_insecure_no_token_starts_on_a_public_address_and_says_so(
    cloud: Broker, registry_factory: RegistryFactory, tmp_path: Any,
) -> None:
    reg = registry_factory(cloud, f"sqlite://{tmp_path / 'r.db'}", start=False)
    reg.extra = ("--http", f"0.0.0.0:{reg.port}", "--insecure-no-token")
    reg.start()
    assert reg.get("/api/v1/nodes") == {"nodes": []}
    assert "HTTP API without a token" in reg.log_tail(400)
