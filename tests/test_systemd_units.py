"""The unit files and their sysusers/tmpfiles snippets, checked by systemd's own tools."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_missing

UNITS = Path(__file__).resolve().parents[1] / "systemd"
_EDGE = Path(sys.executable).with_name("edge")


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        skip_missing(f"{name} is not installed (apt-get install systemd; scripts/test does)")
    return found


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read(UNITS / name)
    return parser


def verify(tmp_path: Path, *names: str, edit: tuple[str, str] | None = None) -> str:
    """systemd-analyze verify on copies whose ExecStart is this checkout's `edge`."""
    copies = []
    for name in names:
        text = (UNITS / name).read_text().replace("/usr/local/bin/edge", str(_EDGE))
        if edit is not None:
            text = text.replace(*edit)
        copy = tmp_path / name
        copy.write_text(text)
        copies.append(str(copy))
    done = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", *copies],
                          capture_output=True, text=True, timeout=60)
    return f"rc={done.returncode} {done.stdout}{done.stderr}".strip()


def test_the_units_verify_clean(tmp_path: Path) -> None:
    assert verify(tmp_path, "edge-agent.service", "edge-registry.service") == "rc=0"


def test_verify_would_see_a_mistake(tmp_path: Path) -> None:
    # The check above can fail: a misspelt key is reported.
    out = verify(tmp_path, "edge-agent.service", edit=("WatchdogSec=", "WatchdogSecs="))
    assert "WatchdogSecs" in out


def test_the_agent_unit_is_a_notify_service_with_a_watchdog_that_needs_no_network() -> None:
    u = unit("edge-agent.service")
    service, head = u["Service"], u["Unit"]
    assert service["Type"] == "notify" and service["Restart"] == "always"
    assert service["WatchdogSec"] == "30s"
    assert "network-online.target" in head["After"] and "time-sync.target" in head["After"]
    assert "Requires" not in head and "BindsTo" not in head  # starts without them
    assert service["User"] == "edge"
    for key, value in (("StateDirectory", "edge"), ("RuntimeDirectory", "edge"),
                       ("ConfigurationDirectory", "edge"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("KillMode", "mixed")):
        assert service[key] == value, key
    # The services the agent runs need devices and a writable cgroup.
    assert "PrivateDevices" not in service and "ProtectControlGroups" not in service


def test_the_snippets_make_the_users_and_directories_in_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([tool("systemd-sysusers"), f"--root={root}",
                    str(UNITS / "edge.sysusers.conf")], check=True, capture_output=True,
                   timeout=60)
    users = {line.split(":")[0]: line for line in (root / "etc/passwd").read_text().splitlines()}
    assert set(users) >= {"edge", "edge-registry"}
    assert users["edge"].endswith(":/var/lib/edge:/usr/sbin/nologin")
    subprocess.run([tool("systemd-tmpfiles"), f"--root={root}", "--create",
                    str(UNITS / "edge.tmpfiles.conf")], check=True, capture_output=True,
                   timeout=60)
    state = root / "var/lib/edge"
    assert state.is_dir() and oct(state.stat().st_mode & 0o777) == "0o750"
    assert (root / "run/edge").is_dir()


@pytest.mark.parametrize("name", ["edge-agent.service", "edge-registry.service"])
def test_the_units_start_the_installed_command(name: str) -> None:
    command = unit(name)["Service"]["ExecStart"].split()
    assert command[0] == "/usr/local/bin/edge"
    assert command[1] in ("run", "registry")
