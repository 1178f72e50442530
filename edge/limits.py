"""Memory and CPU limits for services: cgroup v2 where the agent may use it, else setrlimit.

cgroup v2 needs a unified hierarchy and a cgroup of the agent's own in which
the memory and cpu controllers are (or can be) enabled for children, as under
systemd with `Delegate=yes`. Without it, memory falls back to RLIMIT_AS (the
address space, a coarser bound than resident memory) and CPU has no sensible
rlimit at all: status says so rather than pretending.

Every function here blocks (sysfs I/O): call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.services import ServiceSpec

__all__ = ["Limits", "Placement", "delegated_cgroup", "kill_cgroup", "prepare", "remove"]

log = logging.getLogger("edge.limits")

_ROOT = Path("/sys/fs/cgroup")
_SELF = Path("/proc/self/cgroup")
_CONTROLLERS = ("memory", "cpu")
_PERIOD = 100_000  # microseconds: cpu.max's default period
_AGENT_LEAF = "edge-agent"


@dataclass(frozen=True)
class Limits:
    """The limits one service gets, and how: `mode` is "cgroup", "rlimit" or "none"."""

    mode: str
    applied: tuple[str, ...] = ()      # e.g. "memory.max=268435456", "RLIMIT_AS=268435456"
    missing: tuple[str, ...] = ()      # asked for, not enforced, and why
    cgroup: Path | None = None
    address_space: int | None = None   # RLIMIT_AS in bytes


NO_LIMITS = Limits(mode="none")


def delegated_cgroup(root: Path = _ROOT, own: Path = _SELF) -> Path | None:
    """The cgroup the agent may create service cgroups under, or None (use setrlimit)."""
    try:
        if not (root / "cgroup.controllers").exists():
            return None  # cgroup v1 or a hybrid mount: the controllers are not on v2
        lines = [line for line in own.read_text().splitlines() if line.startswith("0::")]
        if not lines:
            return None
        base = root / lines[0][3:].strip().lstrip("/")
        if not _enable_controllers(base):
            return None
        probe = base / f"edge-probe-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        try:
            usable = all((probe / f"{c}.max").exists() for c in _CONTROLLERS)
        finally:
            probe.rmdir()
        return base if usable else None
    except OSError as exc:
        log.info("cgroup v2 not usable for service limits (%s); using setrlimit", exc)
        return None


def _enable_controllers(base: Path) -> bool:
    control = base / "cgroup.subtree_control"
    if set(_CONTROLLERS) <= set(control.read_text().split()):
        return True
    if not set(_CONTROLLERS) <= set((base / "cgroup.controllers").read_text().split()):
        return False  # not delegated to us
    wanted = " ".join(f"+{c}" for c in _CONTROLLERS)
    try:
        control.write_text(wanted)
    except OSError:
        # A cgroup with processes in it cannot enable controllers for children (cgroup
        # v2's no-internal-processes rule): move the agent into a leaf of its own first.
        leaf = base / _AGENT_LEAF
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        control.write_text(wanted)
    return True


def prepare(spec: ServiceSpec, parent: Path | None) -> Limits:
    """Make the service's cgroup and write its limits, or plan the rlimit fallback."""
    if not spec.has_limits:
        return NO_LIMITS
    if parent is not None:
        group = parent / f"edge-{spec.name}"
        try:
            group.mkdir(exist_ok=True)
            written: list[str] = []
            if spec.memory_max is not None:
                (group / "memory.max").write_text(str(spec.memory_max))
                written.append(f"memory.max={spec.memory_max}")
            if spec.cpu_max is not None:
                quota = max(1000, round(spec.cpu_max * _PERIOD))  # the kernel's minimum is 1 ms
                (group / "cpu.max").write_text(f"{quota} {_PERIOD}")
                written.append(f"cpu.max={quota} {_PERIOD}")
            return Limits(mode="cgroup", applied=tuple(written), cgroup=group)
        except OSError as exc:
            log.warning("service %s: cannot set cgroup limits in %s (%s); using setrlimit",
                        spec.name, group, exc)
    applied = (f"RLIMIT_AS={spec.memory_max}",) if spec.memory_max is not None else ()
    missing = (("cpu_max: not enforced, it needs cgroup v2 with the cpu controller",)
               if spec.cpu_max is not None else ())
    return Limits(mode="rlimit", applied=applied, missing=missing,
                  address_space=spec.memory_max)


def remove(limits: Limits) -> None:
    """Remove the service's cgroup once it is empty (a busy one stays for next time)."""
    if limits.cgroup is not None:
        with contextlib.suppress(OSError):
            limits.cgroup.rmdir()


def kill_cgroup(limits: Limits) -> None:
    """SIGKILL every process in the service's cgroup, even one that left its session."""
    if limits.cgroup is not None:
        with contextlib.suppress(OSError):
            (limits.cgroup / "cgroup.kill").write_text("1")


class Placement:
    """What a new child does between fork and exec to take its limits; close it after."""

    def __init__(self, limits: Limits) -> None:
        self._address_space = limits.address_space
        self._procs: int | None = None
        if limits.cgroup is not None:
            self._procs = os.open(limits.cgroup / "cgroup.procs", os.O_WRONLY)

    def preexec(self) -> Callable[[], None] | None:
        """The function for `preexec_fn`, or None when there is nothing to do."""
        procs, address_space = self._procs, self._address_space
        if procs is None and address_space is None:
            return None

        def enter() -> None:
            # Runs in the forked child of a threaded agent: plain system calls on values
            # bound beforehand, no locks, no imports, no logging.
            if procs is not None:
                os.write(procs, b"0")  # the child moves itself: none of its own can escape
            if address_space is not None:
                resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

        return enter

    def close(self) -> None:
        """Close the cgroup file the parent opened for the child."""
        if self._procs is not None:
            os.close(self._procs)
            self._procs = None
