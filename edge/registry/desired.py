"""Desired documents out: stored first with a fresh version, then published retained.

A document that cannot be published now (no broker) stays marked unpublished
in the store and goes out at the next connection. Per node, publishing is one
at a time and always sends what is stored, so a slower, older PUT can never
leave its document retained over a newer one. Between workers (each with its
own locks) the store is read again after each publish: a worker that sent an
older version than the one stored meanwhile sends the newer one too.

With a signing key (`--signing-key`), what is published is the document with
its `node` added, in a signed wrapper (edge/signing.py); the store keeps the
document as it was put.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import cbor2

from edge.documents import encode
from edge.errors import RegistryError
from edge.registry.records import desired_body
from edge.registry.store import Store
from edge.signing import Signer

__all__ = ["DesiredPublisher"]

log = logging.getLogger("edge.registry.desired")

Publish = Callable[[str, bytes], Awaitable[bool]]
_REREADS = 5  # publishes per flush at most: PUTs that keep coming go out with the next
_NUDGE_EVERY = 60.0  # seconds between resends to a node that reports an older version
_REMEMBER = 100_000  # nodes kept in each of the publisher's small caches


class DesiredPublisher:
    """PUTs of desired documents, and publishing the ones the broker lacks."""

    def __init__(self, store: Store, publish: Publish, prefix: str, *,
                 signer: Signer | None = None) -> None:
        self._store = store
        self._publish = publish
        self._prefix = prefix
        self._signer = signer
        self._locks: dict[str, asyncio.Lock] = {}
        self._reports: dict[str, tuple[int, int | None]] = {}  # not looked at yet
        self._report_wake = asyncio.Event()
        self._looked: dict[str, float] = {}  # node -> monotonic time of the last resend
        self._versions: dict[str, int] = {}  # node -> desired version stored, as last seen

    async def put(self, node: str, doc: Mapping[str, Any], *, by: str) -> tuple[int, bool]:
        """Store a validated document body for `node`; (version, published)."""
        body = {"v": 1, "ts": time.time(), "by": by, **{k: v for k, v in doc.items()
                                                        if k in ("services", "config")}}
        version = await self._store.put_desired(node, desired_body(body))
        self._remember(node, version)
        return version, await self.flush(node, version)

    def _remember(self, node: str, version: int) -> None:
        if len(self._versions) > _REMEMBER:
            self._versions.clear()  # a bound on memory: what is forgotten is read again
        self._versions[node] = max(version, self._versions.get(node, 0))

    def reported(self, node: str, applied: int, rejected: int | None) -> None:
        """Note what a node's newest report says it applied (called by the ingest)."""
        self._reports[node] = (applied, rejected)
        self._report_wake.set()

    async def run(self) -> None:
        """Send a document again to nodes that report an older one, until cancelled.

        The broker may have lost it (restarted without persistence) while the node
        lost its copy (a wiped data dir). Each node is looked at once a minute at
        most, apart from the ingest; a version the node refused is not sent again.
        """
        while True:
            await self._report_wake.wait()
            self._report_wake.clear()
            reports, self._reports = self._reports, {}
            now = time.monotonic()
            for node, (applied, rejected) in reports.items():
                if now - self._looked.get(node, -1e18) < _NUDGE_EVERY:
                    continue
                known = self._versions.get(node)
                if known is not None and known <= applied:
                    # Versions only grow: a newer one stored by another worker since was
                    # published by that worker. No read needed, even in a storm.
                    continue
                try:
                    stored = await self._store.desired(node)
                except RegistryError:
                    continue  # the store is failing: the next report asks again
                self._remember(node, 0 if stored is None else stored[0])
                if stored is None or stored[0] <= applied or stored[0] == rejected:
                    continue
                self._looked[node] = now
                log.info("node %s reports desired version %d applied, %d is stored:"
                         " publishing it again", node, applied, stored[0])
                await self.flush(node, force=True)
            if len(self._looked) > _REMEMBER:  # a bound on memory, not a schedule
                self._looked.clear()
            await asyncio.sleep(1.0)  # a storm's reports are taken in batches

    async def flush(self, node: str, at_least: int = 0, *, force: bool = False) -> bool:
        """Publish the node's stored document unless it is out already (or `force`);
        True if it is."""
        lock = self._locks.setdefault(node, asyncio.Lock())
        try:
            async with lock:
                sent = 0
                for _ in range(_REREADS):
                    stored = await self._store.desired(node)
                    if stored is None:
                        return False
                    version, body, published = stored
                    if version <= sent or (published and not sent and not force):
                        break  # what is stored went out: from here, or from another worker
                    topic = f"{self._prefix}/nodes/{node}/desired"
                    published = await self._publish(topic, self._payload(node, version, body))
                    if not published:
                        break
                    await self._store.mark_published(node, version)
                    log.info("published desired version %d for node %s", version, node)
                    sent = version
                return published and version >= at_least
        finally:
            if not lock.locked() and self._locks.get(node) is lock:
                del self._locks[node]

    def _payload(self, node: str, version: int, body: bytes) -> bytes:
        doc = {**cbor2.loads(body), "version": version}
        if self._signer is None:
            return encode(doc)  # as before signing: agents of older versions take no "node"
        # The node and version are inside what is signed: no replay to another node.
        return self._signer.wrap(encode({**doc, "node": node}))

    @property
    def signing_kid(self) -> str | None:
        """The id of the key that signs the documents published (None: not signed)."""
        return None if self._signer is None else self._signer.kid

    async def publish_pending(self) -> None:
        """Publish every stored document the broker does not have yet."""
        nodes = await self._store.unpublished()
        if nodes:
            log.info("publishing %d desired documents stored while the broker was away",
                     len(nodes))
        for node in nodes:
            if not await self.flush(node):
                return  # the connection went again: the next one tries
