"""`edge install` / `edge uninstall`: the agent as a systemd service, idempotently.

The plan and its steps are edge/install_plan.py; here are the commands: their
arguments, the output, the lock that lets one install at a time change a root.
`--dry-run` prints the steps; `--root` installs into another root directory
(an image being built, a test). An uninstall disables and removes the unit and
the snippets and keeps the data and the config unless asked (`--purge`); the
account stays either way.

The output is progress only: when stdout goes away (`edge install | head -1`,
a full disk) the steps go on, since an install stopped half-way is worse than
lost progress lines.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

from edge.install_files import UNIT
from edge.install_paths import InstallError, locked
from edge.install_plan import install_plan, uninstall_plan

__all__ = ["add_install_parsers"]

_USER = "edge"

_ABOUT = {
    "install": (
        "install the agent as a systemd service (idempotent)",
        "Create the edge account, /etc/edge/agent.toml (commented defaults; an existing one"
        " is kept, and checked), /var/lib/edge, the sysusers.d and tmpfiles.d snippets and"
        f" the unit {UNIT} running this edge, then enable and start it. Each step is done"
        " only when needed: run it again after an upgrade (a changed unit is reloaded, and"
        " a running agent restarted)."),
    "uninstall": (
        "remove the service; data and config stay unless --purge",
        f"Stop, disable and remove {UNIT} and its snippets. /var/lib/edge (the outbox) and"
        " /etc/edge stay unless --purge; the edge account stays."),
}


def _root_dir(text: str) -> Path:
    path = Path(text)
    if not text or not path.is_dir():
        why = ("an empty name" if not text else "not a directory" if path.exists()
               else "no such directory")
        raise argparse.ArgumentTypeError(
            f"{text!r}: {why}; give the root directory of an existing image (/ is this machine)")
    return path.resolve()


def add_install_parsers(sub: Any) -> None:
    """Add `install` and `uninstall` to the `edge` command's subparsers."""
    for name, (summary, description) in _ABOUT.items():
        command = sub.add_parser(name, help=summary, description=description)
        command.add_argument("--dry-run", action="store_true",
                             help="print what would be done, and do nothing")
        command.add_argument("--root", type=_root_dir, default=Path("/"), metavar="DIR",
                             help=f"{name} in this root directory, an image being built, read"
                             " as that machine will see it (default /)")
        if name == "install":
            command.add_argument("--no-enable", action="store_true",
                                 help="do not enable (or start) the unit")
            command.add_argument("--reuse-user", action="store_true",
                                 help=f"run the agent as an existing {_USER!r} account even"
                                 " if it has a login shell or another home")
        else:
            command.add_argument("--purge", action="store_true",
                                 help="also delete /var/lib/edge (the outbox!) and /etc/edge")
        command.set_defaults(handler=_command)


def _write(stream: TextIO | None, line: str) -> None:
    """Print `line` now; a stream that cannot take it (a closed pipe, a full disk) is sent
    to /dev/null from then on, and the install goes on."""
    if stream is None:
        return
    try:
        print(line, file=stream, flush=True)
    except OSError as exc:
        with suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
        if stream is sys.stdout and not isinstance(exc, BrokenPipeError):
            _write(sys.stderr, f"edge: cannot write to stdout ({exc.strerror or exc});"
                   " going on without it")


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _command(args: argparse.Namespace) -> int:
    name, root = args.command, args.root
    try:
        plan = (install_plan(root, enable=not args.no_enable, reuse_user=args.reuse_user)
                if name == "install" else uninstall_plan(root, purge=args.purge))
        for warning in plan.warnings:
            _write(sys.stderr, f"edge {name}: warning: {warning}")
        todo = [step for step in plan.steps if step.needed()]
    except (InstallError, OSError) as exc:
        _write(sys.stderr, f"edge {name}: {_why(exc)}")
        return 1
    if args.dry_run or not todo:
        for step in todo:
            _write(sys.stdout, f"would {step.what}")
        if not todo:
            _write(sys.stdout, f"edge {name}: nothing to do, {root} is as it should be")
        return 0
    if os.geteuid() != 0:
        _write(sys.stderr, f"edge {name}: run it as root (sudo edge {name}), or see what it"
               " would do with --dry-run")
        return 2
    done = 0
    with locked(root, lambda: _write(sys.stdout, f"edge {name}: waiting for another edge"
                                     f" install or uninstall in {root}")):
        for step in plan.steps:  # looked at again: the one we waited for may have done it
            try:
                if not step.needed():
                    continue
                step.run()
            except (InstallError, OSError) as exc:
                _write(sys.stderr, f"edge {name}: {step.what}: {_why(exc)}")
                return 1
            done += 1
            _write(sys.stdout, f"done: {step.what}")
    if not done:
        _write(sys.stdout, f"edge {name}: nothing to do, {root} is as it should be")
    return 0
