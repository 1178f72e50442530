"""`edge registry serve` as a real subprocess on free ports, and its HTTP API.

Tests talk to it the way scripts do: over HTTP (urllib, JSON in and out).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .net import free_port
from .process import read_log_tail, terminate_or_kill

__all__ = ["Registry"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_READY_TIMEOUT = 20.0


class Registry:
    """One registry process: start(), the HTTP API (get/put), stop(), restart()."""

    def __init__(self, workdir: Path, *, broker_port: int, db_url: str,
                 extra: Sequence[str] = (), client_id: str | None = None) -> None:
        self.workdir = workdir
        self.broker_port = broker_port
        self.db_url = db_url
        self.extra = tuple(extra)
        self.client_id = client_id or f"registry-{workdir.name}"
        self.port = free_port()
        self.log_path = workdir / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "edge", "registry", "serve",
                "--broker", f"mqtt://127.0.0.1:{self.broker_port}", "--db", self.db_url,
                "--http", f"127.0.0.1:{self.port}", "--client-id", self.client_id,
                "--reconnect-max", "0.5s", "--catchup-idle", "0.3s", "--log-level", "DEBUG",
                *self.extra]

    def start(self, *, wait_broker: bool = True) -> Registry:
        """Start and wait until /healthz answers (and says the broker is online)."""
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command(), cwd=REPO_ROOT,
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"registry exited with {self._proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                health = self.get("/healthz")
                if not wait_broker or health.get("broker") == "online":
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"registry not ready in {_READY_TIMEOUT}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def request(self, method: str, path: str, body: Any = None,
                raw: bytes | None = None) -> tuple[int, Any]:
        """(status, decoded JSON) of one request; errors are answers, not exceptions."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path}: {status} {body}")
        return body

    def nodes(self, query: str = "") -> dict[str, dict[str, Any]]:
        """GET /api/v1/nodes as {node: NODE}."""
        return {n["node"]: n for n in self.get("/api/v1/nodes" + query)["nodes"]}

    def stop(self) -> None:
        """SIGTERM and wait for the exit."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            terminate_or_kill(proc, 15.0, "registry", kill=proc.kill)

    def kill(self) -> None:
        """SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        return read_log_tail(self.log_path, lines, missing="(no registry log)")
