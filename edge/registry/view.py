"""A stored node as the HTTP API shows it (NODE in docs/registry.md): pure functions."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

import cbor2

from edge.registry.health import HealthPolicy, classify

__all__ = ["jsonable", "node_detail", "node_summary"]


def jsonable(value: Any, depth: int = 0) -> Any:
    """A decoded CBOR value as JSON can carry it (bytes as base64, odd floats as null)."""
    if depth > 32:
        return None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, depth + 1) for v in value]
    return str(value)


def _loads_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _loads_cbor(blob: bytes | None) -> Any:
    if blob is None:
        return None
    try:
        return jsonable(cbor2.loads(bytes(blob)))
    except Exception:  # stored once valid; never let one row break a page
        return None


def node_summary(row: Mapping[str, Any], *, now: float, policy: HealthPolicy) -> dict[str, Any]:
    """NODE: the fleet-list fields of one stored row."""
    online = None if row["status_offline"] is None else not row["status_offline"]
    return {
        "node": row["node"],
        "health": classify(online=online, last_seen=row["last_seen"],
                           heartbeat=row["heartbeat"], queue_depth=row["queue_depth"],
                           oldest_age=row["oldest_age"], now=now, policy=policy),
        "online": bool(online),
        "last_seen": row["last_seen"],
        "reported_version": row["reported_version"],
        "desired_version": row["desired_version"],
        "desired_applied": row["desired_applied"],
        "queue_depth": row["queue_depth"],
        "oldest_age": row["oldest_age"],
        "services_up": row["services_up"],
        "services_total": row["services_total"],
        "profile": row["profile"],
        "agent": row["agent"],
        "labels": _loads_json(row["labels"]) or {},
        "desired_rejected": _loads_json(row["desired_rejected"]),
        "desired_failed": row["desired_failed"] or 0,
    }


def node_detail(row: Mapping[str, Any], *, now: float, policy: HealthPolicy) -> dict[str, Any]:
    """NODE plus its reported, desired (with version) and status documents."""
    out = node_summary(row, now=now, policy=policy)
    desired = _loads_cbor(row["desired"])
    if isinstance(desired, dict):
        desired["version"] = row["desired_version"]
    out["desired_published"] = bool(row["desired_published"])
    out["reported"] = _loads_cbor(row["reported"])
    out["desired"] = desired
    out["status"] = _loads_cbor(row["status"])
    return out
