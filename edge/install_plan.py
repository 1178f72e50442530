"""The steps of `edge install` and `edge uninstall`, each looking before it acts.

An install runs in order, the account first, and the later steps look its ids
up when they run: the `edge` account (systemd-sysusers, else useradd), the
agent's sysusers.d and tmpfiles.d snippets, /var/lib/edge with all in it owned
by the account (an earlier `edge run` as root leaves files there),
/etc/edge/agent.toml with commented defaults (an existing one is never
overwritten: it is checked, and made readable by the account), the unit, and
`systemctl enable`. Every path is taken inside the root as that machine will
see it (edge/install_paths.py). On a live system (root /) the running systemd
is told too: a changed unit is reloaded and a running agent restarted, a
removed one forgotten. The programs run through a `Command`, so a test can
record what a live system would run.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from edge.config import load_settings
from edge.errors import EdgeError
from edge.install_accounts import find_account, unfit
from edge.install_files import CONFIG_TEXT, UNIT, agent_only, edge_command, system_files, unit_text
from edge.install_paths import InstallError, inside, make_dirs, write_file

__all__ = ["Command", "Plan", "Step", "install_plan", "uninstall_plan"]

_USER = "edge"
_STATE = "/var/lib/edge"
_CONFIG_FILE = "/etc/edge/agent.toml"
_UNIT_FILE = f"/etc/systemd/system/{UNIT}"
_WANTS = f"/etc/systemd/system/multi-user.target.wants/{UNIT}"
# Where each snippet goes, and its file in systemd/.
_SNIPPETS = {"/etc/sysusers.d/edge.conf": "edge.sysusers.conf",
             "/etc/tmpfiles.d/edge.conf": "edge.tmpfiles.conf"}

Command = Callable[[Sequence[str]], None]
"""Runs a program (systemctl, systemd-sysusers, useradd); raises InstallError if it fails."""


@dataclass(frozen=True)
class Step:
    """One thing an install does: `needed()` looks, `run()` does it."""

    what: str
    needed: Callable[[], bool]
    run: Callable[[], None]


@dataclass(frozen=True)
class Plan:
    """The steps of an install or uninstall, and what to tell the operator first."""

    steps: list[Step]
    warnings: list[str] = field(default_factory=list)


def _run(argv: Sequence[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    except FileNotFoundError:
        raise InstallError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired as exc:
        raise InstallError(f"{' '.join(argv)}: no answer in {exc.timeout:.0f} s") from exc
    if done.returncode != 0:
        raise InstallError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")


def _ids(root: Path) -> tuple[int, int] | None:
    account = find_account(root, _USER)
    return None if account is None else (account.uid, account.gid)


def _ids_now(root: Path) -> tuple[int, int]:
    ids = _ids(root)
    if ids is None:
        raise InstallError(f"no account {_USER!r} in {inside(root, '/etc/passwd')}")
    return ids


def _tree(top: Path) -> Iterator[Path]:
    """`top` and all under it; a link is itself, never what it points to."""
    yield top
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            yield Path(directory, name)


def _readable_by(path: Path, ids: tuple[int, int] | None) -> bool:
    info = path.stat()
    if ids is None:  # an account yet to be made is neither owner nor group
        return bool(info.st_mode & stat.S_IROTH)
    if info.st_uid == ids[0]:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid == ids[1]:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def _differs(path: Path, text: str) -> bool:
    if path.is_symlink():  # replaced by the file itself
        return True
    try:
        return path.read_text() != text
    except FileNotFoundError:
        return True


def _enabled(root: Path) -> bool:
    # The link points into the root's own /etc: under another root it dangles here.
    return os.path.lexists(inside(root, _WANTS, follow_last=False))


# ---- the steps of an install ----------------------------------------------------------


def install_plan(root: Path, *, enable: bool = True, reuse_user: bool = False,
                 live: bool | None = None, command: Command = _run) -> Plan:
    """The steps of an install into `root`. `live` (the default when `root` is /) also
    tells the running systemd: daemon-reload, start, restart on a changed unit."""
    live = root == Path("/") if live is None else live
    files = system_files()
    account = find_account(root, _USER)
    why = None if account is None or reuse_user else unfit(account, _STATE)
    if why is not None:
        raise InstallError(
            f"an account {_USER!r} exists in {inside(root, '/etc/passwd')} with {why}: it"
            " looks like a person's, and the agent would run as it and own its files."
            " Remove or rename it, or give --reuse-user to run the agent as it anyway")
    program = edge_command(sys.executable)
    plan = Plan([_account_step(root, files, command)])
    plan.steps.extend(_file_step(inside(root, path, follow_last=False),
                                 agent_only((files / name).read_text()))
                      for path, name in _SNIPPETS.items())
    plan.steps.append(_state_step(root))
    plan.steps.extend(_config_steps(root, plan.warnings))
    unit = unit_text((files / UNIT).read_text(), program, files / UNIT)
    plan.steps.append(_unit_step(root, unit, live, command))
    if enable:
        plan.steps.append(_enable_step(root, live, command))
    if not live:
        try:
            found = inside(root, program[0]).exists()
        except InstallError:
            found = False
        if not found:
            plan.warnings.append(
                f"the unit runs {program[0]}, a path of this machine that {root} does not"
                " have: the image needs edge installed at that path too")
    return plan


def _file_step(path: Path, text: str) -> Step:
    def run() -> None:
        write_file(path, text, 0o644)

    return Step(f"write {path}", lambda: _differs(path, text), run)


def _account_step(root: Path, files: Path, command: Command) -> Step:
    lines = [line for line in agent_only((files / "edge.sysusers.conf").read_text())
             .splitlines() if line.strip() and not line.startswith("#")]
    tool = "systemd-sysusers" if shutil.which("systemd-sysusers") else "useradd"

    def add() -> None:
        make_dirs(inside(root, "/etc"))
        if tool == "systemd-sysusers":
            command([tool, f"--root={root}", "--inline", *lines])
        else:
            command([tool, "--root", str(root), "--system", "--user-group", "--home-dir",
                     _STATE, "--shell", "/usr/sbin/nologin", _USER])

    return Step(f"create the account {_USER!r} ({tool})",
                lambda: find_account(root, _USER) is None, add)


def _state_step(root: Path) -> Step:
    state = inside(root, _STATE)
    if state.exists() and not state.is_dir():
        raise InstallError(f"{state} is not a directory: the agent keeps its outbox there")

    def strangers() -> list[Path]:
        """What in the data dir the account does not own (all of it, before it exists)."""
        ids = _ids(root)
        return [path for path in _tree(state)
                if ids is None or (path.lstat().st_uid, path.lstat().st_gid) != ids]

    def needed() -> bool:
        return (not state.is_dir() or stat.S_IMODE(state.stat().st_mode) != 0o750
                or bool(strangers()))

    def run() -> None:
        make_dirs(state.parent)
        with suppress(FileExistsError):
            state.mkdir()
        uid, gid = _ids_now(root)
        for path in _tree(state):  # outbox.db, its -wal and -shm, agent.lock, inbox.db...
            os.chown(path, uid, gid, follow_symlinks=False)
        state.chmod(0o750)

    if not state.is_dir():
        return Step(f"create {state} (0750, {_USER}:{_USER})", needed, run)
    inner = len([path for path in strangers() if path != state])
    what = f"set {state} to 0750 {_USER}:{_USER} (it exists)"
    if inner:
        what += f", and the {inner} files in it to {_USER}:{_USER}"
    return Step(what, needed, run)


def _config_steps(root: Path, warnings: list[str]) -> list[Step]:
    link = inside(root, _CONFIG_FILE, follow_last=False)
    config = inside(root, _CONFIG_FILE)
    if config.is_dir():
        raise InstallError(f"{config} is a directory where the agent reads its config file:"
                           " move it away, then run edge install again")
    if not config.exists():
        if link.is_symlink():
            raise InstallError(f"{link} is a link to {os.readlink(link)}, which {root} does"
                               " not have: create that file, or remove the link")

        def write() -> None:
            write_file(config, CONFIG_TEXT, 0o644, replace=False)  # one made meanwhile wins

        return [Step(f"write {config} (commented defaults)",
                     lambda: not os.path.lexists(config), write)]
    try:
        load_settings(config, must_exist=True)
    except EdgeError as exc:
        warnings.append(
            f"{exc}. The file is kept as it is, but the agent will not start with it (it"
            " exits 2 and systemd does not restart it): fix it, check it with `edge config"
            f" check {config}`, then restart edge-agent")

    def let_read() -> None:
        uid, gid = _ids_now(root)
        if not _readable_by(config, (uid, gid)):
            os.chown(config, -1, gid)
            config.chmod(stat.S_IMODE(config.stat().st_mode) | stat.S_IRGRP)

    return [Step(f"let {_USER} read {config} (group {_USER}, g+r; the file is kept)",
                 lambda: not _readable_by(config, _ids(root)), let_read)]


def _unit_step(root: Path, text: str, live: bool, command: Command) -> Step:
    unit = inside(root, _UNIT_FILE, follow_last=False)
    if unit.is_symlink() and os.readlink(unit) == "/dev/null":
        raise InstallError(f"{UNIT} is masked ({unit} -> /dev/null): systemctl unmask it"
                           " first, then run edge install again")

    def run() -> None:
        write_file(unit, text, 0o644)
        if live:  # else systemd goes on with the old ExecStart
            command(["systemctl", "daemon-reload"])
            command(["systemctl", "try-restart", UNIT])

    tell = (", then systemctl daemon-reload and try-restart (a running agent restarts"
            " with the new unit)") if live else ""
    return Step(f"write {unit}{tell}", lambda: _differs(unit, text), run)


def _enable_step(root: Path, live: bool, command: Command) -> Step:
    def run() -> None:
        if live:
            command(["systemctl", "daemon-reload"])
            command(["systemctl", "enable", "--now", UNIT])
        else:
            command(["systemctl", f"--root={root}", "enable", UNIT])

    return Step(f"enable {UNIT}" + (" and start it" if live else f" in {root}"),
                lambda: not _enabled(root), run)


# ---- the steps of an uninstall --------------------------------------------------------


def uninstall_plan(root: Path, *, purge: bool = False, live: bool | None = None,
                   command: Command = _run) -> Plan:
    """The steps of an uninstall from `root`; the data and config stay unless `purge`."""
    live = root == Path("/") if live is None else live
    unit = inside(root, _UNIT_FILE, follow_last=False)

    def disable() -> None:
        if live:
            command(["systemctl", "disable", "--now", UNIT])
        else:
            command(["systemctl", f"--root={root}", "disable", UNIT])

    def remove_unit() -> None:
        unit.unlink()
        if live:  # else systemd keeps the unit it loaded
            command(["systemctl", "daemon-reload"])

    steps = [
        Step(f"disable {UNIT}" + (" and stop it" if live else f" in {root}"),
             lambda: _enabled(root) or (live and os.path.lexists(unit)), disable),
        Step(f"remove {unit}" + (", then systemctl daemon-reload" if live else ""),
             lambda: os.path.lexists(unit), remove_unit),
    ]
    steps += [_removal(inside(root, path, follow_last=False)) for path in _SNIPPETS]
    if purge:
        steps += [_removal(inside(root, path, follow_last=False), tree=True)
                  for path in (_STATE, "/etc/edge")]
    return Plan(steps)


def _removal(path: Path, *, tree: bool = False) -> Step:
    if tree and path.is_symlink():
        raise InstallError(f"{path} is a link to {os.readlink(path)}: --purge does not delete"
                           " what a link points to; delete that yourself, and the link")

    def run() -> None:
        if tree and path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    return Step(f"remove {path}", lambda: os.path.lexists(path), run)
