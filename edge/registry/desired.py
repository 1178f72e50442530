"""Desired documents out: stored first with a fresh version, then published retained.

A document that cannot be published now (no broker) stays marked unpublished
in the store and goes out at the next connection. Per node, publishing is one
at a time and always sends what is stored, so a slower, older PUT can never
leave its document retained over a newer one. Between workers (each with its
own locks) the store is read again after each publish: a worker that sent an
older version than the one stored meanwhile sends the newer one too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import cbor2

from edge.documents import encode
from edge.registry.records import desired_body
from edge.registry.store import Store

__all__ = ["DesiredPublisher"]

log = logging.getLogger("edge.registry.desired")

Publish = Callable[[str, bytes], Awaitable[bool]]
_REREADS = 5  # publishes per flush at most: PUTs that keep coming go out with the next


class DesiredPublisher:
    """PUTs of desired documents, and publishing the ones the broker lacks."""

    def __init__(self, store: Store, publish: Publish, prefix: str) -> None:
        self._store = store
        self._publish = publish
        self._prefix = prefix
        self._locks: dict[str, asyncio.Lock] = {}

    async def put(self, node: str, doc: Mapping[str, Any], *, by: str) -> tuple[int, bool]:
        """Store a validated document body for `node`; (version, published)."""
        body = {"v": 1, "ts": time.time(), "by": by, **{k: v for k, v in doc.items()
                                                        if k in ("services", "config")}}
        version = await self._store.put_desired(node, desired_body(body))
        return version, await self.flush(node, version)

    async def flush(self, node: str, at_least: int = 0) -> bool:
        """Publish the node's stored document unless it is out already; True if it is."""
        lock = self._locks.setdefault(node, asyncio.Lock())
        try:
            async with lock:
                sent = 0
                for _ in range(_REREADS):
                    stored = await self._store.desired(node)
                    if stored is None:
                        return False
                    version, body, published = stored
                    if version <= sent or (published and not sent):
                        break  # what is stored went out: from here, or from another worker
                    doc = {**cbor2.loads(body), "version": version}
                    topic = f"{self._prefix}/nodes/{node}/desired"
                    published = await self._publish(topic, encode(doc))
                    if not published:
                        break
                    await self._store.mark_published(node, version)
                    log.info("published desired version %d for node %s", version, node)
                    sent = version
                return published and version >= at_least
        finally:
            if not lock.locked() and self._locks.get(node) is lock:
                del self._locks[node]

    async def publish_pending(self) -> None:
        """Publish every stored document the broker does not have yet."""
        nodes = await self._store.unpublished()
        if nodes:
            log.info("publishing %d desired documents stored while the broker was away",
                     len(nodes))
        for node in nodes:
            if not await self.flush(node):
                return  # the connection went again: the next one tries
