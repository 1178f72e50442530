"""Whether the wall clock can be trusted yet, and how to fix timestamps taken before it could.

A board without a real-time clock (a Raspberry Pi) boots with a wall clock
that is wrong: 1970, or the time fake-hwclock saved at the last shutdown.
It becomes right when NTP synchronises it, seconds or hours later, often in
one step. Timers never look at the wall clock (they use the monotonic one);
timestamps that leave the device have to.

Until the clock is synchronised, each envelope is marked (`tsu`) and carries
the monotonic time it was accepted at and the kernel's boot id. Once it is,
`wall - monotonic` is the true offset for the whole boot, and a message
accepted earlier in the same boot gets its true time back: `mono + offset`
(`retime`). A message from an earlier boot cannot be fixed, and keeps its mark.

Synchronised means: the kernel's NTP state is synchronised (adjtimex(2): the
status lacks STA_UNSYNC and the call does not return TIME_ERROR), or
systemd-timesyncd has written `/run/systemd/timesync/synchronized` in this
boot. For tests only, `EDGE_TEST_CLOCK_SYNC_FILE=PATH` replaces both checks:
the clock counts as synchronised while PATH exists.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TEST_SYNC_FILE_ENV", "ClockSync", "boot_id", "retime", "synchronised"]

log = logging.getLogger("edge.clock")

TEST_SYNC_FILE_ENV = "EDGE_TEST_CLOCK_SYNC_FILE"
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_STA_UNSYNC = 0x0040
_TIME_ERROR = 5
_POLL = 1.0  # seconds between looks while not synchronised


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """struct timex of <sys/timex.h> (glibc and musl lay it out alike)."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long), ("time", _Timeval), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


def _adjtimex() -> Callable[[Any], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn: Callable[[Any], int] = libc.adjtimex
    except (OSError, AttributeError):
        return None
    return fn


_ADJTIMEX = _adjtimex()


def kernel_synchronised() -> bool | None:
    """The kernel's NTP state (a read-only adjtimex call); None where it cannot be read."""
    if _ADJTIMEX is None:
        return None
    tx = _Timex()  # modes 0: only read
    state = _ADJTIMEX(ctypes.byref(tx))
    if state < 0:
        return None
    return state != _TIME_ERROR and not tx.status & _STA_UNSYNC


def synchronised() -> bool:
    """Whether the system clock is synchronised (see the module docstring)."""
    override = os.environ.get(TEST_SYNC_FILE_ENV)
    if override:
        return os.path.exists(override)
    return TIMESYNCD_FLAG.exists() or kernel_synchronised() is True


def boot_id() -> bytes:
    """The kernel's id of this boot (16 bytes); 16 zero bytes where there is none."""
    try:
        return uuid.UUID(BOOT_ID.read_text().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


class ClockSync:
    """Watches for the wall clock's synchronisation; once seen, it holds for the process.

    `offset` (wall minus monotonic, taken when synchronisation was first seen)
    dates anything this boot's monotonic clock measured.
    """

    def __init__(
        self,
        *,
        check: Callable[[], bool] = synchronised,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        boot: bytes | None = None,
        poll: float = _POLL,
    ) -> None:
        self._check = check
        self._wall = wall
        self._monotonic = monotonic
        self.boot_id = boot_id() if boot is None else boot
        self._poll = poll
        self.offset: float | None = None
        self.synced_at: float | None = None  # wall clock, once synchronised
        self.look()

    @property
    def synced(self) -> bool:
        """True once the wall clock was seen synchronised."""
        return self.offset is not None

    def look(self) -> bool:
        """Check now; on the first synchronised reading, take the offset. Returns `synced`."""
        if self.offset is None and self._check():
            wall, mono = self._wall(), self._monotonic()
            self.offset, self.synced_at = wall - mono, wall
        return self.synced

    async def run(self) -> None:
        """Look every second until synchronised, then idle (until cancelled)."""
        if self.synced:
            log.info("system clock is synchronised")
        else:
            log.info("system clock is not synchronised yet: messages are marked (tsu) until"
                     " it is, then those still queued are dated again")
            # A stat and a system call: cheap, but off the loop all the same.
            while True:
                if await asyncio.to_thread(self.look):
                    break
                await asyncio.sleep(self._poll)
            log.info("system clock synchronised: messages accepted before are dated again")
        await asyncio.Event().wait()


def retime(envelope: dict[Any, Any], boot: bytes, offset: float) -> bool:
    """Give a marked envelope map of boot `boot` its true `ts` (and `exp`), in place.

    The mark and what served it (`tsu`, `mono`, `bootid`) go; `tsc` says the
    time was corrected. False (and unchanged) when it is not one to fix.
    """
    mono = envelope.get("mono")
    if (envelope.get("tsu") is not True or envelope.get("bootid") != boot
            or not isinstance(mono, int | float) or isinstance(mono, bool)
            or not isinstance(envelope.get("ts"), int | float)):
        return False
    ts = float(mono) + offset
    exp = envelope.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        envelope["exp"] = exp + (ts - envelope["ts"])
    envelope["ts"] = ts
    for key in ("tsu", "mono", "bootid"):
        del envelope[key]
    envelope["tsc"] = True
    return True
