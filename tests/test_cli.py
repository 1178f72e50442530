"""The CLI as a client of the socket API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import AgentFactory
from tests.support.agent import REPO_ROOT
from tests.support.expect import accepted_seqs


def edge(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m edge ARGS` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("EDGE_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
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
