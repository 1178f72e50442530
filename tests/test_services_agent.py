"""The agent runs its [services.NAME]: once, with its environment, across a kill -9 of itself."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import psutil

from tests.conftest import AgentFactory
from tests.support.agent import REPO_ROOT
from tests.support.net import wait_until

_CODE = (
    "import os, sys, time\n"
    "print('node', os.environ['EDGE_NODE_ID'], 'socket', os.environ['EDGE_API_SOCKET'],"
    " flush=True)\n"
    "time.sleep(300)\n"
)


def _running(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if mark in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _service(agent: Any) -> dict[str, Any]:
    [row] = agent.request({"op": "services"})["services"]
    return dict(row)


def test_agent_runs_a_service_once_across_its_own_kill_and_stops_it_with_itself(
    agent_factory: AgentFactory,
) -> None:
    mark = f"edge-test-service-{uuid.uuid4().hex}"
    overrides = {"services.tick": {
        "command": [sys.executable, "-c", _CODE, mark],
        "stop_timeout": "2s", "backoff_initial": "0.1s", "backoff_max": "1s",
    }}
    agent = agent_factory(None, overrides=overrides)
    try:
        wait_until(lambda: _service(agent)["state"] == "running", 15, what="tick running")
        first = _service(agent)["pid"]
        assert [p.pid for p in _running(mark)] == [first]
        wait_until(
            lambda: any("node node-a" in line for line in agent.request(
                {"op": "service.logs", "name": "tick", "lines": 10})["lines"]),
            10, what="the service's output with EDGE_NODE_ID",
        )
        assert agent.status()["services"] == {"running": 1}

        cli = subprocess.run(
            [sys.executable, "-m", "edge", "services", "restart", "tick",
             "--socket", str(agent.socket_path)],
            capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
        )
        assert cli.returncode == 0, cli.stderr
        wait_until(lambda: _service(agent)["pid"] not in (None, first), 15, what="a new pid")
        assert len(_running(mark)) == 1

        agent.kill9()  # the service outlives it for now
        assert len(_running(mark)) == 1
        agent.start()
        wait_until(lambda: _service(agent)["state"] == "running", 15, what="tick running again")
        wait_until(lambda: len(_running(mark)) == 1, 10, what="the leftover ended")
        assert [p.pid for p in _running(mark)] == [_service(agent)["pid"]]

        unknown = agent.request({"op": "service.restart", "name": "nope"})
        assert unknown["ok"] is False and unknown["error"]["code"] == "unknown_service"
        table = subprocess.run(
            [sys.executable, "-m", "edge", "services", "--socket", str(agent.socket_path)],
            capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
        )
        assert table.returncode == 0 and "tick" in table.stdout and "running" in table.stdout

        assert agent.terminate() == 0, agent.log_tail()
        assert _running(mark) == [], "the service outlived a clean stop of the agent"
    finally:
        for proc in _running(mark):
            proc.kill()


def test_a_service_user_without_root_or_a_bad_service_key_is_a_config_error(
    tmp_path: Any,
) -> None:
    config = tmp_path / "a.toml"
    config.write_text('[services.web]\ncommand = "python -m http.server"\n')
    done = subprocess.run(
        [sys.executable, "-m", "edge", "config", "check", str(config)],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert f"config {config}: [services.web] command" in done.stderr
