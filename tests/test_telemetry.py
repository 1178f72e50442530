"""Telemetry: the psutil sampler and the schedule that submits its samples."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import cbor2
import psutil
import pytest

from edge.telemetry import Telemetry, _next_tick, read_metrics

GROUPS = ("cpu", "load", "memory", "swap", "disk", "net", "uptime", "process", "temperatures")

# The shape psutil.sensors_temperatures() returns its readings in.
Shwtemp = namedtuple("Shwtemp", "label current high critical")


def _plain(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# --- read_metrics -----------------------------------------------------------


def test_read_metrics_reports_every_group_with_sane_values(tmp_path: Path) -> None:
    before = time.time()
    m = read_metrics(tmp_path)
    assert before <= m["ts"] <= time.time()  # type: ignore[operator]

    for group in GROUPS:
        assert group in m
    # Only temperatures may legitimately be missing on a test host.
    for group in GROUPS[:-1]:
        assert m[group] is not None, m.get(f"{group}_reason")

    cpu, load, mem, swap = m["cpu"], m["load"], m["memory"], m["swap"]
    disk, net, proc = m["disk"], m["net"], m["process"]
    assert isinstance(cpu, dict) and isinstance(cpu["count"], int) and cpu["count"] > 0
    assert 0.0 <= cpu["percent"] <= 100.0
    assert isinstance(load, dict) and set(load) == {"1m", "5m", "15m"}
    assert all(isinstance(v, float) and v >= 0 for v in load.values())
    assert isinstance(mem, dict) and mem["total"] > 0 and 0 < mem["available"] <= mem["total"]
    assert 0.0 <= mem["percent"] <= 100.0
    assert isinstance(swap, dict) and swap["total"] >= 0
    assert isinstance(disk, dict) and disk["path"] == str(tmp_path) and disk["total"] > 0
    assert 0 <= disk["free"] <= disk["total"]
    assert isinstance(net, dict) and isinstance(net["bytes_recv"], int)
    assert isinstance(net["interfaces"], dict) and net["interfaces"]
    assert isinstance(m["uptime"], float) and m["uptime"] > 0
    assert isinstance(proc, dict) and proc["rss"] > 0 and proc["cpu_user"] >= 0


def test_read_metrics_is_plain_json_and_cbor(tmp_path: Path) -> None:
    m = read_metrics(tmp_path)
    assert _plain(m)
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    assert cbor2.loads(cbor2.dumps(m)) == m


def test_temperatures_are_celsius_by_sensor_or_null_with_reason(tmp_path: Path) -> None:
    m = read_metrics(tmp_path)
    temps = m["temperatures"]
    if temps is None:
        reason = m["temperatures_reason"]
        assert isinstance(reason, str) and reason.strip()
    else:
        assert isinstance(temps, dict) and temps
        assert all(isinstance(k, str) and isinstance(v, float) for k, v in temps.items())
        assert all(-60.0 < v < 150.0 for v in temps.values())
        assert "temperatures_reason" not in m


def test_missing_data_dir_measures_nearest_existing_parent(tmp_path: Path) -> None:
    m = read_metrics(tmp_path / "not" / "yet" / "created")
    disk = m["disk"]
    assert isinstance(disk, dict) and disk["path"] == str(tmp_path)
    assert disk["total"] > 0


def test_relative_data_dir_is_resolved_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    disk = read_metrics(Path("state/edge"))["disk"]
    assert isinstance(disk, dict) and disk["path"] == str(tmp_path)


def test_net_totals_leave_out_loopback(tmp_path: Path) -> None:
    net = read_metrics(tmp_path)["net"]
    assert isinstance(net, dict)
    interfaces, excluded = net["interfaces"], net["excluded"]
    assert isinstance(interfaces, dict) and isinstance(excluded, list)
    counted = [v for k, v in interfaces.items() if k not in excluded]
    assert net["bytes_sent"] == sum(v["bytes_sent"] for v in counted)
    assert net["bytes_recv"] == sum(v["bytes_recv"] for v in counted)


def test_one_failing_group_is_null_with_reason_and_the_rest_sampled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied() -> None:
        raise psutil.AccessDenied(msg="/proc/meminfo")

    monkeypatch.setattr(psutil, "virtual_memory", denied)
    m = read_metrics(tmp_path)
    assert m["memory"] is None
    assert "AccessDenied" in str(m["memory_reason"])
    assert "/proc/meminfo" in str(m["memory_reason"])
    for group in ("cpu", "disk", "net", "uptime", "process"):
        assert m[group] is not None and f"{group}_reason" not in m


def test_no_thermal_sensors_gives_null_and_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {})
    m = read_metrics(tmp_path)
    assert m["temperatures"] is None
    assert "no thermal sensors" in str(m["temperatures_reason"])


def test_platform_without_temperature_support_gives_null_and_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(psutil, "sensors_temperatures")
    m = read_metrics(tmp_path)
    assert m["temperatures"] is None
    assert "not supported" in str(m["temperatures_reason"])


def test_failing_temperature_read_gives_null_and_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(psutil, "sensors_temperatures", broken)
    m = read_metrics(tmp_path)
    assert m["temperatures"] is None
    assert "Input/output error" in str(m["temperatures_reason"])
    assert m["memory"] is not None


def test_temperatures_are_keyed_by_chip_and_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readings = {
        "cpu_thermal": [Shwtemp("", 48.3, None, None)],  # Raspberry Pi: one unlabeled zone
        "coretemp": [
            Shwtemp("Package id 0", 55.0, 80.0, 100.0),
            Shwtemp("Core 0", 52.0, 80.0, 100.0),
        ],
        "acpitz": [Shwtemp("", 27.8, None, None), Shwtemp("", 29.8, None, None)],
        "broken": [Shwtemp("x", math.nan, None, None)],
    }
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: readings)
    assert read_metrics(tmp_path)["temperatures"] == {
        "cpu_thermal": 48.3,
        "coretemp/Package id 0": 55.0,
        "coretemp/Core 0": 52.0,
        "acpitz/0": 27.8,
        "acpitz/1": 29.8,
    }


# --- the schedule ------------------------------------------------------------


def test_next_tick_keeps_to_the_grid() -> None:
    assert _next_tick(10.0, 10.3, 1.0) == 11.0
    assert _next_tick(10.0, 11.0, 1.0) == 11.0  # due now: not skipped


def test_next_tick_skips_missed_ticks_instead_of_bursting() -> None:
    assert _next_tick(10.0, 12.5, 1.0) == 13.0
    assert _next_tick(10.0, 13.0, 1.0) == 13.0


# --- Telemetry.run ------------------------------------------------------------


def _fake_sampler(calls: list[tuple[float, int]]) -> Callable[[Path], dict[str, object]]:
    def sample(data_dir: Path) -> dict[str, object]:
        calls.append((time.time(), threading.get_ident()))
        return {"ts": time.time(), "dir": str(data_dir)}

    return sample


async def _run_for(telemetry: Telemetry, seconds: float) -> None:
    task = asyncio.create_task(telemetry.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_samples_are_submitted_every_interval_with_distinct_timestamps(tmp_path: Path) -> None:
    submitted: list[dict[str, object]] = []

    async def submit(metrics: dict[str, object]) -> None:
        submitted.append(metrics)

    telemetry = Telemetry(0.05, tmp_path, submit)
    asyncio.run(_run_for(telemetry, 0.5))

    assert 4 <= len(submitted) <= 11
    stamps = [m["ts"] for m in submitted]
    assert len(set(stamps)) == len(stamps) and stamps == sorted(stamps)  # type: ignore[type-var]
    assert all(m["disk"] is not None for m in submitted)
    assert telemetry.samples == len(submitted)
    assert telemetry.last_sample_ts == stamps[-1]
    assert telemetry.failures == 0


def test_sampling_runs_off_the_event_loop_on_one_thread(tmp_path: Path) -> None:
    calls: list[tuple[float, int]] = []

    async def submit(metrics: dict[str, object]) -> None:
        pass

    async def main() -> int:
        telemetry = Telemetry(0.02, tmp_path, submit, sampler=_fake_sampler(calls))
        await _run_for(telemetry, 0.2)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(calls) >= 3
    threads = {ident for _, ident in calls}
    assert loop_thread not in threads
    # psutil's cpu_percent(interval=None) keeps its previous reading per thread.
    assert len(threads) == 1


def test_slow_sampling_does_not_block_the_loop(tmp_path: Path) -> None:
    def slow(data_dir: Path) -> dict[str, object]:
        time.sleep(0.15)
        return {"ts": time.time()}

    async def submit(metrics: dict[str, object]) -> None:
        pass

    async def main() -> float:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(Telemetry(0.01, tmp_path, submit, sampler=slow).run())
        worst, last = 0.0, loop.time()
        for _ in range(40):
            await asyncio.sleep(0.01)
            now = loop.time()
            worst, last = max(worst, now - last), now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return worst

    assert asyncio.run(main()) < 0.1


def test_failing_submit_is_logged_and_sampling_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def submit(metrics: dict[str, object]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError("outbox is full")

    telemetry = Telemetry(0.03, tmp_path, submit, sampler=lambda _: {"ts": time.time()})
    with caplog.at_level(logging.DEBUG, logger="edge.telemetry"):
        asyncio.run(_run_for(telemetry, 0.4))

    assert calls >= 5
    assert telemetry.failures == 3
    assert telemetry.samples == calls - 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # Logged once per streak, with the traceback; repeats go to debug.
    assert len(errors) == 1
    assert "submit" in errors[0].getMessage() and errors[0].exc_info is not None
    assert "outbox is full" in caplog.text
    assert any("recovered" in r.getMessage() for r in caplog.records)


def test_failing_sampler_is_logged_and_the_loop_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = 0

    def sampler(data_dir: Path) -> dict[str, object]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ValueError("psutil went away")
        return {"ts": time.time()}

    async def submit(metrics: dict[str, object]) -> None:
        pass

    telemetry = Telemetry(0.03, tmp_path, submit, sampler=sampler)
    with caplog.at_level(logging.ERROR, logger="edge.telemetry"):
        asyncio.run(_run_for(telemetry, 0.25))

    assert attempts >= 3 and telemetry.samples == attempts - 1 and telemetry.failures == 1
    assert "psutil went away" in caplog.text


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_telemetry_that_is_off_takes_no_sample(tmp_path: Path, interval: float) -> None:
    called = False

    async def submit(metrics: dict[str, object]) -> None:
        nonlocal called
        called = True

    telemetry = Telemetry(interval, tmp_path, submit, sampler=lambda _: {"ts": time.time()})
    asyncio.run(_run_for(telemetry, 0.3))
    assert not called and telemetry.samples == 0


def test_a_changed_interval_applies_while_running(tmp_path: Path) -> None:
    times: list[float] = []

    async def submit(metrics: dict[str, object]) -> None:
        times.append(time.monotonic())

    telemetry = Telemetry(0.0, tmp_path, submit, sampler=lambda _: {"ts": time.time()})

    async def main() -> None:
        task = asyncio.create_task(telemetry.run())
        await asyncio.sleep(0.2)
        assert not times  # off
        telemetry.set_interval(0.05)
        await asyncio.sleep(0.5)
        on = len(times)
        telemetry.set_interval(0.0)
        await asyncio.sleep(0.1)
        off = len(times)
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert on >= 4, f"{on} samples in 0.5s at a 0.05s interval"
        assert len(times) == off, "samples went on after the interval was set to 0"

    asyncio.run(main())


def test_cancel_while_submitting_propagates(tmp_path: Path) -> None:
    async def main() -> None:
        in_submit = asyncio.Event()

        async def submit(metrics: dict[str, object]) -> None:
            in_submit.set()
            await asyncio.Event().wait()  # an outbox that never commits

        telemetry = Telemetry(0.01, tmp_path, submit, sampler=lambda _: {"ts": time.time()})
        task = asyncio.create_task(telemetry.run())
        await asyncio.wait_for(in_submit.wait(), timeout=2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert telemetry.failures == 0

    asyncio.run(main())


def test_cancel_while_sampling_propagates_without_waiting_for_the_sample(tmp_path: Path) -> None:
    started = threading.Event()

    def slow(data_dir: Path) -> dict[str, object]:
        started.set()
        time.sleep(0.3)
        return {"ts": time.time()}

    async def submit(metrics: dict[str, object]) -> None:
        raise AssertionError("a cancelled tick must not submit")

    async def main() -> float:
        task = asyncio.create_task(Telemetry(0.01, tmp_path, submit, sampler=slow).run())
        await asyncio.to_thread(started.wait, 2)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.2
