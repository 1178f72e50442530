"""A firmware profile's policy defaults fill the settings the config leaves out, and only those."""

from __future__ import annotations

import json
from pathlib import Path

from edge.config import load_settings
from edge.policy import with_policy
from edge.profiles import Policy, load_profiles
from tests.conftest import AgentFactory
from tests.test_cli import edge

MiB = 1024 * 1024
ZERO = load_profiles()["raspberrypi-zero-2w"].policy  # 64 MiB, 120 s, 50 ms: none a default


def test_config_records_the_keys_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[queue]\nmax_bytes = "1MiB"\n[telemetry]\ninterval = "5s"\n')
    settings = load_settings(path, data_dir=tmp_path / "data")
    assert settings.given == {"queue.max_bytes", "telemetry.interval", "node.data_dir"}
    assert load_settings(None).given == frozenset()


def test_policy_fills_only_what_the_config_leaves_out(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[queue]\nmax_bytes = "1MiB"\n')
    settings, taken = with_policy(load_settings(path), ZERO)
    assert settings.queue.max_bytes == 1 * MiB  # the file wins
    assert settings.queue.commit_interval == 0.05
    assert settings.telemetry.interval == 120.0
    assert taken == {"queue.commit_interval": 0.05, "telemetry.interval": 120.0}


def test_a_profile_without_policy_changes_nothing() -> None:
    settings = load_settings(None)
    same, taken = with_policy(settings, Policy())
    assert same == settings and taken == {}


def test_a_telemetry_interval_of_0s_in_the_file_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[telemetry]\ninterval = "0s"\n')  # off: a falsy value, still the user's
    settings, taken = with_policy(load_settings(path), ZERO)
    assert settings.telemetry.interval == 0.0 and "telemetry.interval" not in taken


def test_the_agent_runs_on_its_profiles_defaults(agent_factory: AgentFactory) -> None:
    agent = agent_factory(overrides={
        "node": {"profile": "raspberrypi-zero-2w"},
        "queue": {"max_bytes": None},          # left out: the profile's 64 MiB
        "telemetry": {"interval": None},       # left out: the profile's 120 s
    })
    status = agent.status()
    assert status["profile"] == "raspberrypi-zero-2w"
    assert status["profile_policy"] == {"queue.max_bytes": 64 * MiB,
                                        "queue.commit_interval": 0.05,
                                        "telemetry.interval": 120.0}
    assert status["telemetry"]["interval"] == 120.0
    assert agent.queue()["max_bytes"] == 64 * MiB
    shown = edge("status", "--socket", str(agent.socket_path)).stdout
    assert "raspberrypi-zero-2w (its defaults: queue.max_bytes 64.0MiB" in shown
    assert "firmware profile raspberrypi-zero-2w (its defaults in use:" in agent.log_tail()


def test_the_agent_keeps_what_its_config_says(agent_factory: AgentFactory) -> None:
    agent = agent_factory(overrides={
        "node": {"profile": "raspberrypi-zero-2w"},
        "queue": {"max_bytes": "3MiB", "commit_interval": "0s"},
        "telemetry": {"interval": "0s"},
    })
    status = agent.status()
    assert status["profile_policy"] == {}
    assert status["telemetry"]["interval"] == 0
    assert agent.queue()["max_bytes"] == 3 * MiB


def test_edge_profile_shows_which_defaults_are_in_use(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[node]\nprofile = "raspberrypi-zero-2w"\n[queue]\nmax_bytes = "1MiB"\n')
    result = edge("profile", "--json", "--config", str(path), "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)["policy"]
    assert policy["queue.max_bytes"] == {"value": 64 * MiB, "in_use": False,
                                         "overridden_by": str(path)}
    assert policy["telemetry.interval"] == {"value": 120.0, "in_use": True,
                                            "overridden_by": None}
    text = edge("profile", "--config", str(path), "--root", str(tmp_path)).stdout
    rows = {line.split(None, 1)[0] + " " + line.split(None, 2)[1]: line.split(None, 2)[2]
            for line in text.splitlines() if line.startswith("default ")}
    assert rows["default queue.max_bytes"] == f"64.0MiB (not in use: {path} sets it)"
    assert rows["default queue.commit_interval"] == "0.05s"
    assert rows["default telemetry.interval"] == "120s"
