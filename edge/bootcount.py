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
from collections.abc import Callable
from pathlib import Path

from edge.numberfile import read_number, write_number

__all__ = ["next_boot"]

log = logging.getLogger("edge.bootcount")


def next_boot(path: Path, clock: Callable[[], float]) -> int:
    """This start's boot number, stored (written and fsynced) before it is returned.

    Blocking: run it off the loop. When it cannot be stored the number is still
    returned (the agent must start on a full disk), said once in the log: a
    restart with a clock behind may then hand out a number that is not above it.
    """
    number = max(read_number(path, "the boot number") + 1, int(clock() * 1000))
    try:
        write_number(path, number)
    except OSError as exc:
        log.error("cannot store the boot number in %s: %s; a restart with the clock behind"
                  " may show this node offline until its clock is right", path,
                  exc.strerror or exc)
    return number
