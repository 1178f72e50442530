"""Service limits: the cgroup v2 files and formats, the fallback to setrlimit, the child's join.

The real cgroup path runs in test_supervisor's memory test wherever the agent
may use cgroup v2; here a directory stands in for the cgroup to check what
is written, in what format, and that the child writes itself in before exec.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from edge import limits
from edge.limits import Limits, Placement
from edge.services import ServiceSpec

SPEC = ServiceSpec(name="app", command=("/bin/app",), memory_max=128 * 1024 * 1024, cpu_max=0.5)


def test_a_host_without_unified_cgroup_v2_falls_back_to_rlimit(tmp_path: Path) -> None:
    own = tmp_path / "self-cgroup"
    own.write_text("0::/system.slice/edge.service\n4:memory:/system.slice/edge.service\n")
    assert limits.delegated_cgroup(root=tmp_path, own=own) is None  # no cgroup.controllers
    chosen = limits.prepare(SPEC, None)
    assert chosen == Limits(mode="rlimit", applied=("RLIMIT_AS=134217728",),
                            missing=("cpu_max: not enforced, it needs cgroup v2 with the cpu"
                                     " controller",), address_space=128 * 1024 * 1024)


def test_cgroup_limits_are_written_in_the_kernel_formats(tmp_path: Path) -> None:
    chosen = limits.prepare(SPEC, tmp_path)
    group = tmp_path / "edge-app"
    assert (group / "memory.max").read_text() == "134217728"
    assert (group / "cpu.max").read_text() == "50000 100000"
    assert chosen == Limits(mode="cgroup", applied=("memory.max=134217728",
                                                    "cpu.max=50000 100000"), cgroup=group)


def test_a_cgroup_that_cannot_be_made_falls_back_to_rlimit(tmp_path: Path) -> None:
    chosen = limits.prepare(SPEC, tmp_path / "gone" / "away")
    assert chosen.mode == "rlimit" and chosen.address_space == SPEC.memory_max


def test_a_spec_without_limits_gets_none(tmp_path: Path) -> None:
    plain = ServiceSpec(name="plain", command=("/bin/app",))
    assert limits.prepare(plain, tmp_path) == limits.NO_LIMITS
    assert not list(tmp_path.iterdir())


async def test_a_child_writes_itself_into_its_cgroup_before_exec(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("")
    placement = Placement(Limits(mode="cgroup", cgroup=tmp_path))
    try:
        # The program itself writes nothing: whatever is in the file, the child wrote
        # between fork and exec, as "0" (itself) the way cgroup.procs takes it.
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "pass", preexec_fn=placement.preexec())
    finally:
        placement.close()
    assert await process.wait() == 0
    assert (tmp_path / "cgroup.procs").read_text() == "0"
