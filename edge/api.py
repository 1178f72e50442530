"""The local socket API: newline-delimited JSON over a unix socket.

Requests on one connection are answered in order, but a client may send
many before reading: publishes are handed to the outbox as they arrive and
answered as their group commit lands, so a pipelining client gets batching.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import grp
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from edge.errors import (
    ConfigError,
    EdgeError,
    EnvelopeError,
    MessageTooLarge,
    RequestError,
    StorageError,
)

__all__ = [
    "ApiServer", "Handler", "Stream", "Submit", "group_id", "parse_publish", "parse_request",
    "validate_topic",
]

log = logging.getLogger("edge.api")

class Stream:
    """An answer that turns the connection into a stream of further lines.

    The first line is the answer itself; then each item of `lines`, until it
    ends or the client closes its side of the connection.
    """

    def __init__(
        self, first: dict[str, Any], lines: AsyncIterator[dict[str, Any]],
        close: Callable[[], None] | None = None,
    ) -> None:
        self.first = first
        self.lines = lines
        self._close = close

    def close(self) -> None:
        """Release what the stream holds (its subscription); called however it ends."""
        if self._close is not None:
            close, self._close = self._close, None
            close()


Answer = dict[str, Any] | Stream
Handler = Callable[[dict[str, Any]], Awaitable[Answer]]
# Queues a message and returns (seq, id, future that resolves once it is committed).
Submit = Callable[[str, Any, str, int, float | None], tuple[int, str, "asyncio.Future[None]"]]

_MAX_TOPIC = 1024
_PIPELINE_DEPTH = 4096  # answers a connection may owe before we stop reading it
_BACKLOG = 1024  # pending connects the kernel holds for us
_CLOSE_TIMEOUT = 2.0  # seconds close() waits for open connections to end


def _bad_char(text: str) -> str | None:
    """The first character MQTT brokers refuse in a topic, described, or None."""
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"control character U+{code:04X}"
        if 0xD800 <= code <= 0xDFFF:
            return f"lone surrogate U+{code:04X}"
        if code in (0xFFFE, 0xFFFF) or 0xFDD0 <= code <= 0xFDEF:
            return f"non-character U+{code:04X}"
    return None


def validate_topic(topic: object) -> str:
    """A local topic as the socket API accepts it, or RequestError saying why not."""
    if not isinstance(topic, str) or not topic:
        raise RequestError("bad_request", "publish needs 'topic', a non-empty string")
    if len(topic) > _MAX_TOPIC:
        raise RequestError("bad_request", f"'topic' must be at most {_MAX_TOPIC} characters")
    bad = _bad_char(topic)
    if bad is not None:
        raise RequestError("bad_request", f"'topic' holds a {bad}, which MQTT does not carry")
    if "+" in topic or "#" in topic or topic.startswith("/") or topic.startswith("$"):
        raise RequestError(
            "bad_request", f"'topic' {topic!r} may not hold '+', '#' or start with '/' or '$'"
        )
    return topic


def parse_publish(req: dict[str, Any]) -> tuple[str, Any, str, int, float | None]:
    """Validate a publish request: (topic, data, ct, prio, ttl), or RequestError."""
    topic = validate_topic(req.get("topic"))
    if "data" in req and "data_b64" in req:
        raise RequestError("bad_request", "give 'data' or 'data_b64', not both")
    data: Any
    if "data_b64" in req:
        if not isinstance(req["data_b64"], str):
            raise RequestError("bad_request", "'data_b64' must be a base64 string")
        try:
            data = base64.b64decode(req["data_b64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError("bad_request", f"'data_b64' is not valid base64: {exc}") from exc
        default_ct = "application/octet-stream"
    else:
        data = req.get("data", "")
        if not isinstance(data, str):
            raise RequestError("bad_request", "'data' must be a string (use 'data_b64' for bytes)")
        default_ct = "text/plain"
    ct = req.get("ct", default_ct)
    if not isinstance(ct, str) or not ct or len(ct) > 255:
        raise RequestError("bad_request", "'ct' must be a non-empty string under 256 characters")
    prio = req.get("prio", 0)
    if not isinstance(prio, int) or isinstance(prio, bool):
        raise RequestError("bad_request", "'prio' must be an integer")
    ttl = req.get("ttl")
    if ttl is not None and (
        not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 <= ttl < 1e10
    ):
        raise RequestError(
            "bad_request", "'ttl' must be a finite, non-negative number of seconds (0: never)"
        )
    return topic, data, ct, prio, None if not ttl else float(ttl)


def parse_request(line: bytes, max_line: int) -> dict[str, Any]:
    """One request line as a JSON object with a string `op`, or RequestError saying why not.

    The reader stops a line at `max_line` bytes before it gets here; the check is
    repeated so that the parser is bounded on its own.
    """
    if len(line) - line.endswith(b"\n") > max_line:
        raise RequestError("too_long", f"request line is over {max_line} bytes")
    try:
        req = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError("bad_json", f"request is not UTF-8 text: {exc}") from exc
    except ValueError as exc:  # also a number of more than 4300 digits
        raise RequestError("bad_json", f"request is not JSON: {exc}") from exc
    except RecursionError:
        raise RequestError("bad_json", "request is nested too deeply to parse") from None
    if not isinstance(req, dict):
        raise RequestError("bad_request", "request must be a JSON object")
    if not isinstance(req.get("op"), str):
        raise RequestError("bad_request", "request needs 'op', a string")
    return req


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


class ApiServer:
    """Serve the socket API; `publish` goes to `submit`, other ops to `handlers`."""

    def __init__(
        self,
        path: Path,
        *,
        max_line: int,
        submit: Submit,
        handlers: dict[str, Handler],
        max_connections: int = 256,
        group: str = "",
    ) -> None:
        self.path = path
        self.group = group  # the socket's group ("": the agent's own)
        self.max_line = max_line
        self._submit = submit
        self._handlers = handlers
        self._server: asyncio.Server | None = None
        self.rejected: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self.connections = 0
        self.max_connections = max_connections
        self._serving: set[asyncio.Task[Any]] = set()  # one per open connection
        self._closing = False

    async def start(self) -> None:
        """Bind the socket (mode 0660, group [api] group); a stale socket file is replaced."""
        _check_socket_dir(self.path.parent)
        gid = group_id(self.group)
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_symlink() and not stat.S_ISSOCK(self.path.stat().st_mode):
                # A file given as [api] socket by mistake: never deleted to make room.
                raise EdgeError(f"[api] socket {self.path} exists and is not a socket;"
                                " refusing to replace it")
            if await _answers(self.path):
                raise EdgeError(f"another agent is already serving {self.path}")
            self.path.unlink()
        old = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=self.max_line, backlog=_BACKLOG
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        if gid is not None:
            try:
                os.chown(self.path, -1, gid)
            except OSError as exc:  # not a member of that group, and not root
                self.path.unlink(missing_ok=True)
                raise EdgeError(f"[api] group {self.group!r}: cannot give the socket"
                                f" {self.path} to it: {exc.strerror}") from exc

    async def close(self) -> None:
        """Stop accepting, end every open connection, remove the socket file. Idempotent."""
        self._closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        # Open connections end now: their stored messages are committed all the same,
        # and a client that stopped reading must not hold the shutdown.
        serving = list(self._serving)
        for task in serving:
            task.cancel()
        if serving:
            await asyncio.wait(serving, timeout=_CLOSE_TIMEOUT)

    def _reject(self, code: str, message: str) -> dict[str, Any]:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(code, -1e9) > 60:
            self._logged_at[code] = now
            log.warning("socket API rejected a request (%s): %s", code, message)
        return _error(code, message)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            # Each connection holds a descriptor; past the cap, say so and hang up.
            answer = self._reject(
                "busy", f"the agent serves at most {self.max_connections} connections at once"
            )
            writer.write(json.dumps(answer).encode() + b"\n")
            writer.close()
            return
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        answers: asyncio.Queue[Awaitable[Answer] | None] = asyncio.Queue(_PIPELINE_DEPTH)
        link = _Link()
        try:
            async with asyncio.TaskGroup() as tg:
                writing = tg.create_task(self._write_answers(answers, writer, link))
                await self._read_requests(reader, answers)
                link.hung_up = True
                if link.streaming:
                    writing.cancel()  # the client closed its side: the stream ends
        except* (ConnectionError, BrokenPipeError):
            pass
        except* asyncio.CancelledError:
            if not self._closing:
                raise  # not ours to swallow
            # close() ended this connection: end quietly (asyncio logs a cancelled one).
        finally:
            self._serving.discard(task)
            self.connections -= 1
            _forget(answers)
            if self._closing:
                writer.transport.abort()  # drop unsent answers: nobody may be reading
            else:
                writer.close()
                with contextlib.suppress(ConnectionError, BrokenPipeError):
                    await writer.wait_closed()

    async def _read_requests(
        self, reader: asyncio.StreamReader, answers: asyncio.Queue[Awaitable[Answer] | None]
    ) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    await _discard_line(reader, self.max_line)
                    await answers.put(_done(self._reject(
                        "too_long", f"request line is over {self.max_line} bytes")))
                    continue
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await answers.put(self._dispatch_safely(exc.partial))
                    return
                if line.strip():
                    await answers.put(self._dispatch_safely(line))
        finally:
            await answers.put(None)

    async def _write_answers(
        self,
        answers: asyncio.Queue[Awaitable[Answer] | None],
        writer: asyncio.StreamWriter,
        link: _Link,
    ) -> None:
        while (pending := await answers.get()) is not None:
            stream: Stream | None = None
            try:
                answer = await pending
                if isinstance(answer, Stream):
                    stream, answer = answer, answer.first
                line = _line(answer)
            except Exception as exc:
                # One request's failure must not cost the answers queued behind it.
                line = _line(self._internal(exc))
            try:
                if writer.is_closing():
                    continue  # the client hung up; its messages are stored all the same
                writer.write(line)
                if stream is not None:
                    await self._write_stream(stream, writer, link)
                elif answers.empty():
                    await writer.drain()
            finally:
                if stream is not None:
                    stream.close()

    async def _write_stream(
        self, stream: Stream, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Write a stream's lines until it ends; the reader cancels us when the client leaves."""
        lines = stream.lines
        try:
            await writer.drain()
            if link.hung_up:
                return
            link.streaming = True
            async for item in lines:
                writer.write(_line(item))
                await writer.drain()
        finally:
            link.streaming = False
            aclose = getattr(lines, "aclose", None)
            if aclose is not None:
                await aclose()

    def _internal(self, exc: BaseException) -> dict[str, Any]:
        """Answer, count and log (once a minute, with the traceback) an unexpected failure."""
        code = "internal_error"
        self.rejected[code] = self.rejected.get(code, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(code, -1e9) > 60:
            self._logged_at[code] = now
            log.error("socket API request failed unexpectedly: %r", exc, exc_info=exc)
        return _error(code, f"the agent failed to serve this request: {exc!r}")

    def _dispatch_safely(self, line: bytes) -> Awaitable[Answer]:
        try:
            return self._dispatch(line)
        except Exception as exc:
            return _done(self._internal(exc))

    def _dispatch(self, line: bytes) -> Awaitable[Answer]:
        """Parse a line and start serving it; the answer is awaited in order."""
        try:
            req = parse_request(line, self.max_line)
        except RequestError as exc:
            return _done(self._reject(exc.code, str(exc)))
        op = req["op"]
        if op == "publish":
            # Queued now, answered when its commit lands: pipelined requests share commits.
            try:
                seq, msg_id, committed = self._submit(*parse_publish(req))
            except (RequestError, StorageError) as exc:
                return _done(self._reject(exc.code, str(exc)))
            except MessageTooLarge as exc:
                return _done(self._reject("too_large", str(exc)))
            except EnvelopeError as exc:
                return _done(self._reject("bad_request", str(exc)))
            return self._await_commit(seq, msg_id, committed)
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return _done(self._reject("unknown_op", f"unknown op {op!r}"))
        return self._do(handler, req)

    async def _await_commit(
        self, seq: int, msg_id: str, committed: asyncio.Future[None]
    ) -> dict[str, Any]:
        try:
            await committed
        except StorageError as exc:
            return self._reject(exc.code, str(exc))
        return {"ok": True, "seq": seq, "id": msg_id}

    async def _do(self, handler: Handler, req: dict[str, Any]) -> Answer:
        try:
            return await handler(req)
        except RequestError as exc:
            return self._reject(exc.code, str(exc))
        except EdgeError as exc:
            return self._reject("failed", str(exc))


class _Link:
    """What the reading and writing halves of one connection tell each other."""

    def __init__(self) -> None:
        self.hung_up = False  # the client closed its side
        self.streaming = False  # the writer is in a stream, which only a hang-up ends


def _line(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


def _forget(answers: asyncio.Queue[Awaitable[Answer] | None]) -> None:
    """Close answers nobody will await (the connection ended first)."""
    while not answers.empty():
        pending = answers.get_nowait()
        if asyncio.iscoroutine(pending):
            pending.close()


def _done(answer: dict[str, Any]) -> Awaitable[dict[str, Any]]:
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    fut.set_result(answer)
    return fut


async def _discard_line(reader: asyncio.StreamReader, chunk: int) -> None:
    """Skip the rest of an over-long line, up to and including its newline."""
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return


def group_id(group: str) -> int | None:
    """The gid of `group` (a name or a number); None for ""; ConfigError when unknown."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"[api] group: no such group {group!r}") from None


def _check_socket_dir(directory: Path) -> None:
    """Create the socket's directory, and refuse one that others could tamper with."""
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise EdgeError(f"socket directory {directory}: {exc.strerror}") from exc
    if not directory.is_dir():
        raise EdgeError(f"socket directory {directory} is not a directory")
    if info.st_uid not in (os.geteuid(), 0) or info.st_mode & 0o022:
        raise EdgeError(
            f"socket directory {directory} is writable by its group or others, or owned by"
            " another user: they could replace the socket; use a directory only this user"
            " can write ([api] socket; give access with [api] group instead)"
        )


async def _answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
