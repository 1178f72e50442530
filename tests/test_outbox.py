"""The outbox against real SQLite files: order, durability, limits, expiry, corruption."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from edge.clock import ClockSync
from edge.envelope import Envelope
from edge.errors import EnvelopeError, QueueFull, StorageError
from edge.outbox import Outbox, OutRow
from edge.settings import QueueSettings


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def opened(
    path: Path, clock: Callable[[], float] | None = None, *,
    monotonic: Callable[[], float] | None = None, sync: ClockSync | None = None,
    **queue: object,
) -> AsyncIterator[Outbox]:
    """An open outbox with its writer running; `clock` is also the monotonic clock unless
    one is given (moving it moves time as the outbox measures it too)."""
    clock = clock or Clock()
    box = Outbox(path, "node-a", QueueSettings(**queue), clock=clock,  # type: ignore[arg-type]
                 monotonic=monotonic or clock, sync=sync)
    await box.open()
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(box.run())
        try:
            yield box
        finally:
            writer.cancel()
    await box.close()


async def drain(box: Outbox) -> list[Envelope]:
    """Fetch and acknowledge everything, in send order."""
    out: list[Envelope] = []
    while rows := await box.fetch(100):
        out += [Envelope.decode(r.body) for r in rows]
        await box.ack(rows)
    return out


async def test_fifo_within_priority_and_higher_priority_first(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db") as box:
        for i in range(5):
            await box.put("low", str(i), "text/plain")
        await box.put("high", "h1", "text/plain", prio=5)
        await box.put("mid", "m", "text/plain", prio=1)
        await box.put("high", "h2", "text/plain", prio=5)
        await box.put("neg", "n", "text/plain", prio=-3)
        sent = await drain(box)
    assert [e.data for e in sent] == ["h1", "h2", "m", "0", "1", "2", "3", "4", "n"]


async def test_higher_priority_arriving_mid_stream_jumps_the_read_cursor(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db") as box:
        for i in range(10):
            await box.put("t", str(i), "text/plain")
        first = await box.fetch(3)
        await box.put("t", "urgent", "text/plain", prio=9)
        nxt = await box.fetch(1)
        assert Envelope.decode(nxt[0].body).data == "urgent"
        await box.ack(first + nxt)
        rest = await drain(box)
    assert [e.data for e in rest] == [str(i) for i in range(3, 10)]


async def test_seq_survives_restart_and_is_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with opened(path) as box:
        seqs = [(await box.put("t", "x", "text/plain")).seq for _ in range(3)]
        await drain(box)
    async with opened(path) as box:
        later = (await box.put("t", "x", "text/plain")).seq
    assert seqs == [1, 2, 3]
    assert later == 4


async def test_committed_rows_survive_a_reopen_and_leased_ones_come_back(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with opened(path) as box:
        for i in range(4):
            await box.put("t", str(i), "text/plain")
        leased = await box.fetch(2)  # sent, never acknowledged
        assert len(leased) == 2
    async with opened(path) as box:
        assert (await box.stats()).depth == 4
        assert [e.data for e in await drain(box)] == ["0", "1", "2", "3"]


async def test_released_rows_are_sent_again_and_not_duplicated_in_one_fetch(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db") as box:
        for i in range(5):
            await box.put("t", str(i), "text/plain")
        a = await box.fetch(3)
        box.release(a[1:])  # connection dropped with two unacknowledged
        b = await box.fetch(10)
        assert [Envelope.decode(r.body).data for r in b] == ["1", "2", "3", "4"]


async def test_a_rewind_during_an_ack_commit_does_not_send_the_acked_row_again(
        tmp_path: Path) -> None:
    """An acknowledged row below the mark stays stored until a bulk delete: never re-read.

    The ack's commit plans to move the mark over the row (it is covered, not
    deleted); while that commit is being written, a release sends the cursor back
    to the mark of that moment, below the row. The writer thread is held at that
    point so the interleaving happens every time.
    """
    async with opened(tmp_path / "o.db") as box:
        for i in range(3):
            await box.put("t", str(i), "text/plain")
        first, _second = await box.fetch(2)
        writing, go_on = threading.Event(), threading.Event()
        write_batch = box._write_batch

        def held_write(*args: Any) -> Any:
            writing.set()
            go_on.wait(10)
            return write_batch(*args)

        box._write_batch = held_write  # type: ignore[method-assign]
        committed = box.ack([first])
        assert await asyncio.to_thread(writing.wait, 10)
        box.release([])  # the cursor goes back to the mark, still below `first`
        go_on.set()
        await committed
        again = await box.fetch(10)
        assert [Envelope.decode(r.body).data for r in again] == ["2"]  # `_second` is leased


async def test_ack_of_an_already_deleted_row_does_not_corrupt_counters(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db") as box:
        await box.put("t", "x", "text/plain")
        rows = await box.fetch(1)
        await box.ack(rows)
        await box.ack(rows)  # a duplicate PUBACK after a re-send
        stats = await box.stats()
    assert (stats.depth, stats.bytes) == (0, 0)


async def test_drop_oldest_evicts_lowest_priority_oldest_first(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db", max_bytes=4000, on_full="drop-oldest") as box:
        await box.put("keep", "alarm", "text/plain", prio=5)
        for i in range(100):
            await box.put("t", f"{i:04d}" + "x" * 60, "text/plain")
        stats = await box.stats()
        sent = await drain(box)
    assert stats.bytes <= 4000
    assert stats.dropped > 0 and stats.dropped + stats.depth == 101
    assert sent[0].data == "alarm"
    tail = [e.data[:4] for e in sent[1:]]
    assert tail == [f"{i:04d}" for i in range(100 - len(tail), 100)]


async def test_drops_are_logged_once_then_once_a_minute_with_the_count_since(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    with caplog.at_level("WARNING", logger="edge.outbox"):
        async with opened(tmp_path / "o.db", clock, max_bytes=4000) as box:
            for i in range(200):  # one commit each: most of them drop a row
                await box.put("t", f"{i:04d}" + "x" * 60, "text/plain")
            first = (await box.stats()).dropped
            clock.now += 61
            await box.put("t", "y" * 64, "text/plain")
            total = (await box.stats()).dropped
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert first > 100 and len(lines) == 2, lines
    assert "dropped the 1 oldest" in lines[0]
    assert f"dropped {total - 1} more since" in lines[1]


async def test_reject_refuses_when_full_and_keeps_what_it_accepted(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db", max_bytes=2000, on_full="reject") as box:
        accepted = []
        with pytest.raises(QueueFull):
            for i in range(100):
                accepted.append((await box.put("t", f"{i}" + "x" * 60, "text/plain")).seq)
        stats = await box.stats()
        sent = await drain(box)
    assert 0 < len(accepted) < 100
    assert stats.dropped == 0
    assert [e.seq for e in sent] == accepted


async def test_expired_messages_are_dropped_unsent_and_counted(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path / "o.db", clock=clock) as box:
        await box.put("t", "short", "text/plain", ttl=10)
        await box.put("t", "long", "text/plain", ttl=1000)
        await box.put("t", "forever", "text/plain")
        clock.now += 60
        sent = await drain(box)
        await asyncio.sleep(0.05)  # the expiry delete commits with the next batch
        stats = await box.stats()
    assert [e.data for e in sent] == ["long", "forever"]
    assert stats.expired == 1


async def test_default_ttl_applies_to_messages_without_one(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path / "o.db", clock=clock, default_ttl=5.0) as box:
        env = await box.put("t", "x", "text/plain")
    assert env.exp == clock.now + 5.0


async def test_oversized_message_is_refused(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db", max_message_bytes=100) as box:
        with pytest.raises(EnvelopeError, match="exceeds"):
            await box.put("t", "x" * 200, "text/plain")


async def test_dead_letters_keep_the_reason_and_leave_the_queue(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db") as box:
        for i in range(3):
            await box.put("t", str(i), "text/plain")
        rows = await box.fetch(3)
        await box.dead_letter(rows[1], "too big for the broker")
        await box.ack([rows[0], rows[2]])
        dead = await box.dead_letters()
        stats = await box.stats()
    assert [(d["seq"], d["topic"], d["reason"]) for d in dead] == [
        (2, "t", "too big for the broker")
    ]
    assert (stats.depth, stats.dead) == (0, 1)


async def test_a_burst_shares_commits(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db") as box:
        pending = [box.submit("t", str(i), "text/plain")[1] for i in range(500)]
        await asyncio.gather(*pending)
        # One commit took them all: they were gathered before the writer ran.
        assert box.accepted_total == 500
        assert (await box.stats()).depth == 500


async def test_corrupt_database_is_moved_aside_and_a_fresh_one_used(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with opened(path) as box:
        for _ in range(5):
            await box.put("t", "x", "text/plain")
    path.write_bytes(b"this is not a database" * 100)
    async with opened(path) as box:
        env = await box.put("t", "after", "text/plain")
        assert box.moved_aside is not None and box.moved_aside.exists()
        assert "corrupt" in box.moved_aside.name
        assert (await box.stats()).depth == 1
    assert env.seq > 5  # the seq reserve outlives the database


def _corrupt(path: Path, *, make: bool) -> None:
    """Write a corrupt database (make), or clear the fresh one away."""
    if make:
        path.write_bytes(b"this is not a database" * 100)
        return
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _corrupt_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "corrupt" in p.name)


async def test_only_the_three_newest_corrupt_databases_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    clock = Clock()
    for _ in range(5):
        _corrupt(path, make=True)
        clock.now += 10
        async with opened(path, clock) as box:
            assert box.moved_aside is not None and box.moved_aside_ts == clock.now
        _corrupt(path, make=False)
    newest = [time.strftime("%Y%m%dT%H%M%S", time.gmtime(clock.now - 10 * i)) for i in (2, 1, 0)]
    assert _corrupt_names(tmp_path) == [f"o.db.corrupt-{stamp}" for stamp in newest]


async def test_open_fails_clearly_when_the_directory_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    box = Outbox(blocker / "o.db", "n", QueueSettings())
    with pytest.raises(OSError):
        await box.open()


def test_table_order_needs_no_index_for_sending(tmp_path: Path) -> None:
    """The send query walks the table's own key: no sort step in the plan."""
    db = sqlite3.connect(tmp_path / "x.db")
    db.execute("CREATE TABLE outbox (k INTEGER PRIMARY KEY, body BLOB)")
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT k, body FROM outbox WHERE k > 0 ORDER BY k LIMIT 5"
    ).fetchall()
    assert not any("TEMP B-TREE" in str(row) for row in plan)


def _set_trigger(path: Path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.executescript(sql)
    db.commit()
    db.close()


async def _wait_storage(box: Outbox, failing: bool) -> None:
    """Poll until the outbox says its storage fails (or works), for 5 s at most."""
    for _ in range(500):
        if (box.storage_error is not None) == failing:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"storage_error still {box.storage_error!r}")


async def test_a_failed_commit_answers_its_waiters_and_the_writer_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with opened(path, retry_initial=0.05, retry_max=0.1) as box:
        await box.put("t", "before", "text/plain")
        # Make the next transaction fail: a trigger that aborts inserts.
        _set_trigger(path, "CREATE TRIGGER no_more BEFORE INSERT ON outbox"
                           " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;")
        with pytest.raises(StorageError, match="disk on fire"):
            await box.put("t", "refused", "text/plain")
        failing = box.storage_error
        assert failing is not None and "disk on fire" in failing[0]
        with pytest.raises(StorageError, match="not accepted"):  # at once, no commit
            box.submit("t", "refused too", "text/plain")
        _set_trigger(path, "DROP TRIGGER no_more;")
        await _wait_storage(box, failing=False)
        await box.put("t", "after", "text/plain")
        sent = await drain(box)
    assert [e.data for e in sent] == ["before", "after"]


_NO_META = ("CREATE TRIGGER no_meta BEFORE UPDATE ON meta"
            " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;"
            "CREATE TRIGGER no_meta_insert BEFORE INSERT ON meta"
            " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;")


async def _five_leased_then_meta_fails(box: Outbox, path: Path) -> list[OutRow]:
    """Five rows in the outbox and leased; from now on no commit can record a mark."""
    for i in range(5):
        await box.put("t", f"m{i}", "text/plain")
    rows = await box.fetch(10)
    assert len(rows) == 5
    _set_trigger(path, _NO_META)
    return rows


async def _ack_aside(box: Outbox, rows: list[OutRow]) -> None:
    """Acknowledge rows while commits fail: the ack finishes once the mark file has it."""
    acked = box.ack(rows)
    await _wait_storage(box, failing=True)
    async with asyncio.timeout(5):
        await acked


async def test_an_ack_whose_commit_fails_is_recorded_aside_and_never_resent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    async with opened(path, retry_initial=0.05, retry_max=0.1) as box:
        # Recording the acknowledgement (the mark in meta) fails, as on a full disk:
        # the mark goes to the mark file instead, and the ack is finished.
        await _ack_aside(box, await _five_leased_then_meta_fails(box, path))
        await asyncio.sleep(0.3)  # several retries fail meanwhile
        assert box.storage_error is not None
        assert await box.fetch(10) == [], "acknowledged rows were handed out again"
        assert (await box.stats()).depth == 0
    async with opened(path) as box:  # a restart while the database still fails
        assert (await box.stats()).depth == 0
        assert await box.fetch(10) == [], "the mark file's mark was not taken at start"
    _set_trigger(path, "DROP TRIGGER no_meta; DROP TRIGGER no_meta_insert;")
    async with opened(path) as box:
        await box.put("t", "after", "text/plain")  # a commit: meta takes over the mark
    (tmp_path / "o.db.mark").unlink()
    async with opened(path) as box:
        assert [e.data for e in await drain(box)] == ["after"]


async def test_an_ack_set_aside_then_a_commit_that_works_leaves_nothing_to_resend(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    async with opened(path, retry_initial=0.05, retry_max=0.1) as box:
        rows = await _five_leased_then_meta_fails(box, path)
        await _ack_aside(box, rows[:3])
        _set_trigger(path, "DROP TRIGGER no_meta; DROP TRIGGER no_meta_insert;")
        await _wait_storage(box, failing=False)
        async with asyncio.timeout(5):
            await box.ack(rows[3:])
        assert (await box.stats()).depth == 0
    async with opened(path) as box:
        assert await box.fetch(10) == []


def _put_in_place(src: Path, dst: Path) -> None:
    """Move database `src` (with its -wal and -shm) to `dst`, replacing what is there."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(dst) + suffix).unlink(missing_ok=True)
        if Path(str(src) + suffix).exists():
            Path(str(src) + suffix).replace(Path(str(dst) + suffix))


async def test_a_mark_file_of_another_database_is_ignored(tmp_path: Path) -> None:
    path, other = tmp_path / "o.db", tmp_path / "other" / "o.db"
    async with opened(path, retry_initial=0.05, retry_max=0.1) as box:
        await _ack_aside(box, await _five_leased_then_meta_fails(box, path))  # o.db.mark only
    async with opened(other) as box:  # another database, its keys below that mark
        for i in range(3):
            await box.put("t", f"new{i}", "text/plain")
    _put_in_place(other, path)  # the mark file stays
    assert (tmp_path / "o.db.mark").exists()
    async with opened(path) as box:
        assert [e.data for e in await drain(box)] == ["new0", "new1", "new2"]


async def test_dead_letters_are_capped_newest_kept_and_all_counted(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.db") as box:
        await asyncio.gather(*(box.submit("t", str(i), "text/plain")[1] for i in range(1100)))
        rows = []
        while batch := await box.fetch(200):
            rows += batch
        assert len(rows) == 1100
        await asyncio.gather(*(box.dead_letter(row, "refused") for row in rows))
        assert await box.ack([]) is None  # an empty write is answered, not left hanging
        kept = await box.dead_kept()
        newest = await box.dead_letters(limit=1)
        stats = await box.stats()
    assert kept == 1000
    assert newest[0]["seq"] == 1100
    assert (stats.dead, stats.depth) == (1100, 0)


def _stored_keys(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


async def test_acknowledged_rows_stay_gone_across_a_restart_before_any_bulk_delete(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    async with opened(path) as box:
        for i in range(10):
            await box.put("t", str(i), "text/plain")
        rows = await box.fetch(10)
        await box.ack(rows)
        assert (await box.stats()).depth == 0
        # Covered by the acknowledged-through mark, not deleted one by one yet.
        assert _stored_keys(path) == 10
    async with opened(path) as box:
        assert (await box.stats()).depth == 0
        assert await drain(box) == []
        await box.put("t", "next", "text/plain")
        assert [e.data for e in await drain(box)] == ["next"]
    assert _stored_keys(path) <= 1


async def test_out_of_order_acks_and_a_priority_arriving_below_the_mark(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with opened(path) as box:
        for i in range(10):
            await box.put("t", str(i), "text/plain")
        rows = await box.fetch(6)
        await box.ack(rows[3:5])  # acknowledged out of order: deleted one by one
        await box.ack(rows[:3])  # now the mark passes 0..4
        await box.put("t", "urgent", "text/plain", prio=7)  # sorts before the mark
        await box.ack(rows[5:])
        rest = await drain(box)
        stats = await box.stats()
    assert [e.data for e in rest] == ["urgent", "6", "7", "8", "9"]
    assert (stats.depth, stats.bytes) == (0, 0)
    async with opened(path) as box:
        assert (await box.stats()).depth == 0
        assert await drain(box) == []


async def test_a_bulk_delete_in_the_same_commit_as_a_dead_letter_keeps_counts_exact(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path / "o.db") as box:
        await asyncio.gather(*(box.submit("t", str(i), "text/plain")[1] for i in range(2100)))
        rows = []
        while batch := await box.fetch(500):
            rows += batch
        # One commit: enough acks for a bulk delete, and a dead letter under the mark.
        done = [box.ack(rows[:2050]), box.dead_letter(rows[2050], "refused"),
                box.ack(rows[2051:])]
        await asyncio.gather(*done)
        stats = await box.stats()
        dead = await box.dead_letters()
    assert (stats.depth, stats.bytes, stats.dead) == (0, 0, 1)
    assert [(d["seq"], d["reason"]) for d in dead] == [(2051, "refused")]
    assert dead[0]["ts"] > 0


async def test_a_fetch_cancelled_between_its_reads_leaves_no_row_leased(tmp_path: Path) -> None:
    # The uplink's pump is cancelled whenever its connection dies, wherever it is: a
    # fetch cut off after its first read must not keep rows that nobody will send.
    async with opened(tmp_path / "o.db") as box:
        for i in range(5):
            await box.put("t", str(i), "text/plain")
        cut_between_reads = 0
        for attempt in range(400):
            task = asyncio.create_task(box.fetch(10))  # 5 stored: a second read comes back empty
            for _ in range(attempt % 40):
                await asyncio.sleep(0)
            if attempt >= 40:
                await asyncio.sleep((attempt % 40) * 2e-5)
            task.cancel()
            try:
                rows = await task
            except asyncio.CancelledError:
                rows = []
                cut_between_reads += 1
            box.release(rows)  # what the uplink does with what it held
            again = await box.fetch(10)
            assert [Envelope.decode(r.body).data for r in again] == [str(i) for i in range(5)], (
                f"attempt {attempt}: rows stuck after a cancelled fetch"
            )
            box.release(again)
        assert cut_between_reads > 0


async def test_a_higher_priority_committed_while_a_fetch_reads_is_not_skipped(
    tmp_path: Path,
) -> None:
    # A read that began before a commit and ends after it moves the cursor past
    # the new row's key: the next fetch must still find that row. Many leased
    # rows below the cursor make each read slow enough for a commit to land inside.
    async with opened(tmp_path / "o.db") as box:
        for i in range(3000):
            box.submit("t", f"held-{i}", "text/plain", 0, None)
        await box.put("t", "held-last", "text/plain")
        held = await box.fetch(3001)
        assert len(held) == 3001
        skipped = 0
        for attempt in range(60):
            await box.put("t", f"rewind-{attempt}", "text/plain", prio=5)
            reading = asyncio.create_task(box.fetch(10))
            await asyncio.sleep(0)
            await box.put("t", f"urgent-{attempt}", "text/plain", prio=6)
            rows = await reading
            rows += await box.fetch(10)
            got = {Envelope.decode(r.body).data for r in rows}
            skipped += f"urgent-{attempt}" not in got
            assert f"rewind-{attempt}" in got
            await box.ack(rows)
        assert skipped == 0, f"{skipped} of 60 urgent rows skipped by a fetch"
