"""`edge install` / `edge uninstall`: the agent as a systemd service, idempotently.

An install is a list of steps, each of which looks first and does only what is
missing: the `edge` account (systemd-sysusers, else useradd), /etc/edge with a
commented config file (never overwritten), /var/lib/edge, the unit with this
installation's `edge` command, the sysusers.d and tmpfiles.d snippets, and
`systemctl enable`. `--dry-run` prints the steps without doing them; `--root`
installs into another root directory (an image being built, a test). An
uninstall disables and removes the unit and snippets and keeps the data and
the config unless asked (`--purge`); the account stays either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["add_install_parsers", "install_steps", "uninstall_steps"]

UNIT = "edge-agent.service"
_USER = "edge"
_CONFIG = """\
# edge agent configuration. Every key has a default; see docs/configuration.md.
# `edge config check /etc/edge/agent.toml` checks this file without running it.

[node]
# id = "auto"                  # from /etc/machine-id
# profile = "auto"             # the firmware profile: `edge profile` shows the one found
# labels = { site = "greenhouse-3" }

[uplink]
# url = "mqtt://broker.example:1883"   # "" keeps every message in the outbox
# keepalive = "30s"

[queue]
# max_bytes = "256MiB"
# on_full = "drop-oldest"      # or "reject"

# [services.sensor]
# command = ["/usr/local/bin/sensor"]
# restart = "always"
"""


@dataclass(frozen=True)
class Step:
    """One thing an install does: `needed()` looks, `run()` does it."""

    what: str
    needed: Callable[[], bool]
    run: Callable[[], None]


def _system_files() -> Path:
    """The unit and snippets: the checkout's `systemd/`, else the installed share dir."""
    for directory in (Path(__file__).resolve().parent.parent / "systemd",
                      Path(sys.prefix) / "share" / "edge-agent" / "systemd"):
        if (directory / UNIT).is_file():
            return directory
    raise FileNotFoundError("the systemd unit files are not installed with this edge")


def _edge_command() -> str:
    found = shutil.which("edge") or sys.argv[0]
    return str(Path(found).resolve())


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _enabled(root: Path) -> bool:
    # The link points into the root's own /etc: under another root it dangles here.
    link = _under(root, f"/etc/systemd/system/multi-user.target.wants/{UNIT}")
    return link.is_symlink() or link.exists()


def _has_user(root: Path, name: str) -> bool:
    try:
        lines = _under(root, "/etc/passwd").read_text().splitlines()
    except FileNotFoundError:
        return False
    return any(line.split(":", 1)[0] == name for line in lines)


def _ids(root: Path, name: str) -> tuple[int, int]:
    for line in _under(root, "/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise LookupError(f"no user {name} in {_under(root, '/etc/passwd')}")


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise OSError(f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()}")


def _write_if_changed(path: Path, text: str, mode: int) -> Step:
    def needed() -> bool:
        try:
            return path.read_text() != text
        except FileNotFoundError:
            return True

    def run() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)

    return Step(f"write {path}", needed, run)


def install_steps(root: Path, *, enable: bool = True) -> list[Step]:
    """The steps of an install into `root` (each checks before it acts)."""
    files = _system_files()
    unit_text = (files / UNIT).read_text().replace("/usr/local/bin/edge", _edge_command())
    sysusers = _under(root, "/etc/sysusers.d/edge.conf")
    state = _under(root, "/var/lib/edge")
    config = _under(root, "/etc/edge/agent.toml")
    live = root == Path("/")

    def add_user() -> None:
        _under(root, "/etc").mkdir(parents=True, exist_ok=True)
        if shutil.which("systemd-sysusers"):
            _run("systemd-sysusers", f"--root={root}", str(files / "edge.sysusers.conf"))
        else:
            _run("useradd", "--root", str(root), "--system", "--user-group",
                 "--home-dir", "/var/lib/edge", "--shell", "/usr/sbin/nologin", _USER)

    def make_state() -> None:
        state.mkdir(parents=True, exist_ok=True)
        uid, gid = _ids(root, _USER)
        os.chown(state, uid, gid)
        state.chmod(0o750)

    def state_needed() -> bool:
        if not state.is_dir():
            return True
        info = state.stat()
        return (info.st_mode & 0o777) != 0o750 or (info.st_uid, info.st_gid) != _ids(root, _USER)

    def enable_unit() -> None:
        if live:
            _run("systemctl", "daemon-reload")
            _run("systemctl", "enable", "--now", UNIT)
        else:
            _run("systemctl", f"--root={root}", "enable", UNIT)

    def enable_needed() -> bool:
        return not _enabled(root)

    tool = "systemd-sysusers" if shutil.which("systemd-sysusers") else "useradd"
    steps = [
        Step(f"create the account {_USER!r} ({tool})", lambda: not _has_user(root, _USER),
             add_user),
        _write_if_changed(sysusers, (files / "edge.sysusers.conf").read_text(), 0o644),
        _write_if_changed(_under(root, "/etc/tmpfiles.d/edge.conf"),
                          (files / "edge.tmpfiles.conf").read_text(), 0o644),
        Step(f"create {state} (0750, {_USER}:{_USER})", state_needed, make_state),
        Step(f"write {config} (commented defaults; an existing one is kept)",
             lambda: not config.exists(),
             lambda: _write_if_changed(config, _CONFIG, 0o644).run()),
        _write_if_changed(_under(root, f"/etc/systemd/system/{UNIT}"), unit_text, 0o644),
    ]
    if enable:
        steps.append(Step(f"enable {UNIT}" + (" and start it" if live else f" in {root}"),
                          enable_needed, enable_unit))
    return steps


def uninstall_steps(root: Path, *, purge: bool = False) -> list[Step]:
    """The steps of an uninstall; the data and config stay unless `purge`."""
    unit = _under(root, f"/etc/systemd/system/{UNIT}")
    live = root == Path("/")

    def disable() -> None:
        if live:
            _run("systemctl", "disable", "--now", UNIT)
        else:
            _run("systemctl", f"--root={root}", "disable", UNIT)

    def remove(path: Path) -> Step:
        def run() -> None:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return Step(f"remove {path}", path.exists, run)

    steps = [
        Step(f"disable {UNIT}", lambda: _enabled(root), disable),
        remove(unit),
        remove(_under(root, "/etc/sysusers.d/edge.conf")),
        remove(_under(root, "/etc/tmpfiles.d/edge.conf")),
    ]
    if purge:
        steps += [remove(_under(root, "/var/lib/edge")), remove(_under(root, "/etc/edge"))]
    return steps


# ---- the commands ----------------------------------------------------------------------


def add_install_parsers(sub: Any) -> None:
    """Add `install` and `uninstall` to the `edge` command's subparsers."""
    for name, what in (("install", "install the agent as a systemd service (idempotent)"),
                       ("uninstall", "remove the service; data and config stay unless --purge")):
        command = sub.add_parser(name, help=what)
        command.add_argument("--dry-run", action="store_true",
                             help="print what would be done, and do nothing")
        command.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                             help="install into this root directory (default /)")
        if name == "install":
            command.add_argument("--no-enable", action="store_true",
                                 help="do not enable (or start) the unit")
        else:
            command.add_argument("--purge", action="store_true",
                                 help="also delete /var/lib/edge (the outbox!) and /etc/edge")
        command.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    try:
        steps = (install_steps(root, enable=not args.no_enable) if args.command == "install"
                 else uninstall_steps(root, purge=args.purge))
        todo = [step for step in steps if step.needed()]
    except (OSError, LookupError) as exc:
        print(f"edge {args.command}: {exc}", file=sys.stderr)
        return 1
    if not todo:
        print(f"edge {args.command}: nothing to do, {root} is as it should be")
        return 0
    if not args.dry_run and os.geteuid() != 0:
        print(f"edge {args.command}: run it as root (sudo edge {args.command}), or see what it"
              " would do with --dry-run", file=sys.stderr)
        return 2
    for step in todo:
        if args.dry_run:
            print(f"would {step.what}")
            continue
        try:
            step.run()
        except (OSError, LookupError) as exc:
            print(f"edge {args.command}: {step.what}: {exc}", file=sys.stderr)
            return 1
        print(f"done: {step.what}")
    return 0
