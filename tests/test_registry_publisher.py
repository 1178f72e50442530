"""Desired documents out of the registry: the newest stored one is the last published,
also when two workers (two publishers, one store) race on one node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cbor2

from edge.registry.desired import DesiredPublisher
from edge.registry.store import open_store

WEB = {"services": {"web": {"command": ["/bin/true"]}}}


async def test_an_older_publish_landing_last_is_followed_by_the_newer_one(
    tmp_path: Path,
) -> None:
    store = await open_store(f"sqlite://{tmp_path / 'r.db'}")
    retained: list[int] = []  # versions in the order the broker got them
    a_sending = asyncio.Event()
    b_done = asyncio.Event()

    async def publish_a(topic: str, payload: bytes) -> bool:
        version = cbor2.loads(payload)["version"]
        if version == 1:
            a_sending.set()
            await b_done.wait()  # worker A is slow: B's newer document lands first
        retained.append(version)
        return True

    async def publish_b(topic: str, payload: bytes) -> bool:
        retained.append(cbor2.loads(payload)["version"])
        return True

    a = DesiredPublisher(store, publish_a, "edge/v1")
    b = DesiredPublisher(store, publish_b, "edge/v1")
    try:
        first = asyncio.create_task(a.put("n1", WEB, by="a"))
        await a_sending.wait()
        assert await b.put("n1", {"services": {}}, by="b") == (2, True)
        b_done.set()
        assert await first == (1, True)
        assert retained[-1] == 2, f"broker got {retained}: an older document retained last"
        assert retained == [2, 1, 2]
    finally:
        await store.close()
