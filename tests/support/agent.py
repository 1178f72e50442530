"""The agent as a real subprocess (`python -m edge run --config ...`) and its socket API.

Everything the tests do to the agent goes through what a user has: the config
file, the process (signals), and the unix socket API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from .net import wait_until
from .process import read_log_tail, terminate_or_kill

__all__ = ["Agent", "ApiClient", "ApiError", "render_toml"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_READY_TIMEOUT = 15.0
_REQUEST_TIMEOUT = 10.0

Overrides = Mapping[str, Mapping[str, Any]]


class ApiError(RuntimeError):
    """The socket API answered something that is not a JSON object line."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_toml(config: Mapping[str, Mapping[str, Any]]) -> str:
    """Render a {section: {key: value}} mapping as TOML (values None are left out)."""
    out: list[str] = []
    for section, keys in config.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {_toml_value(v)}" for key, v in keys.items() if v is not None)
        out.append("")
    return "\n".join(out)


class ApiClient:
    """One connection to the agent's socket: lines out, lines in."""

    def __init__(self, path: Path, timeout: float = _REQUEST_TIMEOUT) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._buf = bytearray()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (for malformed input)."""
        self._sock.sendall(data)

    def read_line(self) -> bytes:
        """Read one response line (without the newline)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return line
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ApiError(f"agent closed the connection; unread {bytes(self._buf)[:200]!r}")
            self._buf += chunk

    def read_response(self) -> dict[str, Any]:
        """Read and decode one response line."""
        line = self.read_line()
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ApiError(f"response is not JSON: {line[:200]!r}") from exc
        if not isinstance(value, dict):
            raise ApiError(f"response is not a JSON object: {line[:200]!r}")
        return value

    def request(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request line and read its response."""
        self.send_raw(json.dumps(obj).encode() + b"\n")
        return self.read_response()

    def pipeline(self, lines: list[bytes], batch: int = 512) -> list[dict[str, Any]]:
        """Write all lines from a thread while reading the responses here.

        Writing everything before reading would deadlock once the agent blocks
        on writing responses nobody reads.
        """
        failure: list[BaseException] = []

        def write() -> None:
            try:
                for i in range(0, len(lines), batch):
                    self._sock.sendall(b"".join(lines[i : i + batch]))
            except BaseException as exc:
                failure.append(exc)

        writer = threading.Thread(target=write, name="api-pipeline-writer", daemon=True)
        writer.start()
        responses: list[dict[str, Any]] = []
        try:
            while len(responses) < len(lines):
                if failure:
                    raise ApiError(f"writing requests failed: {failure[0]!r}") from failure[0]
                responses.append(self.read_response())
        finally:
            if len(responses) < len(lines):
                # Unblock the writer before joining it.
                self._sock.shutdown(socket.SHUT_RDWR)
            writer.join(timeout=30)
        if failure:
            raise ApiError(f"writing requests failed: {failure[0]!r}") from failure[0]
        return responses


def publish_request(
    topic: str,
    data: str | None = None,
    *,
    data_b64: str | None = None,
    prio: int | None = None,
    ttl: float | None = None,
    ct: str | None = None,
) -> dict[str, Any]:
    """Build a publish request, leaving out the fields not given."""
    req: dict[str, Any] = {"op": "publish", "topic": topic}
    for key, value in (
        ("data", data),
        ("data_b64", data_b64),
        ("prio", prio),
        ("ttl", ttl),
        ("ct", ct),
    ):
        if value is not None:
            req[key] = value
    return req


class Agent:
    """`python -m edge run` with a config file under `workdir`.

    `prefix` goes before the command, e.g. `["ip", "netns", "exec", NS]` to run
    the agent in a network namespace; it must exec the command, so that `pid`
    stays the agent's own and signals reach it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        uplink: str = "",
        node_id: str = "node-a",
        overrides: Overrides | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.node_id = node_id
        self.prefix = list(prefix)
        self.data_dir = workdir / "data"
        self.socket_path = workdir / "agent.sock"
        self.config_path = workdir / "agent.toml"
        self.log_path = workdir / "agent.log"
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, dict[str, Any]] = {
            "node": {"id": node_id, "data_dir": self.data_dir},
            "uplink": {
                "url": uplink,
                "keepalive": "2s",
                "inflight": 50,
                "heartbeat": "60s",
                "backoff_initial": "0.1s",
                "backoff_max": "1s",
            },
            "queue": {"max_bytes": "256MiB", "on_full": "drop-oldest"},
            "api": {"socket": self.socket_path},
            "telemetry": {"interval": "0s"},
            "discovery": {"enabled": False},
            # No local bus unless a test asks: a broker on 127.0.0.1:1883 is not ours.
            "local": {"url": ""},
        }
        for section, keys in (overrides or {}).items():
            config.setdefault(section, {}).update(keys)
        self.config = config
        self.config_path.write_text(render_toml(config))

    # -- process --------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The running agent's process id."""
        if self._proc is None:
            raise RuntimeError("agent not started")
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """True while the agent process runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended."""
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout: float = _READY_TIMEOUT) -> Agent:
        """Start the process and wait until the socket API answers `status`."""
        if self.alive:
            raise RuntimeError("agent already running")
        env = dict(os.environ)
        # Import this checkout's package even where it is not installed.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-m", "edge", "run", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts + 1} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [*self.prefix, *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        last_error = "socket not there yet"
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"agent exited with {self._proc.returncode} during start\n{self.log_tail()}"
                )
            if self.socket_path.exists():
                try:
                    answer = self.request({"op": "status"}, timeout=2.0)
                    if answer.get("ok") is True:
                        return self
                    last_error = f"status answered {answer!r}"
                except (OSError, ApiError) as exc:
                    last_error = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"agent not answering status within {timeout}s ({last_error})\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def assert_alive(self) -> None:
        """Fail with the log's tail if the agent process has ended."""
        if not self.alive:
            raise AssertionError(
                f"agent exited unexpectedly with {self.returncode}\n{self.log_tail()}"
            )

    def kill9(self) -> None:
        """SIGKILL and reap: a crash with no chance to clean up."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait for an orderly exit; SIGKILL if it does not come. Return the status."""
        if self._proc is None:
            raise RuntimeError("agent not started")
        if self._proc.poll() is None:
            terminate_or_kill(self._proc, timeout, "agent", kill=self.kill9)
        return self._proc.wait()

    def restart(self, timeout: float = _READY_TIMEOUT) -> Agent:
        """Start again with the same config and data dir (terminating first if running)."""
        if self.alive:
            self.terminate()
        return self.start(timeout=timeout)

    def close(self) -> None:
        """Teardown: stop the process, whatever state it is in, and show its log's tail."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self.terminate(timeout=5.0)
            except RuntimeError:
                pass
        if self._proc is not None:
            self._proc.wait()
        print(f"--- agent log tail ({self.log_path}) ---\n{self.log_tail()}")

    def rss(self) -> int:
        """Resident set size of the agent process, in bytes."""
        rss: int = psutil.Process(self.pid).memory_info().rss
        return rss

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the agent's output."""
        return read_log_tail(self.log_path, lines, missing="(no agent log)")

    # -- socket API -----------------------------------------------------------

    def connect(self, timeout: float = _REQUEST_TIMEOUT) -> ApiClient:
        """Open a connection to the socket API (close it, or use it as a context manager)."""
        return ApiClient(self.socket_path, timeout=timeout)

    def request(self, obj: Mapping[str, Any], timeout: float = _REQUEST_TIMEOUT) -> dict[str, Any]:
        """One request on a fresh connection."""
        with self.connect(timeout=timeout) as api:
            return api.request(obj)

    def publish(self, topic: str, data: str | None = None, **fields: Any) -> dict[str, Any]:
        """One publish request; the response as it is."""
        return self.request(publish_request(topic, data, **fields))

    def publish_ok(self, topic: str, data: str | None = None, **fields: Any) -> dict[str, Any]:
        """One publish that must be accepted; return the response."""
        answer = self.publish(topic, data, **fields)
        assert answer.get("ok") is True, f"publish refused: {answer!r}"
        return answer

    def publish_many(
        self, items: Iterable[Mapping[str, Any]], timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """Pipeline many requests on one connection; the responses, in order.

        `timeout` bounds the wait for any single response, not the whole batch.
        """
        lines = [json.dumps(item).encode() + b"\n" for item in items]
        with self.connect(timeout=timeout) as api:
            return api.pipeline(lines)

    def status(self) -> dict[str, Any]:
        """The `status` answer (asserted ok)."""
        answer = self.request({"op": "status"})
        assert answer.get("ok") is True, f"status failed: {answer!r}"
        return answer

    def queue(self) -> dict[str, Any]:
        """The `queue` answer (asserted ok)."""
        answer = self.request({"op": "queue"})
        assert answer.get("ok") is True, f"queue failed: {answer!r}"
        return answer

    def wait_status(self, predicate: Any, timeout: float, what: str = "status") -> dict[str, Any]:
        """Poll `status` until predicate(answer) is true; return that answer."""
        last: list[dict[str, Any]] = []

        def check() -> bool:
            last[:] = [self.status()]
            return bool(predicate(last[0]))

        try:
            wait_until(check, timeout, interval=0.05, what=what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last status {last[0] if last else None!r}") from None
        return last[0]

    def wait_online(self, timeout: float = 10) -> dict[str, Any]:
        """Wait until the uplink is connected."""
        return self.wait_status(
            lambda s: s["uplink"]["state"] == "online", timeout, what="uplink online"
        )

    def wait_drained(self, timeout: float) -> dict[str, Any]:
        """Wait until the outbox is empty (every row PUBACKed, expired or dropped)."""
        return self.wait_status(lambda s: s["queue"]["depth"] == 0, timeout, what="outbox depth 0")
