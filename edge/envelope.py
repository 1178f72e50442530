"""The CBOR envelope every outgoing message travels in (see DESIGN.md)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import cbor2

from edge import cbor_safe
from edge.errors import CborError, EnvelopeError, MessageTooLarge

__all__ = ["MAX_ENVELOPE_BYTES", "Envelope", "load_map", "new_message_id"]

MAX_ENVELOPE_BYTES = 16 * 1024 * 1024

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "v": int,
    "id": bytes,
    "node": str,
    "seq": int,
    "ts": (float, int),
    "topic": str,
    "ct": str,
}


class _RandomBytes:
    """os.urandom fetched 4 KiB at a time: one system call for hundreds of ids."""

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._pool):
            self._pool, self._pos = os.urandom(4096), 0
        start = self._pos
        self._pos += n
        return self._pool[start:self._pos]


_random = _RandomBytes()


def new_message_id(now: float | None = None) -> bytes:
    """Return 16 bytes laid out as a UUIDv7: time-ordered, then random."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    raw = bytearray(ms.to_bytes(6, "big") + _random.take(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # RFC 4122 variant
    return bytes(raw)


def load_map(frame: bytes, max_bytes: int) -> dict[Any, Any]:
    """Decode a CBOR map, its size checked before any decoding; EnvelopeError if not one.

    The frame's structure is checked before cbor2 builds anything (edge/cbor_safe.py):
    a frame over a limit or with a tag raises CborError, whose `kind` says which.
    """
    if len(frame) > max_bytes:
        raise MessageTooLarge(f"envelope of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = cbor_safe.loads(frame)
    except CborError as exc:
        raise CborError(exc.kind, f"envelope is not valid CBOR: {exc}") from exc
    if not isinstance(obj, dict):
        raise EnvelopeError(f"envelope must be a CBOR map, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message as it is stored in the outbox and published upstream."""

    id: bytes
    node: str
    seq: int
    ts: float
    topic: str
    ct: str
    data: Any
    prio: int = 0
    exp: float | None = None
    v: int = 1
    # Taken before the wall clock was synchronised (edge/clock.py): the mark, and the
    # monotonic time and boot id that let the agent correct `ts` once it is.
    tsu: bool = False
    mono: float | None = None
    bootid: bytes | None = None
    tsc: bool = False  # `ts` (and `exp`) were corrected after the clock was synchronised

    def __post_init__(self) -> None:
        if len(self.id) != 16:
            raise EnvelopeError(f"envelope id must be 16 bytes, got {len(self.id)}")
        if self.seq < 1:
            raise EnvelopeError(f"envelope seq must be positive, got {self.seq}")
        if self.bootid is not None and len(self.bootid) != 16:
            raise EnvelopeError(f"envelope bootid must be 16 bytes, got {len(self.bootid)}")

    def to_map(self) -> dict[str, Any]:
        """The envelope as the CBOR map DESIGN.md fixes (optional keys only when set)."""
        out: dict[str, Any] = {
            "v": self.v,
            "id": self.id,
            "node": self.node,
            "seq": self.seq,
            "ts": self.ts,
            "topic": self.topic,
            "ct": self.ct,
            "data": self.data,
        }
        if self.prio:
            out["prio"] = self.prio
        if self.exp is not None:
            out["exp"] = self.exp
        if self.tsu:
            out["tsu"] = True
        if self.mono is not None:
            out["mono"] = self.mono
        if self.bootid is not None:
            out["bootid"] = self.bootid
        if self.tsc:
            out["tsc"] = True
        return out

    def encode(self) -> bytes:
        """Serialise to CBOR."""
        try:
            return bytes(cbor2.dumps(self.to_map()))
        except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
            raise EnvelopeError(f"envelope seq {self.seq}: cannot encode data: {exc}") from exc

    @classmethod
    def decode(cls, frame: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
        """Parse a CBOR envelope; the size is checked before any decoding."""
        obj = load_map(frame, max_bytes)
        for key, kind in _REQUIRED.items():
            if key not in obj:
                raise EnvelopeError(f"envelope lacks the key {key!r}")
            if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
                got = type(obj[key]).__name__
                raise EnvelopeError(f"envelope key {key!r} has the wrong type {got}")
        if obj["v"] != 1:
            raise EnvelopeError(f"envelope version {obj['v']} is not supported")
        if "data" not in obj:
            raise EnvelopeError("envelope lacks the key 'data'")
        prio = obj.get("prio", 0)
        exp = obj.get("exp")
        if not isinstance(prio, int) or isinstance(prio, bool):
            raise EnvelopeError("envelope key 'prio' must be an integer")
        if exp is not None and (not isinstance(exp, (int, float)) or isinstance(exp, bool)):
            raise EnvelopeError("envelope key 'exp' must be a number")
        return cls(
            id=obj["id"], node=obj["node"], seq=obj["seq"], ts=float(obj["ts"]),
            topic=obj["topic"], ct=obj["ct"], data=obj["data"], prio=prio,
            exp=None if exp is None else float(exp),
        )
