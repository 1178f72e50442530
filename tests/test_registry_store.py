"""The store itself, in-process, over SQLite and PostgreSQL: conditional writes, versions."""

from __future__ import annotations

import asyncio

import cbor2

from edge.registry.records import ReportedRow, StatusRow, to_row
from edge.registry.store import open_store
from tests.support.simnode import reported_doc, status_doc


def _reported(node: str, version: int, seen: float = 1.0) -> ReportedRow:
    row = to_row(node, "reported", cbor2.dumps(reported_doc(node, version)), seen)
    assert isinstance(row, ReportedRow)
    return row


def _status(node: str, state: str, seen: float = 1.0, **kw: float) -> StatusRow:
    row = to_row(node, "status", cbor2.dumps(status_doc(state, **kw)), seen)  # type: ignore[arg-type]
    assert isinstance(row, StatusRow)
    return row


async def test_older_rows_never_overwrite_and_last_seen_only_grows(db_url: str) -> None:
    store = await open_store(db_url)
    try:
        assert await store.write([_reported("a", 5, seen=100.0)]) == [False]
        assert await store.write([_reported("a", 3, seen=50.0), _reported("b", 1)]) \
            == [True, False]
        assert await store.write([_status("a", "offline", boot=1, conn=2, ts=5)]) == [False]
        older = _status("a", "online", boot=1, conn=2, ts=9)  # same connection: offline wins
        assert await store.write([older]) == [True]
        rows = {r["node"]: r for r in await store.nodes()}
        assert rows["a"]["reported_version"] == 5
        assert rows["a"]["last_seen"] == 100.0
        assert rows["a"]["status_offline"] == 1
        assert [r["node"] for r in await store.nodes()] == ["a", "b"]
    finally:
        await store.close()


async def test_concurrent_desired_puts_get_distinct_versions_above_applied(db_url: str) -> None:
    store = await open_store(db_url)
    other = await open_store(db_url)
    try:
        row = to_row("a", "reported",
                     cbor2.dumps(reported_doc("a", 1, desired_applied=40)), 1.0)
        assert isinstance(row, ReportedRow)
        await store.write([row])
        versions = await asyncio.gather(*(s.put_desired("a", b"\xa0")
                                          for s in (store, other) * 10))
        assert sorted(versions) == list(range(41, 61))
        stored = await store.desired("a")
        assert stored is not None and stored[0] == 60 and stored[2] is False
        assert await store.unpublished() == ["a"]
        await store.mark_published("a", 59)  # an older version: not this one
        assert await store.unpublished() == ["a"]
        await store.mark_published("a", 60)
        assert await store.unpublished() == []
    finally:
        await other.close()
        await store.close()
