"""The service account in a root's /etc/passwd: found, and judged fit to run the agent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge.install_paths import InstallError, inside

__all__ = ["Account", "find_account", "unfit"]

# Shells that let nobody log in: an account with one of these is a machine's, not a person's.
_NO_LOGIN = frozenset({"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"})


@dataclass(frozen=True)
class Account:
    """One line of /etc/passwd."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


def find_account(root: Path, name: str) -> Account | None:
    """The account `name` in the passwd file of `root`, or None when it has none."""
    passwd = inside(root, "/etc/passwd")
    try:
        lines = passwd.read_text().splitlines()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"cannot read {passwd}: {getattr(exc, 'strerror', None) or exc}"
                           ) from exc
    for number, line in enumerate(lines, 1):
        fields = line.split(":")
        if fields[0] != name:
            continue
        if len(fields) != 7 or not fields[2].isdigit() or not fields[3].isdigit():
            raise InstallError(f"{passwd} line {number}: expected"
                               f" name:password:uid:gid:comment:home:shell, got {line!r}")
        return Account(name, int(fields[2]), int(fields[3]), fields[5], fields[6])
    return None


def unfit(account: Account, home: str) -> str | None:
    """Why `account` looks like a person's rather than the service's, or None when it fits."""
    problems = []
    if account.shell not in _NO_LOGIN:
        problems.append(f"the login shell {account.shell or '/bin/sh (empty)'}")
    if account.home.rstrip("/") != home:
        problems.append(f"the home {account.home or '/ (empty)'} rather than {home}")
    return " and ".join(problems) or None
