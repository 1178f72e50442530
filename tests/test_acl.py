"""docs/mosquitto-acl.conf loaded in a real mosquitto with mutual TLS (user name = CN).

Each node may publish only under its own `{prefix}/nodes/{node}/`, never a
`desired` document, and reads only its own desired state and down messages;
the registry's identity publishes desired. The prefix is substituted as the
template says, to show that works. mosquitto 2.0.11 answers an MQTT 5 publish
its ACL refuses with PUBACK 0x87 (not authorized), delivers it to nobody, and
then closes the connection (a node's agent dead-letters such a message, and
reconnects).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentFactory, BrokerFactory, RegistryFactory
from tests.support.broker import Broker
from tests.support.net import wait_until
from tests.support.pki import Pki
from tests.support.tlspeer import TlsPeer

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "docs" / "mosquitto-acl.conf"
PREFIX = "fleet/t1"
NOT_AUTHORIZED = 0x87
REGISTRY = "edge-registry"


def acl_file(directory: Path) -> Path:
    """The template with our prefix, and its example cloud application switched on."""
    lines = []
    for line in TEMPLATE.read_text().replace("edge/v1", PREFIX).splitlines():
        if line.startswith(("# user cloud-app", "# topic ")):
            line = line[2:]
        lines.append(line)
    path = directory / "acl.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def acl_broker(broker_factory: BrokerFactory, pki: Pki, tmp_path: Path) -> Broker:
    broker = broker_factory(extra=[*pki.listener_lines(pki.server()),
                                   f"acl_file {acl_file(tmp_path)}",
                                   "log_type all"])  # "Denied PUBLISH" lines are debug
    broker.start()
    return broker


def peer(broker: Broker, pki: Pki, identity: str) -> TlsPeer:
    """A connection with `identity`'s certificate, started by `with`."""
    return TlsPeer(broker.port, pki.ca_file, pki.client(identity), client_id=f"{identity}-test")


def topic(node: str, rest: str) -> str:
    return f"{PREFIX}/nodes/{node}/{rest}"


def test_template_lines_are_all_valid_mosquitto_acl_lines() -> None:
    for line in TEMPLATE.read_text().splitlines():
        words = line.split()
        if not words or line.startswith("#"):
            continue
        assert words[0] in ("user", "topic", "pattern"), line
        if words[0] in ("topic", "pattern"):
            assert words[1] in ("read", "write", "readwrite"), line
            assert len(words) == 3, f"a topic line has one topic, nothing after it: {line!r}"


def test_a_node_cannot_publish_into_another_nodes_namespace(
    acl_broker: Broker, pki: Pki
) -> None:
    with peer(acl_broker, pki, "cloud-app") as app, peer(acl_broker, pki, "node-a") as a:
        app.subscribe(f"{PREFIX}/nodes/+/up/#")
        app.subscribe(f"{PREFIX}/nodes/+/status")
        assert a.publish(topic("node-b", "up/x"), b"forged") == NOT_AUTHORIZED
        assert a.publish(topic("node-b", "status"), b"forged", retain=True) == NOT_AUTHORIZED
        assert a.publish(topic("node-a", "up/x"), b"mine") == 0
        assert app.wait_for(topic("node-a", "up/x")) == b"mine"
        assert a.publish(topic("node-a", "status"), b"up", retain=True) == 0
        app.wait_for(topic("node-a", "status"))
        assert [t for t, _ in app.messages()] == [topic("node-a", "up/x"),
                                                  topic("node-a", "status")]
        assert a.connects == 3  # closed by the broker after each refused publish


def test_a_node_cannot_publish_desired_and_only_the_registry_can(
    acl_broker: Broker, pki: Pki
) -> None:
    with peer(acl_broker, pki, "node-a") as a, peer(acl_broker, pki, "node-b") as b, \
            peer(acl_broker, pki, REGISTRY) as registry:
        assert b.subscribe(topic("node-b", "desired")) == [1]
        assert a.subscribe(topic("node-a", "desired")) == [1]
        # mosquitto grants a subscription to another node's topics, then delivers nothing.
        a.subscribe(topic("node-b", "desired"))
        a.subscribe(topic("node-b", "down/#"))
        assert a.publish(topic("node-a", "desired"), b"self-served", retain=True) \
            == NOT_AUTHORIZED
        assert a.publish(topic("node-b", "desired"), b"forged", retain=True) == NOT_AUTHORIZED
        assert registry.publish(topic("node-b", "desired"), b"from the registry",
                                retain=True) == 0
        assert b.wait_for(topic("node-b", "desired")) == b"from the registry"
        assert registry.publish(topic("node-a", "desired"), b"for a", retain=True) == 0
        assert a.wait_for(topic("node-a", "desired")) == b"for a"
        # The registry reads desired too (its retained read at start-up).
        registry.subscribe(f"{PREFIX}/nodes/+/desired")
        wait_until(lambda: len(registry.messages()) >= 2, 5, what="retained desired documents")
        assert sorted(registry.messages()) == [(topic("node-a", "desired"), b"for a"),
                                               (topic("node-b", "desired"),
                                                b"from the registry")]
    assert a.messages() == [(topic("node-a", "desired"), b"for a")]  # nothing of b's
    assert b.messages() == [(topic("node-b", "desired"), b"from the registry")]
    denied = [line for line in acl_broker.log_path.read_text().splitlines()
              if "Denied PUBLISH" in line]
    assert len(denied) == 2, denied


def test_the_agent_and_the_registry_work_within_the_template(
    acl_broker: Broker, pki: Pki, tmp_path: Path, agent_factory: AgentFactory,
    registry_factory: RegistryFactory,
) -> None:
    node = pki.client("node-a")
    reg = pki.client(REGISTRY)
    registry = registry_factory(acl_broker, f"sqlite://{tmp_path / 'registry.db'}", extra=[
        "--broker", f"mqtts://127.0.0.1:{acl_broker.port}", "--prefix", PREFIX,
        "--ca-file", str(pki.ca_file), "--cert-file", str(reg.cert),
        "--key-file", str(reg.key)])
    overrides: dict[str, Any] = {
        "uplink": {"prefix": PREFIX, "ca_file": pki.ca_file, "cert_file": node.cert,
                   "key_file": node.key},
        "state": {"debounce": "0.2s"},
        "telemetry": {"interval": "1s"},
    }
    agent = agent_factory(f"mqtts://127.0.0.1:{acl_broker.port}", node_id="node-a",
                          overrides=overrides)
    agent.publish_ok("sensors/t", "21.5")
    agent.wait_online()

    def node_row() -> dict[str, Any]:
        status, body = registry.request("GET", "/api/v1/nodes/node-a")
        return body if status == 200 else {}

    wait_until(lambda: node_row().get("health") == "healthy", 15, what="node-a healthy")
    status, answer = registry.request("PUT", "/api/v1/nodes/node-a/desired", {
        "services": {}, "config": {"telemetry": {"interval": "5s"}}})
    assert status == 200 and answer["published"] is True, answer
    agent.wait_status(lambda s: s["desired"]["version"] == answer["version"], 10,
                      "the desired state from the registry applied")
    wait_until(lambda: node_row().get("desired_applied") == answer["version"], 10,
               what="the registry sees it applied")
    queue = agent.wait_drained(10)["queue"]
    assert queue["dead"] == 0  # everything the agent sends is allowed
    assert "Denied" not in acl_broker.log_path.read_text()


def test_a_node_whose_certificate_names_another_node_is_told_so_and_keeps_its_messages(
    acl_broker: Broker, pki: Pki, agent_factory: AgentFactory
) -> None:
    other = pki.client("node-z")  # the node id is node-a: the ACL gives it nothing
    agent = agent_factory(f"mqtts://127.0.0.1:{acl_broker.port}", node_id="node-a", overrides={
        "uplink": {"prefix": PREFIX, "ca_file": pki.ca_file, "cert_file": other.cert,
                   "key_file": other.key}})
    for i in range(3):
        agent.publish_ok("sensors/t", str(i))
    status = agent.wait_status(
        lambda s: "refused this node's status" in (s["uplink"]["last_error"] or ""), 10,
        "the refusal in last_error")
    assert status["uplink"]["last_error"] == (
        f"the broker refused this node's status on {PREFIX}/nodes/node-a/status (Not"
        f" authorized): its ACL does not let this client publish under {PREFIX}/nodes/node-a/;"
        " is the node id 'node-a' the user name the broker knows this device by (the CN of"
        " its certificate)?")
    assert status["queue"]["depth"] == 3 and status["queue"]["dead"] == 0
