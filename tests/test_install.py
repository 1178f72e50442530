"""`edge install` / `edge uninstall` into a temporary root directory.

The command runs in this process (`main()`), except where the process itself
matters: which `edge` ran it, its stdout, several at once. Nothing is
installed into this machine's /: what only a live system would do (reload
systemd, restart the agent) is recorded by a stand-in for the commands.
"""

from __future__ import annotations

import fcntl
import io
import os
import select
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge.cli import main
from edge.config import load_settings
from edge.install_files import UNIT, edge_command
from edge.install_plan import Plan, install_plan, uninstall_plan
from tests.conftest import skip_missing

_EDGE = Path(sys.executable).with_name("edge")
_RUN = "run --config /etc/edge/agent.toml"


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


def edge(*args: str) -> Done:
    """`edge ARGS...` in this process, its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, a bad argument
            code = int(exc.code or 0)
    return Done(code, out.getvalue(), err.getvalue())


def edge_process(*args: str, **options: object) -> subprocess.Popen[str]:
    return subprocess.Popen([str(_EDGE), *args], text=True, **options)  # type: ignore[call-overload]


def ids(root: Path, name: str = "edge") -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no {name} in {root}/etc/passwd")


def owners(top: Path) -> set[tuple[int, int]]:
    return {(path.lstat().st_uid, path.lstat().st_gid) for path in [top, *top.rglob("*")]}


def carry_out(plan: Plan) -> list[str]:
    """Run a plan's steps as `edge install` does; what was done."""
    done = []
    for step in plan.steps:
        if step.needed():
            step.run()
            done.append(step.what)
    return done


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if shutil.which("systemctl") is None or shutil.which("systemd-sysusers") is None:
        skip_missing("systemctl and systemd-sysusers are needed (apt-get install systemd)")
    if os.geteuid() != 0:
        pytest.skip("an install (even into a temporary root) changes owners: run as root")
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
    # The edge of this machine is not in the image: said, not silently left to fail.
    assert f"the unit runs {_EDGE}, a path of this machine that {root} does not have" in (
        done.stderr)
    uid, gid = ids(root)
    assert "edge-registry" not in (root / "etc/passwd").read_text()  # a device runs no registry
    assert "edge-registry" not in (root / "etc/sysusers.d/edge.conf").read_text()
    state = root / "var/lib/edge"
    assert owners(state) == {(uid, gid)} and oct(state.stat().st_mode & 0o777) == "0o750"
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    assert f"\nExecStart={_EDGE} {_RUN}\n" in unit
    assert "\nRestartPreventExitStatus=2\n" in unit  # a config error does not loop
    assert "/usr/local/bin" not in unit  # the header says who wrote it, not the template's path
    assert (root / "etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()
    config = root / "etc/edge/agent.toml"
    load_settings(config, must_exist=True)  # the commented file is valid
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


# ---- which edge the unit runs ----------------------------------------------------------


@pytest.mark.parametrize("started", [[str(_EDGE)], [sys.executable, "-m", "edge"]],
                         ids=["edge", "python -m edge"])
def test_the_unit_runs_the_edge_that_installed_it_not_the_first_on_path(
        root: Path, tmp_path: Path, started: list[str]) -> None:
    stray = tmp_path / "bin"
    stray.mkdir()
    (stray / "edge").write_text("#!/bin/sh\nexit 0\n")
    (stray / "edge").chmod(0o755)
    env = {**os.environ, "PATH": f"{stray}:{os.environ['PATH']}"}
    done = subprocess.run([*started, "install", "--root", str(root), "--no-enable"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    assert f"\nExecStart={_EDGE} {_RUN}\n" in unit


def test_without_an_edge_script_beside_python_the_unit_runs_python_dash_m_edge(
        tmp_path: Path) -> None:
    python = tmp_path / "bin/python3"
    python.parent.mkdir()
    python.write_text("")
    assert edge_command(str(python)) == [str(python), "-m", "edge"]
    (tmp_path / "bin/edge").write_text("")  # there, but not executable: not run
    assert edge_command(str(python)) == [str(python), "-m", "edge"]
    (tmp_path / "bin/edge").chmod(0o755)
    assert edge_command(str(python)) == [str(tmp_path / "bin/edge")]


# ---- what an earlier `edge run` as root, or the operator, left -------------------------


def test_a_data_dir_left_by_a_root_run_is_handed_to_the_new_account_with_all_in_it(
        root: Path) -> None:
    state = root / "var/lib/edge"
    (state / "logs").mkdir(parents=True)
    state.chmod(0o750)
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm", "outbox.db.seq", "inbox.db",
                 "agent.lock", "desired.cbor", "logs/sensor.log"):
        (state / name).write_bytes(b"x")  # as root: owned by uid 0
    dry = edge("install", "--root", str(root), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (f"would set {state} to 0750 edge:edge (it exists), and the 9 files in it to"
            " edge:edge") in dry.stdout.splitlines()
    done = edge("install", "--root", str(root), "--no-enable")
    assert done.returncode == 0, done.stderr
    assert owners(state) == {ids(root)}
    assert (state / "outbox.db").read_bytes() == b"x"


def test_an_existing_login_account_named_edge_is_not_taken_unless_asked(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                     "edge:x:1000:1000:Ed Ge:/home/edge:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\nedge:x:1000:\nsudo:x:27:edge\n")
    done = edge("install", "--root", str(root), "--dry-run")
    assert done.returncode == 1
    assert "the login shell /bin/bash and the home /home/edge" in done.stderr
    assert "--reuse-user" in done.stderr
    assert sorted(path.name for path in root.rglob("*")) == ["etc", "group", "passwd"]
    done = edge("install", "--root", str(root), "--no-enable", "--reuse-user")
    assert done.returncode == 0, done.stderr
    assert owners(root / "var/lib/edge") == {(1000, 1000)}


def test_a_malformed_passwd_line_is_named(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nedge:x:999\n")
    done = edge("install", "--root", str(root), "--dry-run")
    assert done.returncode == 1
    assert f"{root}/etc/passwd line 2: expected name:password:uid:gid" in done.stderr


def test_an_invalid_config_is_kept_and_named_in_a_warning(root: Path) -> None:
    config = root / "etc/edge/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[queue]\nmax_bytes = "lots"\n')
    done = edge("install", "--root", str(root), "--no-enable")
    assert done.returncode == 0, done.stderr
    assert f"edge install: warning: config {config}: [queue] max_bytes" in done.stderr
    assert "the agent will not start with it" in done.stderr
    assert config.read_text() == '[queue]\nmax_bytes = "lots"\n'


def test_a_config_path_that_is_a_directory_stops_the_install(root: Path) -> None:
    (root / "etc/edge/agent.toml").mkdir(parents=True)
    done = edge("install", "--root", str(root))
    assert done.returncode == 1
    assert f"{root}/etc/edge/agent.toml is a directory" in done.stderr
    assert not (root / "etc/systemd").exists()


def test_a_config_only_root_can_read_is_made_readable_by_the_edge_group(root: Path) -> None:
    config = root / "etc/edge/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[node]\nid = "mine"\n')
    config.chmod(0o600)
    done = edge("install", "--root", str(root), "--no-enable")
    assert done.returncode == 0, done.stderr
    info = config.stat()
    assert (info.st_uid, info.st_gid, oct(info.st_mode & 0o777)) == (0, ids(root)[1], "0o640")
    assert config.read_text() == '[node]\nid = "mine"\n'


def test_an_existing_data_dir_is_set_not_created_in_the_dry_run(root: Path) -> None:
    (root / "var/lib/edge").mkdir(parents=True)
    done = edge("install", "--root", str(root), "--dry-run")
    assert f"would set {root}/var/lib/edge to 0750 edge:edge (it exists)" in (
        done.stdout.splitlines())


# ---- links in the root -----------------------------------------------------------------


def test_absolute_links_in_the_root_lead_inside_it_not_out_to_this_machine(
        root: Path, tmp_path: Path) -> None:
    host = tmp_path / "host"
    for name in ("data", "etc", "systemd"):
        (host / name).mkdir(parents=True)
    (root / "var/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "var/lib/edge").symlink_to(host / "data")
    (root / "etc/edge").symlink_to(host / "etc")
    (root / "etc/systemd").symlink_to(host / "systemd")
    done = edge("install", "--root", str(root), "--no-enable")
    assert done.returncode == 0, done.stderr
    assert sorted(str(path.relative_to(host)) for path in host.rglob("*")) == [
        "data", "etc", "systemd"]
    assert owners(host) == {(0, 0)}
    image = root / str(host).lstrip("/")  # where the links lead on the image
    assert (image / "etc/agent.toml").is_file()
    assert (image / "systemd/system/edge-agent.service").is_file()
    assert owners(image / "data") == {ids(root)}


def test_a_config_linked_to_a_file_of_the_image_is_kept(root: Path) -> None:
    (root / "boot").mkdir()
    (root / "boot/edge.toml").write_text('[node]\nid = "from-boot"\n')
    (root / "etc/edge").mkdir(parents=True)
    (root / "etc/edge/agent.toml").symlink_to("/boot/edge.toml")  # valid on the device
    done = edge("install", "--root", str(root), "--no-enable")
    assert done.returncode == 0, done.stderr
    assert "warning: config" not in done.stderr
    assert os.readlink(root / "etc/edge/agent.toml") == "/boot/edge.toml"
    assert (root / "boot/edge.toml").read_text() == '[node]\nid = "from-boot"\n'


def test_a_link_that_climbs_out_of_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc/edge").symlink_to("../../outside")
    done = edge("install", "--root", str(root), "--no-enable")
    assert done.returncode == 1
    assert f"{root}/etc/edge -> ../../outside" in done.stderr and "leads out of" in done.stderr
    assert not (tmp_path / "outside").exists()


def test_purge_does_not_delete_through_a_linked_data_dir(root: Path) -> None:
    assert edge("install", "--root", str(root), "--no-enable").returncode == 0
    (root / "data").mkdir()
    (root / "var/lib/edge").rename(root / "data/edge")
    (root / "var/lib/edge").symlink_to("/data/edge")
    (root / "data/edge/outbox.db").write_bytes(b"messages")
    done = edge("uninstall", "--root", str(root), "--purge")
    assert done.returncode == 1
    assert f"{root}/var/lib/edge is a link to /data/edge: --purge does not delete" in (
        done.stderr)
    assert (root / "data/edge/outbox.db").read_bytes() == b"messages"


# ---- the root, the lock, the output ------------------------------------------------------


@pytest.mark.parametrize("given", ["", "typo", "a-file"])
def test_the_root_must_be_an_existing_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    done = edge("install", "--root", given, "--dry-run")
    assert done.returncode == 2
    assert "argument --root" in done.stderr and "root directory of an existing image" in (
        done.stderr)
    assert [path.name for path in tmp_path.iterdir()] == ["a-file"]


def test_an_install_waits_while_another_holds_the_root(root: Path) -> None:
    held = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = edge_process("install", "--root", str(root), "--no-enable",
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert waiting.stdout is not None
        readable, _, _ = select.select([waiting.stdout], [], [], 20)
        assert readable, "no word from an install that should be waiting"
        assert "waiting for another edge install or uninstall" in waiting.stdout.readline()
        assert not (root / "etc/systemd").exists()
    finally:
        os.close(held)
    waiting.communicate(timeout=60)
    assert waiting.returncode == 0
    assert (root / "etc/systemd/system/edge-agent.service").is_file()


def test_installs_at_the_same_time_all_succeed_and_leave_no_temporary_files(
        root: Path) -> None:
    runs = [edge_process("install", "--root", str(root), "--no-enable",
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(4)]
    errors = [run.communicate(timeout=60)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0, 0], errors
    assert [path for path in root.rglob(".*") if path.name != ".pwd.lock"] == []
    assert (root / "etc/edge/agent.toml").is_file() and owners(root / "var/lib/edge") == {
        ids(root)}


@pytest.mark.parametrize("output", ["closed pipe", "full disk"])
def test_an_install_whose_output_goes_away_still_completes(root: Path, output: str) -> None:
    if output == "closed pipe":  # `edge install | head -1`, the reader gone early
        read, stdout = os.pipe()
        os.close(read)
    else:
        stdout = os.open("/dev/full", os.O_WRONLY)
    try:
        run = edge_process("install", "--root", str(root), stdout=stdout,
                           stderr=subprocess.PIPE)
        _, errors = run.communicate(timeout=60)
    finally:
        os.close(stdout)
    assert run.returncode == 0, errors
    assert "Traceback" not in errors
    assert (root / "etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()


# ---- a live system (root /): what would be run, recorded --------------------------------


def test_a_changed_unit_on_a_live_system_is_reloaded_and_the_agent_restarted(
        root: Path) -> None:
    assert edge("install", "--root", str(root)).returncode == 0
    unit = root / "etc/systemd/system/edge-agent.service"
    unit.write_text(unit.read_text().replace(str(_EDGE), "/opt/old/bin/edge"))  # an upgrade
    calls: list[list[str]] = []
    done = carry_out(install_plan(root, live=True, command=lambda argv: calls.append([*argv])))
    assert len(done) == 1 and "daemon-reload and try-restart" in done[0]
    assert calls == [["systemctl", "daemon-reload"], ["systemctl", "try-restart", UNIT]]
    assert f"ExecStart={_EDGE} " in unit.read_text()


def test_uninstall_on_a_live_system_stops_the_agent_and_reloads_systemd(root: Path) -> None:
    assert edge("install", "--root", str(root)).returncode == 0
    calls: list[list[str]] = []
    carry_out(uninstall_plan(root, live=True, command=lambda argv: calls.append([*argv])))
    assert calls == [["systemctl", "disable", "--now", UNIT], ["systemctl", "daemon-reload"]]
    assert not (root / "etc/systemd/system/edge-agent.service").exists()


def test_the_help_says_what_each_command_does() -> None:
    install, uninstall = edge("install", "--help").stdout, edge("uninstall", "--help").stdout
    assert "then enable and start it" in " ".join(install.split())
    assert "install into" not in uninstall and "uninstall in this root" in uninstall
