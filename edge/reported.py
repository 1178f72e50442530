"""The reported state: what this node runs, published retained for the registry.

A document goes out on every connection and, while connected, when what it
says has changed (looked at every `[state] debounce`, so a burst of changes
makes one document). Its `version` grows with every document and survives
restarts: the last one is stored in `reported-version` before the document
leaves, and a new process starts above both it and the clock in milliseconds
(so a node whose data dir was wiped still moves forward on a sane clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edge.documents import encode
from edge.numberfile import read_number, write_number

__all__ = ["Reporter"]

log = logging.getLogger("edge.reported")

Build = Callable[[], Awaitable[dict[str, Any]]]


class Reporter:
    """Publish `build()`'s document through `publish` on connect and on change."""

    def __init__(
        self,
        path: Path,
        build: Build,
        fingerprint: Callable[[], object],
        publish: Callable[[bytes], bool],
        *,
        debounce: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._build = build
        self._fingerprint = fingerprint
        self._publish = publish
        self._debounce = debounce
        self._clock = clock
        self.version = 0          # of the last document published (or stored at boot)
        self.published = 0        # documents published by this process
        self.last_ts: float | None = None
        self._online = asyncio.Event()
        self._last: object = None
        self._store_failing = False  # said once per streak: a full disk fails every try

    def online(self) -> None:
        """A connection is up: publish at once (called by the uplink)."""
        self._online.set()

    async def run(self) -> None:
        """Publish on connect and on change until cancelled."""
        self.version = await asyncio.to_thread(read_number, self.path, "the reported version")
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._debounce):
                    await self._online.wait()
            connected = self._online.is_set()
            self._online.clear()
            mark = self._fingerprint()
            if connected or mark != self._last:
                if await self._send():
                    self._last = mark

    async def _send(self) -> bool:
        doc = await self._build()
        version = max(self.version + 1, int(self._clock() * 1000))
        try:
            await asyncio.to_thread(write_number, self.path, version)
        except OSError as exc:
            # Publishing on would risk a version that a restart hands out again.
            if not self._store_failing:
                log.error("cannot store the reported version in %s: %s; reported state not"
                          " sent until it can be", self.path, exc.strerror or exc)
            self._store_failing = True
            return False
        if self._store_failing:
            log.info("reported version stored again in %s", self.path)
            self._store_failing = False
        self.version = version
        doc["version"] = version
        if not self._publish(encode(doc)):
            return False  # offline: the next connection publishes a fresh one
        self.published += 1
        self.last_ts = doc.get("ts")
        return True

