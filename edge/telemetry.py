"""Device telemetry: sample host metrics with psutil and submit them on a fixed schedule.

``read_metrics`` is the blocking sampler. ``Telemetry.run`` calls it on a worker
thread every ``interval`` seconds and hands each sample to ``submit`` (the agent
commits it to the outbox as one message on the local topic ``telemetry``).

A sample is a map of plain JSON/CBOR values. Each group (``cpu``, ``load``,
``memory``, ``swap``, ``disk``, ``net``, ``uptime``, ``process``,
``temperatures``) is sampled on its own: a group that cannot be read is
``None`` and a ``"<group>_reason"`` string says why; the other groups are
still there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

__all__ = ["Telemetry", "read_metrics"]

log = logging.getLogger("edge.telemetry")

Sampler = Callable[[Path], dict[str, object]]
Submit = Callable[[dict[str, object]], Awaitable[object]]


class _Unavailable(Exception):
    """A metrics group cannot be read here; the message is the reason, for a person."""


def read_metrics(data_dir: Path) -> dict[str, object]:
    """Sample host metrics (blocking); a group that cannot be read is None plus a reason."""
    metrics: dict[str, object] = {"ts": time.time()}
    readers: list[tuple[str, Callable[[], object]]] = [
        ("cpu", _cpu),
        ("load", _load),
        ("memory", _memory),
        ("swap", _swap),
        ("disk", lambda: _disk(data_dir)),
        ("net", _net),
        ("uptime", _uptime),
        ("process", _process),
        ("temperatures", _temperatures),
    ]
    for group, read in readers:
        try:
            metrics[group] = read()
        except Exception as exc:  # one unreadable group must not cost the others
            metrics[group] = None
            metrics[f"{group}_reason"] = _reason(exc)
    return metrics


def _reason(exc: Exception) -> str:
    if isinstance(exc, _Unavailable):
        return str(exc)
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _cpu() -> dict[str, object]:
    # psutil keeps "since the last call" per thread: the first call on a thread
    # reports a meaningless ~0.0, which is why Telemetry samples on one thread.
    physical = psutil.cpu_count(logical=False)
    return {
        "percent": float(psutil.cpu_percent(interval=None)),
        "count": int(psutil.cpu_count(logical=True) or 0),
        "count_physical": None if physical is None else int(physical),
    }


def _load() -> dict[str, object]:
    one, five, fifteen = psutil.getloadavg()
    return {"1m": float(one), "5m": float(five), "15m": float(fifteen)}


def _memory() -> dict[str, object]:
    vm = psutil.virtual_memory()
    return {
        "total": int(vm.total),
        "available": int(vm.available),
        "used": int(vm.used),
        "percent": float(vm.percent),
    }


def _swap() -> dict[str, object]:
    sw = psutil.swap_memory()
    return {
        "total": int(sw.total),
        "used": int(sw.used),
        "free": int(sw.free),
        "percent": float(sw.percent),
    }


def _disk(data_dir: Path) -> dict[str, object]:
    path = _nearest_existing(data_dir)
    du = psutil.disk_usage(str(path))
    return {
        "path": str(path),
        "total": int(du.total),
        "used": int(du.used),
        "free": int(du.free),
        "percent": float(du.percent),
    }


def _nearest_existing(path: Path) -> Path:
    # The data dir may not exist yet (first boot); its filesystem is the parent's.
    # os.path.exists, unlike Path.exists on 3.11, is False on EACCES too.
    path = path.absolute()
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


_NET_TOTALS = (
    "bytes_sent",
    "bytes_recv",
    "packets_sent",
    "packets_recv",
    "errin",
    "errout",
    "dropin",
    "dropout",
)


def _net() -> dict[str, object]:
    pernic = psutil.net_io_counters(pernic=True)
    loopback = _loopback_interfaces()
    totals = dict.fromkeys(_NET_TOTALS, 0)
    interfaces: dict[str, object] = {}
    for name, counters in sorted(pernic.items()):
        interfaces[name] = {
            "bytes_sent": int(counters.bytes_sent),
            "bytes_recv": int(counters.bytes_recv),
        }
        # Local services talk to the local broker over loopback; counting it
        # would hide the traffic that actually leaves the device.
        if name in loopback:
            continue
        for key in _NET_TOTALS:
            totals[key] += int(getattr(counters, key))
    return {**totals, "excluded": sorted(loopback & pernic.keys()), "interfaces": interfaces}


def _loopback_interfaces() -> set[str]:
    try:
        stats = psutil.net_if_stats()
    except Exception:  # flags are a refinement; the name is a good enough guess
        return {"lo"}
    found = {name for name, st in stats.items() if "loopback" in getattr(st, "flags", "")}
    return found or {"lo"}


def _uptime() -> float:
    # Since boot, suspend included; the wall clock minus the boot time would jump with it.
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _process() -> dict[str, object]:
    proc = psutil.Process()
    with proc.oneshot():
        rss = proc.memory_info().rss
        cpu = proc.cpu_times()
    return {
        "pid": proc.pid,
        "rss": int(rss),
        "cpu_user": float(cpu.user),
        "cpu_system": float(cpu.system),
    }


def _temperatures() -> dict[str, float]:
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        raise _Unavailable(f"temperature sensors are not supported by psutil on {sys.platform}")
    chips = sensors()
    if not chips:
        raise _Unavailable("no thermal sensors visible (container or board without thermal zones)")
    readings: dict[str, float] = {}
    for chip, entries in sorted(chips.items()):
        for index, entry in enumerate(entries):
            current = entry.current
            if current is None or not math.isfinite(current):
                continue
            if entry.label:
                name = f"{chip}/{entry.label}"
            else:
                name = chip if len(entries) == 1 else f"{chip}/{index}"
            if name in readings:  # two sensors of one chip share a label
                name = f"{name}/{index}"
            readings[name] = float(current)
    if not readings:
        raise _Unavailable(
            f"thermal sensors found ({', '.join(sorted(chips))}) but none has a reading"
        )
    return readings


def _next_tick(previous: float, now: float, interval: float) -> float:
    """The first tick of the grid ``previous + k * interval`` (k >= 1) not before ``now``."""
    tick = previous + interval
    if tick < now:  # missed ticks are skipped, not made up in a burst
        tick += math.ceil((now - tick) / interval) * interval
    return tick


def _prime_cpu_percent() -> None:
    psutil.cpu_percent(interval=None)


class Telemetry:
    """Sample metrics every ``interval`` seconds off the event loop and submit each sample."""

    def __init__(
        self,
        interval: float,
        data_dir: Path,
        submit: Submit,
        *,
        sampler: Sampler = read_metrics,
    ) -> None:
        self._interval = interval
        self._interval_changed = asyncio.Event()
        self._data_dir = data_dir
        self._submit = submit
        self._sampler = sampler
        self._failing: str | None = None  # kind of the current failure streak
        self.samples = 0  # samples submitted successfully
        self.failures = 0  # ticks whose sampling or submit failed
        self.last_sample_ts: float | None = None  # "ts" of the last submitted sample

    @property
    def interval(self) -> float:
        """Seconds between samples; 0 is off."""
        return self._interval

    def set_interval(self, seconds: float) -> None:
        """Sample every `seconds` from now on (0: stop sampling)."""
        if seconds != self._interval:
            self._interval = seconds
            self._interval_changed.set()

    async def run(self) -> None:
        """Sample and submit on a monotonic schedule until cancelled; idle while off."""
        while True:
            self._interval_changed.clear()
            if self._interval <= 0:
                await self._interval_changed.wait()
                continue
            sampling = asyncio.ensure_future(self._sample_forever())
            changed = asyncio.ensure_future(self._interval_changed.wait())
            try:
                await asyncio.wait({sampling, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sampling, changed):
                    task.cancel()
                await asyncio.gather(sampling, changed, return_exceptions=True)
            if sampling.done() and not sampling.cancelled():
                sampling.result()  # a failure of the loop itself is not hidden

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        # One dedicated thread rather than asyncio.to_thread: psutil keeps
        # cpu_percent()'s previous reading per thread, so a pool thread that
        # changes between ticks would measure some other window, or report 0.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-telemetry")
        try:
            await loop.run_in_executor(executor, _prime_cpu_percent)
            # The first sample comes one interval after start, so its cpu
            # percent covers a whole interval like every later one.
            tick = loop.time()
            while True:
                tick = _next_tick(tick, loop.time(), self._interval)
                await asyncio.sleep(max(0.0, tick - loop.time()))
                await self._tick(loop, executor)
        finally:
            # A sample in progress finishes on its thread; the loop does not wait for it.
            executor.shutdown(wait=False, cancel_futures=True)

    async def _tick(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        try:
            metrics = await loop.run_in_executor(executor, self._sampler, self._data_dir)
        except Exception as exc:
            self._failed("sampling", exc)
            return
        try:
            await self._submit(metrics)
        except Exception as exc:
            self._failed("submit", exc)
            return
        ts = metrics.get("ts")
        self.last_sample_ts = float(ts) if isinstance(ts, (int, float)) else time.time()
        self.samples += 1
        if self._failing is not None:
            log.info("telemetry recovered (%s)", self._failing)
            self._failing = None

    def _failed(self, stage: str, exc: Exception) -> None:
        self.failures += 1
        kind = f"{stage} raised {type(exc).__name__}"
        if kind == self._failing:  # once per streak: a full queue fails every tick
            log.debug("telemetry %s again: %s", kind, exc)
            return
        self._failing = kind
        log.error(
            "telemetry %s; sample dropped, next one in %gs (repeats logged at debug)",
            kind,
            self._interval,
            exc_info=exc,
        )
