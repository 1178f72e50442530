"""A process that runs a Supervisor, for tests that must `kill -9` the one who supervises.

    python tests/support/supervise.py CONFIG.toml DATA_DIR SNAPSHOT.json

CONFIG.toml holds `[services.NAME]` tables. The snapshot is rewritten (atomically)
every 50 ms. SIGTERM closes the supervisor (an ordered stop) and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from edge.services import parse_services  # noqa: E402
from edge.supervisor import Supervisor  # noqa: E402

_SNAPSHOT_EVERY = 0.05


def _write(path: Path, rows: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(rows))
    os.replace(temporary, path)


async def main(config: Path, data_dir: Path, snapshot: Path) -> None:
    text = await asyncio.to_thread(config.read_text)
    specs = parse_services(tomllib.loads(text).get("services", {}), str(config))
    supervisor = Supervisor(specs, data_dir, env_extra={"EDGE_NODE_ID": "test-node"})
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def report() -> None:
        while True:
            await asyncio.to_thread(_write, snapshot, supervisor.snapshot())
            await asyncio.sleep(_SNAPSHOT_EVERY)

    async with asyncio.TaskGroup() as group:
        running = group.create_task(supervisor.run())
        reporting = group.create_task(report())
        await stop.wait()
        await supervisor.close()
        running.cancel()
        reporting.cancel()
    await asyncio.to_thread(_write, snapshot, supervisor.snapshot())


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
