"""A small client for the agent's socket API (the CLI uses it)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from edge.errors import AgentNotRunning, EdgeError

__all__ = ["ApiClient"]


class ApiClient:
    """One connection to the agent; requests are answered in order."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise AgentNotRunning(
                f"no agent is running at {path} (start it with `edge run`,"
                " or point --socket / EDGE_SOCKET at its socket)"
            ) from exc
        except PermissionError as exc:
            self._sock.close()
            raise EdgeError(f"not allowed to open {path}: {exc.strerror}") from exc
        except TimeoutError as exc:  # a stopped agent whose listen backlog is full
            self._sock.close()
            raise self._no_answer() from exc
        except OSError as exc:  # a path too long for AF_UNIX, not a socket, ...
            self._sock.close()
            raise EdgeError(f"cannot connect to {path}: {exc.strerror or exc}") from exc
        self._file = self._sock.makefile("rb")

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self._sock.close()

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its answer."""
        return next(self.pipeline([req]))

    def pipeline(
        self, reqs: Iterable[dict[str, Any]], window: int = 256
    ) -> Iterator[dict[str, Any]]:
        """Send many requests without waiting, yielding the answers in order."""
        outstanding = 0
        it = iter(reqs)
        exhausted = False
        while True:
            buf = bytearray()
            while not exhausted and outstanding < window:
                try:
                    req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                buf += json.dumps(req, separators=(",", ":")).encode() + b"\n"
                outstanding += 1
            if buf:
                try:
                    self._sock.sendall(buf)
                except TimeoutError as exc:  # the agent stopped reading
                    raise self._no_answer() from exc
                except OSError as exc:
                    raise AgentNotRunning(
                        f"the agent at {self.path} closed the connection: {exc.strerror or exc}"
                    ) from exc
            if outstanding == 0:
                return
            yield self._read()
            outstanding -= 1

    def stream(self, req: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Send a streaming request: yields its answer, then each line, until the agent ends it.

        Only the answer is bound by the timeout; the lines after it may be far apart.
        """
        answer = self.request(req)
        yield answer
        if not answer.get("ok"):
            return
        self._sock.settimeout(None)
        while True:
            try:
                yield self._read()
            except AgentNotRunning:
                return

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except TimeoutError as exc:
            raise self._no_answer() from exc
        except OSError as exc:
            raise AgentNotRunning(
                f"the agent at {self.path} closed the connection: {exc.strerror or exc}"
            ) from exc
        if not line:
            raise AgentNotRunning(f"the agent at {self.path} closed the connection")
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise EdgeError(f"the agent at {self.path} sent a malformed answer")
        return answer

    def _no_answer(self) -> EdgeError:
        return EdgeError(f"the agent at {self.path} did not answer within {self.timeout:g}s")
