"""A wall-clock step (NTP after a boot without RTC) restarts no service.

The agent runs under libfaketime, which fakes the wall clock only
(FAKETIME_DONT_FAKE_MONOTONIC: the monotonic clock runs on, as it does when
NTP steps a real clock). The test steps it by writing an offset into
FAKETIME_TIMESTAMP_FILE, which the agent re-reads on every clock call
(FAKETIME_NO_CACHE).
"""

from __future__ import annotations

import glob
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import skip_missing
from tests.support.agent import Agent
from tests.support.net import wait_until

# Debian puts it under the multiarch directory: x86_64-linux-gnu, aarch64-linux-gnu, ...
_LIBFAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)
_SLEEP = ["sleep", "100000"]
HOUR = 3600.0


@pytest.fixture(scope="session")
def libfaketime() -> Path:
    """The multi-threaded libfaketime (the agent has threads); skip (fail on CI) without it."""
    for pattern in _LIBFAKETIME_GLOBS:
        for found in sorted(glob.glob(pattern)):
            return Path(found)
    skip_missing("libfaketime is not installed (apt-get install faketime; scripts/test does)")


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


def _agent_clock(agent: Agent) -> float:
    """The agent's wall clock: a message id starts with its milliseconds (UUIDv7)."""
    answer = agent.publish_ok("clock/probe", "x")
    return int(answer["id"][:12], 16) / 1000.0


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
        prefix=[
            "env",
            f"LD_PRELOAD={libfaketime}",
            f"FAKETIME_TIMESTAMP_FILE={offset}",
            "FAKETIME_NO_CACHE=1",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
        ],
    )
    try:
        agent.start()
        yield agent, offset, mark
    finally:
        agent.close()
        for proc in _marked(mark):
            proc.kill()


def _step(agent: Agent, offset: Path, text: str, seconds: float) -> None:
    """Set the agent's clock to real time + `seconds`, and see that it took."""
    offset.write_text(text + "\n")
    wait_until(
        lambda: abs(_agent_clock(agent) - (time.time() + seconds)) < 60,
        10,
        what=f"the agent's clock at {text}",
    )


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
    assert abs(_agent_clock(agent) - time.time()) < 60

    # Forward and back, several times: each step has a good chance of falling
    # inside a health check.
    for text, seconds in (("+3h", 3 * HOUR), ("-2h", -2 * HOUR), ("+26h", 26 * HOUR),
                          ("-30m", -0.5 * HOUR)):
        _step(agent, offset, text, seconds)
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
    _step(agent, offset, "-5h", -5 * HOUR)
    agent.kill9()  # the service outlives it for now
    assert [p.pid for p in _marked(mark)] == [first]
    agent.start()
    wait_until(lambda: _row(agent)["state"] == "running", 15, what="sleeper running again")
    wait_until(lambda: len(_marked(mark)) == 1, 10, what="the leftover ended")
    assert [p.pid for p in _marked(mark)] == [_row(agent)["pid"]]
    assert _row(agent)["pid"] != first
