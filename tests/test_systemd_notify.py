"""The agent under systemd's notify protocol: a NOTIFY_SOCKET bound by the test.

READY=1 only once the socket API accepts, WATCHDOG=1 from the event loop every
half WatchdogSec (and none while the process is stopped), STATUS= lines, and
STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge.notify import Notifier, watchdog_interval
from tests.conftest import AgentFactory, BrokerFactory, SubscriberFactory
from tests.support.agent import ApiClient, ApiError


@dataclass
class Datagram:
    at: float
    fields: dict[str, str]
    api_answered: bool | None = None  # for READY: did the socket API answer right then?


@dataclass
class FakeSystemd:
    """A bound NOTIFY_SOCKET recording each datagram with the time it came."""

    path: Path
    api: Path
    got: list[Datagram] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str, since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for d in self.got if key in d.fields and d.at >= since)

    def first(self, key: str) -> Datagram | None:
        with self.lock:
            return next((d for d in self.got if key in d.fields), None)

    def wait(self, key: str, timeout: float) -> Datagram:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.first(key)
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no {key} from the agent in {timeout}s: {self.got!r:.600}")


def _api_answers(path: Path) -> bool:
    try:
        with ApiClient(path, timeout=2.0) as client:
            return bool(client.request({"op": "status"}).get("ok"))
    except OSError:
        return False


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    fake = FakeSystemd(path, tmp_path / "agent0" / "agent.sock")
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            item = Datagram(time.monotonic(), fields)
            if "READY" in fields:
                item.api_answered = _api_answers(fake.api)
            with fake.lock:
                fake.got.append(item)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4s: a ping every 0.2s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield fake
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_ready_comes_once_the_socket_api_answers(
    systemd: FakeSystemd, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(name="agent0")
    ready = systemd.wait("READY", 10)
    assert ready.api_answered is True, "READY=1 came before the socket API answered"
    assert ready.fields["STATUS"].startswith("uplink ")
    assert systemd.count("READY") == 1
    agent.assert_alive()


def test_watchdog_pings_come_from_the_loop_and_stop_while_it_is_stopped(
    systemd: FakeSystemd, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(name="agent0")
    systemd.wait("READY", 10)
    started = time.monotonic()
    time.sleep(1.0)
    assert systemd.count("WATCHDOG", since=started) >= 3
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)  # one ping may be on its way
        frozen = time.monotonic()
        time.sleep(1.0)
        assert systemd.count("WATCHDOG", since=frozen) == 0, "pings while stopped"
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    woke = time.monotonic()
    time.sleep(0.8)
    assert systemd.count("WATCHDOG", since=woke) >= 2


def test_sigterm_says_stopping_then_the_agent_exits(
    systemd: FakeSystemd, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(name="agent0")
    systemd.wait("READY", 10)
    assert agent.terminate() == 0
    stopping = systemd.wait("STOPPING", 5)
    assert stopping.fields.get("STATUS") == "stopping"


def test_watchdog_interval_is_half_the_usec_and_for_this_pid_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, 42) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "42"}, 42) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({}, 42) is None


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    notifier.ready("x")
    notifier.stopping()
    assert not notifier.enabled and notifier.sent == 0


def test_an_abstract_socket_address_is_used_as_such(tmp_path: Path) -> None:
    name = f"edge-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("uplink offline, 0 queued")
        assert sock.recv(4096) == b"READY=1\nSTATUS=uplink offline, 0 queued"
        notifier.close()
    finally:
        sock.close()


def test_every_publish_answered_ok_before_sigterm_is_delivered_after_the_next_start(
    broker_factory: BrokerFactory, agent_factory: AgentFactory,
    subscriber_factory: SubscriberFactory,
) -> None:
    """systemd stops the agent in the middle of a burst: nothing it said ok to is lost."""
    broker = broker_factory(name="cloud")  # down for now: everything stays in the outbox
    agent = agent_factory(broker)
    client = agent.connect(timeout=15)
    lines = b"".join(json.dumps({"op": "publish", "topic": "burst", "data": f"m{i}"}).encode()
                     + b"\n" for i in range(20_000))
    writer = threading.Thread(target=lambda: _send_quietly(client, lines), daemon=True)
    writer.start()
    accepted: list[int] = []
    try:
        while len(accepted) < 300:
            answer = client.read_response()
            if answer.get("ok"):
                accepted.append(answer["seq"])
        os.kill(agent.pid, signal.SIGTERM)  # mid-burst
        while True:
            try:
                answer = client.read_response()
            except (ApiError, OSError):
                break  # the agent closed the connection as it stopped
            if answer.get("ok"):
                accepted.append(answer["seq"])
    finally:
        client.close()
        writer.join(10)
    assert agent.terminate(timeout=15) == 0  # already stopping: waits for the exit
    assert len(accepted) < 20_000, "the burst ended before the SIGTERM: nothing was tested"

    broker.start()
    subscriber = subscriber_factory(broker)
    agent.start()
    subscriber.wait_for_seqs(accepted, timeout=60)
    assert set(accepted) <= subscriber.distinct_seqs()


def _send_quietly(client: ApiClient, data: bytes) -> None:
    try:
        client.send_raw(data)
    except OSError:
        pass  # the agent stopped reading: the test looks at what was answered
