"""What the agent exposes on the device: a 0660 socket in its group, no TCP port, no secrets."""

from __future__ import annotations

import grp
import json
import os
import stat
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import AgentFactory
from tests.support.net import wait_until


def _other_group() -> grp.struct_group:
    """A group that is not the test process's own, to give the socket to."""
    for entry in grp.getgrall():
        if entry.gr_gid != os.getgid():
            return entry
    pytest.skip("this machine has a single group")


def test_socket_is_0660_and_owned_by_the_configured_group(agent_factory: AgentFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a socket to another group needs root")
    group = _other_group()
    agent = agent_factory(overrides={"api": {"group": group.gr_name}})
    info = agent.socket_path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == group.gr_gid


def test_socket_by_default_is_0660_in_the_agents_group(agent_factory: AgentFactory) -> None:
    info = agent_factory().socket_path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getegid()


def test_an_unknown_socket_group_stops_the_agent_with_a_clear_error(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory(overrides={"api": {"group": "no-such-group-edge"}}, start=False)
    with pytest.raises(RuntimeError) as caught:
        agent.start(timeout=15)
    assert "[api] group: no such group 'no-such-group-edge'" in str(caught.value)


def test_no_tcp_or_udp_port_but_mdns_is_opened_by_default(agent_factory: AgentFactory) -> None:
    agent = agent_factory()  # the harness turns discovery off; no local bus, no uplink
    proc = psutil.Process(agent.pid)
    listening = [c for c in proc.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN or c.type == 2]  # 2: SOCK_DGRAM
    assert listening == []


def test_services_get_none_of_the_agents_environment(
        agent_factory: AgentFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TEST_SECRET", "hunter2")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")  # systemd's, for the agent only
    out = tmp_path / "env.json"
    code = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    agent = agent_factory(overrides={"services.dump": {
        "command": [sys.executable, "-c", code, str(out)], "restart": "never"}})
    wait_until(out.exists, 15, what="the service wrote its environment")
    wait_until(lambda: out.stat().st_size > 0, 5, what="the environment written")
    env = json.loads(out.read_text())
    assert "EDGE_TEST_SECRET" not in env and "NOTIFY_SOCKET" not in env
    assert env["EDGE_NODE_ID"] == "node-a"
    assert env["EDGE_API_SOCKET"] == str(agent.socket_path)


def test_config_check_refuses_what_run_would_refuse(tmp_path: Path) -> None:
    from tests.test_cli import edge

    bad_key = tmp_path / "registry.pub"
    bad_key.write_text("not a key\n")
    for text, message in (
        ('[api]\ngroup = "no-such-group-edge"\n', "[api] group: no such group"),
        (f'[state]\ndesired_keys = ["{bad_key}"]\n', "[state] desired_keys: "),
        (f'[state]\ndesired_keys = ["{tmp_path / "missing.pub"}"]\n',
         "[state] desired_keys: "),
    ):
        config = tmp_path / "agent.toml"
        config.write_text(text)
        done = edge("config", "check", str(config))
        assert done.returncode == 2, (text, done.stderr)
        assert f"config {config}: {message}" in done.stderr


def test_an_unknown_socket_group_is_a_config_error_exit_2(agent_factory: AgentFactory) -> None:
    import subprocess

    agent = agent_factory(overrides={"api": {"group": "no-such-group-edge"}}, start=False)
    done = subprocess.run([sys.executable, "-m", "edge", "run", "--config",
                           str(agent.config_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr  # RestartPreventExitStatus=2: no restart loop
