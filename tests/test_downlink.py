"""Down: cloud application -> cloud mosquitto -> agent -> inbox -> local mosquitto / socket.

Each test runs the real agent with a real cloud broker and, where it matters,
a real local broker. A local subscriber's persistent session is made before
the agent can reach the local broker, so what it receives is what the agent
delivered there.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import cbor2
import pytest

from edge.envelope import Envelope
from tests.conftest import AgentFactory, BrokerFactory
from tests.support.agent import Agent, ApiClient, Overrides
from tests.support.broker import Broker
from tests.support.expect import assert_error
from tests.support.localpub import (
    MqttClients,
    Publisher,
    RawSubscriber,
    down_envelope,
    probe_until,
    total,
)

NODE = "node-a"
UP = f"edge/v1/nodes/{NODE}/up/"
DOWN = f"edge/v1/nodes/{NODE}/down/"

AgentStarter = Callable[..., Agent]


def _local(
    local: Broker | None, forward: tuple[str, ...] = ("sensors/#",), **keys: Any
) -> Overrides:
    """The [local] section for `local` (None: no local bus), with a quick reconnect."""
    return {
        "local": {
            "url": "" if local is None else local.url,
            "forward": list(forward),
            "backoff_initial": "0.1s",
            "backoff_max": "0.5s",
            **keys,
        }
    }


@pytest.fixture
def local(broker_factory: BrokerFactory) -> Broker:
    """The local broker, NOT started: a test starts or primes it."""
    return broker_factory(name="local")



@pytest.fixture
def app(cloud: Broker, mqtt_clients: MqttClients) -> Publisher:
    """The cloud application, connected to `cloud`, sending down messages."""
    return mqtt_clients.publisher(cloud)


def _down(agent: Agent) -> dict[str, Any]:
    """The `down` section of the agent's status."""
    section: dict[str, Any] = agent.status()["down"]
    return section


def _await_down_subscription(agent: Agent, app: Publisher) -> None:
    """Send probes on down/probe/N until the agent has stored one.

    The probes' local topics match no filter the tests subscribe to.
    """
    probe_until(
        lambda n: app.publish(f"{DOWN}probe/{n}", down_envelope(f"probe {n}")),
        lambda: _down(agent)["received"] >= 1,
        timeout=15,
        what="the agent's down subscription",
    )


@pytest.fixture
def start_agent(agent_factory: AgentFactory, cloud: Broker, app: Publisher) -> AgentStarter:
    """start_agent(local, name=None, **local_keys): an agent on `cloud` taking down messages.

    It has the [local] section for `local` (None: no local bus) and is online,
    and one of `app`'s probes has reached it, so its down subscription exists.
    An agent started under the `name` of an earlier one has that one's data dir.
    """

    def start(local: Broker | None, name: str | None = None, **local_keys: Any) -> Agent:
        agent = agent_factory(cloud, overrides=_local(local, **local_keys), name=name)
        agent.wait_online()
        _await_down_subscription(agent, app)
        return agent

    return start


def _wait_received(agent: Agent, count: int, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until the agent has stored `count` down messages in all."""
    return agent.wait_status(
        lambda s: s["down"]["received"] >= count, timeout, what=f"{count} down messages stored"
    )


def _wait_local_online(agent: Agent) -> None:
    """Wait until the agent is subscribed on the local broker (it says online only then)."""
    agent.wait_status(lambda s: s["local"]["state"] == "online", 10, what="local online")


def _up(cloud_sub: RawSubscriber) -> list[tuple[str, Any]]:
    """(local topic, data) of each message the agent forwarded up, in arrival order."""
    return [(m.topic.removeprefix(UP), Envelope.decode(m.payload).data) for m in cloud_sub.messages]


def _leave_local_session(
    agent_factory: AgentFactory, cloud: Broker, local: Broker, protocol: str
) -> None:
    """Run agent "agent" forwarding "#" over `protocol` until it is subscribed, then stop it.

    The local broker keeps its session, and the subscription in it, for the next run.
    It sends no down probes: the echo of one, still queued in the session when
    this agent stops, would reach the next run as a local message.
    """
    first = agent_factory(
        cloud, overrides=_local(local, forward=("#",), protocol=protocol), name="agent"
    )
    _wait_local_online(first)
    assert first.terminate() == 0, first.log_tail()


def _read_event(api: ApiClient) -> dict[str, Any]:
    """The next stream line that is a message event (the socket's timeout bounds the wait)."""
    while True:
        try:
            line = api.read_response()
        except TimeoutError:
            raise TimeoutError("no message event on the subscribe stream in time") from None
        if line.get("event") == "message" and not str(line.get("topic")).startswith("probe/"):
            return line
        assert line.get("event") == "message", f"unexpected stream line {line!r}"


def test_down_message_sent_while_the_local_broker_is_down_is_delivered_when_it_starts(
    local: Broker, app: Publisher, start_agent: AgentStarter, mqtt_clients: MqttClients
) -> None:
    local_sub = mqtt_clients.primed_subscriber(local, "cmd/#")
    agent = start_agent(local)
    received = _down(agent)["received"]

    app.publish(DOWN + "cmd/valve", cbor2.dumps({"v": 1, "data": "open", "ct": "text/plain"}))
    stored = _wait_received(agent, received + 1)
    assert stored["local"]["state"] == "offline"
    assert stored["down"]["pending"] >= 1

    local.start()
    got = local_sub.wait_for_topic("cmd/valve", timeout=15)
    assert got.payload == b"open"
    assert got.content_type == "text/plain"
    done = agent.wait_status(
        lambda s: s["down"]["pending"] == 0, 10, what="inbox empty after the local PUBACKs"
    )
    assert done["down"]["delivered"] >= received + 1
    assert total(done["down"]["rejected"]) == 0


def test_down_message_reaches_a_socket_subscriber_while_the_local_broker_is_down(
    local: Broker, cloud: Broker, app: Publisher, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(cloud, overrides=_local(local))  # `local` is never started
    agent.wait_online()
    assert_error(agent.request({"op": "subscribe", "filter": "cmd/#/x"}), "bad_request")
    with agent.connect(timeout=15) as stream:
        answer = stream.request({"op": "subscribe", "filter": "cmd/#"})
        assert answer.get("ok") is True and answer.get("filter") == "cmd/#", answer
        agent.wait_status(lambda s: s["down"]["subscribers"] == 1, 5, what="one subscriber")
        _await_down_subscription(agent, app)

        app.publish(DOWN + "other/y", down_envelope("not for this filter"))
        app.publish(DOWN + "cmd/x", down_envelope("hello", ct="text/plain", ts=1796320000.5))
        app.publish(DOWN + "cmd/blob", down_envelope(b"\x00\x01\x02"))
        text = _read_event(stream)
        blob = _read_event(stream)

    assert text["topic"] == "cmd/x" and text["data"] == "hello", text
    assert text["ct"] == "text/plain" and "data_b64" not in text
    assert text["id"] is None and text["ts"] == 1796320000.5
    # Without a ts in the envelope the docs leave ts open: the arrival time or null.
    assert blob["ts"] is None or isinstance(blob["ts"], int | float), blob
    assert blob["topic"] == "cmd/blob", blob
    assert base64.b64decode(blob["data_b64"]) == b"\x00\x01\x02" and "data" not in blob
    assert blob["ct"] == "application/octet-stream"
    assert agent.status()["local"]["state"] == "offline"


def test_with_no_local_bus_a_down_message_waits_for_a_socket_subscriber(
    app: Publisher, start_agent: AgentStarter
) -> None:
    agent = start_agent(None)
    received = _down(agent)["received"]
    message_id = bytes(range(16))
    app.publish(DOWN + "cmd/late", down_envelope("kept", id=message_id))
    _wait_received(agent, received + 1)
    assert _down(agent)["pending"] >= 1

    with agent.connect(timeout=15) as stream:
        assert stream.request({"op": "subscribe", "filter": "cmd/#"})["ok"] is True
        event = _read_event(stream)
    assert (event["topic"], event["data"]) == ("cmd/late", "kept")
    assert event["id"] == message_id.hex()
    assert agent.status()["local"]["state"] == "disabled"


@pytest.mark.parametrize("stop", ["kill9", "sigterm"])
def test_down_message_survives_an_agent_restart_in_the_inbox(
    stop: str,
    local: Broker,
    cloud: Broker,
    app: Publisher,
    start_agent: AgentStarter,
    mqtt_clients: MqttClients,
) -> None:
    local_sub = mqtt_clients.primed_subscriber(local, "cmd/#")
    agent = start_agent(local)
    received = _down(agent)["received"]

    app.publish(DOWN + "cmd/valve", down_envelope("close"))
    stored = _wait_received(agent, received + 1)
    assert stored["down"]["pending"] >= 1
    if stop == "kill9":
        agent.kill9()
    else:
        assert agent.terminate() == 0, agent.log_tail()
    # With the cloud broker gone the agent cannot fetch the message again:
    # what reaches the local subscriber comes from the inbox on disk.
    cloud.stop()

    local.start()
    agent.start()
    got = local_sub.wait_for_topic("cmd/valve", timeout=15)
    assert got.payload == b"close"
    status = agent.wait_status(lambda s: s["down"]["pending"] == 0, 10, what="inbox empty")
    assert status["uplink"]["state"] == "offline"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_down_message_delivered_locally_is_not_forwarded_back_up(
    protocol: str,
    local: Broker,
    cloud: Broker,
    app: Publisher,
    agent_factory: AgentFactory,
    mqtt_clients: MqttClients,
) -> None:
    local.start()
    local_sub = mqtt_clients.subscriber(local, "cmd/#", protocol=protocol)
    cloud_sub = mqtt_clients.subscriber(cloud, UP + "#")
    agent = agent_factory(cloud, overrides=_local(local, forward=("#",), protocol=protocol))
    agent.wait_online()
    device = mqtt_clients.publisher(local, protocol=protocol)
    probe_until(
        lambda n: device.publish("sensors/probe", f"probe {n}".encode()),
        lambda: bool(cloud_sub.on(UP + "sensors/probe")),
        timeout=15,
        what="the agent's local subscription",
    )
    _await_down_subscription(agent, app)

    app.publish(DOWN + "cmd/loop", down_envelope("loop-me"))
    got = local_sub.wait_for_topic("cmd/loop", timeout=15)
    assert got.payload == b"loop-me"
    # A device program publishing on the same topic after that is forwarded;
    # the agent's own copy, had it come back, was queued before it (the local
    # broker and the outbox keep order), so it would be at the cloud by now.
    device.publish("cmd/loop", b"from the device")
    cloud_sub.wait_until(
        lambda ms: any(Envelope.decode(m.payload).data == b"from the device" for m in ms
                       if m.topic == UP + "cmd/loop"),
        15,
        what="the device's own cmd/loop at the cloud",
    )

    looped = [
        (m.topic, Envelope.decode(m.payload).data)
        for m in cloud_sub.messages
        if m.topic.startswith(UP + "probe/") or Envelope.decode(m.payload).data == b"loop-me"
    ]
    assert looped == [], f"down messages came back up: {looped!r}"


def _after_protocol_change(
    first: str,
    then: str,
    local: Broker,
    cloud: Broker,
    agent_factory: AgentFactory,
    start_agent: AgentStarter,
    mqtt_clients: MqttClients,
) -> tuple[Agent, RawSubscriber, RawSubscriber]:
    """An agent forwarding "#" over `then`, on a local session kept from a run over `first`.

    Returns it with a local subscriber on cmd/# and a cloud subscriber on up/#.
    """
    local.start()
    local_sub = mqtt_clients.subscriber(local, "cmd/#")
    cloud_sub = mqtt_clients.subscriber(cloud, UP + "#")
    _leave_local_session(agent_factory, cloud, local, first)
    agent = start_agent(local, name="agent", forward=("#",), protocol=then)
    _wait_local_online(agent)
    return agent, local_sub, cloud_sub


def test_after_a_change_to_mqtt5_a_kept_session_does_not_loop_a_down_message_back_up(
    local: Broker,
    cloud: Broker,
    app: Publisher,
    agent_factory: AgentFactory,
    start_agent: AgentStarter,
    mqtt_clients: MqttClients,
) -> None:
    # Made over 3.1.1, the session's "#" has no *no local*: a SUBSCRIBE over
    # MQTT 5 to the same filter changes only its QoS, in mosquitto.
    agent, local_sub, cloud_sub = _after_protocol_change(
        "3.1.1", "5", local, cloud, agent_factory, start_agent, mqtt_clients)
    device = mqtt_clients.publisher(local)

    app.publish(DOWN + "cmd/loop", down_envelope("loop-me"))
    assert local_sub.wait_for_topic("cmd/loop", timeout=15).payload == b"loop-me"
    # Had the agent's copy come back, the local broker queued it for the agent
    # before this one, and the outbox keeps order: it would be at the cloud first.
    device.publish("sensors/fence", b"fence")
    cloud_sub.wait_for_topic(UP + "sensors/fence", timeout=15)

    # Neither cmd/loop nor the probes (down on probe/N) came back up.
    assert _up(cloud_sub) == [("sensors/fence", b"fence")]
    assert "made afresh" in agent.log_path.read_text(), "the session was not kept: proves nothing"


def test_after_a_change_to_mqtt311_a_local_program_publishing_a_down_payload_is_forwarded(
    local: Broker,
    cloud: Broker,
    app: Publisher,
    agent_factory: AgentFactory,
    start_agent: AgentStarter,
    mqtt_clients: MqttClients,
) -> None:
    # Made over MQTT 5, the session's "#" says *no local*; a 3.1.1 SUBSCRIBE
    # leaves that as it is, and the agent then waits for an echo that never comes.
    agent, local_sub, cloud_sub = _after_protocol_change(
        "5", "3.1.1", local, cloud, agent_factory, start_agent, mqtt_clients)
    device = mqtt_clients.publisher(local, protocol="3.1.1")

    app.publish(DOWN + "cmd/q", down_envelope("Q"))
    assert local_sub.wait_for_topic("cmd/q", timeout=15).payload == b"Q"
    # The echo of the agent's own cmd/q was queued for it before this fence:
    # once the fence is at the cloud, the agent has had the echo (and skipped it).
    device.publish("sensors/fence1", b"fence 1")
    cloud_sub.wait_for_topic(UP + "sensors/fence1", timeout=15)
    device.publish("cmd/q", b"Q")  # the device's own, with the same topic and payload
    device.publish("sensors/fence2", b"fence 2")
    cloud_sub.wait_for_topic(UP + "sensors/fence2", timeout=15)

    assert _up(cloud_sub) == [
        ("sensors/fence1", b"fence 1"),
        ("cmd/q", b"Q"),
        ("sensors/fence2", b"fence 2"),
    ]
    assert "made afresh" in agent.log_path.read_text(), "the session was not kept: proves nothing"


def test_malformed_down_payloads_are_rejected_counted_and_the_next_is_delivered(
    local: Broker, app: Publisher, start_agent: AgentStarter, mqtt_clients: MqttClients
) -> None:
    local.start()
    local_sub = mqtt_clients.subscriber(local, "cmd/#")
    agent = start_agent(local)
    assert total(_down(agent)["rejected"]) == 0

    app.publish(DOWN + "cmd/bad1", b"\xff\xff not cbor")
    app.publish(DOWN + "cmd/bad2", cbor2.dumps({"v": 1, "ct": "text/plain"}))
    app.publish(DOWN + "cmd/good", down_envelope("fine"))
    got = local_sub.wait_for_topic("cmd/good", timeout=15)
    assert got.payload == b"fine" and got.content_type == "text/plain"

    status = agent.wait_status(
        lambda s: total(s["down"]["rejected"]) >= 2, 10, what="2 rejected"
    )
    assert total(status["down"]["rejected"]) == 2
    agent.assert_alive()
    assert local_sub.on("cmd/bad1") == [] and local_sub.on("cmd/bad2") == []
    with agent.connect() as api:  # still serving, and still taking down messages
        assert api.request({"op": "subscribe", "filter": "cmd/#"})["ok"] is True
        app.publish(DOWN + "cmd/after", down_envelope("after"))
        assert _read_event(api)["topic"] == "cmd/after"
    assert total(_down(agent)["rejected"]) == 2


def test_down_data_becomes_the_local_payload_with_its_content_type(
    local: Broker, app: Publisher, start_agent: AgentStarter, mqtt_clients: MqttClients
) -> None:
    local.start()
    local_sub = mqtt_clients.subscriber(local, "cmd/#")
    start_agent(local)

    app.publish(DOWN + "cmd/text", down_envelope("héllo"))
    app.publish(DOWN + "cmd/bytes", down_envelope(b"\x00\xff"))
    app.publish(DOWN + "cmd/map", down_envelope({"a": [1, 2]}))
    app.publish(DOWN + "cmd/typed", down_envelope('{"on": true}', ct="application/json"))
    got = {
        topic: local_sub.wait_for_topic(topic, timeout=15)
        for topic in ("cmd/text", "cmd/bytes", "cmd/map", "cmd/typed")
    }
    assert (got["cmd/text"].payload, got["cmd/text"].content_type) == (
        "héllo".encode(), "text/plain")
    assert (got["cmd/bytes"].payload, got["cmd/bytes"].content_type) == (
        b"\x00\xff", "application/octet-stream")
    assert cbor2.loads(got["cmd/map"].payload) == {"a": [1, 2]}
    assert got["cmd/map"].content_type == "application/cbor"
    assert (got["cmd/typed"].payload, got["cmd/typed"].content_type) == (
        b'{"on": true}', "application/json")


def test_expired_and_oversized_down_messages_are_dropped_and_counted(
    local: Broker, app: Publisher, start_agent: AgentStarter, mqtt_clients: MqttClients
) -> None:
    local_sub = mqtt_clients.primed_subscriber(local, "cmd/#")
    agent = start_agent(local)
    assert _down(agent)["expired"] == 0

    app.publish(DOWN + "cmd/stale", down_envelope("stale", exp=time.time() - 10))
    # Stored while the local broker is down, it expires in the inbox.
    app.publish(DOWN + "cmd/soon", down_envelope("soon", exp=time.time() + 1.0))
    app.publish(DOWN + "cmd/huge", down_envelope(b"\x00" * (1024 * 1024 + 1)))
    status = agent.wait_status(
        lambda s: s["down"]["expired"] >= 2 and total(s["down"]["rejected"]) >= 1,
        10,
        what="two down messages expired and one rejected",
    )
    assert status["down"]["expired"] == 2 and total(status["down"]["rejected"]) == 1

    local.start()
    app.publish(DOWN + "cmd/fresh", down_envelope("fresh", exp=time.time() + 3600))
    assert local_sub.wait_for_topic("cmd/fresh", timeout=15).payload == b"fresh"
    agent.wait_status(lambda s: s["down"]["pending"] == 0, 10, what="inbox empty")
    assert [m.topic for m in local_sub.messages] == ["cmd/fresh"]
    agent.assert_alive()
