"""The store in one SQLite file (WAL), run on one thread of its own."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from edge.errors import RegistryError
from edge.registry import sql
from edge.registry.records import Row
from edge.registry.store import kind_of, params_of

__all__ = ["SqliteStore"]

T = TypeVar("T")
_D = sql.SQLITE


class SqliteStore:
    """All statements run on one worker thread, so the loop never waits on the disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-sqlite")
        self._db: sqlite3.Connection | None = None
        self._upserts = {kind: sql.upsert(_D, kind) for kind in sql.KEYS}

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        """Open or create the database file and its table."""
        store = cls(path)
        await store._run(store._open)
        return store

    def _open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(sql.create_table(_D))
        self._db = db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, fn, *args)
        except sqlite3.Error as exc:
            raise RegistryError(f"registry database {self.path}: {exc}") from exc

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RegistryError(f"registry database {self.path} is closed")
        return self._db

    def _write(self, rows: Sequence[Row]) -> list[bool]:
        db = self.db
        older: list[bool] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                stored = db.execute(self._upserts[kind_of(row)], params_of(row)).fetchone()
                older.append(tuple(stored[1:]) > row.key)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return older

    async def write(self, rows: Sequence[Row]) -> list[bool]:
        """Store each row unless what is stored is newer; True where it was older."""
        return await self._run(self._write, rows)

    def _query(self, text: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.db.execute(text, tuple(args))
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node's list columns, sorted by node."""
        return await self._run(self._query, sql.select_nodes(_D, detail=False))

    async def node(self, node: str) -> dict[str, Any] | None:
        """One node with its documents."""
        found = await self._run(self._query, sql.select_nodes(_D, detail=True), (node,))
        return found[0] if found else None

    def _one(self, text: str, args: Sequence[Any]) -> Any:
        return self.db.execute(text, tuple(args)).fetchone()

    async def put_desired(self, node: str, body: bytes) -> int:
        """Store a desired body and return its new version."""
        row = await self._run(self._one, sql.put_desired(_D), (node, body))
        return int(row[0])

    async def desired(self, node: str) -> tuple[int, bytes, bool] | None:
        """(version, body, published) of the stored desired document."""
        row = await self._run(self._one, sql.select_desired(_D), (node,))
        if row is None or row[0] is None:
            return None
        return int(row[0]), bytes(row[1]), bool(row[2])

    async def mark_published(self, node: str, version: int) -> None:
        """That version is retained on the broker."""
        await self._run(self._one, sql.mark_published(_D), (node, version))

    async def unpublished(self) -> list[str]:
        """Nodes whose desired document still waits for the broker."""
        return [r["node"] for r in await self._run(self._query, sql.UNPUBLISHED)]

    async def count(self) -> int:
        """How many nodes are stored."""
        row = await self._run(self._one, sql.COUNT, ())
        return int(row[0])

    async def close(self) -> None:
        """Close the file and the thread."""
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=True)
