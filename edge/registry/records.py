"""What one document from the broker becomes in the store: a row, or a rejection.

Pure: a topic and a payload in, a `StatusRow`, `ReportedRow` or `DesiredRow`
out, or `Rejected` with the kind the stats count (`invalid`, `spoofed`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge.documents import (
    MAX_DESIRED_BYTES,
    MAX_REPORTED_BYTES,
    MAX_STATUS_BYTES,
    check_reported,
    decode_document,
    encode,
    parse_desired,
    parse_status,
    status_order,
)
from edge.errors import DocumentError
from edge.signing import Keyring, is_signed, unwrap

__all__ = [
    "KINDS",
    "DesiredRow",
    "Rejected",
    "ReportedRow",
    "Row",
    "StatusRow",
    "desired_body",
    "parse_topic",
    "to_row",
]

KINDS = ("status", "reported", "desired")
_NODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LIMITS = {"status": MAX_STATUS_BYTES, "reported": MAX_REPORTED_BYTES,
           "desired": MAX_DESIRED_BYTES}


@dataclass(frozen=True, slots=True)
class StatusRow:
    """A node's status: ordered by `order` (boot number, conn, offline after online, ts)."""

    node: str
    seen: float | None  # None for an offline status: the broker's Last Will, perhaps
    order: tuple[float, int, int, float]
    heartbeat: float | None
    queue_depth: int | None
    oldest_age: float | None
    doc: bytes

    @property
    def key(self) -> tuple[Any, ...]:
        return self.order


@dataclass(frozen=True, slots=True)
class ReportedRow:
    """A node's reported document, with the fields the fleet list shows."""

    node: str
    seen: float
    version: int
    doc: bytes
    profile: str | None
    agent: str | None
    labels: str              # JSON object
    services_up: int
    services_total: int
    desired_applied: int
    desired_rejected: str | None  # JSON
    desired_failed: int           # items of the applied desired document that failed

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.version,)


@dataclass(frozen=True, slots=True)
class DesiredRow:
    """A desired document seen on the broker (retained there, so published)."""

    node: str
    seen: None   # the registry's own document: not a sign of the node's life
    version: int
    body: bytes  # the document without its version (see desired_body)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.version,)


Row = StatusRow | ReportedRow | DesiredRow


@dataclass(frozen=True, slots=True)
class Rejected:
    """A document the registry refuses: `kind` is invalid or spoofed."""

    kind: str
    reason: str


def parse_topic(topic: str, prefix: str) -> tuple[str, str] | None:
    """`{prefix}/nodes/{node}/{kind}` -> (node, kind); None for any other topic."""
    head = prefix + "/nodes/"
    if not topic.startswith(head):
        return None
    node, _, kind = topic[len(head):].partition("/")
    if kind not in KINDS or not _NODE.fullmatch(node):
        return None
    return node, kind


def desired_body(doc: Mapping[Any, Any]) -> bytes:
    """A desired document as stored: CBOR, without `version` and `node` (the store keeps
    those)."""
    return encode({str(k): v for k, v in doc.items() if k not in ("version", "node")})


def _json(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def to_row(node: str, kind: str, payload: bytes, seen: float, *,
           keys: Keyring | None = None, retained: bool = False) -> Row | Rejected:
    """Decode and check one document of `node`; never raises for bad input.

    `seen`: when it arrived. A `retained` document arrives again at every
    connection of the registry, long after the node said it: it is seen at its
    own `ts`, not in the future, so it never moves `last_seen` past when the node
    last spoke (the store keeps the greater of the stored and this).

    `keys`: the registry signs its desired documents, and takes from the broker only
    those it signed (a forged one stored here would go out signed at the next resend).
    """
    try:
        doc = decode_document(payload, _LIMITS[kind], kind)
        if kind == "status":
            status = parse_status(doc)
            if retained:
                seen = _said_at(status.ts, seen)
            return StatusRow(node, seen if status.online else None, status_order(status),
                             status.heartbeat,
                             status.queue_depth, status.oldest_age, payload)
        if kind == "reported":
            if doc.get("node") != node:
                return Rejected("spoofed", f"reported: node {doc.get('node')!r} published on"
                                           f" the topic of node {node!r}")
            version = check_reported(doc, node)
            if retained:
                seen = _said_at(doc["ts"], seen)
            return _reported(node, seen, version, doc, payload)
        if is_signed(doc):
            signed = unwrap(doc)
            if keys:
                keys.verify(signed)
            doc = decode_document(signed.doc, _LIMITS[kind], kind)
        elif keys:
            return Rejected("invalid", f"node {node}: desired: unsigned, and this registry"
                                       " signs its documents (--signing-key)")
        desired = parse_desired(doc)
        if doc.get("node", node) != node:
            return Rejected("spoofed", f"desired: node {doc.get('node')!r} published on the"
                                       f" topic of node {node!r}")
        return DesiredRow(node, None, desired.version, desired_body(doc))
    except DocumentError as exc:
        return Rejected("invalid", f"node {node}: {exc}")
    except Exception as exc:  # a document must never take the ingest down
        return Rejected("invalid", f"node {node}: {kind}: {exc!r}")


def _said_at(ts: float, received: float) -> float:
    """When a retained document was said: its `ts`, but not after it arrived."""
    return max(0.0, min(float(ts), received))


def _reported(node: str, seen: float, version: int, doc: Mapping[Any, Any],
              payload: bytes) -> ReportedRow:
    services = [s for s in doc.get("services") or () if isinstance(s, Mapping)]
    applied = doc.get("desired_applied")
    rejected = doc.get("desired_rejected")
    desired = doc.get("desired")
    items = desired.get("items") if isinstance(desired, Mapping) else None
    failed = sum(1 for item in (items.values() if isinstance(items, Mapping) else ())
                 if isinstance(item, Mapping) and item.get("result") == "failed")
    return ReportedRow(
        node=node, seen=seen, version=version, doc=payload,
        profile=doc.get("profile") if isinstance(doc.get("profile"), str) else None,
        agent=doc.get("agent") if isinstance(doc.get("agent"), str) else None,
        labels=_json(dict(doc.get("labels") or {})),
        services_up=sum(1 for s in services if s.get("state") == "running"),
        services_total=len(services),
        desired_applied=applied if isinstance(applied, int) and not isinstance(applied, bool)
        and 0 <= applied < 2**63 else 0,
        desired_rejected=_json(rejected) if isinstance(rejected, Mapping) else None,
        desired_failed=failed,
    )
