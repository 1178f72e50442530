"""The MQTT adapter's own plumbing against a real mosquitto: gathered writes, buffered reads."""

from __future__ import annotations

import asyncio

from edge.mqtt import Inbound, MqttConnection
from tests.support.aio import until
from tests.support.broker import Broker

KiB = 1024


async def connect(broker: Broker, client_id: str, **kw: object) -> MqttConnection:
    conn = MqttConnection(host="127.0.0.1", port=broker.port, client_id=client_id,
                          keepalive=30, **kw)  # type: ignore[arg-type]
    await conn.connect(10)
    return conn


async def acking_reader(
    broker: Broker, topic_filter: str, **kw: object
) -> tuple[MqttConnection, list[Inbound]]:
    """A subscriber that keeps what it gets, in order, and acknowledges each at once."""
    received: list[Inbound] = []
    reader: MqttConnection

    def take(message: Inbound) -> None:
        received.append(message)
        reader.ack(message)

    reader = await connect(broker, "reader", on_message=take, **kw)
    await reader.subscribe([topic_filter])
    return reader, received


async def test_a_burst_larger_than_the_socket_buffer_goes_out_whole(broker: Broker) -> None:
    """Writes gathered into one buffer must wait for room, not be lost, when the kernel is full.

    The broker is stopped while 16 MiB are queued, so the socket buffer fills up
    and the rest waits in the adapter; every PUBACK must come once it resumes.
    """
    broker.start()
    reader, received = await acking_reader(broker, "big/#")
    writer = await connect(broker, "writer", max_inflight=64)
    broker.pause()
    try:
        payloads = [bytes([i]) * (512 * KiB) for i in range(32)]
        acks = [writer.publish(f"big/{i}", p) for i, p in enumerate(payloads)]
        await asyncio.sleep(0.5)
        assert not any(a.done() for a in acks)  # held by the stopped broker, not failed
    finally:
        broker.resume()
    async with asyncio.timeout(30):
        results = await asyncio.gather(*acks)
    await until(lambda: len(received) >= len(payloads), timeout=30, what="every message")
    assert all(r.ok for r in results)
    got = {m.topic: m.payload for m in received}
    assert got == {f"big/{i}": p for i, p in enumerate(payloads)}
    for conn in (reader, writer):
        await conn.disconnect()


async def test_many_small_messages_in_one_read_are_all_delivered(broker: Broker) -> None:
    """One recv brings hundreds of packets: each must reach the owner, none left in the buffer."""
    broker.start()
    reader, received = await acking_reader(broker, "small/#", receive_maximum=1000)
    writer = await connect(broker, "writer", max_inflight=1000)
    acks = [writer.publish("small/t", b"%05d" % i) for i in range(3000)]
    async with asyncio.timeout(30):
        await asyncio.gather(*acks)
    await until(lambda: len(received) >= 3000, timeout=30, what="every message")
    assert [m.payload for m in received] == [b"%05d" % i for i in range(3000)]
    for conn in (reader, writer):
        await conn.disconnect()


async def test_a_paused_reader_takes_nothing_until_resumed_then_everything(
    broker: Broker,
) -> None:
    """pause_reading() leaves the socket unread (the broker waits), resume_reading() reads on."""
    broker.start()
    reader, received = await acking_reader(broker, "held/#", receive_maximum=1000)
    writer = await connect(broker, "writer", max_inflight=1000)
    reader.pause_reading()
    acks = [writer.publish("held/t", b"%04d" % i) for i in range(500)]
    async with asyncio.timeout(30):
        await asyncio.gather(*acks)  # the broker has them all
    await asyncio.sleep(0.3)
    assert received == []
    reader.resume_reading()
    await until(lambda: len(received) >= 500, timeout=30, what="every message after resuming")
    assert [m.payload for m in received] == [b"%04d" % i for i in range(500)]
    for conn in (reader, writer):
        await conn.disconnect()
