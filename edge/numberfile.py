"""A number kept in a small file of the data dir, durably (boot-count, reported-version)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["read_number", "write_number"]

log = logging.getLogger("edge.numberfile")


def read_number(path: Path, what: str) -> int:
    """The number in `path`; 0 when there is none or it cannot be read (said in the log)."""
    try:
        return max(0, int(path.read_text().strip() or 0))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): %s starts from the clock", path, exc, what)
        return 0


def write_number(path: Path, number: int) -> None:
    """Replace the number in `path`, durably: the file and the rename are fsynced."""
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
