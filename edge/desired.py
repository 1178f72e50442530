"""The desired state on the node: received, checked, persisted, then applied.

A document from `{prefix}/nodes/{node}/desired` is decoded with a size limit
first and validated (edge/documents.py). One with a version not above the
newest accepted one is ignored; an invalid one is rejected as a whole, with the
reason kept for the reported state, and nothing runs differently. An accepted
one is written to `desired.cbor` (atomically, synced) before its PUBACK and
before anything changes; then the apply callback reconciles services and
config. At boot the agent applies `desired.cbor` again, with no network.

With public keys (`[state] desired_keys`), a document must come in a signed
wrapper (edge/signing.py) made by one of them and name this node, and an old
version is rejected as a replay instead of ignored; the retained copy of the
document applied last, which the broker sends at every connection, is still
just ignored. `desired.cbor` keeps the wrapper as it came, so the file is
verified again at boot: a changed file is not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edge.documents import MAX_DESIRED_BYTES, Desired, decode_document, parse_desired
from edge.errors import DocumentError
from edge.reconcile import Items
from edge.rejections import Rejections
from edge.signing import Keyring, SignatureError, is_signed, unwrap

__all__ = ["DesiredState"]

log = logging.getLogger("edge.desired")

Apply = Callable[[Desired], Awaitable[Items]]


class _Refused(Exception):
    """A document not taken: the kind counted, its version if it has one, and why."""

    def __init__(self, kind: str, version: int | None, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.version = version
        self.reason = reason


class DesiredState:
    """Take desired documents from the uplink and apply the newest through `apply`."""

    def __init__(self, path: Path, apply: Apply, *, node: str = "", keys: Keyring | None = None,
                 max_bytes: int = MAX_DESIRED_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._apply = apply
        self._node = node                      # "": documents for any node (tests)
        self._keys = keys if keys else None    # None: nothing verified
        self._max_bytes = max_bytes
        self._clock = clock
        self.applied = 0              # version of the document applied last (0: none)
        self.applied_ts: float | None = None
        self.items: Items = {}
        self.rejected: dict[str, Any] | None = None  # the last refused document and why
        self._rejected_digest: bytes | None = None  # its hash: the same one again is not news
        self.ignored = 0              # documents not newer than the applied one
        self.changes = 0              # grows at each change the reported state shows
        self.rejections = Rejections(log, "desired")
        self._pending: tuple[Desired, bytes] | None = None  # and the payload, stored as it came
        self._applying = 0  # version being written or applied now
        self._newest_doc: tuple[int, bytes] | None = None  # the newest accepted: version, doc
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()

    # ---- boot ----------------------------------------------------------------

    async def restore(self) -> None:
        """Apply the last accepted document from disk, if there is one (no network needed)."""
        try:
            payload = await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read the last desired state %s: %s; running without it",
                      self.path, exc.strerror or exc)
            return
        try:
            desired, doc = self._open(payload)
        except _Refused as refused:
            log.error("the last desired state %s is not valid (%s); running without it",
                      self.path, refused.reason)
            self._reject(refused.kind, refused.version, f"{self.path.name}: {refused.reason}")
            return
        log.info("applying desired state version %d from %s", desired.version, self.path)
        self._newest_doc = (desired.version, doc)
        await self._apply_one(desired)

    # ---- from the uplink -----------------------------------------------------

    def receive(self, payload: bytes) -> asyncio.Future[None] | None:
        """Take one document; the future resolves once it is persisted (then PUBACK it).

        None: refused or ignored, nothing to wait for (PUBACK it at once).
        """
        try:
            desired, doc = self._open(payload)
        except _Refused as refused:
            if self._keys is None and refused.version is not None \
                    and refused.version <= self._newest():
                self.ignored += 1  # an old document, bad or not: not news
                return None
            self._reject(refused.kind, refused.version, refused.reason, payload)
            return None
        newest = self._newest()
        if desired.version <= newest:
            if self._keys is not None and self._newest_doc != (desired.version, doc):
                # Signed once, so it is genuine, but old: someone sends it again.
                self._reject("replayed", desired.version, f"replayed: version {desired.version}"
                             f" is not above applied {newest}", payload)
                return None
            self.ignored += 1  # without keys; or the retained copy of the newest, again
            log.debug("desired state version %d ignored: version %d is applied", desired.version,
                      newest)
            return None
        self._pending = (desired, payload)
        self._newest_doc = (desired.version, doc)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return waiter

    def _open(self, payload: bytes) -> tuple[Desired, bytes]:
        """Decode, verify and validate a payload: (the document, its CBOR); or _Refused."""
        doc: dict[Any, Any] | None = None
        try:
            outer = decode_document(payload, self._max_bytes, "desired")
            if is_signed(outer):
                signed = unwrap(outer)
                if self._keys is not None:
                    try:
                        self._keys.verify(signed)  # before its contents are looked at
                    except SignatureError as exc:
                        raise _Refused(exc.kind, self._peek_version(signed.doc),
                                       str(exc)) from None
                doc_bytes = signed.doc
                doc = decode_document(doc_bytes, self._max_bytes, "desired")
            elif self._keys is not None:
                raise _Refused("unsigned", _version_of(outer), "unsigned: this node takes only"
                               " documents signed by a key of its [state] desired_keys")
            else:
                doc_bytes, doc = payload, outer
            desired = parse_desired(doc)
        except DocumentError as exc:
            raise _Refused("invalid", _version_of(doc), str(exc)) from None
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            # A parser bug must not take the node down: the document is refused all the same.
            log.exception("desired state: the parser failed on a document")
            raise _Refused("invalid", _version_of(doc),
                           f"not a valid desired document ({type(exc).__name__})") from None
        node = desired.raw.get("node")
        if self._node and node != self._node and (node is not None or self._keys is not None):
            # A document made for another node, sent to this one's topic.
            reason = f"for node {node!r}, not this node {self._node!r}" if node is not None \
                else "names no node: a signed document must say which node it is for"
            raise _Refused("wrong_node", desired.version, reason)
        return desired, doc_bytes

    def _peek_version(self, doc: bytes) -> int | None:
        """The version a document says it has, for the report only: nothing trusts it."""
        try:
            return _version_of(decode_document(doc, self._max_bytes, "desired"))
        except DocumentError:
            return None

    def _newest(self) -> int:
        """The newest version accepted: applied, being applied, or waiting its turn."""
        return max(self.applied, self._applying,
                   self._pending[0].version if self._pending else 0)

    def _reject(self, kind: str, version: int | None, reason: str,
                payload: bytes | None = None) -> None:
        digest = None if payload is None else hashlib.blake2b(payload, digest_size=16).digest()
        if digest is not None and digest == self._rejected_digest:
            return  # the very same document again (the retained copy, at a reconnect)
        self._rejected_digest = digest
        self.rejected = {"version": version, "reason": reason, "ts": self._clock()}
        self.changes += 1
        self.rejections(kind, f"version {version}: {reason}")

    # ---- applying --------------------------------------------------------------

    async def run(self) -> None:
        """Persist and apply the newest document received, one at a time, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, None
            waiters, self._waiters = self._waiters, []
            if pending is None:
                continue
            desired, payload = pending
            self._applying = desired.version
            try:
                # As it came: a signed one keeps its signature, checked again at boot.
                await asyncio.to_thread(_write_synced, self.path, payload)
            except OSError as exc:
                log.error("cannot store desired state version %d in %s: %s; it is not"
                          " applied, and the broker sends it again", desired.version,
                          self.path, exc.strerror or exc)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                self._applying = 0  # not accepted after all: the broker sends it again
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            await self._apply_one(desired)

    async def _apply_one(self, desired: Desired) -> None:
        items = await self._apply(desired)
        self.applied = desired.version
        self.applied_ts = self._clock()
        self.items = items
        if self.rejected is not None and (self.rejected.get("version") or 0) <= desired.version:
            self.rejected = None
        self.changes += 1
        failed = {key: item["reason"] for key, item in items.items()
                  if item["result"] == "failed"}
        if failed:
            log.warning("desired state version %d applied, except: %s", desired.version,
                        "; ".join(f"{key}: {reason}" for key, reason in failed.items()))
        else:
            log.info("desired state version %d applied (%d items)", desired.version, len(items))

    def snapshot(self) -> dict[str, Any]:
        """What `status` and the reported state show."""
        return {
            "version": self.applied,
            "ts": self.applied_ts,
            "items": self.items,
            "rejected": self.rejected,
            "ignored": self.ignored,
            "rejections": dict(self.rejections.counts),
            "keys": list(self._keys.kids) if self._keys is not None else [],
        }


def _version_of(doc: Any) -> int | None:
    """A decoded document's version, if it has one that is an integer."""
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _write_synced(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, durably: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
