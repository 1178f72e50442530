"""Supervisor figures: CPU with 20 idle services, and time from a crash to running again.

    .venv/bin/python bench/services.py            # ~40 s
    .venv/bin/python bench/services.py --quick    # ~15 s

- idle CPU: CPU time (user+system) of a process running only a Supervisor
  with 20 `/bin/sleep` services, over the window, as % of one core; also its
  RSS and thread count. Then the same with a tcp health check on each service
  every 1 s (against a listener the bench keeps accepting on).
- crash to running: a service records `time.monotonic()` first thing and just
  before `exit(1)`; `restart = "always"`, back-off fixed at 100 ms
  (`backoff_initial = backoff_max`, no jitter). The figure is exit to the next
  run's first line, minus the 100 ms; median and worst.
- of which Python start: the same gap for a bare `python -c` started by
  `subprocess` in a loop: what the child costs, not the supervisor.

The supervisor runs in its own process (not this one) so its CPU is measured alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

_RUNNER = """
import asyncio, json, sys, tomllib
from pathlib import Path
sys.path.insert(0, {root!r})
from edge.services import parse_services
from edge.supervisor import Supervisor

async def main():
    specs = parse_services(tomllib.loads(Path(sys.argv[1]).read_text())["services"], sys.argv[1])
    supervisor = Supervisor(specs, Path(sys.argv[2]), env_extra={{}})
    task = asyncio.create_task(supervisor.run())
    try:
        await asyncio.sleep(float(sys.argv[3]))
    finally:
        await supervisor.close()
        task.cancel()

asyncio.run(main())
"""


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers and lists of them read the same in TOML


def _config(services: dict[str, dict[str, object]]) -> str:
    lines = []
    for name, keys in services.items():
        lines.append(f"[services.{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def _run_supervisor(work: Path, config: str, seconds: float) -> subprocess.Popen[bytes]:
    (work / "services.toml").write_text(config)
    (work / "runner.py").write_text(_RUNNER.format(root=str(REPO_ROOT)))
    return subprocess.Popen([sys.executable, str(work / "runner.py"), str(work / "services.toml"),
                             str(work / "data"), str(seconds)])


def idle_cpu(work: Path, settle: float, window: float, checks: bool) -> tuple[float, int, int]:
    """% of one core the supervisor process uses with 20 idle services, its RSS and threads."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(100)
    port = listener.getsockname()[1]
    services: dict[str, dict[str, object]] = {}
    for i in range(20):
        keys: dict[str, object] = {"command": ["/bin/sleep", "3600"], "stop_timeout": "2s"}
        if checks:
            keys["health"] = {"tcp": f"127.0.0.1:{port}", "interval": "1s"}
        services[f"idle{i:02d}"] = keys
    runner = _run_supervisor(work, _config(services), settle + window + 5)
    try:
        process = psutil.Process(runner.pid)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            try:  # the checks' connections queue up unless someone accepts them
                listener.settimeout(0.05)
                listener.accept()[0].close()
            except TimeoutError:
                pass
        before = process.cpu_times()
        started = time.monotonic()
        while time.monotonic() - started < window:
            try:
                listener.settimeout(0.05)
                listener.accept()[0].close()
            except TimeoutError:
                pass
        after = process.cpu_times()
        spent = (after.user - before.user) + (after.system - before.system)
        if runner.poll() is not None:
            raise RuntimeError(f"the supervisor exited early with {runner.returncode}")
        return (100 * spent / (time.monotonic() - started), process.memory_info().rss,
                process.num_threads())
    finally:
        runner.wait(timeout=30)
        listener.close()


def crash_to_running(work: Path, crashes: int) -> list[float]:
    """Seconds from one run's exit to the next run's first line, minus the 100 ms back-off."""
    marks = work / "marks"
    code = textwrap.dedent(f"""
        import time
        start = time.monotonic()
        with open({str(marks)!r}, "a") as f:
            f.write(f"start {{start}}\\n")
            f.write(f"exit {{time.monotonic()}}\\n")
        raise SystemExit(1)
    """)
    config = _config({"crasher": {
        "command": [sys.executable, "-c", code], "restart": "always",
        "backoff_initial": "100ms", "backoff_max": "100ms", "backoff_jitter": 0.0,
    }})
    runner = _run_supervisor(work, config, 0.15 * crashes + 5)
    try:
        while not marks.exists() or marks.read_text().count("start") < crashes + 1:
            time.sleep(0.05)
            if runner.poll() is not None:
                break
    finally:
        runner.wait(timeout=60)
    events = [line.split() for line in marks.read_text().splitlines()]
    gaps = []
    for (kind, at), (next_kind, next_at) in itertools.pairwise(events):
        if kind == "exit" and next_kind == "start":
            gaps.append(float(next_at) - float(at) - 0.1)
    return gaps


def python_start(runs: int) -> list[float]:
    """Seconds from Popen to a bare Python child's first line."""
    gaps = []
    for _ in range(runs):
        began = time.monotonic()
        out = subprocess.run([sys.executable, "-c", "import time; print(time.monotonic())"],
                             capture_output=True, text=True, check=True).stdout
        gaps.append(float(out) - began)
    return gaps


def _ms(values: list[float]) -> str:
    return (f"median {1000 * statistics.median(values):.1f} ms, worst {1000 * max(values):.1f} ms"
            f" ({len(values)} runs)")


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    settle, window, crashes = (2.0, 5.0, 20) if options.quick else (5.0, 20.0, 50)
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as directory:
        work = Path(directory)
        for checks in (False, True):
            (work / "data").mkdir(exist_ok=True)
            cpu, rss, threads = idle_cpu(work, settle, window, checks)
            label = "tcp checks every 1s" if checks else "no checks"
            print(f"idle CPU, 20 services, {label}: {cpu:.2f}% of one core"
                  f" (RSS {rss / 2**20:.1f} MiB, {threads} threads)")
        gaps = crash_to_running(work, crashes)
        print(f"crash to running again (minus 100 ms back-off): {_ms(gaps)}")
        print(f"  of which a bare Python start: {_ms(python_start(crashes))}")
    print(f"machine: {psutil.cpu_count()} CPUs, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
