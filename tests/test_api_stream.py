"""Streaming answers on the socket API: a first answer, then lines until the client leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge.api import ApiServer, Stream
from tests.support.aio import until


class Ticker:
    """A stream op whose lines the test feeds, and which notes when its stream is closed."""

    def __init__(self) -> None:
        self.feed: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.started = 0

    async def handle(self, req: dict[str, Any]) -> Stream:
        return Stream({"ok": True, "op": "tick"}, self._lines())

    async def _lines(self) -> AsyncIterator[dict[str, Any]]:
        self.started += 1
        try:
            while True:
                yield await self.feed.get()
        finally:
            self.closed.set()


@pytest.fixture
def ticker() -> Ticker:
    """The `tick` stream op of `server`."""
    return Ticker()


@pytest.fixture
async def server(tmp_path: Path, ticker: Ticker) -> AsyncIterator[ApiServer]:
    """A started API server with a `ping` op and `ticker` as `tick`; closed at teardown."""

    async def ping(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "pong": True}

    def submit(*args: Any) -> Any:
        raise AssertionError("no publishes here")

    server = ApiServer(tmp_path / "api.sock", max_line=65536, submit=submit,
                       handlers={"ping": ping, "tick": ticker.handle})
    await server.start()
    yield server
    await server.close()  # idempotent: a test may have closed it already


async def ask(
    server: ApiServer, requests: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to `server` and write `requests` (JSON lines); return the connection."""
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(requests)
    return reader, writer


async def read(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next line from `reader` as a JSON object, within 5 s."""
    async with asyncio.timeout(5):
        line = await reader.readline()
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


async def test_stream_follows_earlier_answers_and_ends_when_the_client_leaves(
        server: ApiServer, ticker: Ticker) -> None:
    reader, writer = await ask(server, b'{"op":"ping"}\n{"op":"tick"}\n')
    assert await read(reader) == {"ok": True, "pong": True}
    assert await read(reader) == {"ok": True, "op": "tick"}
    for i in range(3):
        ticker.feed.put_nowait({"event": "tick", "n": i})
        assert await read(reader) == {"event": "tick", "n": i}
    writer.close()
    async with asyncio.timeout(5):
        await ticker.closed.wait()  # the client's hang-up ended the stream
    await until(lambda: server.connections == 0, what="the connection ending")


async def test_a_client_that_hangs_up_right_after_asking_gets_the_answer_only(
        server: ApiServer, ticker: Ticker) -> None:
    reader, writer = await ask(server, b'{"op":"tick"}\n')
    writer.write_eof()  # nothing more from this side
    assert await read(reader) == {"ok": True, "op": "tick"}
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # the agent ends the connection
    assert ticker.started == 0 or ticker.closed.is_set()
    writer.close()


async def test_closing_the_server_ends_open_streams(server: ApiServer, ticker: Ticker) -> None:
    reader, writer = await ask(server, b'{"op":"tick"}\n')
    assert await read(reader) == {"ok": True, "op": "tick"}
    await until(lambda: ticker.started > 0, what="the stream starting")
    async with asyncio.timeout(5):
        await server.close()
    assert ticker.closed.is_set()
    writer.close()
