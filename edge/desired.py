"""The desired state on the node: received, checked, persisted, then applied.

A document from `{prefix}/nodes/{node}/desired` is decoded with a size limit
first and validated (edge/documents.py). One with a version not above the
newest accepted one is ignored; an invalid one is rejected as a whole, with the
reason kept for the reported state, and nothing runs differently. An accepted
one is written to `desired.cbor` (atomically, synced) before its PUBACK and
before anything changes; then the apply callback reconciles services and
config. At boot the agent applies `desired.cbor` again, with no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edge.documents import MAX_DESIRED_BYTES, Desired, decode_document, encode, parse_desired
from edge.errors import DocumentError
from edge.reconcile import Items
from edge.rejections import Rejections

__all__ = ["DesiredState"]

log = logging.getLogger("edge.desired")

Apply = Callable[[Desired], Awaitable[Items]]


class DesiredState:
    """Take desired documents from the uplink and apply the newest through `apply`."""

    def __init__(self, path: Path, apply: Apply, *, max_bytes: int = MAX_DESIRED_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._apply = apply
        self._max_bytes = max_bytes
        self._clock = clock
        self.applied = 0              # version of the document applied last (0: none)
        self.applied_ts: float | None = None
        self.items: Items = {}
        self.rejected: dict[str, Any] | None = None  # the last refused document and why
        self.ignored = 0              # documents not newer than the applied one
        self.changes = 0              # grows at each change the reported state shows
        self.rejections = Rejections(log, "desired")
        self._pending: Desired | None = None
        self._applying = 0  # version being written or applied now
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()

    # ---- boot ----------------------------------------------------------------

    async def restore(self) -> None:
        """Apply the last accepted document from disk, if there is one (no network needed)."""
        try:
            payload = await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read the last desired state %s: %s; running without it",
                      self.path, exc.strerror or exc)
            return
        try:
            desired = parse_desired(decode_document(payload, self._max_bytes, "desired"))
        except DocumentError as exc:
            log.error("the last desired state %s is not valid (%s); running without it",
                      self.path, exc)
            return
        log.info("applying desired state version %d from %s", desired.version, self.path)
        await self._apply_one(desired)

    # ---- from the uplink -----------------------------------------------------

    def receive(self, payload: bytes) -> asyncio.Future[None] | None:
        """Take one document; the future resolves once it is persisted (then PUBACK it).

        None: refused or ignored, nothing to wait for (PUBACK it at once).
        """
        version: int | None = None
        try:
            doc = decode_document(payload, self._max_bytes, "desired")
            raw_version = doc.get("version")
            if isinstance(raw_version, int) and not isinstance(raw_version, bool):
                version = raw_version
            desired = parse_desired(doc)
        except DocumentError as exc:
            if version is not None and version <= self._newest():
                self.ignored += 1  # an old document, bad or not: not news
                return None
            self._reject(version, str(exc))
            return None
        if desired.version <= self._newest():
            self.ignored += 1
            log.debug("desired state version %d ignored: version %d is applied", desired.version,
                      self._newest())
            return None
        self._pending = desired
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return waiter

    def _newest(self) -> int:
        """The newest version accepted: applied, being applied, or waiting its turn."""
        return max(self.applied, self._applying,
                   self._pending.version if self._pending else 0)

    def _reject(self, version: int | None, reason: str) -> None:
        if self.rejected is not None and self.rejected.get("version") == version \
                and self.rejected.get("reason") == reason:
            return  # the retained copy again, at a reconnect: said already
        self.rejected = {"version": version, "reason": reason, "ts": self._clock()}
        self.changes += 1
        self.rejections("invalid", f"version {version}: {reason}")

    # ---- applying --------------------------------------------------------------

    async def run(self) -> None:
        """Persist and apply the newest document received, one at a time, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            desired, self._pending = self._pending, None
            waiters, self._waiters = self._waiters, []
            if desired is None:
                continue
            self._applying = desired.version
            try:
                await asyncio.to_thread(_write_synced, self.path, encode(desired.raw))
            except OSError as exc:
                log.error("cannot store desired state version %d in %s: %s; it is not"
                          " applied, and the broker sends it again", desired.version,
                          self.path, exc.strerror or exc)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                self._applying = 0  # not accepted after all: the broker sends it again
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            await self._apply_one(desired)

    async def _apply_one(self, desired: Desired) -> None:
        items = await self._apply(desired)
        self.applied = desired.version
        self.applied_ts = self._clock()
        self.items = items
        if self.rejected is not None and (self.rejected.get("version") or 0) <= desired.version:
            self.rejected = None
        self.changes += 1
        failed = {key: item["reason"] for key, item in items.items()
                  if item["result"] == "failed"}
        if failed:
            log.warning("desired state version %d applied, except: %s", desired.version,
                        "; ".join(f"{key}: {reason}" for key, reason in failed.items()))
        else:
            log.info("desired state version %d applied (%d items)", desired.version, len(items))

    def snapshot(self) -> dict[str, Any]:
        """What `status` and the reported state show."""
        return {
            "version": self.applied,
            "ts": self.applied_ts,
            "items": self.items,
            "rejected": self.rejected,
            "ignored": self.ignored,
            "rejections": dict(self.rejections.counts),
        }


def _write_synced(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, durably: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
