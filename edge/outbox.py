"""The durable outbox: every accepted message lives here until the broker PUBACKs it.

Rows are keyed so that SQLite's own rowid order is the send order: the
priority band sits in the high bits (higher priority, smaller band) and the
per-node sequence number in the low 48 bits. Reading the next batch is then a
range scan of the table itself, with no second index to keep up to date.

All writes (new messages, acknowledged deletes, dead letters, expiry) go
through one writer that commits whatever has gathered since its last commit
in one transaction, in one trip to its thread: a burst costs a few fsyncs,
not one per message. Reads go through a second connection (aiosqlite) that
only ever sees committed rows.

When a commit fails (a full disk), the acknowledgements it carried are not
given back to be sent again: they stay in memory, still leased, and go into
the next attempt, which comes after a capped backoff. Meanwhile new messages
are refused at once, and acknowledgements in send order are recorded aside,
in a small preallocated file written in place (`outbox.db.mark`, which needs
no free space): the uplink's window keeps moving and the backlog keeps
draining while the disk is full. A broker's PUBACK is therefore never paid
for with a resend; a crash costs at most the in-flight window, as any crash
does. The file's mark counts only for the database it was written for, and
only until the database's own mark has caught up (a generation in `meta`).

Time: the `ts` and `exp` columns are on the outbox clock, the monotonic clock
plus a base fixed once per boot (kept in `meta` with the boot id), so ages and
expiry follow the time that really passed within a boot, across agent
restarts, whatever steps the wall clock takes. The envelopes keep wall-clock
`ts` and `exp`; one accepted before the clock was synchronised is dated again
when it is read for sending, if it is of this boot (edge/clock.py).

Acknowledged rows mostly leave by a mark, not a delete: rows are sent in key
order and acknowledged in order, so "every row up to key K is acknowledged"
is one small meta write per commit. The rows below the mark are deleted in
bulk later, which frees whole pages instead of rewriting each page as its
rows go one by one (the difference is most of the disk writes per message).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import cbor2

from edge.backoff import Backoff
from edge.clock import ClockSync, boot_id, retime
from edge.envelope import Envelope, new_message_id
from edge.errors import EnvelopeError, MessageTooLarge, QueueFull, StorageError
from edge.settings import QueueSettings

__all__ = ["PRIO_MAX", "PRIO_MIN", "OutRow", "Outbox", "QueueStats"]

log = logging.getLogger("edge.outbox")

T = TypeVar("T")

PRIO_MIN = -1000
PRIO_MAX = 1000
_SEQ_BITS = 48
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_SEQ_RESERVE = 100_000  # seq numbers reserved in the side file at a time
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SWEEP_EVERY = 5.0  # seconds between expiry sweeps
_PURGE_EVERY = 2048  # acknowledged rows left under the mark before a bulk delete
_DEAD_KEEP_ROWS = 1000  # dead letters kept (newest first), and at most this many bytes:
_DEAD_KEEP_BYTES = 16 * 1024 * 1024
_FILE_MODE = 0o640  # the database, its -wal and -shm, and the seq side file
_CORRUPT_KEEP = 3  # corrupt databases kept after being moved aside
_LOG_EVERY = 60.0  # seconds between repeats of one warning (with a count)
_MARK_FILE_BYTES = 4096  # preallocated, so that writing a mark needs no free space
_MARK_RECORD = struct.Struct("<8sQQQ")  # magic, database id, generation, mark; then a CRC32
_MARK_MAGIC = b"edgemark"
_TSU = b"\x63tsu"  # the CBOR text "tsu": only envelopes holding it may need dating again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    k INTEGER PRIMARY KEY,      -- (PRIO_MAX - prio) << 48 | seq
    ts REAL NOT NULL,           -- accepted, on the outbox clock (monotonic + boot base)
    exp REAL,                   -- expiry, on the outbox clock
    topic TEXT NOT NULL,        -- route under the node's cloud topic
    body BLOB NOT NULL          -- the CBOR envelope, exactly as published
);
CREATE INDEX IF NOT EXISTS outbox_exp ON outbox(exp) WHERE exp IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    dead_ts REAL NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _key(prio: int, seq: int) -> int:
    return ((PRIO_MAX - prio) << _SEQ_BITS) | seq


@dataclass(frozen=True, slots=True)
class OutRow:
    """One stored message as the uplink sees it."""

    key: int
    topic: str  # the route under the node's cloud topic, e.g. "up/sensors/t"
    body: bytes  # what to publish: the stored envelope, dated again if it had to be
    exp: float | None  # on the outbox clock
    stored: int = -1  # bytes the stored body takes, when `body` is not it

    @property
    def size(self) -> int:
        """Bytes the row takes in the outbox."""
        return self.stored if self.stored >= 0 else len(self.body)

    @property
    def seq(self) -> int:
        return self.key & _SEQ_MASK

    @property
    def prio(self) -> int:
        return PRIO_MAX - (self.key >> _SEQ_BITS)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of the outbox counters."""

    depth: int
    bytes: int
    oldest_age: float | None
    dropped: int
    expired: int
    dead: int


@dataclass
class _Pending:
    """Writes gathered for the next group commit."""

    inserts: list[tuple[int, float, float | None, str, bytes]] = field(default_factory=list)
    insert_bytes: int = 0
    acks: list[OutRow] = field(default_factory=list)
    dead: list[tuple[OutRow, str]] = field(default_factory=list)
    expired: list[OutRow] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)  # fail with the commit
    held: list[asyncio.Future[None]] = field(default_factory=list)  # wait until recorded

    def __bool__(self) -> bool:
        return bool(self.inserts or self.acks or self.dead or self.expired)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a commit does about acknowledged rows, decided on the loop."""

    mark: int  # the acknowledged-through mark after this commit
    covered: list[OutRow]  # acks the mark now covers: no delete needed
    delete: list[int]  # keys to delete one by one (acks out of order, dead, expired)
    purge_to: int | None  # bulk-delete every row at or below this key first


@dataclass(frozen=True, slots=True)
class _Committed:
    """What one transaction changed, for the in-memory counters."""

    deleted: dict[int, int]  # key -> body bytes, rows that really left
    evicted: dict[int, int]  # key -> body bytes, stored rows dropped to make room
    skipped: dict[int, int]  # key -> body bytes, new rows dropped at once to make room


class Outbox:
    """SQLite-backed queue of envelopes waiting for the uplink."""

    def __init__(
        self,
        path: Path,
        node: str,
        settings: QueueSettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sync: ClockSync | None = None,
    ) -> None:
        """`clock` dates messages, `monotonic` times everything; `sync`, when given, says
        whether the wall clock is synchronised yet (without it, it is taken to be)."""
        self.path = path
        self.node = node
        self.settings = settings
        self._clock = clock
        self._mono = monotonic
        self._sync = sync
        self._boot = sync.boot_id if sync is not None else boot_id()
        self._base = 0.0  # the outbox clock is monotonic + this (set at open, per boot)
        self._base_dirty = False  # a new boot's base, not yet in meta
        self._boot_key = 0  # the boot id as meta stores it
        self._hwm_path = path.with_name(path.name + ".seq")
        self._mark_path = path.with_name(path.name + ".mark")
        self._mark_fd: int | None = None
        self._db_id: int | None = None  # ties the mark file to this database
        self._mark_gen = 0  # meta's generation: a mark file of another one is stale
        self._aside_live = False  # the mark file holds a mark meta does not have yet
        self._ack_upto: dict[asyncio.Future[None], int] = {}  # ack future -> highest key
        self._writer: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._more = asyncio.Event()
        self._leased: set[int] = set()  # rows handed to the uplink and not yet gone
        # A fetch reads a snapshot: rows finished while it read may still be in it, and
        # are no longer leased when it looks. These keys tell it they are gone.
        self._fetching = 0
        self._finished_while_fetching: set[int] = set()
        self._cursor = 0  # fetch reads keys above this; never below the mark
        self._rewinds = 0  # times the cursor went back to the mark, so a fetch can tell
        self._low_insert: int | None = None  # lowest key committed while a fetch reads
        self._mark = 0  # every row with a key up to here is acknowledged
        self._unpurged = 0  # acknowledged rows at or below the mark still stored
        self._bands: dict[int, int] = {}  # priority band -> queued rows
        self._next_seq = 1
        self._reserved = 0
        self._bytes = 0  # committed rows
        self._unsettled_bytes = 0  # submitted inserts whose commit has not finished
        self._dropped = 0
        self._expired = 0
        self._dead = 0
        self.accepted_total = 0  # committed since this process started
        self.sent_total = 0  # acknowledged and deleted since this process started
        self.moved_aside: Path | None = None
        self.moved_aside_ts: float | None = None  # wall clock of the move
        self._carry = _Pending()  # acks, dead letters, expiries a failed commit left to redo
        self._failure: StorageError | None = None  # set while commits fail
        self._failing_since: float | None = None  # wall clock
        self._failing_mono = 0.0
        self._failed_commits = 0
        self._retry = Backoff(settings.retry_initial, settings.retry_max)
        self._retry_at = 0.0  # monotonic: the next attempt while failing
        self._drops_logged_at: float | None = None  # monotonic, the last drop warning
        self._drops_unlogged = 0  # dropped since then
        self._aside_failed = False  # the mark file could not be written (said once)

    # ---- lifecycle -------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the database; a corrupt file is moved aside, never fatal."""
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="outbox-writer")
        try:
            await self._open_db()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                await self.close()
                raise StorageError(f"outbox {self.path}: cannot open: {exc}") from exc
            await self._close_db()
            self.moved_aside = self._move_aside()
            self.moved_aside_ts = self._clock()
            log.error(
                "outbox %s is corrupt (%s); moved it to %s and started a fresh one",
                self.path, exc, self.moved_aside,
            )
            try:
                await self._open_db()
            except sqlite3.Error as exc2:
                await self.close()
                raise StorageError(f"outbox {self.path}: cannot create: {exc2}") from exc2

    async def _open_db(self) -> None:
        await self._in_writer(self._open_writer)
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA cache_size=-2048")

    def _open_writer(self) -> None:
        # SQLite gives the -wal and -shm files the mode of the database file: create
        # it private first, so that none of them is ever readable by others.
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, _FILE_MODE))
        except OSError as exc:  # reported as SQLite would have: "cannot open"
            raise sqlite3.OperationalError(f"{exc.strerror or exc}") from exc
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._writer = db
        sync = {"off": "OFF", "normal": "NORMAL", "full": "FULL"}[self.settings.durability]
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync}")
        db.execute("PRAGMA journal_size_limit=67108864")
        db.execute("PRAGMA cache_size=-2048")  # KiB: keep the page cache small
        # Debian's SQLite zeroes every freed page (SECURE_DELETE), one more page write
        # per page a drain frees; FAST still clears deleted rows inside pages it writes.
        db.execute("PRAGMA secure_delete=FAST")
        db.executescript(_SCHEMA)
        meta = {k: int(v) for k, v in db.execute("SELECT key, value FROM meta")}
        self._mark = self._cursor = meta.get("acked_through", 0)
        self._open_clock(meta)
        self._open_mark_file(db, meta)
        if self._mark:  # acknowledged before the last stop: delete them for good now
            try:
                db.execute("DELETE FROM outbox WHERE k <= ?", (self._mark,))
            except sqlite3.OperationalError as exc:  # a full disk: they go with a later purge
                log.warning("outbox %s: cannot delete acknowledged rows yet: %s", self.path, exc)
                self._unpurged = _PURGE_EVERY
        # This scan reads every page of the table: corruption shows up here, at start.
        rows = db.execute(
            "SELECT k >> ?, count(*), sum(length(body)) FROM outbox WHERE k > ? GROUP BY 1",
            (_SEQ_BITS, self._mark),
        ).fetchall()
        self._bands = {band: n for band, n, _ in rows}
        self._bytes = sum(size for _, _, size in rows)
        kept = db.execute("SELECT count(*) FROM dead").fetchone()[0]
        self._dead = max(meta.get("dead", 0), kept)
        self._dropped = meta.get("dropped", 0)
        self._expired = meta.get("expired", 0)
        # A fresh database (first start, or the old one lost or moved aside) continues
        # from the reserve in the side file, so a seq is never handed out twice.
        self._next_seq = meta["next_seq"] if "next_seq" in meta else self._read_hwm()
        self._reserved = self._next_seq

    def _open_clock(self, meta: dict[str, int]) -> None:
        """The outbox clock's base: this boot's, as stored, or a new one from the wall clock."""
        boot = int.from_bytes(self._boot[:8], "big") >> 1  # fits SQLite's signed integers
        if meta.get("boot") == boot and "base_us" in meta:
            self._base = meta["base_us"] / 1e6
        else:  # the first start in this boot: written with the next commit
            self._base = self._clock() - self._mono()
            self._base_dirty = True
        self._boot_key = boot

    def _open_mark_file(self, db: sqlite3.Connection, meta: dict[str, int]) -> None:
        """Open (or make, preallocated) the mark file; a mark in it for this database counts."""
        self._mark_gen = meta.get("mark_gen", 0)
        self._db_id = meta.get("db_id")
        try:
            if self._db_id is None:
                db_id = secrets.randbits(62) + 1
                db.execute("INSERT INTO meta (key, value) VALUES ('db_id', ?)", (db_id,))
                self._db_id = db_id
            fd = os.open(self._mark_path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except (OSError, sqlite3.OperationalError) as exc:
            log.warning("outbox %s: no mark file (%s): while the disk is full, the backlog"
                        " stops after the in-flight window", self.path, exc)
            return
        try:
            if os.fstat(fd).st_size < _MARK_FILE_BYTES:
                os.pwrite(fd, bytes(_MARK_FILE_BYTES), 0)
                os.fsync(fd)
            raw = os.pread(fd, _MARK_RECORD.size + 4, 0)
        except OSError as exc:
            os.close(fd)
            log.warning("outbox %s: no mark file %s (%s): while the disk is full, the backlog"
                        " stops after the in-flight window", self.path, self._mark_path, exc)
            return
        self._mark_fd = fd
        if len(raw) < _MARK_RECORD.size + 4:
            return
        record, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        if zlib.crc32(record) != crc:
            return  # never written (zeros), or torn: meta's mark stands
        magic, db_id, gen, mark = _MARK_RECORD.unpack(record)
        if magic == _MARK_MAGIC and db_id == self._db_id and gen == self._mark_gen:
            if mark > self._mark:
                self._mark = self._cursor = mark
            self._aside_live = True  # the next commit puts it in meta

    def _write_mark(self, mark: int) -> None:
        """Record `mark` in the mark file, in place (writer thread)."""
        assert self._mark_fd is not None and self._db_id is not None
        record = _MARK_RECORD.pack(_MARK_MAGIC, self._db_id, self._mark_gen, mark)
        os.pwrite(self._mark_fd, record + zlib.crc32(record).to_bytes(4, "little"), 0)
        os.fdatasync(self._mark_fd)

    def _read_hwm(self) -> int:
        try:
            return int(self._hwm_path.read_text().strip() or 1)
        except (OSError, ValueError):
            return 1

    def _write_hwm(self, value: int) -> None:
        tmp = self._hwm_path.with_name(self._hwm_path.name + ".tmp")
        with open(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, _FILE_MODE), "w") as fh:
            fh.write(f"{value}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._hwm_path)

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        try:  # its database is gone: the fresh one starts without a mark
            self._mark_path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete %s: %s", self._mark_path, exc)
        self._prune_moved_aside()
        return target

    def _prune_moved_aside(self) -> None:
        """Keep the newest few corrupt databases for diagnosis; delete the older ones."""
        prefix = f"{self.path.name}.corrupt-"
        stamps = sorted(
            (p for p in self.path.parent.glob(prefix + "*")
             if not p.name.endswith(("-wal", "-shm"))),
            key=lambda p: p.name, reverse=True,  # the stamp sorts by time
        )
        for old in stamps[_CORRUPT_KEEP:]:
            for suffix in ("", "-wal", "-shm"):
                gone = Path(str(old) + suffix)
                try:
                    gone.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("cannot delete the old corrupt outbox %s: %s", gone, exc)
                    continue
            log.warning("deleted the old corrupt outbox %s (the newest %d are kept)",
                        old, _CORRUPT_KEEP)

    async def _close_db(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            try:
                await reader.close()
            except sqlite3.Error:
                log.exception("closing outbox reader %s", self.path)
        if self._writer is not None:
            writer = self._writer
            self._writer = None
            await self._in_writer(writer.close)
        if self._mark_fd is not None:
            fd, self._mark_fd = self._mark_fd, None
            os.close(fd)

    async def close(self) -> None:
        """Commit what is pending and close the database. Safe to call twice."""
        if self._writer is not None and (self._pending or self._carry):
            await self._commit_and_settle(self._take())
        # Acknowledgements still unrecorded: after a restart those rows go out again.
        _settle(self._carry.held, self._failure or StorageError(f"outbox {self.path} closed"))
        self._carry = _Pending()
        await self._close_db()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    async def _in_writer(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise StorageError(f"outbox {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ---- writer ------------------------------------------------------------

    async def run(self) -> None:
        """The single writer: commit whatever has gathered, again and again."""
        sweep_at = time.monotonic() + _SWEEP_EVERY
        while True:
            wait = _SWEEP_EVERY
            if self._failure is not None:
                wait = max(0.0, min(wait, self._retry_at - time.monotonic()))
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._failure is not None and time.monotonic() < self._retry_at:
                # Storage is failing: writes gather until the retry is due, but the
                # acknowledgements in send order are recorded now.
                await self._set_aside()
                continue
            if self.settings.commit_interval > 0 and self._pending:
                await asyncio.sleep(self.settings.commit_interval)
            if time.monotonic() >= sweep_at:
                sweep_at = time.monotonic() + _SWEEP_EVERY
                await self._sweep_expired()
            batch = self._take()
            if batch or self._failure is not None:
                await self._commit_and_settle(batch)
                if self._failure is not None:
                    await self._set_aside()
            else:
                _settle(batch.waiters, None)  # nothing to write: nothing to wait for
                _settle(batch.held, None)

    async def _commit_and_settle(self, batch: _Pending) -> None:
        """Commit and answer the waiters; a stop waits for a commit already under way."""
        commit = asyncio.ensure_future(self._commit(batch, probe=self._failure is not None))
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await asyncio.wait([commit])
            self._settle_batch(batch, commit)
            raise
        except StorageError:
            pass  # the waiters hear of it; the writer lives on and retries
        self._settle_batch(batch, commit)

    def _settle_batch(self, batch: _Pending, commit: asyncio.Future[None]) -> None:
        exc = commit.exception() if not commit.cancelled() else None
        if exc is None and not commit.cancelled():
            _settle(batch.waiters, None)
            _settle(batch.held, None)
            self._note_success(bool(batch.inserts))
            return
        error = exc if isinstance(exc, StorageError) else StorageError(
            f"outbox {self.path}: commit failed: {exc!r}"
        )
        _settle(batch.waiters, error)
        # What the broker acknowledged stays acknowledged: keep it (leased, so it is
        # not sent again) for the next attempt instead of giving the rows back.
        self._carry.acks.extend(batch.acks)
        self._carry.dead.extend(batch.dead)
        self._carry.expired.extend(batch.expired)
        self._carry.held.extend(batch.held)
        self._note_failure(error)

    async def _set_aside(self) -> None:
        """Storage is failing: record the acknowledged-through mark in the mark file.

        Only acknowledgements move it (dead letters and expiries must reach the
        database); what it covers is finished, as after a commit, so the uplink's
        window slots come free. The rest waits in the carry for the next commit.
        """
        carry, pending = self._carry, self._pending
        carry.acks += pending.acks
        carry.dead += pending.dead
        carry.expired += pending.expired
        carry.held += pending.held
        pending.acks, pending.dead, pending.expired, pending.held = [], [], [], []
        if not carry.acks or self._mark_fd is None:
            return
        plan = self._plan(_Pending(acks=list(carry.acks)))
        if plan.mark <= self._mark:
            return
        # Before the write: should this be cut short, the next commit still retires
        # whatever mark the file got (a new generation), so it never outlives meta's.
        self._aside_live = True
        try:
            await self._in_writer(self._write_mark, plan.mark)
        except OSError as exc:
            if not self._aside_failed:
                log.error("outbox %s: cannot write the mark file %s either: %s; the backlog"
                          " stops after the in-flight window until storage works again",
                          self.path, self._mark_path, exc)
            self._aside_failed = True
            return
        self._aside_failed = False
        self.sent_total += len(plan.covered)
        self._bytes -= sum(r.size for r in plan.covered)
        self._unpurged += len(plan.covered)
        self._mark = plan.mark
        for row in plan.covered:
            self._leased.discard(row.key)
            if self._fetching:
                self._finished_while_fetching.add(row.key)
            self._count_band(row.key, -1)
        carry.acks = [r for r in carry.acks if r.key > plan.mark]
        done = [f for f in carry.held if self._ack_upto.get(f, plan.mark + 1) <= plan.mark]
        carry.held = [f for f in carry.held if f not in done]
        _settle(done, None)

    def _note_failure(self, error: StorageError) -> None:
        self._failed_commits += 1
        delay = self._retry.next()
        self._retry_at = time.monotonic() + delay
        if self._failure is None:
            self._failing_since = self._clock()
            self._failing_mono = self._mono()
            log.error(
                "%s; storage is failing: new messages are refused (%s), acknowledgements"
                " in send order are recorded in %s, the others kept in memory until a"
                " commit works again (retrying, at most every %.0fs)",
                error, error.code, self._mark_path.name, self.settings.retry_max,
            )
        self._failure = error

    def _note_success(self, wrote_inserts: bool) -> None:
        if self._failure is not None:
            log.warning(
                "outbox %s: storage works again after %.0fs (%d failed commits);"
                " accepting messages", self.path, self._mono() - self._failing_mono,
                self._failed_commits,
            )
            self._failure = None
            self._failing_since = None
            self._failed_commits = 0
        if wrote_inserts:
            self._retry.reset()  # a probe alone does not prove new rows fit again

    @property
    def storage_error(self) -> tuple[str, float] | None:
        """(message, since) while commits fail, else None."""
        if self._failure is None:
            return None
        return str(self._failure), self._failing_since or self._clock()

    def _take(self) -> _Pending:
        batch, self._pending = self._pending, _Pending()
        if self._carry:
            carry, self._carry = self._carry, _Pending()
            batch.acks[:0] = carry.acks
            batch.dead[:0] = carry.dead
            batch.expired[:0] = carry.expired
            batch.held[:0] = carry.held
        return batch

    def _queue_write(self, *, held: bool = False) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._pending.held if held else self._pending.waiters).append(fut)
        self._wake.set()
        return fut

    async def _commit(self, batch: _Pending, *, probe: bool = False) -> None:
        try:
            if self._next_seq > self._reserved:
                reserve = self._next_seq + _SEQ_RESERVE
                try:
                    await self._in_writer(self._write_hwm, reserve)
                except OSError as exc:
                    raise _storage_error(self.path, exc) from exc
                self._reserved = reserve
            plan = self._plan(batch)
            retire = self._aside_live  # meta takes over the mark file's mark
            base = self._base_dirty
            try:
                done = await self._in_writer(
                    self._write_batch, batch, plan, self._clock(), probe, retire, base
                )
            except sqlite3.Error as exc:
                raise _storage_error(self.path, exc) from exc
        finally:
            self._unsettled_bytes -= batch.insert_bytes
        if retire:
            self._mark_gen += 1
            self._aside_live = False
        if base:
            self._base_dirty = False
        # The transaction is durable: bring the in-memory view up to date.
        self._dropped += len(done.evicted) + len(done.skipped)
        self._expired += sum(r.key in done.deleted for r in batch.expired)
        self._dead += sum(r.key in done.deleted for r, _ in batch.dead)
        self.sent_total += len(plan.covered) + sum(r.key in done.deleted for r in batch.acks)
        self.accepted_total += len(batch.inserts)
        self._bytes += batch.insert_bytes - sum(done.deleted.values())
        self._bytes -= sum(r.size for r in plan.covered)
        self._bytes -= sum(done.evicted.values()) + sum(done.skipped.values())
        self._mark = plan.mark
        self._unpurged = 0 if plan.purge_to is not None else self._unpurged + len(plan.covered)
        for row in (*batch.acks, *(r for r, _ in batch.dead), *batch.expired):
            self._leased.discard(row.key)
            if self._fetching:
                self._finished_while_fetching.add(row.key)
        for k in (*done.deleted, *done.evicted, *(r.key for r in plan.covered)):
            self._count_band(k, -1)
        for k, *_ in batch.inserts:
            if k not in done.skipped:
                self._count_band(k, +1)
        if batch.inserts:
            low = min(k for k, *_ in batch.inserts)
            if low <= self._cursor:
                self._rewind()  # a higher priority arrived behind the cursor
            if self._low_insert is None or low < self._low_insert:
                self._low_insert = low  # a fetch reading now may get past it unseen
            self._more.set()
        if done.evicted or done.skipped:
            self._log_drops(len(done.evicted) + len(done.skipped))

    def _log_drops(self, count: int) -> None:
        """Say it the first time, then at most once a minute with the count since."""
        self._drops_unlogged += count
        now = self._mono()
        if self._drops_logged_at is None:
            log.warning(
                "outbox full (%d bytes max): dropped the %d oldest messages",
                self.settings.max_bytes, self._drops_unlogged,
            )
        elif now - self._drops_logged_at >= _LOG_EVERY:
            log.warning(
                "outbox full (%d bytes max): dropped %d more since %.0fs ago",
                self.settings.max_bytes, self._drops_unlogged, now - self._drops_logged_at,
            )
        else:
            return
        self._drops_logged_at = now
        self._drops_unlogged = 0

    def _plan(self, batch: _Pending) -> _Plan:
        """Move the acknowledged-through mark over the rows this batch finishes.

        Every stored row between the mark and the read cursor is leased (fetched
        and not yet finished), so the mark may pass a leased key once it is gone
        and must stop at the first one that is not, or at a key this batch inserts.
        """
        gone_acks = {r.key for r in batch.acks}
        gone = gone_acks | {r.key for r, _ in batch.dead} | {r.key for r in batch.expired}
        mark, purge_to = self._mark, None
        new_keys = [k for k, *_ in batch.inserts]
        if new_keys and min(new_keys) <= mark:
            # A higher priority arrived below the mark: clear the rows under it, step back.
            purge_to, mark = mark, min(new_keys) - 1
        if gone:
            ahead = sorted(
                k for k in (*self._leased, *new_keys) if mark < k <= self._cursor
            )
            for k in ahead:
                if k not in gone:
                    break
                mark = k
        covered = [
            r for r in batch.acks if self._mark < r.key <= mark and r.key in self._leased
        ]
        delete = [r.key for r in batch.acks if r.key > mark]
        delete += [r.key for r, _ in batch.dead] + [r.key for r in batch.expired]
        if purge_to is None and self._unpurged + len(covered) >= _PURGE_EVERY:
            purge_to = mark
        return _Plan(mark, covered, delete, purge_to)

    def _write_batch(
        self, batch: _Pending, plan: _Plan, now: float, probe: bool = False,
        retire: bool = False, base: bool = False,
    ) -> _Committed:
        """One transaction, run in the writer thread; `probe` writes even when idle,
        `retire` records the mark file's mark (a new generation), `base` this boot's base."""
        db = self._writer
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            # Order matters: rows leaving one by one go first, so RETURNING accounts for
            # every one of them before a bulk delete could sweep them away uncounted.
            if batch.dead:
                db.executemany(
                    "INSERT OR REPLACE INTO dead (seq, ts, dead_ts, topic, reason, body)"
                    " SELECT k & ?, ts, ?, topic, ?, body FROM outbox WHERE k = ?",
                    [(_SEQ_MASK, now, why, r.key) for r, why in batch.dead],
                )
                # Keep the newest dead letters only: they are for diagnosis, not storage.
                db.execute(
                    "DELETE FROM dead WHERE seq IN (SELECT seq FROM ("
                    " SELECT seq, row_number() OVER w AS n, sum(length(body)) OVER w AS b"
                    " FROM dead WINDOW w AS (ORDER BY seq DESC)) WHERE n > ? OR b > ?)",
                    (_DEAD_KEEP_ROWS, _DEAD_KEEP_BYTES),
                )
            deleted: dict[int, int] = {}
            if plan.delete:
                # RETURNING tells which rows really went (an ack can race a re-send).
                deleted = dict(db.execute(
                    "DELETE FROM outbox WHERE k IN (SELECT value FROM json_each(?))"
                    " RETURNING k, length(body)",
                    (json.dumps(plan.delete),),
                ).fetchall())
            if plan.purge_to is not None:
                db.execute("DELETE FROM outbox WHERE k <= ?", (plan.purge_to,))
            evicted = self._evict_for(db, batch.insert_bytes) if batch.inserts else {}
            skipped = self._skip_for(batch, evicted)
            if batch.inserts:
                db.executemany(
                    "INSERT INTO outbox (k, ts, exp, topic, body) VALUES (?, ?, ?, ?, ?)",
                    [row for row in batch.inserts if row[0] not in skipped],
                )
            expired = sum(r.key in deleted for r in batch.expired)
            dead = sum(r.key in deleted for r, _ in batch.dead)
            meta = {
                "next_seq": (self._next_seq, bool(batch.inserts) or probe),
                "dropped": (self._dropped + len(evicted) + len(skipped), bool(evicted or skipped)),
                "expired": (self._expired + expired, bool(expired)),
                "dead": (self._dead + dead, bool(dead)),
                "acked_through": (plan.mark, plan.mark != self._mark or retire),
                "mark_gen": (self._mark_gen + 1, retire),
                "boot": (self._boot_key, base),
                "base_us": (round(self._base * 1e6), base),
            }
            changed = [(key, value) for key, (value, dirty) in meta.items() if dirty]
            if changed:
                # An upsert of an existing key rewrites only the table page, not its index.
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    changed,
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return _Committed(deleted, evicted, skipped)

    def _evict_for(self, db: sqlite3.Connection, incoming: int) -> dict[int, int]:
        """Under drop-oldest, delete the oldest rows of the lowest priority to make room."""
        need = self._bytes + incoming - self.settings.max_bytes
        if need <= 0 or self.settings.on_full != "drop-oldest":
            return {}
        victims: dict[int, int] = {}
        freed = 0
        for band in sorted(self._bands, reverse=True):  # lowest priority first
            start, end = max(band << _SEQ_BITS, self._mark + 1), (band + 1) << _SEQ_BITS
            while freed < need:
                rows = db.execute(
                    "SELECT k, length(body) FROM outbox"
                    " WHERE k >= ? AND k < ? ORDER BY k LIMIT 512",
                    (start, end),
                ).fetchall()
                if not rows:
                    break
                for k, size in rows:
                    start = k + 1
                    if k in self._leased:
                        continue  # on its way to the broker already
                    victims[k] = size
                    freed += size
                    if freed >= need:
                        break
            if freed >= need:
                break
        if victims:
            db.execute(
                "DELETE FROM outbox WHERE k IN (SELECT value FROM json_each(?))",
                (json.dumps(list(victims)),),
            )
        return victims

    def _skip_for(self, batch: _Pending, evicted: dict[int, int]) -> dict[int, int]:
        """A batch larger than the room left drops its own oldest, lowest-priority rows."""
        over = self._bytes - sum(evicted.values()) + batch.insert_bytes - self.settings.max_bytes
        if over <= 0 or self.settings.on_full != "drop-oldest":
            return {}
        skipped: dict[int, int] = {}
        bands: dict[int, list[tuple[int, int]]] = {}
        for k, _, _, _, body in batch.inserts:
            bands.setdefault(k >> _SEQ_BITS, []).append((k, len(body)))
        for band in sorted(bands, reverse=True):
            for k, size in sorted(bands[band]):
                if over <= 0:
                    return skipped
                skipped[k] = size
                over -= size
        return skipped

    def _count_band(self, key: int, delta: int) -> None:
        band = key >> _SEQ_BITS
        left = self._bands.get(band, 0) + delta
        if left > 0:
            self._bands[band] = left
        else:
            self._bands.pop(band, None)

    async def _sweep_expired(self) -> None:
        """Queue expired rows for deletion, so they are counted while offline too."""
        if self._reader is None:
            return
        try:
            rows = await self._reader.execute_fetchall(
                "SELECT k, topic, exp FROM outbox"
                " WHERE exp IS NOT NULL AND exp < ? AND k > ? LIMIT 10000",
                (self._now(), self._mark),
            )
        except sqlite3.Error as exc:
            log.warning("expiry sweep of %s failed: %s", self.path, exc)
            return
        for k, topic, exp in rows:
            if k not in self._leased:
                self._leased.add(k)
                self._pending.expired.append(OutRow(k, topic, b"", exp))

    # ---- producers -------------------------------------------------------

    async def put(
        self,
        topic: str,
        data: Any,
        ct: str,
        prio: int = 0,
        ttl: float | None = None,
        *,
        ts: float | None = None,
        route: str | None = None,
    ) -> Envelope:
        """Accept one message: returns once it is committed to disk."""
        env, committed = self.submit(topic, data, ct, prio, ttl, ts=ts, route=route)
        await committed
        return env

    def submit(
        self,
        topic: str,
        data: Any,
        ct: str,
        prio: int = 0,
        ttl: float | None = None,
        *,
        ts: float | None = None,
        route: str | None = None,
    ) -> tuple[Envelope, asyncio.Future[None]]:
        """Queue one message for the next group commit; the future resolves once durable.

        `route` is where it goes under the node's cloud topic: `up/{topic}` unless given.
        """
        if not PRIO_MIN <= prio <= PRIO_MAX:
            raise EnvelopeError(f"prio must be between {PRIO_MIN} and {PRIO_MAX}, got {prio}")
        wall, mono = self._clock(), self._mono()
        now = wall if ts is None else ts
        at = mono - (wall - now)  # the monotonic reading `now` stands for
        if ttl is None and self.settings.default_ttl > 0:
            ttl = self.settings.default_ttl
        exp = now + ttl if ttl else None
        seq = self._next_seq
        unsynced = self._sync is not None and not self._sync.synced
        env = Envelope(
            id=new_message_id(now), node=self.node, seq=seq, ts=now, topic=topic,
            ct=ct, data=data, prio=prio, exp=exp, tsu=unsynced,
            mono=at if unsynced else None, bootid=self._boot if unsynced else None,
        )
        body = env.encode()
        size = len(body)
        if self._failure is not None:
            # Refused at once: a commit now would fail as the last ones did.
            raise StorageError(
                f"{self._failure}; the message was not accepted", self._failure.code
            )
        limit = min(self.settings.max_message_bytes, self.settings.max_bytes)
        if size > limit:
            key = ("max_message_bytes" if limit == self.settings.max_message_bytes
                   else "max_bytes, the whole queue's size")
            raise MessageTooLarge(
                f"message of {size} bytes exceeds the limit of {limit} bytes ([queue] {key})")
        if self.settings.on_full == "reject":
            if self._bytes + self._unsettled_bytes + size > self.settings.max_bytes:
                raise QueueFull(
                    f"outbox is full ({self._bytes} of {self.settings.max_bytes} bytes,"
                    " on_full = reject); the message was not accepted"
                )
        self._next_seq = seq + 1
        route = f"up/{topic}" if route is None else route
        # Stored on the outbox clock: ages and expiry ignore wall-clock steps.
        stored_ts = at + self._base
        stored_exp = stored_ts + ttl if ttl else None
        self._pending.inserts.append((_key(prio, seq), stored_ts, stored_exp, route, body))
        self._pending.insert_bytes += size
        self._unsettled_bytes += size
        return env, self._queue_write()

    # ---- the uplink's side -------------------------------------------------

    async def fetch(self, limit: int) -> list[OutRow]:
        """Lease up to `limit` rows in send order; expired rows are dropped on the way."""
        db = self._require_reader()
        self._more.clear()
        out: list[OutRow] = []
        expired: list[OutRow] = []
        # Rows at or below the mark are finished but may still be stored (bulk-deleted
        # later): never read them, even when a rewind sent the cursor to an older mark.
        cursor, rewinds = max(self._cursor, self._mark), self._rewinds
        self._low_insert = None
        now = self._now()
        # Nothing is leased until the last read is done: a fetch cancelled between two
        # reads (its connection died) must not leave rows leased that nobody holds.
        self._fetching += 1
        try:
            cursor = await self._read_rows(db, cursor, limit, out, expired, now)
        finally:
            self._fetching -= 1
            finished = self._finished_while_fetching
            if not self._fetching:
                self._finished_while_fetching = set()
        out = [r for r in out if r.key not in finished]
        expired = [r for r in expired if r.key not in finished]
        self._leased.update(row.key for row in (*out, *expired))
        if self._low_insert is not None and self._low_insert <= cursor:
            # A row committed while we read lies behind where we got to (a higher
            # priority, or a read that began before its commit): scan again from the mark.
            self._rewind()
        elif rewinds == self._rewinds:
            self._cursor = cursor
        # else: a release sent the cursor back while we read; the next fetch scans
        # again from the mark and skips what this one leased.
        if expired:
            self._pending.expired.extend(expired)
            self._wake.set()
        offset = None if self._sync is None else self._sync.offset
        if offset is not None:  # synchronised: date again what was accepted before
            out = [self._dated(row, offset) for row in out]
        return out

    def _dated(self, row: OutRow, offset: float) -> OutRow:
        """The row with its envelope dated by this boot's synchronised clock, if marked."""
        if _TSU not in row.body:
            return row
        try:  # our own frame, written by encode(): no need for the bounded decoder
            envelope = cbor2.loads(row.body)
        except Exception:  # cbor2 raises several unrelated types; send it as it is
            return row
        if not isinstance(envelope, dict):
            return row
        if not retime(envelope, self._boot, offset):
            return row  # another boot's: its mark stays
        return dataclasses.replace(
            row, body=bytes(cbor2.dumps(envelope)), stored=len(row.body))

    async def _read_rows(
        self, db: aiosqlite.Connection, cursor: int, limit: int, out: list[OutRow],
        expired: list[OutRow], now: float,
    ) -> int:
        """Read unleased rows above `cursor` into `out` / `expired`; returns the new cursor."""
        while len(out) < limit:
            try:
                rows = await db.execute_fetchall(
                    "SELECT k, topic, body, exp FROM outbox WHERE k > ? ORDER BY k LIMIT ?",
                    (cursor, limit - len(out) + len(self._leased)),
                )
            except sqlite3.Error as exc:
                raise StorageError(f"outbox {self.path}: read failed: {exc}") from exc
            if not rows:
                break
            for k, topic, body, exp in rows:
                cursor = k
                if k in self._leased:
                    continue
                row = OutRow(k, topic, body, exp)
                if exp is not None and exp < now:
                    expired.append(row)
                    continue
                out.append(row)
                if len(out) >= limit:
                    break
        return cursor

    async def wait_more(self) -> None:
        """Wait until a commit adds rows (call after `fetch` came back short)."""
        await self._more.wait()

    def release(self, rows: Iterable[OutRow]) -> None:
        """Give leased rows back unsent (the connection dropped): they go out again."""
        for row in rows:
            self._leased.discard(row.key)
        self._rewind()
        self._more.set()

    def _rewind(self) -> None:
        self._cursor = self._mark
        self._rewinds += 1

    def ack(self, rows: list[OutRow]) -> asyncio.Future[None]:
        """Delete rows the broker acknowledged; the future resolves once committed."""
        self._pending.acks.extend(rows)
        fut = self._queue_write(held=True)
        if rows:  # a mark set aside past its highest key finishes it early
            self._ack_upto[fut] = max(r.key for r in rows)
            fut.add_done_callback(self._forget_ack)
        return fut

    def _forget_ack(self, fut: asyncio.Future[None]) -> None:
        self._ack_upto.pop(fut, None)

    def dead_letter(self, row: OutRow, reason: str) -> asyncio.Future[None]:
        """Move a row the broker refuses to the dead-letter table, with the reason."""
        log.error("message seq %d (%s) dead-lettered: %s", row.seq, row.topic, reason)
        self._pending.dead.append((row, reason))
        return self._queue_write(held=True)

    def set_policy(self, *, on_full: str, max_bytes: int, default_ttl: float) -> None:
        """Change the full-queue policy, the size cap and the default TTL while running.

        A smaller cap under drop-oldest evicts at the next commit; under reject it
        refuses new messages until the queue drains below it.
        """
        self.settings = dataclasses.replace(
            self.settings, on_full=on_full, max_bytes=max_bytes, default_ttl=default_ttl,
        )
        self._wake.set()

    # ---- reading -----------------------------------------------------------

    async def stats(self) -> QueueStats:
        """Counters for `status` and `queue`."""
        oldest: float | None = None
        reader = self._require_reader()
        for band in list(self._bands):
            # The first row of each band is its oldest: a seek, not a scan.
            rows = await reader.execute_fetchall(
                "SELECT ts FROM outbox WHERE k >= ? ORDER BY k LIMIT 1",
                (max(band << _SEQ_BITS, self._mark + 1),),
            )
            for (ts,) in rows:
                oldest = ts if oldest is None else min(oldest, ts)
        return QueueStats(
            depth=sum(self._bands.values()),
            bytes=self._bytes,
            oldest_age=None if oldest is None else max(0.0, self._now() - oldest),
            dropped=self._dropped,
            expired=self._expired,
            dead=self._dead,
        )

    def by_priority(self) -> dict[int, int]:
        """Queued message count per priority, highest first."""
        return {PRIO_MAX - band: n for band, n in sorted(self._bands.items())}

    async def dead_kept(self) -> int:
        """How many dead letters the table still holds."""
        rows = await self._require_reader().execute_fetchall("SELECT count(*) FROM dead")
        return int(next(iter(rows))[0])

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters, for `edge queue`."""
        rows = await self._require_reader().execute_fetchall(
            "SELECT seq, ts, dead_ts, topic, reason, length(body), body FROM dead"
            " ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        out = []
        for seq, ts, dead_ts, route, reason, size, body in rows:
            try:
                env = Envelope.decode(body)
                msg_id, topic = env.id.hex(), env.topic
            except EnvelopeError:
                msg_id, topic = None, route
            out.append({"seq": seq, "id": msg_id, "topic": topic, "reason": reason,
                        "ts": ts, "dead_ts": dead_ts, "bytes": size})
        return out

    def _now(self) -> float:
        """The outbox clock: the monotonic clock on this boot's base."""
        return self._mono() + self._base

    def _require_reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StorageError(f"outbox {self.path} is not open")
        return self._reader


def _settle(waiters: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for fut in waiters:
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)


def _storage_error(path: Path, exc: Exception) -> StorageError:
    full = "full" in str(exc).lower() or getattr(exc, "errno", None) == 28
    code = "storage_full" if full else "storage_error"
    return StorageError(f"outbox {path}: commit failed: {exc}", code)

