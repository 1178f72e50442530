"""Discovery never blocks the agent's event loop (blockbuster, inside a namespace of ours)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.agent import REPO_ROOT
from tests.support.netns import Lan

pytest.importorskip("blockbuster", reason="blockbuster is in the test extras")


def test_discovery_work_runs_without_blocking_calls_on_the_loop(lan: Lan, tmp_path: Path) -> None:
    peer = lan.add_host("p").agent("node-peer")
    checker = lan.add_host("c")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [*checker.prefix, sys.executable, str(REPO_ROOT / "tests/support/discovery_loop.py"),
         str(tmp_path / "loop"), peer.node_id],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
