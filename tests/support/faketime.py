"""The agent's wall clock under libfaketime, stepped by the test; its sync state by a file.

libfaketime fakes the wall clock only (FAKETIME_DONT_FAKE_MONOTONIC: the
monotonic clock runs on, as it does when NTP steps a real clock). The test
steps it by writing an offset ("+3h", "-24h", "+0") into the file named by
FAKETIME_TIMESTAMP_FILE, which the agent re-reads once a second
(FAKETIME_CACHE_DURATION=1; `step` waits until the agent's clock moved).
Python hands its GIL over with timed waits on condition variables of the
monotonic clock: libfaketime's "fix" for those (FAKETIME_FORCE_MONOTONIC_FIX)
and reading the file on every clock call (FAKETIME_NO_CACHE) cost so much
there that a busy agent answered a publish in up to a second. Neither is
needed with a real monotonic clock. Whether the agent takes its clock for synchronised is
the file named by EDGE_TEST_CLOCK_SYNC_FILE (edge/clock.py): there or not.
"""

from __future__ import annotations

import glob
import time
from pathlib import Path

from .agent import Agent
from .net import wait_until

__all__ = ["agent_clock", "faked_agent", "faketime_prefix", "find_libfaketime", "step"]

# Debian puts it under the multiarch directory: x86_64-linux-gnu, aarch64-linux-gnu, ...
_LIBFAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)


def find_libfaketime() -> Path | None:
    """The multi-threaded libfaketime (the agent has threads), or None."""
    for pattern in _LIBFAKETIME_GLOBS:
        for found in sorted(glob.glob(pattern)):
            return Path(found)
    return None


def faketime_prefix(lib: Path, offset: Path, sync_file: Path | None = None) -> list[str]:
    """The command prefix that runs the agent with its wall clock at `offset`'s offset."""
    prefix = [
        "env",
        f"LD_PRELOAD={lib}",
        f"FAKETIME_TIMESTAMP_FILE={offset}",
        "FAKETIME_CACHE_DURATION=1",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "FAKETIME_FORCE_MONOTONIC_FIX=0",
    ]
    if sync_file is not None:
        prefix.append(f"EDGE_TEST_CLOCK_SYNC_FILE={sync_file}")
    return prefix


def faked_agent(
    workdir: Path, lib: Path, uplink: str, *, offset: str, synced: bool
) -> tuple[Agent, Path, Path]:
    """An agent (not started) with its clock at `offset` ("+0", "-24h") and synchronised
    or not; with the two files that change that: (agent, offset file, sync file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    offset_file, sync_file = workdir / "faketime.rc", workdir / "synced"
    offset_file.write_text(offset + "\n")
    if synced:
        sync_file.touch()
    agent = Agent(workdir / "agent", uplink=uplink,
                  prefix=faketime_prefix(lib, offset_file, sync_file))
    return agent, offset_file, sync_file


def agent_clock(agent: Agent) -> float:
    """The agent's wall clock: a message id starts with its milliseconds (UUIDv7)."""
    answer = agent.publish_ok("clock/probe", "x")
    return int(answer["id"][:12], 16) / 1000.0


def step(agent: Agent, offset: Path, text: str, seconds: float) -> None:
    """Set the agent's clock to real time + `seconds`, and see that it took."""
    offset.write_text(text + "\n")
    wait_until(
        lambda: abs(agent_clock(agent) - (time.time() + seconds)) < 60,
        10,
        what=f"the agent's clock at {text}",
    )
