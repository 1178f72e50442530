"""CBOR bombs on the real down and desired topics: refused, counted, and the agent goes on.

A real mosquitto and the agent as a subprocess. A cloud publisher sends each
bomb of tests/test_cbor_bombs.py raw and inside an otherwise good document
(as a down envelope's `data`, as a desired document's `services`); then one
good message. The agent must still be the same
process, in bounded memory, must count every bomb in `status`, and must serve
the good message after them.
"""

from __future__ import annotations

from collections import Counter

import cbor2

from tests.conftest import AgentFactory
from tests.support.agent import ApiClient
from tests.support.broker import Broker
from tests.support.localpub import MqttClients, down_envelope, probe_until
from tests.test_cbor_bombs import BOMBS, _in_data, _in_services

NODE = "node-a"
DOWN = f"edge/v1/nodes/{NODE}/down/"
DESIRED = f"edge/v1/nodes/{NODE}/desired"
_MEMORY_GROWTH = 64 * 1024 * 1024  # bytes of resident memory the bombs may cost at most


def _desired(version: int) -> bytes:
    return bytes(cbor2.dumps({"v": 1, "version": version, "services": {},
                              "config": {"telemetry": {"interval": f"{version}s"}}}))


def _next_message(stream: ApiClient) -> dict[str, object]:
    """The next message event on a subscribe stream that is not a probe."""
    while True:
        line = stream.read_response()
        assert line.get("event") == "message", f"unexpected stream line {line!r}"
        if not str(line.get("topic")).startswith("probe/"):
            return line


def test_bombs_on_the_down_topic_are_counted_and_the_next_message_is_delivered(
    cloud: Broker, agent_factory: AgentFactory, mqtt_clients: MqttClients
) -> None:
    agent = agent_factory(cloud)  # no local bus: down messages go to socket subscribers
    agent.wait_online()
    app = mqtt_clients.publisher(cloud)
    bombs = [bomb for bomb, _ in BOMBS.values()] + [_in_data(bomb) for bomb, _ in BOMBS.values()]
    expected = Counter(kind for _, kind in BOMBS.values() for _ in range(2))
    with agent.connect(timeout=15) as stream:
        assert stream.request({"op": "subscribe", "filter": "cmd/#"})["ok"] is True
        probe_until(lambda n: app.publish(f"{DOWN}probe/{n}", down_envelope(n)),
                    lambda: agent.status()["down"]["received"] >= 1, timeout=15,
                    what="the agent's down subscription")
        pid, memory = agent.pid, agent.rss()

        app.publish_many([(DOWN + "cmd/bomb", bomb) for bomb in bombs])
        app.publish(DOWN + "cmd/after", down_envelope("after the bombs", ct="text/plain"))
        event = _next_message(stream)

    assert (event["topic"], event["data"]) == ("cmd/after", "after the bombs"), event
    down = agent.wait_status(lambda s: sum(s["down"]["rejected"].values()) >= len(bombs), 10,
                             what="every bomb counted")["down"]
    assert down["rejected"] == dict(expected), down
    agent.assert_alive()
    assert agent.pid == pid
    assert agent.rss() - memory < _MEMORY_GROWTH, (memory, agent.rss())


def test_bombs_on_the_desired_topic_are_counted_and_the_next_document_is_applied(
    cloud: Broker, agent_factory: AgentFactory, mqtt_clients: MqttClients
) -> None:
    agent = agent_factory(cloud)
    agent.wait_online()
    app = mqtt_clients.publisher(cloud)
    probe_until(lambda n: app.publish(DESIRED, _desired(1 + n)),
                lambda: agent.status()["desired"]["version"] >= 1, timeout=15,
                what="the agent's desired subscription")
    applied = agent.wait_status(lambda s: s["desired"]["version"] >= 1, 5)["desired"]["version"]
    bombs = [bomb for bomb, _ in BOMBS.values()] + [
        _in_services(bomb) for bomb, _ in BOMBS.values()]
    pid, memory = agent.pid, agent.rss()

    app.publish_many([(DESIRED, bomb) for bomb in bombs])
    app.publish(DESIRED, _desired(applied + 100))

    status = agent.wait_status(lambda s: s["desired"]["version"] == applied + 100, 15,
                               what="the good document after the bombs applied")
    # Every bomb counted: none has a version, and no two in a row fail alike (the
    # agent says a refusal once when the same document comes again).
    assert status["desired"]["rejections"] == {"invalid": len(bombs)}, status["desired"]
    assert status["desired"]["rejected"] is None  # the good one cleared the last refusal
    agent.assert_alive()
    assert agent.pid == pid
    assert agent.rss() - memory < _MEMORY_GROWTH, (memory, agent.rss())
