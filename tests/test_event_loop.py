"""The agent never blocks its event loop (blockbuster raises on blocking calls in it)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edge.agent import Agent
from edge.config import load_settings
from tests.support.broker import Broker
from tests.support.subscriber import Subscriber

blockbuster = pytest.importorskip("blockbuster", reason="blockbuster is in the test extras")


async def _request(path: Path, lines: list[dict[str, object]]) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    await writer.drain()
    answers = [json.loads(await reader.readline()) for _ in lines]
    writer.close()
    await writer.wait_closed()
    return answers


async def test_agent_work_runs_without_blocking_calls_on_the_loop(
    tmp_path: Path, broker: Broker
) -> None:
    broker.start()
    sub = Subscriber(broker.port).start()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[node]\nid = "loop-check"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[uplink]\nurl = "{broker.url}"\nkeepalive = "2s"\nbackoff_max = "0.5s"\n'
        f'[api]\nsocket = "{tmp_path / "agent.sock"}"\n'
        '[telemetry]\ninterval = "1s"\n[discovery]\nenabled = false\n'
    )
    settings = load_settings(config, must_exist=True)
    agent = Agent(settings)
    try:
        # Start-up (opening files, binding the socket) happens before the loop is
        # busy serving; from here on every blocking call on the loop thread raises.
        runner = asyncio.ensure_future(agent.run())
        for _ in range(200):
            if settings.api.socket.exists():
                break
            await asyncio.sleep(0.02)
        with blockbuster.blockbuster_ctx("edge"):
            answers = await _request(
                settings.api.socket,
                [{"op": "publish", "topic": "t", "data": str(i)} for i in range(300)]
                + [{"op": "status"}, {"op": "queue"}, {"op": "nope"}],
            )
            assert all(a["ok"] for a in answers[:302])
            await asyncio.sleep(0.8)  # telemetry ticks, heartbeats, acks
            broker.stop()  # an outage and a reconnect, under watch too
            await asyncio.sleep(1.0)
            broker.start()
            for _ in range(300):
                if len(sub.distinct_seqs()) >= 300:
                    break
                await asyncio.sleep(0.05)
        assert len(sub.distinct_seqs()) >= 300
        assert not runner.done(), "the agent stopped: a blocking call raised inside it"
    finally:
        agent.stop()
        await asyncio.wait_for(runner, 10)
        sub.close()
