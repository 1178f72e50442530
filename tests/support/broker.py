"""A real mosquitto on a free loopback port, with the faults the tests inject.

The port is chosen when the Broker is made, not when it starts, so a test can
point the agent at a broker that is not there yet ("port reserved, nothing
listening": connections are refused) and start it later on the same port.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .net import free_port, port_accepts
from .process import read_log_tail, terminate_or_kill

__all__ = ["Broker", "find_mosquitto"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def find_mosquitto() -> str | None:
    """Return the mosquitto binary's path, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class Broker:
    """One mosquitto process with persistence, restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str,
        extra: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = port if port is not None else free_port()
        self.persistence_dir = workdir / "persistence"
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.extra = tuple(extra)
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)
        self.persistence_dir.mkdir(exist_ok=True)
        self._write_conf()

    @property
    def url(self) -> str:
        """The agent's `[uplink] url` for this broker."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the mosquitto process exists (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    def _write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            # mosquitto drops root privileges to user "mosquitto" unless told not to;
            # that user could not write the persistence dir under tmp_path.
            "user root",
            "autosave_interval 1",
            # The default (1000) silently drops QoS 1 messages queued for a slow
            # subscriber: the tests would then blame the agent for the broker's loss.
            "max_queued_messages 0",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %H:%M:%S",
            *self.extra,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start mosquitto and wait until its port accepts connections."""
        if self.running:
            raise RuntimeError(f"broker on port {self.port} is already running")
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts + 1} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._paused = False
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if self._proc.poll() is not None:
                self._proc.wait()
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode} at start\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mosquitto did not accept on port {self.port} within {timeout}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """SIGTERM and wait: mosquitto saves its persistence file on the way out."""
        if not self.running or self._proc is None:
            return
        self.resume()
        terminate_or_kill(self._proc, timeout, "mosquitto", kill=self.kill)

    def kill(self) -> None:
        """SIGKILL and reap: no persistence save beyond the last autosave."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: the kernel still holds the sockets, nobody answers (a half-open peer)."""
        if not self.running or self._proc is None:
            raise RuntimeError("cannot pause a broker that is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self._paused and self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self, timeout: float = _START_TIMEOUT) -> None:
        """stop() then start() on the same port, with the persisted state."""
        self.stop()
        self.start(timeout=timeout)

    def close(self) -> None:
        """Teardown: never leave a stopped or running mosquitto behind."""
        self.resume()
        self.kill()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines mosquitto logged, for failure messages."""
        return read_log_tail(self.log_path, lines, missing="(no mosquitto log)")
