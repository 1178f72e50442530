"""A service's output: size-capped rotating files on disk and the last lines in memory.

The agent reads the child's pipe on the event loop and hands each chunk to
`RotatingFile.write` through `asyncio.to_thread`: the child never rotates
anything, and a slow SD card slows the child (its pipe fills), not the agent.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from pathlib import Path

__all__ = ["LOG_NAME", "RotatingFile", "Tail"]

LOG_NAME = "output.log"
_LINE_MAX = 1000  # characters of one line kept in memory
_TAIL_READ = 64 * 1024  # bytes of an old log read back at start


class RotatingFile:
    """`output.log`, then `output.log.1` ... `output.log.KEEP`; none over `max_bytes`."""

    def __init__(self, directory: Path, max_bytes: int, keep: int) -> None:
        self.path = directory / LOG_NAME
        self.max_bytes = max_bytes
        self.keep = keep
        self._size: int | None = None  # unknown until the first write

    def write(self, data: bytes) -> None:
        """Append `data`, rotating first whenever it would overflow the current file (blocks)."""
        if self._size is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._size = self.path.stat().st_size
            except FileNotFoundError:
                self._size = 0
        while data:
            room = self.max_bytes - self._size
            if room <= 0 or (len(data) > room and self._size > 0):
                self._rotate()
                continue
            piece, data = data[:room], data[room:]
            with self.path.open("ab") as file:
                file.write(piece)
            self._size += len(piece)

    def _rotate(self) -> None:
        for index in range(self.keep, 0, -1):
            older = self.path.with_name(f"{LOG_NAME}.{index}")
            newer = self.path.with_name(f"{LOG_NAME}.{index - 1}") if index > 1 else self.path
            with contextlib.suppress(FileNotFoundError):
                os.replace(newer, older)
        if self.keep == 0:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._size = 0

    def read_tail(self) -> bytes:
        """The last bytes of the current file, to seed `Tail` after a restart (blocks)."""
        try:
            with self.path.open("rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - _TAIL_READ))
                return file.read()
        except OSError:
            return b""


class Tail:
    """The last `size` lines of output, assembled from chunks (lives on the loop)."""

    def __init__(self, size: int) -> None:
        self._lines: deque[str] = deque(maxlen=size)
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        """Add a chunk and return the lines it completed; a partial line waits for more."""
        *complete, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > _LINE_MAX * 4:  # a child that never writes a newline
            complete.append(self._partial)
            self._partial = b""
        lines = [line.decode(errors="replace").rstrip("\r")[:_LINE_MAX] for line in complete]
        self._lines.extend(lines)
        return lines

    def lines(self, count: int) -> list[str]:
        """The last `count` lines (and a trailing partial one)."""
        lines = list(self._lines)
        if self._partial:
            lines.append(self._partial.decode(errors="replace")[:_LINE_MAX])
        return lines[-count:] if count > 0 else []
