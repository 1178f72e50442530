"""Run inside a network namespace: an in-process agent with discovery, under blockbuster.

tests/test_event_loop.py checks the rest of the agent; discovery has to be
checked where it may send multicast, which is a namespace of the test's own.
Exits 0 when discovery ran, found the peer, and no blocking call happened on
the loop; prints what went wrong otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import blockbuster

from edge.agent import Agent
from edge.config import load_settings


class _Collect(logging.Handler):
    """Keeps warnings and errors: discovery survives a blocking-call error by design,
    so the error shows only in its log and state."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def write_config(workdir: Path) -> Path:
    """The checked agent's config: discovery on, short timings."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "agent.toml"
    config.write_text(
        f'[node]\nid = "loop-check"\ndata_dir = "{workdir / "data"}"\n'
        f'[api]\nsocket = "{workdir / "agent.sock"}"\n[telemetry]\ninterval = "0s"\n'
        '[discovery]\npeer_timeout = "3s"\nscan_interval = "1s"\n'
    )
    return config


async def main(config: Path, peer: str) -> int:
    problems = _Collect()
    logging.getLogger("edge").addHandler(problems)
    settings = load_settings(config, must_exist=True)
    agent = Agent(settings)
    runner = asyncio.ensure_future(agent.run())
    try:
        await asyncio.sleep(0.2)  # start-up: files, sockets
        with blockbuster.blockbuster_ctx("edge"):
            for _ in range(100):  # registering, browsing, probing, rescanning
                rows = agent.discovery.peers()
                if any(r["node"] == peer and r["state"] == "up" for r in rows):
                    break
                await asyncio.sleep(0.1)
            else:
                print(f"peer {peer} not found: {rows}")
                return 1
            await asyncio.sleep(3.0)  # probes of the quiet peer, rescans
            await agent.discovery.close()  # goodbye, draining, closing
        if runner.done():
            print(f"the agent stopped: {runner.exception()!r}")
            return 1
        bad = [r for r in problems.records if r.name.startswith("edge.discovery")]
        if bad or agent.discovery.state == "failed":
            for record in bad:
                print(f"{record.levelname} {record.name}: {record.getMessage()}")
                if record.exc_info:
                    print(logging.Formatter().formatException(record.exc_info))
            print(f"discovery state {agent.discovery.state}: {agent.discovery.reason}")
            return 1
        return 0
    finally:
        agent.stop()
        await asyncio.wait_for(runner, 10)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(write_config(Path(sys.argv[1])), sys.argv[2])))
