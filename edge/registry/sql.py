"""The registry's one table and its statements, for SQLite and PostgreSQL alike.

Both dialects get the same schema and the same conditional upserts: an
INSERT ... ON CONFLICT DO UPDATE whose SET keeps the stored values unless the
incoming document is newer, so a late, older document never wins, whichever
worker writes it. `last_seen` always moves to the greatest of both; only what
the node itself says moves it (an online status, a reported document).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "COLUMNS",
    "KEYS",
    "LIST_COLUMNS",
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "columns_of",
    "create_table",
    "mark_published",
    "put_desired",
    "select_desired",
    "select_nodes",
    "upsert",
]

# column -> (type, PostgreSQL array element type)
COLUMNS: dict[str, str] = {
    "node": "text",
    "last_seen": "float8",
    "status": "blob",
    "status_boot": "float8",
    "status_conn": "int8",
    "status_offline": "int8",
    "status_ts": "float8",
    "heartbeat": "float8",
    "queue_depth": "int8",
    "oldest_age": "float8",
    "reported": "blob",
    "reported_version": "int8",
    "profile": "text",
    "agent": "text",
    "labels": "text",
    "services_up": "int8",
    "services_total": "int8",
    "desired_applied": "int8",
    "desired_rejected": "text",
    "desired_failed": "int8",
    "desired": "blob",
    "desired_version": "int8",
    "desired_published": "int8",
}

# What each kind of document writes, and the columns that order it (compared as a row).
WRITES: dict[str, tuple[str, ...]] = {
    "status": ("status", "status_boot", "status_conn", "status_offline", "status_ts",
               "heartbeat", "queue_depth", "oldest_age"),
    "reported": ("reported", "reported_version", "profile", "agent", "labels", "services_up",
                 "services_total", "desired_applied", "desired_rejected", "desired_failed"),
    "desired": ("desired", "desired_version"),
}
KEYS: dict[str, tuple[str, ...]] = {
    "status": ("status_boot", "status_conn", "status_offline", "status_ts"),
    "reported": ("reported_version",),
    "desired": ("desired_version",),
}
LIST_COLUMNS = tuple(c for c in COLUMNS if c not in ("status", "reported", "desired"))


@dataclass(frozen=True)
class Dialect:
    """What differs between the two databases."""

    name: str
    types: dict[str, str]
    greatest: str

    def param(self, n: int) -> str:
        """The n-th parameter (1-based)."""
        return f"${n}" if self.name == "postgresql" else f"?{n}"


SQLITE = Dialect("sqlite", {"text": "TEXT", "float8": "REAL", "int8": "INTEGER",
                            "blob": "BLOB"}, "max")
POSTGRES = Dialect("postgresql", {"text": "TEXT", "float8": "DOUBLE PRECISION",
                                  "int8": "BIGINT", "blob": "BYTEA"}, "greatest")


def create_table(d: Dialect) -> str:
    """CREATE TABLE IF NOT EXISTS nodes (...)."""
    cols = ",\n  ".join(
        f"{name} {d.types[kind]}" + (" PRIMARY KEY" if name == "node" else "")
        for name, kind in COLUMNS.items()
    )
    return f"CREATE TABLE IF NOT EXISTS nodes (\n  {cols}\n)"


def _newer(kind: str) -> str:
    keys = KEYS[kind]
    old = ", ".join(f"nodes.{k}" for k in keys)
    new = ", ".join(f"excluded.{k}" for k in keys)
    if len(keys) == 1:
        return f"(nodes.{keys[0]} IS NULL OR {old} < {new})"
    return f"(nodes.{keys[0]} IS NULL OR ({old}) < ({new}))"


def upsert(d: Dialect, kind: str) -> str:
    """The conditional upsert of one kind of document; RETURNING the stored order key.

    SQLite takes one row per execution; PostgreSQL takes arrays, one per column,
    and writes the rows in node order (two workers lock rows in the same order).
    """
    cols = columns_of(kind)
    newer = _newer(kind)
    sets = [f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE nodes.{c} END"
            for c in WRITES[kind]]
    # NULL (a desired document, a Last Will) says nothing of when the node was last heard.
    sets.append(f"last_seen = nullif({d.greatest}(coalesce(nodes.last_seen, 0),"
                f" coalesce(excluded.last_seen, 0)), 0)")
    if kind == "desired":
        # Found on the broker: it is published (also when it is the one stored).
        equal_or_newer = newer.replace(" < ", " <= ")
        sets.append(f"desired_published = CASE WHEN {equal_or_newer} THEN 1"
                    " ELSE nodes.desired_published END")
    names = ", ".join(cols)
    if d.name == "postgresql":
        arrays = ", ".join(f"{d.param(i + 1)}::{d.types[COLUMNS[c]]}[]"
                           for i, c in enumerate(cols))
        source = f"SELECT * FROM unnest({arrays}) AS t({names}) ORDER BY node"
    else:
        source = "VALUES (" + ", ".join(d.param(i + 1) for i in range(len(cols))) + ")"
    return (
        f"INSERT INTO nodes ({names}) {source}\n"
        f"ON CONFLICT (node) DO UPDATE SET {', '.join(sets)}\n"
        f"RETURNING node, {', '.join(KEYS[kind])}"
    )


def columns_of(kind: str) -> tuple[str, ...]:
    """The parameters `upsert(kind)` takes, in order."""
    extra = ("desired_published",) if kind == "desired" else ()
    return ("node", "last_seen", *WRITES[kind], *extra)


def put_desired(d: Dialect) -> str:
    """Store a new desired body; its version is one above the stored and the applied one."""
    p = d.param
    return (
        f"INSERT INTO nodes (node, desired, desired_version, desired_published)"
        f" VALUES ({p(1)}, {p(2)}, 1, 0)\n"
        f"ON CONFLICT (node) DO UPDATE SET desired = excluded.desired,"
        f" desired_version = {d.greatest}(coalesce(nodes.desired_version, 0),"
        f" coalesce(nodes.desired_applied, 0)) + 1, desired_published = 0\n"
        f"RETURNING desired_version"
    )


def mark_published(d: Dialect) -> str:
    """The stored desired document of that version is on the broker."""
    return (f"UPDATE nodes SET desired_published = 1"
            f" WHERE node = {d.param(1)} AND desired_version = {d.param(2)}")


def select_nodes(d: Dialect, *, detail: bool) -> str:
    """Every node's list columns (detail: one node, with its documents)."""
    cols = ", ".join((*LIST_COLUMNS, "status", "reported", "desired") if detail
                     else LIST_COLUMNS)
    if detail:
        return f"SELECT {cols} FROM nodes WHERE node = {d.param(1)}"
    return f"SELECT {cols} FROM nodes ORDER BY node"


def select_desired(d: Dialect) -> str:
    """One node's desired document: version, body, published."""
    return (f"SELECT desired_version, desired, desired_published FROM nodes"
            f" WHERE node = {d.param(1)}")


UNPUBLISHED = ("SELECT node FROM nodes WHERE desired_version IS NOT NULL"
               " AND desired_published = 0 ORDER BY node")
COUNT = "SELECT count(*) FROM nodes"
