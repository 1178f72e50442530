"""Fixtures: a real mosquitto, the agent as a subprocess, a cloud-side subscriber, a LAN.

Every peer made here is torn down by its fixture, whatever the test did to it
(a paused broker is resumed and killed, a live agent is stopped, a subscriber
disconnected), and the logs' tails are printed so a failing test shows them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support.agent import Agent, Overrides
from tests.support.broker import Broker, find_mosquitto
from tests.support.faketime import find_libfaketime
from tests.support.localpub import MqttClients
from tests.support.net import free_port
from tests.support.netns import Lan, netns_unavailable, sweep_leftovers
from tests.support.postgres import Postgres, find_postgres
from tests.support.registry import Registry
from tests.support.simnode import SimNodes
from tests.support.subscriber import UP_FILTER, Subscriber

BrokerFactory = Callable[..., Broker]
AgentFactory = Callable[..., Agent]
SubscriberFactory = Callable[..., Subscriber]


@pytest.fixture
def free_tcp_port() -> int:
    """A loopback TCP port nothing listens on."""
    return free_port()


def skip_missing(reason: str) -> NoReturn:
    """Skip a test whose real peer cannot run here; fail instead on CI, which provides it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run every test")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    """Path of mosquitto; skip (fail on CI, which installs it) when it is missing."""
    found = find_mosquitto()
    if found is None:
        skip_missing("mosquitto is not installed (apt-get install mosquitto; scripts/test does)")
    return found


@pytest.fixture(scope="session")
def libfaketime() -> Path:
    """The multi-threaded libfaketime; skip (fail on CI, which installs it) when it is missing."""
    found = find_libfaketime()
    if found is None:
        skip_missing("libfaketime is not installed (apt-get install faketime; scripts/test does)")
    return found


@pytest.fixture(scope="session")
def netns_ok() -> None:
    """Skip (fail on CI) when this process cannot build network namespaces, saying why."""
    reason = netns_unavailable()
    if reason is not None:
        skip_missing(reason)
    swept = sweep_leftovers()
    if swept:
        print(f"deleted {len(swept)} network namespaces left by dead test runs: {swept}")


@pytest.fixture
def lan(tmp_path: Path, netns_ok: None) -> Iterator[Lan]:
    """An empty LAN (a bridge in its own namespace): lan.add_host("a") plugs in a host.

    Teardown stops its agents, kills what runs in its namespaces and deletes them.
    """
    with Lan(tmp_path / "lan") as made:
        try:
            yield made
        finally:
            print(f"--- lan ---\n{made.describe()}")


@pytest.fixture
def broker_factory(tmp_path: Path, mosquitto_binary: str) -> Iterator[BrokerFactory]:
    """Make brokers (not started): broker_factory(extra=["max_packet_size 2048"])."""
    made: list[Broker] = []

    def make(extra: Sequence[str] = (), name: str | None = None) -> Broker:
        broker = Broker(
            tmp_path / (name or f"broker{len(made)}"), binary=mosquitto_binary, extra=extra
        )
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()
        print(f"--- mosquitto log tail ({broker.log_path}) ---\n{broker.log_tail()}")


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    """A broker on a reserved port, NOT started: call broker.start()."""
    return broker_factory(name="broker")


@pytest.fixture
def cloud(broker_factory: BrokerFactory) -> Broker:
    """The cloud broker, started."""
    broker = broker_factory(name="cloud")
    broker.start()
    return broker


@pytest.fixture
def subscriber_factory() -> Iterator[SubscriberFactory]:
    """Make started subscribers: subscriber_factory(broker, topic_filter=UP_FILTER)."""
    made: list[Subscriber] = []

    def make(
        broker: Broker, topic_filter: str = UP_FILTER, client_id: str | None = None
    ) -> Subscriber:
        sub = Subscriber(broker.port, topic_filter=topic_filter, client_id=client_id)
        made.append(sub)
        return sub.start()

    yield make
    for sub in reversed(made):
        sub.close()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[AgentFactory]:
    """Make agents: agent_factory(broker or url or None, node_id=..., overrides=..., start=True)."""
    made: list[Agent] = []

    def make(
        uplink: Broker | str | None = None,
        *,
        node_id: str = "node-a",
        overrides: Overrides | None = None,
        start: bool = True,
        name: str | None = None,
    ) -> Agent:
        url = uplink.url if isinstance(uplink, Broker) else (uplink or "")
        agent = Agent(
            tmp_path / (name or f"agent{len(made)}"),
            uplink=url,
            node_id=node_id,
            overrides=overrides,
        )
        made.append(agent)
        return agent.start() if start else agent

    yield make
    for agent in reversed(made):
        agent.close()


@pytest.fixture
def primed_subscriber(broker: Broker, subscriber_factory: SubscriberFactory) -> Subscriber:
    """A subscriber whose persistent session exists on `broker`, which is left STOPPED.

    Whatever the agent later gets into the broker is kept for this subscriber,
    so nothing can slip past between the broker starting and a subscription.
    """
    broker.start()
    sub = subscriber_factory(broker)
    broker.stop()
    return sub


@pytest.fixture
def mqtt_clients() -> Iterator[MqttClients]:
    """Local programs and cloud applications: mqtt_clients.publisher(broker), .subscriber(...).

    Every client made is disconnected at teardown.
    """
    with MqttClients() as made:
        yield made


# ---- the registry: PostgreSQL, stores, registry processes ------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session; skip (fail on CI) when it is not installed."""
    bindir = find_postgres()
    if bindir is None:
        skip_missing("PostgreSQL 15 is not installed (apt-get install postgresql-15)")
    server = Postgres(bindir)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        server.close()
        skip_missing(f"PostgreSQL cannot start here: {exc}")
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry's store, once per database: a new SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


RegistryFactory = Callable[..., Registry]


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[RegistryFactory]:
    """Make started registries: registry_factory(broker, db_url, extra=[...], start=True)."""
    made: list[Registry] = []

    def make(broker: Broker, db_url: str, *, extra: Sequence[str] = (),
             start: bool = True, wait_broker: bool = True) -> Registry:
        reg = Registry(tmp_path / f"registry{len(made)}", broker_port=broker.port,
                       db_url=db_url, extra=extra)
        made.append(reg)
        return reg.start(wait_broker=wait_broker) if start else reg

    yield make
    for reg in reversed(made):
        reg.kill()
        print(f"--- registry log tail ({reg.log_path}) ---\n{reg.log_tail()}")


@pytest.fixture
def sim_nodes() -> Iterator[SimNodes]:
    """Make started simulated nodes: sim_nodes(broker.port, "n1", heartbeat=...)."""
    made = SimNodes()
    yield made
    made.close()
