"""Reported and desired state between real agents, a real broker and a real registry.

The agent runs as a subprocess; desired documents come from the registry's
HTTP API or, for documents the registry would refuse, straight from a test
client on the broker (as a rogue or buggy publisher would).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import psutil
import pytest

from tests.conftest import AgentFactory, BrokerFactory, RegistryFactory
from tests.support.agent import Agent
from tests.support.broker import Broker
from tests.support.net import wait_until
from tests.support.registry import Registry
from tests.support.subscriber import publish_retained, read_retained, read_status

NODE = "node-a"
SLEEP = ["/bin/sleep", "1000"]
FAST = {"state": {"debounce": "0.2s"}}


def desired_topic(node: str = NODE) -> str:
    return f"edge/v1/nodes/{node}/desired"


def desired_doc(version: int, services: dict[str, Any], **config: Any) -> bytes:
    return bytes(cbor2.dumps({"v": 1, "version": version, "services": services,
                              "config": config}))


def service_rows(agent: Agent) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in agent.request({"op": "services"})["services"]}


def wait_running(agent: Agent, name: str, timeout: float = 10.0) -> dict[str, Any]:
    wait_until(lambda: service_rows(agent).get(name, {}).get("state") == "running",
               timeout, what=f"service {name} running")
    return service_rows(agent)[name]


def wait_applied(agent: Agent, version: int, timeout: float = 10.0) -> dict[str, Any]:
    return agent.wait_status(lambda s: s["desired"]["version"] == version, timeout,
                             f"desired version {version} applied")


def wait_reported(broker: Broker, predicate: Callable[[dict[str, Any]], bool],
                  timeout: float = 10.0, node: str = NODE) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def check() -> bool:
        doc = read_retained(broker.port, f"edge/v1/nodes/{node}/reported", timeout=1.0)
        if doc is None:
            return False
        seen[:] = [doc]
        return predicate(doc)

    try:
        wait_until(check, timeout, what="a reported document that matches")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; the last one: {seen[-1:]!r:.800}") from None
    return seen[0]


def wait_node(registry: Registry, predicate: Callable[[dict[str, Any]], bool],
              timeout: float = 10.0, what: str = "node state",
              node: str = NODE) -> dict[str, Any]:
    seen: list[Any] = []

    def check() -> bool:
        status, body = registry.request("GET", f"/api/v1/nodes/{node}")
        seen[:] = [body]
        return status == 200 and predicate(body)

    try:
        wait_until(check, timeout, what=what)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; the registry's last answer: {seen[-1:]!r:.800}") from None
    return seen[0]


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'registry.db'}"


Fleet = Callable[..., tuple[Registry, Agent]]


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker, agent_factory: AgentFactory,
          registry_factory: RegistryFactory) -> Fleet:
    """fleet(registry_args, agent_overrides): the broker, a registry and one agent that
    the registry sees healthy."""
    def make(registry_args: tuple[str, ...] = (),
             overrides: dict[str, Any] | None = None) -> tuple[Registry, Agent]:
        broker.start()
        registry = registry_factory(broker, sqlite_url(tmp_path), extra=list(registry_args))
        agent = agent_factory(broker, overrides=overrides or FAST)
        wait_node(registry, lambda n: n["health"] == "healthy", what="node healthy")
        return registry, agent
    return make


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_node_offline_when_its_desired_state_changes_applies_it_once_it_reconnects(
    fleet: Fleet,
) -> None:
    registry, agent = fleet()

    agent.terminate()
    wait_node(registry, lambda n: n["health"] == "offline", what="node offline")
    status, answer = registry.request("PUT", f"/api/v1/nodes/{NODE}/desired", {
        "services": {"tick": {"command": SLEEP}},
        "config": {"telemetry": {"interval": "5s"}},
    })
    assert status == 200 and answer["published"] is True, answer
    version = answer["version"]

    agent.start()
    node = wait_node(registry, lambda n: n["desired_applied"] == version, timeout=15,
                     what=f"desired_applied {version}")
    assert node["desired_version"] == version
    assert node["reported"]["desired"]["items"]["services.tick"]["result"] == "applied"
    assert wait_running(agent, "tick")["source"] == "desired"
    assert agent.status()["telemetry"]["interval"] == 5.0


def test_after_a_reboot_with_no_broker_the_last_accepted_desired_services_run(
    broker: Broker, agent_factory: AgentFactory,
) -> None:
    broker.start()
    agent = agent_factory(broker, overrides=FAST)
    agent.wait_online()
    publish_retained(broker.port, desired_topic(), desired_doc(3, {"tick": {"command": SLEEP}}))
    first = wait_running(agent, "tick")

    agent.terminate()
    assert not alive(first["pid"]), "the service outlived the agent's stop"
    broker.stop()
    agent.start()  # a boot with no network at all
    again = wait_running(agent, "tick")
    assert again["pid"] != first["pid"]
    status = agent.status()
    assert status["uplink"]["state"] == "offline"
    assert status["desired"]["version"] == 3


def test_an_older_or_malformed_desired_document_leaves_the_running_services_alone(
    tmp_path: Path, broker: Broker, agent_factory: AgentFactory,
    registry_factory: RegistryFactory,
) -> None:
    broker.start()
    registry = registry_factory(broker, sqlite_url(tmp_path))
    agent = agent_factory(broker, overrides=FAST)
    agent.wait_online()
    body = {"services": {"tick": {"command": SLEEP}}}
    registry.request("PUT", f"/api/v1/nodes/{NODE}/desired", body)
    status, answer = registry.request("PUT", f"/api/v1/nodes/{NODE}/desired", body)
    assert status == 200
    version = answer["version"]
    assert version >= 2
    wait_node(registry, lambda n: n["desired_applied"] == version, what="applied")
    pid = wait_running(agent, "tick")["pid"]

    # Older: ignored without a word, even though it would stop everything.
    publish_retained(broker.port, desired_topic(), desired_doc(version - 1, {}))
    wait_until(lambda: agent.status()["desired"]["ignored"] >= 1, 10, what="older one ignored")
    assert agent.status()["desired"]["rejected"] is None

    bad_documents = [
        (desired_doc(version + 5, {"tick": {"command": "sleep 1000"}}), "argv list"),
        (bytes(cbor2.dumps({"v": 1, "version": version + 6, "services": "nope"})), "services"),
        (b"\xff\x00 not cbor", "not valid CBOR"),
        (bytes(cbor2.dumps({"v": 1, "version": version + 7, "services": {},
                            "pad": b"x" * 300_000})), "exceeds the limit"),
        (bytes(cbor2.dumps({"v": 1, "version": version + 8,
                            "config": {"uplink": {"url": "mqtt://evil"}}})), "[uplink]"),
    ]
    for payload, reason in bad_documents:
        publish_retained(broker.port, desired_topic(), payload)
        node = wait_node(registry, lambda n, r=reason: r in str(
            ((n.get("reported") or {}).get("desired_rejected") or {}).get("reason")),
            what=f"rejection naming {reason!r}")
        assert node["desired_applied"] == version
        assert node["desired_rejected"] is not None
    rows = service_rows(agent)
    assert rows["tick"]["pid"] == pid and rows["tick"]["state"] == "running"
    assert agent.status()["desired"]["rejections"]["invalid"] == len(bad_documents)

    # The next good document is served.
    publish_retained(broker.port, desired_topic(), desired_doc(version + 9, {
        "tock": {"command": SLEEP}}))
    wait_applied(agent, version + 9)
    wait_running(agent, "tock")
    wait_until(lambda: not alive(pid), 10, what="the old service stopped")
    node = wait_node(registry, lambda n: n["desired_applied"] == version + 9, what="applied")
    assert node["desired_rejected"] is None


def test_a_changed_service_restarts_with_its_new_spec_and_a_dropped_one_stops(
    broker: Broker, agent_factory: AgentFactory,
) -> None:
    broker.start()
    agent = agent_factory(broker, overrides={
        **FAST, "services.local": {"command": ["/bin/sleep", "999"]},
    })
    agent.wait_online()
    publish_retained(broker.port, desired_topic(), desired_doc(1, {
        "a": {"command": ["/bin/sleep", "1001"]},
        "b": {"command": ["/bin/sleep", "1002"], "depends_on": ["local"]},
    }))
    a1, b1 = wait_running(agent, "a"), wait_running(agent, "b")
    local = wait_running(agent, "local")

    publish_retained(broker.port, desired_topic(), desired_doc(2, {
        "a": {"command": ["/bin/sleep", "2001"]},
        "c": {"command": ["/bin/sleep", "1003"]},
        "local": {"command": ["/bin/sleep", "6666"]},   # the config file's: not taken
    }))
    status = wait_applied(agent, 2)
    items = status["desired"]["items"]
    assert items["services.a"]["result"] == "applied"
    assert items["services.b"]["result"] == "removed"
    assert items["services.local"]["result"] == "failed"
    assert "config file" in items["services.local"]["reason"]
    a2, c = wait_running(agent, "a"), wait_running(agent, "c")
    assert a2["pid"] != a1["pid"] and psutil.Process(a2["pid"]).cmdline()[-1] == "2001"
    assert not alive(a1["pid"]) and not alive(b1["pid"])
    assert "b" not in service_rows(agent)
    assert c["source"] == "desired"
    assert service_rows(agent)["local"]["pid"] == local["pid"]  # untouched
    reported = wait_reported(broker, lambda d: d["desired_applied"] == 2)
    assert {row["name"]: row["source"] for row in reported["services"]} == {
        "local": "config", "a": "desired", "c": "desired"}


def test_desired_config_keys_apply_live_and_fall_back_to_the_file_when_left_out(
    broker: Broker, agent_factory: AgentFactory,
) -> None:
    broker.start()
    agent = agent_factory(broker, overrides=FAST)
    agent.wait_online()
    publish_retained(broker.port, desired_topic(), desired_doc(
        1, {}, telemetry={"interval": "1s"},
        queue={"on_full": "reject", "max_bytes": "1MiB", "default_ttl": "1h"}))
    wait_applied(agent, 1)
    queue = agent.queue()
    assert (queue["on_full"], queue["max_bytes"]) == ("reject", 1024 * 1024)
    agent.wait_status(lambda s: s["telemetry"]["samples"] >= 1, 10, "telemetry sampling")

    publish_retained(broker.port, desired_topic(), desired_doc(2, {}))
    status = wait_applied(agent, 2)
    assert status["telemetry"]["interval"] == 0.0
    assert status["desired"]["items"]["config.telemetry.interval"]["result"] == "removed"
    assert status["desired"]["items"]["config.queue.on_full"]["result"] == "removed"
    queue = agent.queue()
    assert (queue["on_full"], queue["max_bytes"]) == ("drop-oldest", 256 * 1024 * 1024)


def test_the_reported_version_grows_across_restarts(
    broker: Broker, agent_factory: AgentFactory,
) -> None:
    broker.start()
    agent = agent_factory(broker, overrides=FAST)
    first = wait_reported(broker, lambda d: True)
    assert first["node"] == NODE and first["v"] == 1
    # The board's firmware profile, detected ("auto"), and its facts.
    from edge.profiles import facts_for
    assert first["profile"] == facts_for("auto")[0] != "auto"
    assert first["facts"]["machine"]["value"] == os.uname().machine
    assert agent.status()["profile"] == first["profile"]
    agent.kill9()
    stored = int((agent.data_dir / "reported-version").read_text())
    assert stored >= first["version"]
    agent.start()
    second = wait_reported(broker, lambda d: d["version"] > first["version"]
                           and d["uplink"]["connects"] == 1)
    assert second["version"] > stored


def test_a_killed_agent_is_offline_within_one_and_a_half_keepalives(
    fleet: Fleet,
) -> None:
    registry, agent = fleet()  # keepalive 2s
    killed, killed_at = time.monotonic(), time.time()
    agent.kill9()
    node = wait_node(registry, lambda n: n["health"] == "offline", timeout=10, what="offline")
    took = time.monotonic() - killed
    # The Last Will comes from the broker, not the node: it does not make it "seen".
    assert node["last_seen"] <= killed_at
    # mosquitto waits 1.5 keepalives; the registry's poll and write add well under 1s.
    assert took <= 2 * 1.5 + 1.0, f"offline only after {took:.1f}s"


def test_a_stopped_agent_whose_broker_session_lives_shows_stale(
    broker: Broker, fleet: Fleet,
) -> None:
    registry, agent = fleet(("--stale-after", "3"), {
        **FAST, "uplink": {"keepalive": "30s", "heartbeat": "0.5s"}})
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        wait_node(registry, lambda n: n["health"] == "stale", timeout=10, what="stale")
        status = read_status(broker.port, NODE)
        assert status is not None and status["state"] == "online"  # the broker still says so
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    wait_node(registry, lambda n: n["health"] == "healthy", timeout=10, what="healthy again")


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc through psutil")
def test_services_of_the_desired_state_end_with_the_agent_after_a_kill_9(
    broker: Broker, agent_factory: AgentFactory, broker_factory: BrokerFactory,
) -> None:
    broker.start()
    agent = agent_factory(broker, overrides=FAST)
    agent.wait_online()
    publish_retained(broker.port, desired_topic(), desired_doc(1, {"tick": {"command": SLEEP}}))
    first = wait_running(agent, "tick")
    agent.kill9()
    agent.start()
    again = wait_running(agent, "tick")
    # The leftover of the killed agent is ended before the same service starts again.
    assert not alive(first["pid"]) and again["pid"] != first["pid"]
    assert len([p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] == SLEEP]) == 1


def test_a_node_that_lost_its_copy_gets_the_desired_state_again_from_the_registry(
    broker: Broker, fleet: Fleet,
) -> None:
    """The broker lost its retained messages and the node its data dir: the registry,
    seeing an older version reported, publishes the stored document again."""
    import shutil

    registry, agent = fleet()
    status, answer = registry.request("PUT", f"/api/v1/nodes/{NODE}/desired",
                                      {"services": {"tick": {"command": SLEEP}}})
    assert status == 200
    version = answer["version"]
    wait_node(registry, lambda n: n["desired_applied"] == version, what="applied")

    agent.terminate()
    broker.stop()
    shutil.rmtree(broker.persistence_dir)  # a broker without persistence, restarted
    broker.persistence_dir.mkdir()
    shutil.rmtree(agent.data_dir)  # a node whose card was replaced
    broker.start()
    assert read_retained(broker.port, desired_topic(), timeout=1.0) is None
    agent.start()
    wait_node(registry, lambda n: n["desired_applied"] == version, timeout=20,
              what="the stored desired state applied again")
    wait_running(agent, "tick")


def test_a_desired_service_that_cannot_start_counts_as_failed_in_the_registry(
    fleet: Fleet,
) -> None:
    registry, agent = fleet()
    status, answer = registry.request("PUT", f"/api/v1/nodes/{NODE}/desired", {"services": {
        "ghost": {"command": ["/nonexistent/bin/thing"], "backoff_initial": "0.2s"},
        "tick": {"command": SLEEP},
    }})
    assert status == 200
    node = wait_node(registry, lambda n: n["desired_applied"] == answer["version"]
                     and n["desired_failed"] == 1, what="one failed item")
    items = node["reported"]["desired"]["items"]
    assert items["services.ghost"]["result"] == "failed"
    assert "cannot start /nonexistent/bin/thing" in items["services.ghost"]["reason"]
    assert items["services.tick"]["result"] == "applied"
    assert agent.status()["desired"]["items"]["services.ghost"]["result"] == "failed"
