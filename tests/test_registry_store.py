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


def _status(node: str, state: str, seen: float = 1.0, *, retained: bool = False,
            bootn: int | None = None, **kw: float) -> StatusRow:
    doc = status_doc(state, **kw)  # type: ignore[arg-type]
    if bootn is not None:
        doc["bootn"] = bootn
    row = to_row(node, "status", cbor2.dumps(doc), seen, retained=retained)
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


async def test_a_restart_with_the_clock_behind_wins_by_its_boot_number(db_url: str) -> None:
    store = await open_store(db_url)
    try:
        now = 1_796_278_031.8
        left = _status("a", "offline", boot=now, conn=3, ts=now + 60, bootn=int(now * 1000))
        assert await store.write([left]) == [False]
        behind = _status("a", "online", seen=now + 90, boot=now - 86400, conn=1,
                         ts=now - 86400 + 5, bootn=int(now * 1000) + 1)
        assert await store.write([behind]) == [False]
        row = (await store.nodes())[0]
        assert row["status_offline"] == 0 and row["status_conn"] == 1
        # An agent from before the boot number, restarted on a sane clock, still moves on.
        old = _status("a", "online", seen=now + 200, boot=now + 100, conn=1, ts=now + 101)
        assert await store.write([old]) == [False]
    finally:
        await store.close()


async def test_a_retained_document_never_moves_last_seen_past_what_the_node_said(
    db_url: str,
) -> None:
    store = await open_store(db_url)
    try:
        # Heard live at 100; the same documents again, retained, at a reconnect at 700.
        await store.write([_reported("a", 5, seen=100.0),
                           _status("a", "online", seen=100.0, boot=1, conn=1, ts=95.0)])
        again = to_row("a", "reported", cbor2.dumps(reported_doc("a", 5) | {"ts": 96.0}),
                       700.0, retained=True)
        assert isinstance(again, ReportedRow) and again.seen == 96.0
        await store.write([again, _status("a", "online", seen=700.0, retained=True,
                                          boot=1, conn=1, ts=95.0)])
        assert (await store.nodes())[0]["last_seen"] == 100.0
        # First heard of through a retained document: when it said it; never in the future.
        await store.write([_status("b", "online", seen=700.0, retained=True, boot=1, conn=1,
                                   ts=650.0),
                           _status("c", "online", seen=700.0, retained=True, boot=1, conn=1,
                                   ts=9000.0)])
        rows = {r["node"]: r for r in await store.nodes()}
        assert rows["b"]["last_seen"] == 650.0 and rows["c"]["last_seen"] == 700.0
    finally:
        await store.close()
