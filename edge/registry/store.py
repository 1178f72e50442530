"""Where the registry keeps its nodes: the interface both databases implement.

`open_store(url)` picks SQLite (`sqlite:///path`) or PostgreSQL
(`postgresql://...`); both run the statements of `sql.py` on the same schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from edge.registry.records import DesiredRow, ReportedRow, Row, StatusRow

__all__ = ["Store", "check_db_url", "kind_of", "open_store", "params_of"]


class Store(Protocol):
    """The registry's table of nodes."""

    async def write(self, rows: Sequence[Row]) -> list[bool]:
        """Store each row unless what is stored is newer; True where it was older."""
        ...

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node's list columns (sql.LIST_COLUMNS), sorted by node."""
        ...

    async def node(self, node: str) -> dict[str, Any] | None:
        """One node with its status, reported and desired documents; None if unknown."""
        ...

    async def put_desired(self, node: str, body: bytes) -> int:
        """Store a desired body (unpublished) and return the version it was given."""
        ...

    async def desired(self, node: str) -> tuple[int, bytes, bool] | None:
        """The stored desired document: (version, body, published)."""
        ...

    async def mark_published(self, node: str, version: int) -> None:
        """That version of the node's desired document is retained on the broker."""
        ...

    async def unpublished(self) -> list[str]:
        """Nodes whose stored desired document is not on the broker yet."""
        ...

    async def count(self) -> int:
        """How many nodes are stored (also the database's sign of life)."""
        ...

    async def close(self) -> None:
        """Close the connections."""
        ...


def kind_of(row: Row) -> str:
    """status, reported or desired."""
    if isinstance(row, StatusRow):
        return "status"
    return "reported" if isinstance(row, ReportedRow) else "desired"


def params_of(row: Row) -> tuple[Any, ...]:
    """The row as `sql.upsert(kind)` parameters (sql.columns_of(kind) order)."""
    if isinstance(row, StatusRow):
        boot, conn, offline, ts = row.order
        return (row.node, row.seen, row.doc, boot, conn, offline, ts, row.heartbeat,
                row.queue_depth, row.oldest_age)
    if isinstance(row, ReportedRow):
        return (row.node, row.seen, row.doc, row.version, row.profile, row.agent, row.labels,
                row.services_up, row.services_total, row.desired_applied, row.desired_rejected,
                row.desired_failed)
    assert isinstance(row, DesiredRow)
    return (row.node, row.seen, row.body, row.version, 1)


def check_db_url(url: str) -> str:
    """The URL if it names a store this registry can open; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite" and parts.path and not parts.netloc:
        return url
    if parts.scheme in ("postgresql", "postgres") and parts.hostname:
        return url
    raise ValueError(f"expected sqlite:///PATH or postgresql://user:pass@host:port/db,"
                     f" got {url!r}")


async def open_store(url: str) -> Store:
    """Open (and create the table of) the store at `url`; RegistryError if it cannot."""
    check_db_url(url)
    if url.startswith("sqlite:"):
        from edge.registry.store_sqlite import SqliteStore
        return await SqliteStore.open(urlsplit(url).path)
    from edge.registry.store_postgres import PostgresStore
    return await PostgresStore.open(url)
