"""A wall-clock step (NTP after a boot without RTC) restarts no service, loses no message.

The agent runs under libfaketime, which fakes the wall clock only; the test
steps it (tests/support/faketime.py). Services, timers, TTLs and the backlog
all run on the monotonic clock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import SubscriberFactory
from tests.support.agent import Agent
from tests.support.broker import Broker
from tests.support.faketime import agent_clock, faked_agent, faketime_prefix, step
from tests.support.net import wait_until
from tests.support.steady import SteadyPublisher

_SLEEP = ["sleep", "100000"]
HOUR = 3600.0
DAY = 24 * HOUR


def _marked(mark: str) -> list[psutil.Process]:
    """The `sleep 100000` processes carrying `mark` in their environment."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.info["cmdline"] != _SLEEP:
            continue
        try:
            if proc.environ().get("EDGE_TEST_MARK") == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _row(agent: Agent) -> dict[str, Any]:
    [row] = agent.request({"op": "services"})["services"]
    return dict(row)


@pytest.fixture
def stepped_agent(tmp_path: Path, libfaketime: Path) -> Iterator[tuple[Agent, Path, str]]:
    """An agent under libfaketime with one service, `sleep 100000`; and the offset file."""
    mark = uuid.uuid4().hex
    offset = tmp_path / "faketime.rc"
    offset.write_text("+0\n")
    agent = Agent(
        tmp_path / "agent",
        overrides={
            "services.sleeper": {"command": _SLEEP, "stop_timeout": "2s",
                                 "backoff_initial": "0.1s", "backoff_max": "1s"},
            "services.sleeper.env": {"EDGE_TEST_MARK": mark},
            # A health check in progress most of the time, failing once means a restart:
            # a check timed on the wall clock would fail when a step falls inside it.
            "services.sleeper.health": {"exec": ["/bin/sleep", "0.3"], "interval": "0.2s",
                                        "timeout": "2s", "retries": 1},
        },
        prefix=faketime_prefix(libfaketime, offset),
    )
    try:
        agent.start()
        yield agent, offset, mark
    finally:
        agent.close()
        for proc in _marked(mark):
            proc.kill()


def _hold_steady(agent: Agent, mark: str, pid: int, started: float, seconds: float) -> None:
    """For `seconds`, the service keeps its pid, runs once, stays running, and ages in real time.

    `started` is the monotonic time by which the service had started.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        row = _row(agent)
        assert (row["pid"], row["state"], row["restarts"]) == (pid, "running", 0), row
        assert [p.pid for p in _marked(mark)] == [pid]
        assert 0 <= row["uptime"] <= time.monotonic() - started + 5, row
        agent.assert_alive()
        time.sleep(0.1)


def test_clock_steps_forward_and_back_restart_no_service(
    stepped_agent: tuple[Agent, Path, str],
) -> None:
    agent, offset, mark = stepped_agent
    started = time.monotonic()
    wait_until(lambda: _row(agent)["state"] == "running", 15, what="sleeper running")
    pid = _row(agent)["pid"]
    assert [p.pid for p in _marked(mark)] == [pid]
    assert abs(agent_clock(agent) - time.time()) < 60

    # Forward and back, several times: each step has a good chance of falling
    # inside a health check.
    for text, seconds in (("+3h", 3 * HOUR), ("-2h", -2 * HOUR), ("+26h", 26 * HOUR),
                          ("-30m", -0.5 * HOUR)):
        step(agent, offset, text, seconds)
        _hold_steady(agent, mark, pid, started, seconds=1.0)

    row = _row(agent)
    assert row["restarts"] == 0 and row["pid"] == pid, row
    assert len(_marked(mark)) == 1


def test_agent_killed_after_a_clock_step_back_ends_its_leftover_and_runs_the_service_once(
    stepped_agent: tuple[Agent, Path, str],
) -> None:
    agent, offset, mark = stepped_agent
    wait_until(lambda: _row(agent)["state"] == "running", 15, what="sleeper running")
    first = _row(agent)["pid"]
    step(agent, offset, "-5h", -5 * HOUR)
    agent.kill9()  # the service outlives it for now
    assert [p.pid for p in _marked(mark)] == [first]
    agent.start()
    wait_until(lambda: _row(agent)["state"] == "running", 15, what="sleeper running again")
    wait_until(lambda: len(_marked(mark)) == 1, 10, what="the leftover ended")
    assert [p.pid for p in _marked(mark)] == [_row(agent)["pid"]]
    assert _row(agent)["pid"] != first


def test_a_day_step_back_and_forward_while_publishing_leaves_no_gap_no_stall_and_right_ttls(
    tmp_path: Path, libfaketime: Path, broker: Broker, subscriber_factory: SubscriberFactory,
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    # A synchronised clock, stepped all the same (an admin, a bad NTP server).
    agent, offset, _ = faked_agent(tmp_path, libfaketime, broker.url, offset="+0", synced=True)
    try:
        agent.start()
        agent.wait_online()
        broker.stop()  # from here on messages wait in the outbox, their TTLs running
        agent.wait_status(lambda s: s["uplink"]["state"] == "offline", 10, what="offline")
        publisher = SteadyPublisher(agent, interval=0.01, topic="steady/t")
        publisher.start()
        short_at = time.monotonic()
        short = agent.publish_ok("ttl/short", "2s", ttl=2)["seq"]
        long = agent.publish_ok("ttl/long", "60s", ttl=60)["seq"]
        step(agent, offset, "-24h", -DAY)
        behind = agent.publish_ok("ttl/behind", "30s", ttl=30)["seq"]
        # Two seconds really pass: "short" is over, though the wall clock says a day to go.
        agent.wait_status(lambda s: s["queue"]["expired"] >= 1, 10, what="'short' expired")
        assert time.monotonic() - short_at >= 2
        step(agent, offset, "+0", 0)  # forward a day: "behind" still has most of its 30 s
        broker.start()
        publisher.stop()
        sub.wait_for_seqs([*publisher.accepted, long, behind], 20)
        agent.wait_drained(10)
        status = agent.status()
    finally:
        agent.close()

    assert not publisher.refused, publisher.refused
    assert len(publisher.accepted) > 100, "publishing stalled"
    assert publisher.longest_wait() < 1.0, f"publishing stalled {publisher.longest_wait():.2f}s"
    got = sub.distinct_seqs()
    assert short not in got, "a message was sent after its TTL by the monotonic clock"
    assert status["queue"]["expired"] == 1
    # No gap: every seq from the first to the last arrived, but the one that expired.
    assert got | {short} == set(range(min(got | {short}), max(got) + 1))
    by_seq = {r.envelope["seq"]: r.envelope for r in sub.first_arrivals()}
    assert by_seq[behind]["exp"] - by_seq[behind]["ts"] == pytest.approx(30)
    assert by_seq[behind]["ts"] == pytest.approx(time.time() - DAY, abs=120)
    assert by_seq[long]["exp"] - by_seq[long]["ts"] == pytest.approx(60)
    assert not {"tsu", "tsc"} & set(by_seq[long])
