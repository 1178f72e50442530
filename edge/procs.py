"""Processes by identity: who a pid is, who is left in a session, and the state file.

A pid alone names a process only while it lives: after that the kernel hands
it to someone else. An identity adds the process's start time in clock ticks
since boot (/proc/PID/stat field 22) and the boot id, so it survives any
wall-clock step and never matches a stranger that got the pid later.

Every function here blocks (it reads /proc or writes files): call it through
`asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Identity",
    "boot_id",
    "identify",
    "load_records",
    "marked",
    "save_records",
    "session_members",
    "session_of",
    "signal_session",
]

_PROC = Path("/proc")
_BOOT_ID = _PROC / "sys/kernel/random/boot_id"


@dataclass(frozen=True)
class Identity:
    """A process as it was when it started: pid, start time after boot, boot id."""

    pid: int
    starttime: int   # clock ticks after boot
    boot: str        # /proc/sys/kernel/random/boot_id


@dataclass(frozen=True)
class _Stat:
    state: str
    session: int
    starttime: int


def boot_id() -> str:
    """This boot's id: processes recorded under another one are all gone."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> _Stat | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = text[text.rfind(")") + 2:].split()
    try:
        return _Stat(state=fields[0], session=int(fields[3]), starttime=int(fields[19]))
    except (IndexError, ValueError):
        return None


def identify(pid: int, boot: str) -> Identity | None:
    """The identity of a live process `pid`, or None when it is gone (or a zombie)."""
    stat = _stat(pid)
    if stat is None or stat.state in ("Z", "X"):
        return None
    return Identity(pid=pid, starttime=stat.starttime, boot=boot)


def session_members(session: int) -> list[int]:
    """Live processes (not zombies) of session `session`: a service and all it started."""
    members = []
    for entry in os.scandir(_PROC):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat.session == session and stat.state not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def marked(variable: str, value: str, *also: str) -> list[int]:
    """Processes started with `variable=value` (and each `also` "NAME=VALUE") in their
    environment, all but this one."""
    wanted = f"{variable}={value}".encode()
    more = [entry.encode() for entry in also]
    found = []
    for entry in os.scandir(_PROC):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (_PROC / entry.name / "environ").read_bytes()
            except OSError:  # gone, or not ours to read
                continue
            entries = environ.split(b"\0")
            if wanted not in entries or not all(m in entries for m in more):
                continue
            stat = _stat(int(entry.name))
            if stat is not None and stat.state not in "ZX":
                found.append(int(entry.name))
    return found


def session_of(pid: int) -> int | None:
    """The session `pid` belongs to, or None when it is gone."""
    stat = _stat(pid)
    return None if stat is None else stat.session


def signal_session(session: int, sig: signal.Signals) -> list[int]:
    """Send `sig` to the process group `session` and to every other member of the session.

    Linux does not hand out a pid while a group or session still bears it: once
    a member is seen, `session` names no stranger's group. With none seen,
    nothing is sent. Returns the members signalled.
    """
    members = session_members(session)
    if not members:
        return []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, sig)
    for pid in members:  # and those that moved to a group of their own within the session
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return members


def load_records(path: Path) -> dict[str, Identity]:
    """The children recorded in the state file; {} when there is none or it is unreadable."""
    try:
        document = json.loads(path.read_text())
        return {
            name: Identity(pid=int(r["pid"]), starttime=int(r["starttime"]), boot=str(r["boot"]))
            for name, r in document["services"].items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # A torn or foreign file: signalling nobody is the safe answer.
        return {}


def save_records(path: Path, records: dict[str, Identity], commands: dict[str, Any]) -> None:
    """Write the records atomically: a crash leaves the old file or the new, never half."""
    document = {
        "v": 1,
        "services": {
            name: {**asdict(identity), "command": commands.get(name)}
            for name, identity in records.items()
        },
    }
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as file:
        json.dump(document, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
