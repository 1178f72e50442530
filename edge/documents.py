"""The state documents nodes and the registry exchange (see docs/registry.md).

Pure functions, no I/O: the agent and the registry both use them, so a desired
document the registry accepts is one the agent parses the same way.

- desired (registry -> node, retained on `{prefix}/nodes/{node}/desired`):
  `{"v": 1, "version", "services": {NAME: service table}, "config": {...}}`
- reported (node -> registry, retained on `{prefix}/nodes/{node}/reported`)
- status (node -> registry, retained on `{prefix}/nodes/{node}/status`)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from edge.envelope import load_map
from edge.errors import ConfigError, DocumentError, EnvelopeError
from edge.services import ServiceSpec, check_dependencies, parse_services
from edge.units import parse_duration, parse_size

__all__ = [
    "LIVE_CONFIG_KEYS",
    "MAX_DESIRED_BYTES",
    "MAX_REPORTED_BYTES",
    "MAX_STATUS_BYTES",
    "Desired",
    "LiveConfig",
    "Status",
    "check_reported",
    "decode_document",
    "encode",
    "parse_desired",
    "parse_status",
    "status_order",
]

MAX_DESIRED_BYTES = 256 * 1024
MAX_REPORTED_BYTES = 512 * 1024
MAX_STATUS_BYTES = 4096
_MAX_SERVICES = 256
_MAX_LABELS = 32

# The config keys a desired document may set; the agent applies them without a restart.
LIVE_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "telemetry": ("interval",),
    "queue": ("on_full", "max_bytes", "default_ttl"),
}


@dataclass(frozen=True)
class LiveConfig:
    """The config part of a desired document: only what is given is changed."""

    telemetry_interval: float | None = None
    queue_on_full: str | None = None
    queue_max_bytes: int | None = None
    queue_default_ttl: float | None = None

    def items(self) -> dict[str, Any]:
        """The keys given, as `section.key` -> value."""
        pairs = {
            "telemetry.interval": self.telemetry_interval,
            "queue.on_full": self.queue_on_full,
            "queue.max_bytes": self.queue_max_bytes,
            "queue.default_ttl": self.queue_default_ttl,
        }
        return {key: value for key, value in pairs.items() if value is not None}


@dataclass(frozen=True)
class Desired:
    """A validated desired-state document."""

    version: int
    services: Mapping[str, ServiceSpec] = field(default_factory=dict)
    config: LiveConfig = field(default_factory=LiveConfig)
    raw: Mapping[str, Any] = field(default_factory=dict)  # the document as it came


def decode_document(payload: bytes, max_bytes: int, what: str) -> dict[Any, Any]:
    """Decode one CBOR map, its size and structure checked first; DocumentError if not one.

    The structure check (edge/cbor_safe.py) refuses tags, nesting deeper than 64,
    over 100,000 items and lengths beyond the payload; the CborError is the cause.
    """
    try:
        return load_map(payload, max_bytes)
    except EnvelopeError as exc:
        raise DocumentError(f"{what}: {str(exc).replace('envelope', 'document')}") from exc


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _version(doc: Mapping[Any, Any], what: str, key: str = "version") -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise DocumentError(f"{what}: {key}: expected an integer from 1, got {_show(value)}")
    return value


def parse_desired(doc: Mapping[Any, Any], *, need_version: bool = True) -> Desired:
    """Validate a desired document (decoded); DocumentError says what and where."""
    what = "desired"
    if not isinstance(doc, Mapping):
        raise DocumentError(f"{what}: expected a map, got {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in ("v", "version", "services", "config",
                                                      "ts", "by", "node"))
    if unknown:
        raise DocumentError(f"{what}: unknown key {unknown[0]!r} (known: config, node,"
                            " services, ts, v, version)")
    if doc.get("v", 1) != 1:
        raise DocumentError(f"{what}: v: expected 1, got {_show(doc.get('v'))}")
    if "node" in doc and not isinstance(doc["node"], str):
        # The node it is for (signed documents name it): the agent checks it is its own.
        raise DocumentError(f"{what}: node: expected a node id, got {_show(doc['node'])}")
    version = _version(doc, what) if need_version or "version" in doc else 0
    services = doc.get("services", {})
    if not isinstance(services, Mapping) or not all(isinstance(k, str) for k in services):
        raise DocumentError(f"{what}: services: expected a map of service name to table,"
                            f" got {_show(services)}")
    if len(services) > _MAX_SERVICES:
        raise DocumentError(f"{what}: services: at most {_MAX_SERVICES} services,"
                            f" got {len(services)}")
    try:
        specs = parse_services(dict(services), what, check_depends=False)
    except ConfigError as exc:
        # "config desired: [services.x] k: ..." reads as "desired: services.x k: ...".
        text = str(exc).removeprefix(f"config {what}: ")
        raise DocumentError(f"{what}: {text}") from exc
    # Dependencies on services outside the document (the node's own) are the node's to
    # judge; a cycle within the document is wrong anywhere.
    inside = {name: dataclasses.replace(spec, depends_on=tuple(
        dep for dep in spec.depends_on if dep in specs)) for name, spec in specs.items()}
    try:
        check_dependencies(inside, what)
    except ConfigError as exc:
        raise DocumentError(f"{what}: {str(exc).removeprefix(f'config {what}: ')}") from exc
    return Desired(version=version, services=specs, config=_live_config(doc.get("config", {})),
                   raw=dict(doc))


def _live_config(config: Any) -> LiveConfig:
    what = "desired: config"
    if not isinstance(config, Mapping):
        raise DocumentError(f"{what}: expected a map like {{\"telemetry\": {{\"interval\":"
                            f" \"30s\"}}}}, got {_show(config)}")
    values: dict[str, Any] = {}
    for section, body in config.items():
        keys = LIVE_CONFIG_KEYS.get(section) if isinstance(section, str) else None
        if keys is None:
            raise DocumentError(f"{what}: [{section}] cannot be set by the registry (it can"
                                " set: telemetry.interval, queue.on_full, queue.max_bytes,"
                                " queue.default_ttl)")
        if not isinstance(body, Mapping):
            raise DocumentError(f"{what}: [{section}]: expected a map, got {_show(body)}")
        for key, raw in body.items():
            if key not in keys:
                raise DocumentError(f"{what}: [{section}] {key}: cannot be set by the registry"
                                    f" (known: {', '.join(keys)})")
            values[f"{section}_{key}"] = _config_value(section, key, raw, what)
    return LiveConfig(**values)


def _config_value(section: str, key: str, raw: Any, what: str) -> Any:
    where = f"{what}: [{section}] {key}"
    try:
        if key == "on_full":
            if raw not in ("drop-oldest", "reject"):
                raise ValueError(f'expected "drop-oldest" or "reject", got {_show(raw)}')
            return raw
        if key == "max_bytes":
            size = parse_size(raw)
            if size <= 0:
                raise ValueError(f"expected a size above 0, got {_show(raw)}")
            return size
        seconds = parse_duration(raw)
        if key == "interval" and 0 < seconds < 1:
            raise ValueError(f'expected "0s" (off) or a duration of at least 1s, got {_show(raw)}')
        return seconds
    except ValueError as exc:
        raise DocumentError(f"{where}: {exc}") from exc
    except TypeError as exc:
        raise DocumentError(f"{where}: expected a value, got {_show(raw)}") from exc


def encode(doc: Mapping[str, Any]) -> bytes:
    """CBOR bytes of a document."""
    return bytes(cbor2.dumps(dict(doc)))


# ---- reported and status: what the registry checks --------------------------------


def check_reported(doc: Mapping[Any, Any], node: str) -> int:
    """Check a reported document for the node of its topic; return its version."""
    what = "reported"
    if doc.get("v") != 1:
        raise DocumentError(f"{what}: v: expected 1, got {_show(doc.get('v'))}")
    if doc.get("node") != node:
        raise DocumentError(f"{what}: node {_show(doc.get('node'))} is not the topic's node"
                            f" {node!r}")
    version = _version(doc, what)
    ts = doc.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise DocumentError(f"{what}: ts: expected a number, got {_show(ts)}")
    kinds: dict[str, type | tuple[type, ...]] = {
        "agent": str, "profile": str, "services": list, "peers": list, "queue": Mapping,
        "uplink": Mapping, "desired_applied": int, "labels": Mapping, "desired": Mapping,
    }
    for key, kind in kinds.items():
        if key in doc and doc[key] is not None and not isinstance(doc[key], kind):
            raise DocumentError(f"{what}: {key}: expected {_kind_name(kind)}, got"
                                f" {_show(doc[key])}")
    for row in doc.get("services") or ():
        if not isinstance(row, Mapping) or not isinstance(row.get("name"), str) \
                or not isinstance(row.get("state"), str):
            raise DocumentError(f"{what}: services: each row needs a name and a state, got"
                                f" {_show(row)}")
    labels = doc.get("labels") or {}
    if len(labels) > _MAX_LABELS or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in labels.items()):
        raise DocumentError(f"{what}: labels: expected at most {_MAX_LABELS} text labels")
    return version


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names: dict[object, str] = {str: "text", list: "a list", int: "an integer"}
    return names.get(kind, "a map")


@dataclass(frozen=True)
class Status:
    """A validated status document."""

    online: bool
    ts: float
    boot: float                # the wall-clock start, for people
    conn: int                  # the connection number within this boot
    heartbeat: float | None    # seconds between heartbeats, when the node says
    queue_depth: int | None
    oldest_age: float | None
    bootn: int | None = None   # the boot number (edge/bootcount.py); None from older agents


def parse_status(doc: Mapping[Any, Any]) -> Status:
    """Check a status document; DocumentError if it is not one."""
    what = "status"
    state = doc.get("state")
    if state not in ("online", "offline"):
        raise DocumentError(f"{what}: state: expected \"online\" or \"offline\", got"
                            f" {_show(state)}")
    numbers: dict[str, float | None] = {}
    for key in ("ts", "boot", "heartbeat"):
        value = doc.get(key, 0.0 if key == "boot" else None)
        if key == "heartbeat" and value is None:
            numbers[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value < 0:
            raise DocumentError(f"{what}: {key}: expected a number, got {_show(value)}")
        numbers[key] = float(value)
    conn = doc.get("conn", 0)
    if isinstance(conn, bool) or not isinstance(conn, int) or conn < 0:
        raise DocumentError(f"{what}: conn: expected an integer from 0, got {_show(conn)}")
    bootn = doc.get("bootn")
    if bootn is not None and (isinstance(bootn, bool) or not isinstance(bootn, int)
                              or not 0 <= bootn < 2**53):
        raise DocumentError(f"{what}: bootn: expected an integer from 0, got {_show(bootn)}")
    queue = doc.get("queue") or {}
    if not isinstance(queue, Mapping):
        raise DocumentError(f"{what}: queue: expected a map, got {_show(queue)}")
    depth = queue.get("depth")
    age = queue.get("oldest_age")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
        raise DocumentError(f"{what}: queue.depth: expected an integer, got {_show(depth)}")
    if age is not None and (isinstance(age, bool) or not isinstance(age, int | float)):
        raise DocumentError(f"{what}: queue.oldest_age: expected a number, got {_show(age)}")
    return Status(
        online=state == "online", ts=numbers["ts"] or 0.0, boot=numbers["boot"] or 0.0,
        conn=conn, heartbeat=numbers["heartbeat"], queue_depth=depth,
        oldest_age=None if age is None else float(age), bootn=bootn,
    )


def status_order(status: Status) -> tuple[float, int, int, float]:
    """Sort key: a status with a greater key is newer.

    Boots are ordered by `bootn`, which only grows across restarts whatever the
    clock (edge/bootcount.py); a status from an older agent without it by `boot`
    in milliseconds, the scale of `bootn`, which starts at least at the clock in
    milliseconds: an agent upgraded in place moves forward, in a mixed fleet too.
    The Last Will is built when a connection starts, so its `ts` is older than the
    heartbeats it ends: within one boot and connection, offline comes last.
    """
    boot = float(status.bootn) if status.bootn is not None else status.boot * 1000.0
    return (boot, status.conn, int(not status.online), status.ts)
