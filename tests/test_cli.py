"""The CLI as a client of the socket API."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentFactory, SubscriberFactory
from tests.support.agent import REPO_ROOT
from tests.support.broker import Broker
from tests.support.expect import accepted_seqs


def edge(*args: str, timeout: float = 20.0, **run: Any) -> subprocess.CompletedProcess[str]:
    """Run `python -m edge ARGS` from this checkout (stdin empty unless `run` says otherwise)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("EDGE_SOCKET", None)
    run.setdefault("stdout", subprocess.PIPE)
    if "input" not in run:
        run.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env=env,
        **run,
    )


def test_cli_status_exits_3_with_a_clear_line_when_no_agent_runs(tmp_path: Path) -> None:
    missing = tmp_path / "nobody-here.sock"
    result = edge("status", "--json", "--socket", str(missing))
    assert result.returncode == 3, result
    output = result.stdout + result.stderr
    assert str(missing) in output
    assert "Traceback" not in output


def test_cli_publish_prints_the_seq_and_status_json_is_the_api_answer(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None)
    sock = str(agent.socket_path)
    first = accepted_seqs([agent.publish("sensors/t", "api")])[0]

    published = edge("publish", "sensors/t", "21.5", "--socket", sock)
    assert published.returncode == 0, published
    assert published.stdout.strip() == str(first + 1)
    assert accepted_seqs([agent.publish("sensors/t", "api")])[0] == first + 2

    status = edge("status", "--json", "--socket", sock)
    assert status.returncode == 0, status
    answer = json.loads(status.stdout)
    assert answer["ok"] is True and answer["node"] == "node-a"
    assert answer["queue"]["depth"] == 3
    assert answer["uplink"]["state"] == "offline"


def test_cli_gives_up_on_a_stopped_agent_after_the_timeout(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    sock = str(agent.socket_path)
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        for command in (["status"], ["queue", "--json"], ["publish", "sensors/t", "21.5"]):
            started = time.monotonic()
            result = edge(*command, "--socket", sock, "--timeout", "0.5")
            assert result.returncode == 1, result
            assert result.stderr == f"edge: the agent at {sock} did not answer within 0.5s\n"
            assert time.monotonic() - started < 10
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    agent.assert_alive()


@pytest.mark.slow
def test_cli_waits_ten_seconds_for_a_stopped_agent_by_default(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None)
    sock = str(agent.socket_path)
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = edge("status", "--socket", sock, timeout=30)
        waited = time.monotonic() - started
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    assert result.returncode == 1, result
    assert result.stderr == f"edge: the agent at {sock} did not answer within 10s\n"
    assert 9.5 < waited < 20


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_cli_timeout_must_be_a_positive_number_of_seconds(value: str) -> None:
    result = edge("status", "--timeout", value, "--socket", "/nonexistent/agent.sock")
    assert result.returncode == 2, result
    assert "--timeout: expected a number of seconds above 0" in result.stderr


def test_cli_run_refuses_an_unknown_log_level(tmp_path: Path) -> None:
    # The config is missing too: an accepted level would exit 2 on that instead.
    missing = str(tmp_path / "missing.toml")
    result = edge("run", "--log-level", "bogus", "--config", missing)
    assert result.returncode == 2, result
    assert "--log-level: invalid choice" in result.stderr
    assert "DEBUG" in result.stderr and "missing.toml" not in result.stderr


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error"])
def test_cli_run_takes_a_log_level_in_any_case(tmp_path: Path, level: str) -> None:
    missing = tmp_path / "missing.toml"
    result = edge("run", "--log-level", level, "--config", str(missing))
    assert result.returncode == 2, result
    assert result.stderr == f"edge: config {missing}: no such file\n"


def test_cli_publish_without_data_on_a_terminal_asks_for_it(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    controller, terminal = pty.openpty()
    try:
        result = edge(
            "publish", "sensors/t", "--socket", str(agent.socket_path), stdin=terminal, timeout=10
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 2, result
    assert result.stderr == "edge: give DATA, or - to read it from stdin\n"
    assert agent.status()["queue"]["depth"] == 0


def test_cli_publish_without_data_reads_stdin_that_is_not_a_terminal(
    agent_factory: AgentFactory,
) -> None:
    result = edge("publish", "--help")
    assert "leaving it out when stdin is not a terminal" in " ".join(result.stdout.split())
    agent = agent_factory(None)
    published = edge("publish", "sensors/t", "--socket", str(agent.socket_path), input="piped")
    assert published.returncode == 0, published
    assert agent.status()["queue"]["depth"] == 1


def test_cli_publish_sends_bytes_when_the_ct_is_not_text(
    broker: Broker, subscriber_factory: SubscriberFactory, agent_factory: AgentFactory
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    agent = agent_factory(broker)
    sock = str(agent.socket_path)
    # (arguments after TOPIC, stdin, the envelope's data, its ct)
    cases: list[tuple[list[str], str, str | bytes, str]] = [
        (["-", "--ct", "application/octet-stream"], "hello", b"hello", "application/octet-stream"),
        (["--ct", "image/png"], "PNG", b"PNG", "image/png"),
        (["abc", "--ct", "application/octet-stream"], "", b"abc", "application/octet-stream"),
        (["-", "--ct", "application/json"], '{"t":1}', '{"t":1}', "application/json"),
        (["-", "--ct", "application/ld+json"], "{}", "{}", "application/ld+json"),
        (["-", "--ct", "application/xml"], "<a/>", "<a/>", "application/xml"),
        (["-", "--ct", "Text/CSV; charset=utf-8"], "a,b", "a,b", "Text/CSV; charset=utf-8"),
        (["-"], "plain", "plain", "text/plain"),
        (["21.5"], "", "21.5", "text/plain"),
    ]
    expected: dict[int, tuple[str | bytes, str]] = {}
    for args, stdin, data, ct in cases:
        result = edge("publish", "sensors/t", *args, "--socket", sock, input=stdin)
        assert result.returncode == 0, (args, result)
        expected[int(result.stdout)] = (data, ct)
    sub.wait_for_seqs(expected, timeout=15)
    for received in sub.first_arrivals():
        envelope = received.envelope
        data, ct = expected[envelope["seq"]]
        assert (type(envelope["data"]), envelope["data"], envelope["ct"]) == (type(data), data, ct)


def test_cli_publish_to_a_full_stdout_says_the_message_was_accepted(
    agent_factory: AgentFactory,
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    agent = agent_factory(None)
    sock = str(agent.socket_path)
    first = accepted_seqs([agent.publish("sensors/t", "api")])[0]
    with open("/dev/full", "w") as full:
        published = edge("publish", "sensors/t", "21.5", "--socket", sock, stdout=full)
        status = edge("status", "--socket", sock, stdout=full)
    assert published.returncode == 1, published
    assert published.stderr == (
        "edge: cannot write output: No space left on device"
        f" (the message was accepted as seq {first + 1})\n"
    )
    assert status.returncode == 1, status
    assert status.stderr == "edge: cannot write output: No space left on device\n"
    assert agent.status()["queue"]["depth"] == 2


def test_cli_publish_too_long_for_a_request_line_names_the_limit(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None, overrides={"api": {"max_line_bytes": 4096}})
    sock = str(agent.socket_path)
    for args, stdin in ((["x" * 8000], None), (["-"], "y" * 8000)):
        run: dict[str, Any] = {} if stdin is None else {"input": stdin}
        result = edge("publish", "sensors/t", *args, "--socket", sock, **run)
        assert result.returncode == 1, result
        assert result.stderr == (
            "edge: the payload is too large for the socket API (max 4096 bytes per request"
            " line; see [queue] max_message_bytes)\n"
        )
    assert agent.status()["queue"]["depth"] == 0


def test_cli_status_table_counts_one_connect_and_one_message_in_the_singular(
    broker: Broker, agent_factory: AgentFactory
) -> None:
    broker.start()
    online = agent_factory(broker, name="online")
    online.wait_status(
        lambda s: s["uplink"]["state"] == "online" and s["uplink"]["connects"] == 1, 10,
        what="online after one connect",
    )
    table = edge("status", "--socket", str(online.socket_path))
    assert table.returncode == 0, table
    assert f"({broker.url}, 1 connect)" in table.stdout

    offline = agent_factory(None, name="offline")
    accepted_seqs([offline.publish("sensors/t", "one")])
    table = edge("status", "--socket", str(offline.socket_path))
    assert table.returncode == 0, table
    assert " 1 message, " in table.stdout
    assert "0 dead letters" in table.stdout


def test_peer_values_from_the_lan_cannot_forge_table_rows_or_send_escapes() -> None:
    from edge.cli import _peers_table

    row = {"node": "a\nfake  up  6.6.6.6", "instance": "a\x1b[2J", "state": "up",
           "addresses": ["198.18.0.1"], "uplink": None, "last_seen": 0.0}
    table = _peers_table([row], {"state": "running"})
    assert len(table.splitlines()) == 2  # the header and one row
    assert "\x1b" not in table and "\\n" in table
    assert "discovery is idle" in _peers_table([], {"state": "idle", "reason": "no interface"})
