"""The boot number: orders this node's status documents across restarts, whatever the clock.

The wall clock alone cannot: a Raspberry Pi without an RTC starts before NTP
with a clock behind its previous run, and its status would lose against the
one it left. So the number is kept in `boot-count` in the data dir and each
start takes `max(stored + 1, wall clock in milliseconds)`: a clock behind with
the data dir kept still moves forward (stored + 1), and a wiped data dir with a
sane clock still does too (the milliseconds). Only both at once, a wiped data
dir and a clock behind the previous run, can still lose (docs/registry.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["next_boot"]

log = logging.getLogger("edge.bootcount")


def next_boot(path: Path, clock: Callable[[], float]) -> int:
    """This start's boot number, stored (written and fsynced) before it is returned.

    Blocking: run it off the loop. When it cannot be stored the number is still
    returned (the agent must start on a full disk), said once in the log: a
    restart with a clock behind may then hand out a number that is not above it.
    """
    number = max(_read(path) + 1, int(clock() * 1000))
    try:
        _write(path, number)
    except OSError as exc:
        log.error("cannot store the boot number in %s: %s; a restart with the clock behind"
                  " may show this node offline until its clock is right", path,
                  exc.strerror or exc)
    return number


def _read(path: Path) -> int:
    try:
        return max(0, int(path.read_text().strip() or 0))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): the boot number starts from the clock", path, exc)
        return 0


def _write(path: Path, number: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(f"{number}\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself, or a power cut may bring back the old number
    finally:
        os.close(fd)
