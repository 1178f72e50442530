"""`edge install` / `edge uninstall` into a temporary root directory, as a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_missing

_EDGE = Path(sys.executable).with_name("edge")


def edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_EDGE), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if shutil.which("systemctl") is None or shutil.which("systemd-sysusers") is None:
        skip_missing("systemctl and systemd-sysusers are needed (apt-get install systemd)")
    made = tmp_path / "root"
    made.mkdir()
    return made


def test_dry_run_says_each_step_and_changes_nothing(root: Path) -> None:
    done = edge("install", "--root", str(root), "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "would create the account 'edge' (systemd-sysusers)"
    assert f"would write {root}/etc/systemd/system/edge-agent.service" in lines
    assert f"would create {root}/var/lib/edge (0750, edge:edge)" in lines
    assert lines[-1] == f"would enable edge-agent.service in {root}"
    assert list(root.iterdir()) == []


def test_install_makes_a_working_layout_and_a_second_run_changes_nothing(root: Path) -> None:
    done = edge("install", "--root", str(root))
    assert done.returncode == 0, done.stderr
    passwd = (root / "etc/passwd").read_text()
    assert passwd.startswith("edge:") or "\nedge:" in passwd
    uid = int(next(line for line in passwd.splitlines() if line.startswith("edge:"))
              .split(":")[2])
    state = root / "var/lib/edge"
    assert state.stat().st_uid == uid and oct(state.stat().st_mode & 0o777) == "0o750"
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    assert f"ExecStart={_EDGE.resolve()} run --config /etc/edge/agent.toml" in unit
    assert (root / "etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()
    config = root / "etc/edge/agent.toml"
    assert edge("config", "check", str(config)).returncode == 0  # the commented file is valid
    config.write_text('[node]\nid = "mine"\n')  # the operator's own edit

    again = edge("install", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"edge install: nothing to do, {root} is as it should be"
    assert config.read_text() == '[node]\nid = "mine"\n'  # never overwritten


def test_uninstall_keeps_data_and_config_unless_purged(root: Path) -> None:
    assert edge("install", "--root", str(root)).returncode == 0
    (root / "var/lib/edge/outbox.db").write_bytes(b"messages")
    done = edge("uninstall", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
                ).is_symlink()
    assert (root / "var/lib/edge/outbox.db").read_bytes() == b"messages"
    assert (root / "etc/edge/agent.toml").exists()
    assert edge("uninstall", "--root", str(root), "--purge").returncode == 0
    assert not (root / "var/lib/edge").exists() and not (root / "etc/edge").exists()


def test_the_installed_unit_verifies(root: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        skip_missing("systemd-analyze is not installed (apt-get install systemd)")
    assert edge("install", "--root", str(root), "--no-enable").returncode == 0
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(root / "etc/systemd/system/edge-agent.service")],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
