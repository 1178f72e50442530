"""Commit batching: what `[queue] commit_interval` buys in writes and costs in latency.

Run from the repository root:

    .venv/bin/python bench/commits.py [--quick]

It drives the agent's Outbox in this process (no broker, no socket) with
sensors that each publish at a steady rate, the way services on a board do,
and with one publisher that waits for each answer. For each commit interval it
prints commits per second, messages per commit, bytes written per message and
the publish answer latency. The baseline is commit_interval = 0s in the same
run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.outbox import Outbox  # noqa: E402
from edge.settings import QueueSettings  # noqa: E402

PAYLOAD = ("0123456789abcdefghijklmnopqrstuvwxyz" * 6)[:200]
INTERVALS = (0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5)


def _disk_dir() -> Path:
    """A directory on a real disk: tmpfs would hide the writes."""
    for base in (os.environ.get("TMPDIR"), "/var/tmp", str(REPO / "bench")):
        if base and Path(base).is_dir():
            kind = subprocess.run(["stat", "-f", "-c", "%T", base], capture_output=True,
                                  text=True, check=False).stdout.strip()
            if kind != "tmpfs":
                return Path(base)
    return Path(tempfile.gettempdir())


def _written() -> tuple[int, str]:
    """Bytes this process sent to storage (write_bytes), else written at all (wchar)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    write_bytes = int(fields["write_bytes"])
    return (write_bytes, "write_bytes") if write_bytes else (int(fields["wchar"]), "wchar")


async def _run(directory: Path, interval: float, durability: str, sensors: int, rate: float,
               seconds: float, serial: bool) -> dict[str, Any]:
    settings = replace(QueueSettings(), commit_interval=interval, durability=durability)
    outbox = Outbox(directory / "outbox.db", "bench", settings)
    await outbox.open()
    commits = 0
    write_batch = outbox._write_batch

    def counted(*args: Any) -> Any:
        nonlocal commits
        commits += 1
        return write_batch(*args)

    outbox._write_batch = counted  # type: ignore[method-assign]
    writer = asyncio.create_task(outbox.run())
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def sensor(offset: float) -> None:
        await asyncio.sleep(offset)
        period = 1.0 / rate
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            started = time.monotonic()
            await outbox.put("bench/t", PAYLOAD, "text/plain")
            latencies.append(time.monotonic() - started)
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def one_by_one() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            await outbox.put("bench/t", PAYLOAD, "text/plain")
            latencies.append(time.monotonic() - started)

    before, kind = _written()
    started = time.monotonic()
    if serial:
        await one_by_one()
    else:
        await asyncio.gather(*(sensor(i / (sensors * rate)) for i in range(sensors)))
    took = time.monotonic() - started
    after, _ = _written()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await outbox.close()
    latencies.sort()
    n = len(latencies)
    return {
        "msgs": n, "rate": n / took, "commits_s": commits / took,
        "per_commit": n / max(commits, 1), "bytes_msg": (after - before) / max(n, 1),
        "kind": kind, "p50_ms": 1000 * latencies[n // 2],
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 3 s run per case")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a run (5)")
    parser.add_argument("--sensors", type=int, default=20, help="steady publishers (20)")
    parser.add_argument("--rate", type=float, default=10.0, help="messages/s each (10)")
    parser.add_argument("--reps", type=int, default=3, help="runs per case; medians shown")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    reps = 1 if args.quick else args.reps
    base = Path(tempfile.mkdtemp(prefix="edge-bench-commits-", dir=_disk_dir()))
    kind_of_disk = subprocess.run(["stat", "-f", "-c", "%T", str(base)], capture_output=True,
                                  text=True, check=False).stdout.strip()
    print("=" * 100)
    print(f"edge commit batching benchmark ({'quick' if args.quick else 'full'});"
          f" host {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f};"
          f" data dir on {kind_of_disk} ({base})")
    print(f"steady: {args.sensors} sensors x {args.rate:g} msg/s = "
          f"{args.sensors * args.rate:g} msg/s offered, 200-byte payload, {seconds:g} s a run;"
          " serial: one publisher waiting for each answer")
    print("bytes/msg: /proc/self/io (write_bytes, or wchar where the disk reports none);"
          f" medians of {reps} run(s); ratios against commit_interval 0s in the same run")
    print("-" * 100)
    try:
        for durability in ("normal", "full"):
            for serial in (False, True):
                label = "serial" if serial else "steady"
                print(f"durability {durability}, {label}")
                print(f"  {'interval':>8} {'msg/s':>8} {'commits/s':>10} {'msg/commit':>10}"
                      f" {'bytes/msg':>10} {'vs 0s':>6} {'p50 ms':>8} {'p99 ms':>8}")
                baseline = None
                for interval in INTERVALS:
                    runs = []
                    for rep in range(reps):
                        directory = base / f"{durability}-{label}-{interval}-{rep}"
                        directory.mkdir()
                        runs.append(asyncio.run(_run(directory, interval, durability,
                                                     args.sensors, args.rate, seconds,
                                                     serial)))
                        shutil.rmtree(directory)
                    med = {key: statistics.median(r[key] for r in runs)
                           for key in ("rate", "commits_s", "per_commit", "bytes_msg",
                                       "p50_ms", "p99_ms")}
                    baseline = baseline or med["bytes_msg"]
                    print(f"  {interval * 1000:>6.0f}ms {med['rate']:>8.0f}"
                          f" {med['commits_s']:>10.1f} {med['per_commit']:>10.1f}"
                          f" {med['bytes_msg']:>10.0f} {med['bytes_msg'] / baseline:>6.2f}"
                          f" {med['p50_ms']:>8.1f} {med['p99_ms']:>8.1f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("=" * 100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
