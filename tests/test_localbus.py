"""The local MQTT bus, up: local program -> local mosquitto -> agent -> outbox -> cloud mosquitto.

Each test runs the real agent with two real brokers, one as the device's local
bus and one as the cloud. The cloud subscriber's persistent session exists
before the agent can reach the cloud broker, so what it counts is what the
agent delivered; the local publisher's messages are all PUBACKed by the local
broker, so what it published is what the agent owed the cloud.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge.envelope import Envelope
from tests.conftest import AgentFactory, BrokerFactory
from tests.support.agent import Agent, Overrides
from tests.support.broker import Broker
from tests.support.localpub import (
    MqttClients,
    Publisher,
    RawMessage,
    RawSubscriber,
    probe_until,
    total,
)

NODE = "node-a"
UP = f"edge/v1/nodes/{NODE}/up/"
PROBE = "sensors/probe"
LOCAL_INFLIGHT = 100


def _local(local: Broker, forward: tuple[str, ...] = ("sensors/#",), **keys: Any) -> Overrides:
    """The [local] section for `local`, with a quick reconnect."""
    return {
        "local": {
            "url": local.url,
            "forward": list(forward),
            "inflight": LOCAL_INFLIGHT,
            "backoff_initial": "0.1s",
            "backoff_max": "0.5s",
            **keys,
        }
    }


def _await_forwarding(pub: Publisher, forwarded: Callable[[], bool]) -> None:
    """Publish probes on PROBE until `forwarded()` sees one come through the agent."""
    probe_until(
        lambda n: pub.publish(PROBE, f"probe-{n}".encode()),
        forwarded,
        timeout=15,
        what="the agent's local subscription",
    )


@pytest.fixture
def local(broker_factory: BrokerFactory) -> Broker:
    """The local broker, running."""
    broker = broker_factory(name="local")
    broker.start()
    return broker


@pytest.fixture
def cloud(broker_factory: BrokerFactory) -> Broker:
    """The cloud broker, NOT started: start_forwarding() or the test starts it."""
    return broker_factory(name="cloud")


Forwarding = tuple[Agent, Publisher, RawSubscriber]
ForwardingStarter = Callable[..., Forwarding]


@pytest.fixture
def start_forwarding(
    cloud: Broker, agent_factory: AgentFactory, mqtt_clients: MqttClients
) -> ForwardingStarter:
    """start_forwarding(local, cloud_running=..., ...): (agent, local program, cloud subscriber).

    The cloud subscriber's session exists before the agent starts; with
    cloud_running=False the cloud broker is left stopped. The agent forwards
    `forward` from `local`, with `protocol` (the program's too) and the `queue`
    section in its config when given, and has forwarded one of the program's
    probes: to the cloud subscriber while the cloud runs, into its outbox while
    it does not.
    """

    def start(
        local: Broker,
        *,
        cloud_running: bool,
        forward: tuple[str, ...] = ("sensors/#",),
        protocol: str | None = None,
        queue: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> Forwarding:
        if cloud_running:
            cloud.start()
            cloud_sub = mqtt_clients.subscriber(cloud, UP + "#")
        else:
            cloud_sub = mqtt_clients.primed_subscriber(cloud, UP + "#")
        local_keys = {} if protocol is None else {"protocol": protocol}
        overrides: dict[str, Any] = {**_local(local, forward, **local_keys)}
        if queue is not None:
            overrides["queue"] = queue
        agent = agent_factory(cloud, overrides=overrides, name=name)
        pub = mqtt_clients.publisher(local, protocol=protocol or "5")
        if cloud_running:
            _await_forwarding(pub, lambda: bool(cloud_sub.on(UP + PROBE)))
        else:
            _await_forwarding(pub, lambda: agent.status()["queue"]["depth"] >= 1)
        return agent, pub, cloud_sub

    return start


def _wait_local_online(agent: Agent) -> None:
    """Wait until the agent is subscribed on the local broker (it says online only then)."""
    agent.wait_status(lambda s: s["local"]["state"] == "online", 10, what="local online")


def _decoded(messages: list[RawMessage]) -> list[tuple[RawMessage, Envelope]]:
    """Every message but the probes, with its decoded envelope."""
    out = []
    for m in messages:
        env = Envelope.decode(m.payload)
        if env.topic != PROBE:
            out.append((m, env))
    return out


def _distinct_data(sub: RawSubscriber) -> set[tuple[str, Any]]:
    """The distinct (local topic, data) pairs the cloud subscriber got, probes left out."""
    return {(env.topic, env.data) for _, env in _decoded(sub.messages)}


def _payloads(count: int, size: int = 0) -> list[tuple[str, bytes]]:
    """`count` distinct (topic, payload) pairs; payloads are bytes that are not UTF-8."""
    pad = b"x" * size
    return [(f"sensors/t{i % 8}", f"m{i}-".encode() + b"\xfe\x00" + pad) for i in range(count)]


def _wait_cloud_got(
    sub: RawSubscriber, wanted: set[tuple[str, bytes]], timeout: float
) -> None:
    """Wait until every (topic, payload) in `wanted` has arrived at the cloud at least once."""
    def done(messages: list[RawMessage]) -> bool:
        return wanted <= {(env.topic, env.data) for _, env in _decoded(messages)}

    try:
        sub.wait_until(done, timeout, what=f"{len(wanted)} local messages at the cloud")
    except TimeoutError as exc:
        missing = wanted - _distinct_data(sub)
        raise TimeoutError(f"{exc}; {len(missing)} missing, e.g. {sorted(missing)[:3]!r}") from None


def _assert_forwarded_as_sent(sub: RawSubscriber, sent: set[tuple[str, bytes]]) -> int:
    """Every up message is one of `sent`, on its topic, as octet-stream; return the copies."""
    copies = 0
    for m, env in _decoded(sub.messages):
        assert m.topic == UP + env.topic, f"{env.topic!r} arrived on {m.topic!r}"
        assert (env.topic, env.data) in sent, f"unexpected {env.topic!r} {env.data!r}"
        assert isinstance(env.data, bytes), f"data is {type(env.data).__name__}, not bytes"
        assert env.ct == "application/octet-stream" and env.node == NODE
        copies += 1
    assert _distinct_data(sub) == sent
    return copies


def test_local_messages_published_while_the_cloud_is_down_all_reach_the_cloud(
    local: Broker, cloud: Broker, start_forwarding: ForwardingStarter
) -> None:
    agent, pub, cloud_sub = start_forwarding(local, cloud_running=False)
    base = agent.status()["queue"]["depth"]

    items = _payloads(5000)
    pub.publish_many(items, timeout=60)
    status = agent.wait_status(
        lambda s: s["queue"]["depth"] >= base + 5000, 30, what="5000 local messages in the outbox"
    )
    assert status["uplink"]["state"] == "offline"
    assert status["local"]["state"] == "online"

    cloud.start()
    sent = set(items)
    _wait_cloud_got(cloud_sub, sent, timeout=60)
    _assert_forwarded_as_sent(cloud_sub, sent)
    assert len(_distinct_data(cloud_sub)) == 5000
    final = agent.wait_drained(timeout=10)
    assert final["queue"]["dropped"] == 0 and total(final["local"]["rejected"]) == 0




@contextlib.contextmanager
def _streaming(
    pub: Publisher, items: list[tuple[str, bytes]], pause: float = 0.05
) -> Iterator[list[int]]:
    """Publish `items` from a thread, 50 then `pause` seconds (about 1000 a second).

    Yields [how many were sent so far]; on leaving, waits for the publisher to
    finish with every message acknowledged by the local broker.
    """
    progress = [0]
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            infos = []
            for n, (topic, payload) in enumerate(items, 1):
                infos.append(pub.send(topic, payload))
                progress[0] = n
                if n % 50 == 0:
                    time.sleep(pause)
            pub.wait_acked(infos, timeout=60)
        except BaseException as exc:
            failure.append(exc)

    producer = threading.Thread(target=produce, name="local-producer", daemon=True)
    producer.start()
    try:
        yield progress
    finally:
        producer.join(timeout=60)
    assert not producer.is_alive(), "the local publisher did not finish"
    assert not failure, f"local publisher failed: {failure[0]!r}"


def test_a_clean_stop_mid_stream_forwards_no_local_message_twice(
    local: Broker, cloud: Broker, start_forwarding: ForwardingStarter
) -> None:
    """SIGTERM acknowledges what is being committed before the agent leaves the broker."""
    agent, pub, cloud_sub = start_forwarding(local, cloud_running=False)
    base = agent.status()["queue"]["depth"]
    items = _payloads(10000)
    # As fast as the broker takes them: commits are always under way at the stop.
    with _streaming(pub, items, pause=0.002) as progress:
        agent.wait_status(
            lambda s: s["queue"]["depth"] >= base + 1000, 20, what="1000 messages committed"
        )
        stopped_at = progress[0]
        assert agent.terminate() == 0
        agent.start()
    assert stopped_at < 10000, "the publisher had finished before the stop: nothing was mid-stream"
    cloud.start()
    sent = set(items)
    _wait_cloud_got(cloud_sub, sent, timeout=60)
    agent.wait_drained(timeout=30)
    copies = _assert_forwarded_as_sent(cloud_sub, sent)
    # The outbox held everything (the cloud was down), so a copy could only come
    # from the local broker sending again what the agent had stored.
    seqs = {env.seq for _, env in _decoded(cloud_sub.messages)}
    assert copies == 10000, (
        f"{copies - 10000} local messages forwarded twice ({len(seqs)} distinct seq:"
        f" {copies - len(seqs)} sent again by the uplink)"
    )


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_local_messages_survive_kill9_of_the_agent_mid_stream(
    protocol: str, local: Broker, cloud: Broker, start_forwarding: ForwardingStarter
) -> None:
    agent, pub, cloud_sub = start_forwarding(local, cloud_running=False, protocol=protocol)
    base = agent.status()["queue"]["depth"]

    items = _payloads(5000)
    with _streaming(pub, items) as progress:
        agent.wait_status(
            lambda s: s["queue"]["depth"] >= base + 1000, 20, what="1000 messages committed"
        )
        agent.kill9()
        killed_at = progress[0]
        agent.start()
    assert killed_at < 5000, "the publisher had finished before the kill: nothing was mid-stream"

    cloud.start()
    sent = set(items)
    _wait_cloud_got(cloud_sub, sent, timeout=60)
    copies = _assert_forwarded_as_sent(cloud_sub, sent)
    assert len(_distinct_data(cloud_sub)) == 5000
    # Only what the broker had sent the agent but not got a PUBACK for comes twice.
    assert copies - 5000 <= LOCAL_INFLIGHT, f"{copies - 5000} duplicates"


def test_reject_holds_local_messages_unacknowledged_until_the_outbox_has_room(
    local: Broker, cloud: Broker, start_forwarding: ForwardingStarter
) -> None:
    max_bytes = 64 * 1024
    agent, pub, cloud_sub = start_forwarding(
        local, cloud_running=False, queue={"max_bytes": "64KiB", "on_full": "reject"}
    )

    items = _payloads(600, size=400)  # about 250 KB: four times what the outbox takes
    pub.publish_many(items, timeout=30)  # the local broker took them all
    held = agent.wait_status(
        lambda s: s["local"]["held"] > 0, 15, what="the agent holding a message back"
    )
    queue = held["queue"]
    assert queue["bytes"] <= max_bytes, queue
    assert queue["depth"] < 600, queue
    assert queue["dropped"] == 0 and total(held["local"]["rejected"]) == 0

    cloud.start()
    sent = set(items)
    _wait_cloud_got(cloud_sub, sent, timeout=60)
    _assert_forwarded_as_sent(cloud_sub, sent)
    final = agent.wait_status(
        lambda s: s["queue"]["depth"] == 0 and s["local"]["held"] == 0, 15, what="all drained"
    )
    assert final["queue"]["dropped"] == 0 and total(final["local"]["rejected"]) == 0


def test_agent_runs_with_the_local_broker_down_and_forwards_once_it_starts(
    cloud: Broker,
    broker_factory: BrokerFactory,
    agent_factory: AgentFactory,
    mqtt_clients: MqttClients,
) -> None:
    local = broker_factory(name="local")  # port reserved, nothing listens
    cloud.start()
    cloud_sub = mqtt_clients.subscriber(cloud, UP + "#")
    agent = agent_factory(cloud, overrides=_local(local))
    agent.wait_online()
    down = agent.wait_status(
        lambda s: s["local"]["state"] == "offline" and s["local"]["last_error"] is not None,
        10,
        what="local offline with its last error",
    )["local"]
    assert isinstance(down["last_error"], str) and down["last_error"]
    assert down["url"] == local.url
    assert agent.publish_ok("sensors/api", "socket still serves")["seq"] >= 1

    local.start()
    up = agent.wait_status(lambda s: s["local"]["state"] == "online", 10, what="local online")
    assert up["local"]["connects"] >= 1
    pub = mqtt_clients.publisher(local)
    _await_forwarding(pub, lambda: bool(cloud_sub.on(UP + PROBE)))
    items = _payloads(20)
    pub.publish_many(items)
    _wait_cloud_got(cloud_sub, set(items), timeout=15)
    agent.assert_alive()


def test_a_topic_outside_forward_is_not_forwarded(
    local: Broker, start_forwarding: ForwardingStarter
) -> None:
    agent, pub, cloud_sub = start_forwarding(
        local, cloud_running=True, forward=("sensors/#", "alarms/+")
    )

    pub.publish("other/x", b"not forwarded")
    pub.publish("alarms/door/deep", b"not forwarded either")  # + is one level
    pub.publish("alarms/door", b"forwarded")
    # The local broker delivers to the agent in order and the outbox is FIFO:
    # once this one is at the cloud, the two before it would have been too.
    pub.publish("sensors/fence", b"fence")
    cloud_sub.wait_for_topic(UP + "sensors/fence", timeout=15)

    topics = {env.topic for _, env in _decoded(cloud_sub.messages)}
    assert topics == {"alarms/door", "sensors/fence"}
    assert total(agent.status()["local"]["rejected"]) == 0


def test_mqtt5_content_type_and_expiry_carry_into_the_envelope(
    local: Broker, start_forwarding: ForwardingStarter
) -> None:
    agent, pub, cloud_sub = start_forwarding(local, cloud_running=True)

    pub.publish("sensors/json", b'{"t": 21.5}', content_type="application/json")
    pub.publish("sensors/raw", b"\x01\x02")
    pub.publish("sensors/brief", b"soon stale", expiry=3600)
    cloud_sub.wait_for_topic(UP + "sensors/brief", timeout=15)

    envs = {env.topic: env for _, env in _decoded(cloud_sub.messages)}
    assert envs["sensors/json"].ct == "application/json"
    assert envs["sensors/json"].data == b'{"t": 21.5}'
    assert envs["sensors/raw"].ct == "application/octet-stream"
    assert envs["sensors/raw"].data == b"\x01\x02" and envs["sensors/raw"].exp is None
    brief = envs["sensors/brief"]
    assert brief.exp is not None and abs(brief.exp - (brief.ts + 3600)) < 2.0
    agent.assert_alive()


def test_a_local_message_the_outbox_can_never_take_is_acknowledged_dropped_and_counted(
    local: Broker, start_forwarding: ForwardingStarter
) -> None:
    agent, pub, cloud_sub = start_forwarding(
        local, cloud_running=True, forward=("#",), queue={"max_message_bytes": "4KiB"}
    )

    pub.publish("sensors/big", b"x" * 8192)
    pub.publish("/abs/t", b"a leading slash")
    pub.publish("sensors/fence", b"fence")
    cloud_sub.wait_for_topic(UP + "sensors/fence", timeout=15)
    status = agent.wait_status(
        lambda s: total(s["local"]["rejected"]) >= 2, 10, what="two local messages rejected"
    )
    assert total(status["local"]["rejected"]) == 2 and status["local"]["held"] == 0
    topics = {env.topic for _, env in _decoded(cloud_sub.messages)}
    assert topics == {"sensors/fence"}

    # Acknowledged: after a restart the local broker has nothing of them to send again.
    agent.restart()
    pub.publish("sensors/fence2", b"fence 2")
    cloud_sub.wait_for_topic(UP + "sensors/fence2", timeout=15)
    assert total(agent.status()["local"]["rejected"]) == 0


def test_a_filter_dropped_from_forward_is_unsubscribed_at_the_next_start(
    cloud: Broker,
    broker_factory: BrokerFactory,
    agent_factory: AgentFactory,
    start_forwarding: ForwardingStarter,
) -> None:
    local = broker_factory(name="local", extra=["log_type all"])  # logs each UNSUBSCRIBE
    local.start()
    first, pub, cloud_sub = start_forwarding(
        local, cloud_running=True, forward=("sensors/#", "alarms/#"), name="agent"
    )
    pub.publish("alarms/door", b"while alarms/# is forwarded")
    cloud_sub.wait_for_topic(UP + "alarms/door", timeout=15)
    assert first.terminate() == 0

    # Away, the session still holds alarms/#: the broker keeps this one for the agent.
    pub.publish("alarms/window", b"queued for the old subscription")
    second = agent_factory(cloud, overrides=_local(local), name="agent")  # sensors/# only
    second.wait_status(lambda s: s["local"]["state"] == "online", 10, what="local online")
    pub.publish("alarms/gate", b"after the unsubscribe")
    pub.publish("sensors/fence", b"fence")
    cloud_sub.wait_for_topic(UP + "sensors/fence", timeout=15)

    topics = [env.topic for _, env in _decoded(cloud_sub.messages)]
    assert "alarms/window" not in topics and "alarms/gate" not in topics, topics
    assert topics.count("alarms/door") >= 1
    # mosquitto (log_type all) logs each filter of an UNSUBSCRIBE on the line after it.
    lines = local.log_path.read_text(errors="replace").splitlines()
    dropped = [
        after.split("\t", 1)[-1].strip()
        for line, after in itertools.pairwise(lines)
        if "Received UNSUBSCRIBE from edge-agent-node-a" in line
    ]
    assert dropped == ["alarms/#"], dropped


def test_a_client_id_changed_and_back_does_not_leave_old_filters_in_the_first_session(
    local: Broker,
    cloud: Broker,
    agent_factory: AgentFactory,
    start_forwarding: ForwardingStarter,
) -> None:
    first, pub, cloud_sub = start_forwarding(
        local, cloud_running=True, forward=("#",), name="agent"
    )
    assert first.terminate() == 0
    other = agent_factory(
        cloud, overrides=_local(local, ("#",), client_id="other"), name="agent"
    )
    _wait_local_online(other)
    assert other.terminate() == 0

    # Back in the first session, which the local broker kept with its "#".
    agent = agent_factory(cloud, overrides=_local(local), name="agent")  # sensors/# only
    _wait_local_online(agent)
    pub.publish("other/x", b"outside forward")
    pub.publish("sensors/x", b"once")
    # Both subscriptions' copies of sensors/x, were there two, are ahead of this one.
    pub.publish("sensors/fence", b"fence")
    cloud_sub.wait_for_topic(UP + "sensors/fence", timeout=15)

    up = [(env.topic, env.data) for _, env in _decoded(cloud_sub.messages)]
    assert up.count(("sensors/x", b"once")) == 1, up
    assert "other/x" not in {topic for topic, _ in up}, up
    # The broker no longer sends it ("#" is gone), or the agent drops it and counts it.
    rejected = agent.status()["local"]["rejected"]
    assert rejected in ({}, {"outside_forward": 1}), rejected


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_retained_local_message_is_forwarded_once_not_again_at_each_restart(
    protocol: str, local: Broker, mqtt_clients: MqttClients, start_forwarding: ForwardingStarter
) -> None:
    program = mqtt_clients.publisher(local, protocol=protocol)
    program.publish("sensors/retained", b"kept by the broker", retain=True)
    agent, pub, cloud_sub = start_forwarding(local, cloud_running=True, protocol=protocol)
    cloud_sub.wait_for_topic(UP + "sensors/retained", timeout=15)

    for n in range(2):
        agent.restart()  # SIGTERM; the local broker keeps the session and its subscription
        _wait_local_online(agent)
        # mosquitto queues the retained messages a SUBSCRIBE asks for before it sends
        # the SUBACK the agent waits for to say online: a copy would be ahead of this.
        pub.publish(f"sensors/fence{n}", b"fence")
        cloud_sub.wait_for_topic(UP + f"sensors/fence{n}", timeout=15)

    up = [(env.topic, env.data) for _, env in _decoded(cloud_sub.messages)]
    assert up.count(("sensors/retained", b"kept by the broker")) == 1, up
