"""A throwaway PostgreSQL cluster (Debian's 15) for the registry tests.

initdb and postgres refuse to run as root, so both run as the `postgres` user
(`runuser`) in a directory it owns under /tmp (pytest's tmp dirs are root-only).
It listens on 127.0.0.1 on a free port and on a unix socket in that directory;
`create_database()` gives each test a database of its own.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .net import free_port, port_accepts

__all__ = ["Postgres", "find_postgres"]

_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)
_START_TIMEOUT = 30.0


def find_postgres() -> Path | None:
    """The directory of initdb and postgres, or None when PostgreSQL is not installed."""
    for d in _BIN_DIRS:
        if os.access(Path(d) / "postgres", os.X_OK) and os.access(Path(d) / "initdb", os.X_OK):
            return Path(d)
    return None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    """One postgres process on a fresh cluster; close() stops it and deletes its files."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.log_path = self.dir / "postgres.log"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)

    def start(self) -> Postgres:
        """initdb, start postgres and wait until it accepts connections."""
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        subprocess.run(
            _as_postgres([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                          "-A", "trust", "-E", "UTF8", "--no-sync"]),
            check=True, capture_output=True,
        )
        log = open(self.log_path, "ab")
        if os.geteuid() == 0:
            shutil.chown(self.log_path, "postgres", "postgres")
        self._proc = subprocess.Popen(
            _as_postgres([str(self.bindir / "postgres"), "-D", str(self.data),
                          "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.socket_dir),
                          "-c", "fsync=off", "-c", "synchronous_commit=off",
                          "-c", "full_page_writes=off", "-c", "max_connections=100"]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT
        while not (port_accepts(self.port) and self._psql("SELECT 1", check=False) == 0):
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready in {_START_TIMEOUT}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)
        return self

    def _psql(self, command: str, *, check: bool = True) -> int:
        done = subprocess.run(
            _as_postgres([str(self.bindir / "psql"), "-h", str(self.socket_dir), "-p",
                          str(self.port), "-U", "postgres", "-d", "postgres", "-qAt",
                          "-c", command]),
            capture_output=True, check=check,
        )
        return done.returncode

    def create_database(self) -> str:
        """A new empty database; returns its postgresql:// URL."""
        name = f"registry_{os.getpid()}_{next(self._names)}"
        self._psql(f"CREATE DATABASE {name}")
        return f"postgresql://postgres:secret@127.0.0.1:{self.port}/{name}"

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no postgres log)"

    def close(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, by its pid), then delete the cluster."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # runuser forwards signals; the postmaster's own pid is in postmaster.pid.
            pid_file = self.data / "postmaster.pid"
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
            except (OSError, ValueError, IndexError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
