"""The inbox: down messages kept in SQLite from their arrival until they are delivered.

Down traffic is light next to the outbox's, so the inbox is simple: one
aiosqlite connection, inserts gathered into one commit while the previous
commit runs, and the whole pending set held in memory too (it is capped by
`[local] inbox_max_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from edge.errors import StorageError

__all__ = ["Inbox", "InboxRow"]

log = logging.getLogger("edge.inbox")

_FILE_MODE = 0o640
_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    ct TEXT NOT NULL,
    id BLOB,
    ts REAL,
    exp REAL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class InboxRow:
    """One stored down message."""

    key: int
    topic: str
    payload: bytes
    ct: str
    id: bytes | None
    ts: float | None
    exp: float | None

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.topic) + 64


class Inbox:
    """Stored down messages, oldest first."""

    def __init__(
        self, path: Path, *, max_bytes: int, durability: str = "normal",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.durability = durability  # SQLite synchronous, as [queue] durability says
        self.max_bytes = max_bytes
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._rows: dict[int, InboxRow] = {}  # pending, by key (insertion order = key order)
        self._bytes = 0
        self._next_key = 1
        self.dropped = 0  # evicted to stay under max_bytes (persisted)
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Open or create the database and load what is pending."""
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={self.durability.upper()}")
            await db.executescript(_SCHEMA)
            async with db.execute(
                "SELECT key, topic, payload, ct, id, ts, exp FROM inbox ORDER BY key"
            ) as cur:
                async for key, topic, payload, ct, msg_id, ts, exp in cur:
                    self._keep(InboxRow(key, topic, bytes(payload), ct, msg_id, ts, exp))
            async with db.execute("SELECT value FROM counters WHERE name = 'dropped'") as cur:
                row = await cur.fetchone()
                self.dropped = int(row[0]) if row else 0
            async with db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inbox'") as cur:
                row = await cur.fetchone()
                self._next_key = int(row[0]) + 1 if row else 1
        except sqlite3.Error as exc:
            raise StorageError(f"inbox {self.path}: {exc}") from exc
        self._db = db
        if self._rows:
            log.info("inbox: %d down message(s) waiting for delivery", len(self._rows))

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(sqlite3.Error):
                await db.close()

    def _keep(self, row: InboxRow) -> None:
        self._rows[row.key] = row
        self._bytes += row.size

    def pending(self) -> list[InboxRow]:
        """Every stored message, oldest first."""
        return list(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def size(self) -> int:
        """Bytes the pending messages take (roughly)."""
        return self._bytes

    async def add(
        self, topic: str, payload: bytes, ct: str, msg_id: bytes | None, ts: float | None,
        exp: float | None,
    ) -> InboxRow:
        """Store one message durably; the oldest go when the inbox would overflow."""
        db = self._require()
        async with self._lock:
            row = InboxRow(self._next_key, topic, payload, ct, msg_id, ts, exp)
            evict: list[int] = []
            room = self._bytes
            for old in self._rows.values():
                if room + row.size <= self.max_bytes:
                    break
                evict.append(old.key)
                room -= old.size
            try:
                await db.execute("BEGIN IMMEDIATE")
                await db.execute(
                    "INSERT INTO inbox (key, topic, payload, ct, id, ts, exp, received)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.key, topic, payload, ct, msg_id, ts, exp, self._clock()),
                )
                if evict:
                    await db.executemany("DELETE FROM inbox WHERE key = ?", [(k,) for k in evict])
                    await db.execute(
                        "INSERT INTO counters (name, value) VALUES ('dropped', ?) ON CONFLICT"
                        " (name) DO UPDATE SET value = value + excluded.value", (len(evict),),
                    )
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                raise StorageError(f"inbox {self.path}: {exc}") from exc
            self._next_key += 1
            for key in evict:
                self._bytes -= self._rows.pop(key).size
            if evict:
                self.dropped += len(evict)
                log.warning("inbox over %d bytes: dropped the %d oldest down message(s)",
                            self.max_bytes, len(evict))
            self._keep(row)
            return row

    async def remove(self, keys: Iterable[int]) -> None:
        """Forget delivered (or expired) messages."""
        gone = [k for k in keys if k in self._rows]
        if not gone:
            return
        db = self._require()
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                await db.executemany("DELETE FROM inbox WHERE key = ?", [(k,) for k in gone])
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                raise StorageError(f"inbox {self.path}: {exc}") from exc
            for key in gone:
                row = self._rows.pop(key, None)
                if row is not None:
                    self._bytes -= row.size

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError(f"inbox {self.path} is not open")
        return self._db
