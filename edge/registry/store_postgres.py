"""The store in PostgreSQL (asyncpg, a small pool), shared by several registry workers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from edge.errors import RegistryError
from edge.registry import sql
from edge.registry.records import Row
from edge.registry.settings import db_url_for_humans
from edge.registry.store import kind_of, params_of

__all__ = ["PostgresStore"]

T = TypeVar("T")
_D = sql.POSTGRES
_SCHEMA_LOCK = 0x65646765  # an advisory lock: two workers starting at once create it once


class PostgresStore:
    """Each kind of document in a batch is one statement over arrays, rows in node order."""

    def __init__(self, url: str, pool: Any) -> None:
        self.url = url
        self._pool = pool
        self._upserts = {kind: sql.upsert(_D, kind) for kind in sql.KEYS}

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        """Connect a pool and create the table if it is missing."""
        where = db_url_for_humans(url)
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=4, timeout=10)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise RegistryError(f"registry database {where}: cannot connect: {exc}") from exc
        store = cls(url, pool)

        async def create(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await conn.execute(sql.create_table(_D))

        try:
            await store._with(create)
        except RegistryError:
            await pool.close()
            raise
        return store

    async def _with(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        try:
            async with self._pool.acquire() as conn:
                return await fn(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise RegistryError(f"registry database {db_url_for_humans(self.url)}: {exc}") \
                from exc

    async def write(self, rows: Sequence[Row]) -> list[bool]:
        """Store each row unless what is stored is newer; True where it was older."""
        by_kind: dict[str, list[Row]] = {}
        for row in rows:
            by_kind.setdefault(kind_of(row), []).append(row)
        stored: dict[tuple[str, str], tuple[Any, ...]] = {}

        async def run(conn: Any) -> None:
            for kind, group in by_kind.items():
                columns = list(zip(*(params_of(r) for r in group), strict=True))
                # One statement (its own transaction) per kind: its row locks are taken
                # in node order, so two workers cannot deadlock.
                for rec in await conn.fetch(self._upserts[kind], *map(list, columns)):
                    stored[(kind, rec[0])] = tuple(rec)[1:]

        await self._with(run)
        return [stored[(kind_of(r), r.node)] > r.key for r in rows]

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node's list columns, sorted by node."""
        async def run(conn: Any) -> list[dict[str, Any]]:
            return [dict(r) for r in await conn.fetch(sql.select_nodes(_D, detail=False))]
        return await self._with(run)

    async def node(self, node: str) -> dict[str, Any] | None:
        """One node with its documents."""
        async def run(conn: Any) -> dict[str, Any] | None:
            rec = await conn.fetchrow(sql.select_nodes(_D, detail=True), node)
            return None if rec is None else dict(rec)
        return await self._with(run)

    async def put_desired(self, node: str, body: bytes) -> int:
        """Store a desired body and return its new version."""
        async def run(conn: Any) -> int:
            return int(await conn.fetchval(sql.put_desired(_D), node, body))
        return await self._with(run)

    async def desired(self, node: str) -> tuple[int, bytes, bool] | None:
        """(version, body, published) of the stored desired document."""
        async def run(conn: Any) -> tuple[int, bytes, bool] | None:
            rec = await conn.fetchrow(sql.select_desired(_D), node)
            if rec is None or rec[0] is None:
                return None
            return int(rec[0]), bytes(rec[1]), bool(rec[2])
        return await self._with(run)

    async def mark_published(self, node: str, version: int) -> None:
        """That version is retained on the broker."""
        async def run(conn: Any) -> None:
            await conn.execute(sql.mark_published(_D), node, version)
        await self._with(run)

    async def unpublished(self) -> list[str]:
        """Nodes whose desired document still waits for the broker."""
        async def run(conn: Any) -> list[str]:
            return [r[0] for r in await conn.fetch(sql.UNPUBLISHED)]
        return await self._with(run)

    async def count(self) -> int:
        """How many nodes are stored."""
        async def run(conn: Any) -> int:
            return int(await conn.fetchval(sql.COUNT))
        return await self._with(run)

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()
