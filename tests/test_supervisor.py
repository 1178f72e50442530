"""The supervisor with real child processes: restarts, stops, health, order, limits, leftovers.

Every service is a small `python -c` program whose argv carries a marker unique
to the test, so processes are counted (and, after a failure, cleaned up) by
what they are, not by pid.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge import health, procs
from edge.services import HealthSpec, ServiceError, ServiceSpec
from edge.supervisor import Supervisor
from tests.support.aio import until
from tests.support.net import free_port

SUPERVISE = Path(__file__).parent / "support" / "supervise.py"


@pytest.fixture
def marker() -> Iterator[str]:
    """A word in the argv of every process of this test; whatever carries it is killed after."""
    word = f"edge-test-{uuid.uuid4().hex}"
    yield word
    for process in _marked(word):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _marked(word: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if word in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


async def count(word: str) -> int:
    """How many live processes carry `word` in their argv."""
    return len(await asyncio.to_thread(_marked, word))


def python(code: str, word: str) -> tuple[str, ...]:
    """argv running `code`, with `word` as its sys.argv[1]."""
    return (sys.executable, "-c", textwrap.dedent(code), word)


def spec(name: str, code: str, word: str, **options: Any) -> ServiceSpec:
    """A service running `code`, with test-sized timings unless given."""
    options.setdefault("backoff_initial", 0.05)
    options.setdefault("backoff_max", 0.2)
    options.setdefault("stop_timeout", 2.0)
    return ServiceSpec(name=name, command=python(code, word), **options)


SLEEP = "import time\ntime.sleep(600)"


def row(supervisor: Supervisor, name: str) -> dict[str, Any]:
    """The service's row of the snapshot."""
    return next(r for r in supervisor.snapshot() if r["name"] == name)


@asynccontextmanager
async def supervising(specs: list[ServiceSpec], data_dir: Path,
                      **options: Any) -> AsyncIterator[Supervisor]:
    """A Supervisor running on this loop; closed (and its run cancelled) on the way out."""
    options.setdefault("env_extra", {"EDGE_NODE_ID": "test-node"})
    supervisor = Supervisor({s.name: s for s in specs}, data_dir, **options)
    running = asyncio.create_task(supervisor.run())
    try:
        yield supervisor
    finally:
        await supervisor.close()
        running.cancel()
        try:
            await running
        except asyncio.CancelledError:
            pass


def _starts(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


# ---- restart policy ---------------------------------------------------------------


async def test_service_that_exits_1_restarts_with_growing_backoff(
        tmp_path: Path, marker: str) -> None:
    starts = tmp_path / "starts"
    code = f"""
        import sys, time
        with open({str(starts)!r}, "a") as f:
            f.write(f"{{time.monotonic()}}\\n")
        sys.exit(1)
    """
    failing = spec("failing", code, marker, backoff_initial=0.1, backoff_max=2.0,
                   backoff_jitter=0.0)
    async with supervising([failing], tmp_path) as supervisor:
        await until(lambda: len(_starts(starts)) >= 4, what="four starts")
        assert row(supervisor, "failing")["last_exit"] == 1
    at = _starts(starts)
    gaps = [later - earlier for earlier, later in itertools.pairwise(at)]
    # 0.1 s, 0.2 s, 0.4 s of backoff, each plus a Python start.
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4, gaps
    assert gaps[2] > gaps[0] + 0.2, gaps


async def test_never_is_not_restarted(tmp_path: Path, marker: str) -> None:
    once = spec("once", "import sys; sys.exit(1)", marker, restart="never")
    async with supervising([once], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "once")["state"] == "failed", what="failed")
        await asyncio.sleep(0.4)  # two initial backoffs: a restart would have happened
        shown = row(supervisor, "once")
    assert (shown["state"], shown["restarts"], shown["last_exit"]) == ("failed", 0, 1)


async def test_on_failure_is_not_restarted_after_exit_0(tmp_path: Path, marker: str) -> None:
    done = spec("done", "print('all done')", marker, restart="on-failure")
    async with supervising([done], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "done")["state"] == "stopped", what="stopped")
        await asyncio.sleep(0.4)
        shown = row(supervisor, "done")
    assert (shown["state"], shown["restarts"], shown["last_exit"]) == ("stopped", 0, 0)
    assert "all done" in shown["log_tail"]


async def test_always_restarts_after_exit_0(tmp_path: Path, marker: str) -> None:
    again = spec("again", "print('tick')", marker, restart="always")
    async with supervising([again], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "again")["restarts"] >= 2, what="two restarts")


async def test_crash_loop_shows_crash_looping_with_last_exit_and_log_tail(
        tmp_path: Path, marker: str) -> None:
    code = "import sys\nprint('boom: no config', file=sys.stderr)\nsys.exit(3)"
    looping = spec("looping", code, marker, backoff_initial=0.02, backoff_max=0.1)
    async with supervising([looping], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "looping")["state"] == "crash-looping",
                    what="crash-looping")
        shown = row(supervisor, "looping")
        assert shown["last_exit"] == 3
        assert "boom: no config" in shown["log_tail"]
        assert "exited with 3" in shown["reason"]
        # Never given up: it is still being retried at backoff_max.
        restarts = shown["restarts"]
        await until(lambda: row(supervisor, "looping")["restarts"] >= restarts + 3,
                    what="more restarts at backoff_max")


async def test_restart_request_starts_a_running_service_again(
        tmp_path: Path, marker: str) -> None:
    sleeper = spec("sleeper", SLEEP, marker)
    async with supervising([sleeper], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "sleeper")["pid"] is not None, what="running")
        first = row(supervisor, "sleeper")["pid"]
        await supervisor.restart("sleeper")
        await until(lambda: row(supervisor, "sleeper")["pid"] not in (None, first),
                    what="a new pid")
        assert row(supervisor, "sleeper")["restarts"] == 1
        assert await count(marker) == 1
        with pytest.raises(ServiceError, match="no service 'nope'"):
            await supervisor.restart("nope")


# ---- stopping -----------------------------------------------------------------------

STUBBORN = """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                " time.sleep(600)")
    subprocess.Popen([sys.executable, "-c", stubborn, sys.argv[1]])
    # One that moved to a process group of its own, still in the session.
    subprocess.Popen([sys.executable, "-c", stubborn, sys.argv[1]],
                     preexec_fn=lambda: os.setpgid(0, 0))
    time.sleep(600)
"""


async def test_stop_timeout_escalates_to_sigkill_for_the_whole_group(
        tmp_path: Path, marker: str) -> None:
    stubborn = spec("stubborn", STUBBORN, marker, stop_timeout=0.5)
    async with supervising([stubborn], tmp_path) as supervisor:
        await until(lambda: len(_marked(marker)) == 3, what="a child and two grandchildren")
        began = time.monotonic()
        await supervisor.close()
        took = time.monotonic() - began
    assert await count(marker) == 0
    assert took >= 0.5
    assert row(supervisor, "stubborn")["last_exit"] == -signal.SIGKILL


async def test_a_service_that_stops_on_sigterm_is_not_killed(
        tmp_path: Path, marker: str) -> None:
    polite = spec("polite", SLEEP, marker, stop_timeout=5.0)
    async with supervising([polite], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "polite")["pid"] is not None, what="running")
        began = time.monotonic()
        await supervisor.close()
        assert time.monotonic() - began < 2.0
    assert row(supervisor, "polite")["last_exit"] == -signal.SIGTERM


async def test_stragglers_of_a_service_that_exited_are_ended(
        tmp_path: Path, marker: str) -> None:
    code = f"""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", {SLEEP!r}, sys.argv[1]])
        sys.exit(0)
    """
    leaves = spec("leaves", code, marker, restart="on-failure")
    async with supervising([leaves], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "leaves")["state"] == "stopped", what="stopped")
        assert await count(marker) == 0


async def test_a_child_that_left_the_services_session_is_ended_with_the_service(
        tmp_path: Path, marker: str) -> None:
    # start_new_session: the child is a session of its own, as `setsid` or a daemon makes it.
    code = f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {SLEEP!r}, sys.argv[1]],
                         start_new_session=True)
        time.sleep(600)
    """
    runaway = spec("runaway", code, marker, restart="never")
    async with supervising([runaway], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "runaway")["state"] == "running", what="running")
        await until(lambda: _count_now(marker) == 2, what="the service and its child")
        await supervisor.restart("runaway")  # the old one stops, and its runaway child too
        await until(lambda: _count_now(marker) == 2, what="one service and one child")
    assert await count(marker) == 0


def _count_now(word: str) -> int:
    return len(_marked(word))


# ---- desired-state services: added, changed, removed while the others run ----------------


async def test_apply_adds_changes_and_removes_services_and_leaves_the_others(
        tmp_path: Path, marker: str) -> None:
    fixed = spec("fixed", SLEEP, marker)
    async with supervising([fixed], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "fixed")["state"] == "running", what="fixed runs")
        fixed_pid = row(supervisor, "fixed")["pid"]
        first = await supervisor.apply({
            "a": spec("a", SLEEP, marker),
            "b": spec("b", SLEEP, marker, depends_on=("fixed",)),
        })
        assert first == {"a": ("applied", None), "b": ("applied", None)}
        await until(lambda: all(row(supervisor, n)["state"] == "running" for n in "ab"),
                    what="a and b running")
        a_pid, b_pid = row(supervisor, "a")["pid"], row(supervisor, "b")["pid"]
        assert row(supervisor, "a")["source"] == "desired"
        assert row(supervisor, "fixed")["source"] == "config"

        second = await supervisor.apply({
            "a": spec("a", SLEEP, marker, stop_timeout=3.0),  # changed: restarted
            "c": spec("c", SLEEP, marker),
            "fixed": spec("fixed", "import sys; sys.exit(3)", marker),  # not the registry's
        })
        assert second["a"] == ("applied", None) and second["c"] == ("applied", None)
        assert second["b"] == ("removed", None)
        assert second["fixed"][0] == "failed" and "config file" in str(second["fixed"][1])
        await until(lambda: row(supervisor, "a")["state"] == "running"
                    and row(supervisor, "c")["state"] == "running", what="a again, and c")
        assert row(supervisor, "a")["pid"] != a_pid
        assert not psutil.pid_exists(b_pid) or psutil.Process(b_pid).status() == "zombie"
        assert [r["name"] for r in supervisor.snapshot()] == ["fixed", "a", "c"]
        assert row(supervisor, "fixed")["pid"] == fixed_pid

        assert await supervisor.apply({}) == {"a": ("removed", None), "c": ("removed", None)}
        assert [r["name"] for r in supervisor.snapshot()] == ["fixed"]
        await until(lambda: _count_now(marker) == 1, what="only the config service left")


async def test_apply_before_run_starts_the_services_when_run_begins(
        tmp_path: Path, marker: str) -> None:
    supervisor = Supervisor({}, tmp_path, env_extra={})
    assert await supervisor.apply({"boot": spec("boot", SLEEP, marker)}) == {
        "boot": ("applied", None)}
    assert await count(marker) == 0  # recorded only: nothing runs before run()
    running = asyncio.create_task(supervisor.run())
    try:
        await until(lambda: row(supervisor, "boot")["state"] == "running", what="boot runs")
    finally:
        await supervisor.close()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert await count(marker) == 0


# ---- health and order ------------------------------------------------------------------


async def test_failing_exec_health_check_restarts_a_running_service(
        tmp_path: Path, marker: str) -> None:
    check = HealthSpec(kind="exec", exec=(sys.executable, "-c", "raise SystemExit(1)"),
                       interval=0.1, timeout=2.0, retries=2)
    sick = spec("sick", SLEEP, marker, health=check)
    async with supervising([sick], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "sick")["pid"] is not None, what="running")
        first = row(supervisor, "sick")["pid"]
        await until(lambda: row(supervisor, "sick")["restarts"] >= 1, what="a restart")
        await until(lambda: row(supervisor, "sick")["pid"] not in (None, first), what="new pid")
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
        assert any("unhealthy" in line for line in row(supervisor, "sick")["log_tail"])


async def test_a_first_passing_check_ends_the_start_period(
        tmp_path: Path, marker: str) -> None:
    flag = tmp_path / "healthy"
    flag.touch()
    check = HealthSpec(kind="exec", exec=("test", "-e", str(flag)), interval=0.1, timeout=2.0,
                       retries=2, start_period=60.0)
    sick = spec("sick", SLEEP, marker, health=check)
    async with supervising([sick], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "sick")["health"] == "passing", what="passing")
        flag.unlink()  # well within the start period, but after a pass: failures count
        await until(lambda: row(supervisor, "sick")["restarts"] >= 1, what="a restart")


async def test_closed_tcp_port_health_check_restarts_a_running_service(
        tmp_path: Path, marker: str) -> None:
    check = HealthSpec(kind="tcp", host="127.0.0.1", port=free_port(), interval=0.1,
                       timeout=1.0, retries=2)
    deaf = spec("deaf", SLEEP, marker, health=check)
    async with supervising([deaf], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "deaf")["state"] == "unhealthy", what="unhealthy")
        assert row(supervisor, "deaf")["health"] == "failing"
        await until(lambda: row(supervisor, "deaf")["restarts"] >= 1, what="a restart")


def _listener(port: int, ready: Path | None = None, delay: float = 0.0) -> str:
    note = (f"open({str(ready)!r}, 'w').write(str(time.monotonic()))" if ready else "")
    return f"""
        import socket, time
        time.sleep({delay})
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", {port}))
        s.listen()
        {note}
        while True:
            s.accept()[0].close()
    """


def _http_server(port: int, directory: Path, word: str) -> tuple[str, ...]:
    code = f"""
        import functools, http.server
        handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                    directory={str(directory)!r})
        http.server.HTTPServer(("127.0.0.1", {port}), handler).serve_forever()
    """
    return python(code, word)


async def test_passing_health_checks_keep_the_service_running(
        tmp_path: Path, marker: str) -> None:
    tcp_port, http_port = free_port(), free_port()
    # The start period covers a slow start on a loaded machine; it ends at the first pass,
    # so a failure after that would count and restart.
    listening = spec("listening", _listener(tcp_port), marker, health=HealthSpec(
        kind="tcp", host="127.0.0.1", port=tcp_port, interval=0.1, timeout=1.0, retries=1,
        start_period=30.0))
    serving = ServiceSpec(
        name="serving", command=_http_server(http_port, tmp_path, marker),
        health=HealthSpec(kind="http", host="127.0.0.1", port=http_port, path="/",
                          interval=0.1, timeout=1.0, retries=1, start_period=30.0))
    async with supervising([listening, serving], tmp_path) as supervisor:
        await until(lambda: all(r["health"] == "passing" for r in supervisor.snapshot()),
                    what="both checks passing")
        await asyncio.sleep(0.6)
        for shown in supervisor.snapshot():
            assert (shown["state"], shown["restarts"]) == ("running", 0), shown


async def test_http_error_status_restarts_the_service(tmp_path: Path, marker: str) -> None:
    port = free_port()
    missing = ServiceSpec(
        name="missing", command=_http_server(port, tmp_path, marker),
        backoff_initial=0.05, backoff_max=0.2,
        health=HealthSpec(kind="http", host="127.0.0.1", port=port, path="/no-such-page",
                          interval=0.1, timeout=1.0, retries=2))
    async with supervising([missing], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "missing")["restarts"] >= 1, what="a restart")
        assert any("HTTP 404" in line for line in row(supervisor, "missing")["log_tail"])


async def test_depends_on_holds_a_dependant_until_its_dependency_is_healthy(
        tmp_path: Path, marker: str) -> None:
    port = free_port()
    listening_at, started_at = tmp_path / "listening", tmp_path / "started"
    broker = spec("broker", _listener(port, listening_at, delay=0.8), marker,
                  health=HealthSpec(kind="tcp", host="127.0.0.1", port=port, interval=0.1,
                                    timeout=1.0, retries=100))
    app = spec("app", f"import time\nopen({str(started_at)!r}, 'w').write(str(time.monotonic()))"
               f"\n{SLEEP}", marker, depends_on=("broker",))
    async with supervising([app, broker], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "broker")["pid"] is not None, what="broker started")
        waiting = row(supervisor, "app")
        assert (waiting["state"], waiting["pid"], waiting["waiting_for"]) == (
            "starting", None, ["broker"])
        # Created, then written: wait for what it says, not only for the file.
        await until(lambda: started_at.exists() and started_at.read_text() != "",
                    what="app started")
        assert float(started_at.read_text()) >= float(listening_at.read_text())
        assert row(supervisor, "broker")["health"] == "passing"
        assert [r["name"] for r in supervisor.snapshot()] == ["broker", "app"]


async def test_close_stops_dependants_before_their_dependency(
        tmp_path: Path, marker: str) -> None:
    stops = tmp_path / "stops"
    code = f"""
        import signal, sys, time
        def stop(*_):
            time.sleep(0.2)
            with open({str(stops)!r}, "a") as f:
                f.write(sys.argv[2] + "\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(600)
    """
    base = ServiceSpec(name="base", command=(*python(code, marker), "base"))
    top = ServiceSpec(name="top", command=(*python(code, marker), "top"), depends_on=("base",))
    async with supervising([top, base], tmp_path) as supervisor:
        await until(lambda: all("ready" in r["log_tail"] for r in supervisor.snapshot()),
                    what="both ready")
    assert stops.read_text().split() == ["top", "base"]


async def test_a_supervisor_error_leaves_no_double_and_the_service_runs_again(
        tmp_path: Path, marker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = procs.identify, []

    def identify_failing_once(pid: int, boot: str) -> procs.Identity | None:
        calls.append(pid)
        if len(calls) == 1:
            raise RuntimeError("a surprise")
        return real(pid, boot)

    monkeypatch.setattr(procs, "identify", identify_failing_once)
    specs = [spec("one", SLEEP, marker), spec("two", SLEEP, marker)]
    async with supervising(specs, tmp_path) as supervisor:
        await until(lambda: len(calls) >= 3 and all(
            r["state"] == "running" for r in supervisor.snapshot()), what="both running")
        assert sum(r["restarts"] for r in supervisor.snapshot()) == 1
        assert await count(marker) == 2


async def test_a_health_check_that_raises_counts_as_unhealthy(
        tmp_path: Path, marker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: object) -> str | None:
        raise RuntimeError("bug in a check")

    monkeypatch.setattr(health, "check", broken)
    check = HealthSpec(kind="tcp", host="127.0.0.1", port=1, interval=0.05, retries=1)
    checked = spec("checked", SLEEP, marker, health=check)
    async with supervising([checked], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "checked")["restarts"] >= 1, what="a restart")
        assert any("bug in a check" in line for line in supervisor.logs("checked", 50))
        assert await count(marker) <= 1


# ---- output ---------------------------------------------------------------------------------


async def test_log_rotation_caps_size(tmp_path: Path, marker: str) -> None:
    code = """
        import sys, time
        for i in range(400):
            print(f"line {i:04d} " + "x" * 40, flush=i % 50 == 0)
        sys.stdout.flush()
        time.sleep(600)
    """
    chatty = spec("chatty", code, marker, log_max_bytes=2048, log_keep=2)
    async with supervising([chatty], tmp_path) as supervisor:
        await until(lambda: any("line 0399" in x for x in supervisor.logs("chatty", 5)),
                    what="the last line")
        await asyncio.sleep(0.2)
        directory = supervisor.log_path("chatty").parent
        files = sorted(p.name for p in directory.iterdir())
        assert files == ["output.log", "output.log.1", "output.log.2"]
        assert all((directory / name).stat().st_size <= 2048 for name in files)
        assert "line 0399" in (directory / "output.log").read_text()
        assert len(supervisor.logs("chatty", 1000)) <= 200


async def test_follow_yields_the_tail_then_new_lines(tmp_path: Path, marker: str) -> None:
    code = """
        import time
        for i in range(1000):
            print(f"tick {i}", flush=True)
            time.sleep(0.05)
    """
    ticking = spec("ticking", code, marker)
    async with supervising([ticking], tmp_path) as supervisor:
        await until(lambda: "tick 2" in supervisor.logs("ticking", 5), what="three ticks")
        seen: list[str] = []
        async with asyncio.timeout(5):
            feed = supervisor.follow("ticking", lines=2)
            async for line in feed:
                seen.append(line)
                if len(seen) == 6:
                    break
            feed.close()
            assert [line async for line in feed] == []  # a closed feed ends
    ticks = [int(line.split()[1]) for line in seen]
    assert ticks == list(range(ticks[0], ticks[0] + 6)), seen  # no gap between tail and new


async def test_services_get_a_minimal_environment(
        tmp_path: Path, marker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_SECRET", "do-not-leak")
    code = "import json, os\nprint(json.dumps(dict(os.environ)))"
    shows = spec("shows", code, marker, restart="never", env={"LEVEL": "debug"})
    async with supervising([shows], tmp_path, env_extra={"EDGE_NODE_ID": "n1",
                                                           "EDGE_API_SOCKET": "/run/x.sock"}
                           ) as supervisor:
        await until(lambda: row(supervisor, "shows")["state"] == "stopped", what="done")
        env = json.loads(next(line for line in supervisor.logs("shows", 20)
                              if line.startswith("{")))
    assert env["EDGE_NODE_ID"] == "n1" and env["EDGE_API_SOCKET"] == "/run/x.sock"
    assert env["LEVEL"] == "debug" and env["EDGE_SERVICE"] == "shows"
    assert "AGENT_SECRET" not in env and "PATH" in env


# ---- no orphans, no doubles ---------------------------------------------------------------


def _supervise(config: Path, data: Path, snapshot: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(SUPERVISE), str(config), str(data),
                             str(snapshot)])


def _rows(snapshot: Path) -> list[dict[str, Any]]:
    try:
        rows: list[dict[str, Any]] = json.loads(snapshot.read_text())
        return rows
    except (FileNotFoundError, ValueError):
        return []


async def test_kill_9_of_the_supervisor_and_restart_runs_each_service_once(
        tmp_path: Path, marker: str) -> None:
    family = """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]])
        time.sleep(600)
    """
    config = tmp_path / "services.toml"
    config.write_text(
        f"[services.single]\ncommand = {json.dumps(list(python(SLEEP, marker)))}\n"
        'stop_timeout = "1s"\n'
        f"[services.family]\ncommand = {json.dumps(list(python(family, marker)))}\n"
        'stop_timeout = "1s"\n'
    )
    data, snapshot = tmp_path / "data", tmp_path / "snapshot.json"
    first = _supervise(config, data, snapshot)
    try:
        await until(lambda: len(_marked(marker)) == 3, what="three processes")
        before = {p.pid for p in _marked(marker)}
        first.kill()
        await asyncio.to_thread(first.wait)
        assert await count(marker) == 3  # the services outlive their supervisor
        snapshot.unlink()
        second = _supervise(config, data, snapshot)
        try:
            await until(lambda: len(_rows(snapshot)) == 2
                        and all(r["state"] == "running" for r in _rows(snapshot)),
                        what="both running again")
            await until(lambda: len(_marked(marker)) == 3, what="three processes again")
            for _ in range(10):  # and it stays so: no double appears later
                now = {p.pid for p in _marked(marker)}
                assert len(now) == 3 and not now & before
                await asyncio.sleep(0.05)
        finally:
            second.terminate()
            assert await asyncio.to_thread(second.wait, 10) == 0
        assert await count(marker) == 0
    finally:
        first.kill()


async def test_recorded_pid_reused_by_another_process_is_not_signalled(
        tmp_path: Path, marker: str) -> None:
    stranger = await asyncio.create_subprocess_exec(*python(SLEEP, marker + "-stranger"),
                                                    start_new_session=True)
    try:
        boot = procs.boot_id()
        real = procs.identify(stranger.pid, boot)
        assert real is not None
        # What a dead agent recorded for its own child, whose pid the stranger has now.
        recorded = procs.Identity(pid=stranger.pid, starttime=real.starttime - 1, boot=boot)
        (tmp_path / "services").mkdir()
        procs.save_records(tmp_path / "services" / "state.json", {"mine": recorded}, {})
        mine = spec("mine", SLEEP, marker)
        async with supervising([mine], tmp_path) as supervisor:
            await until(lambda: row(supervisor, "mine")["pid"] is not None, what="running")
            await asyncio.sleep(0.2)
            assert stranger.returncode is None
        assert stranger.returncode is None and psutil.pid_exists(stranger.pid)
    finally:
        stranger.kill()
        await stranger.wait()


async def test_unrecorded_leftover_is_found_by_its_environment_and_ended(
        tmp_path: Path, marker: str) -> None:
    # As if the agent died between starting a child and recording it.
    ours = await asyncio.create_subprocess_exec(
        *python(SLEEP, marker), start_new_session=True,
        env={"EDGE_SUPERVISOR": str(tmp_path / "services"), "EDGE_SERVICE": "mine"})
    others = await asyncio.create_subprocess_exec(
        *python(SLEEP, marker), start_new_session=True,
        env={"EDGE_SUPERVISOR": str(tmp_path / "another-agent" / "services")})
    try:
        await until(lambda: len(_marked(marker)) == 2, what="both running")
        mine = spec("mine", SLEEP, marker)
        async with supervising([mine], tmp_path) as supervisor:
            await until(lambda: row(supervisor, "mine")["pid"] is not None, what="running")
            assert await asyncio.wait_for(ours.wait(), 5) == -signal.SIGTERM
            assert others.returncode is None
            assert await count(marker) == 2  # the new one, and the other agent's
    finally:
        for process in (ours, others):
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_wall_clock_jump_does_not_restart_or_duplicate(
        tmp_path: Path, marker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    steady = spec("steady", _listener(port), marker, health=HealthSpec(
        kind="tcp", host="127.0.0.1", port=port, interval=0.1, timeout=1.0, retries=1))
    async with supervising([steady], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "steady")["health"] == "passing", what="healthy")
        pid = row(supervisor, "steady")["pid"]
        real = time.time
        for step in (3 * 3600, -6 * 3600, 86400):  # a step forward, far back, a day on
            monkeypatch.setattr(time, "time", lambda step=step: real() + step)
            await asyncio.sleep(0.3)
        shown = row(supervisor, "steady")
        assert (shown["pid"], shown["restarts"], shown["state"]) == (pid, 0, "running")
        assert 0 < shown["uptime"] < 10
        assert await count(marker) == 1
        # The identity a restarted agent compares is free of the wall clock too.
        identity = procs.identify(pid, procs.boot_id())
        monkeypatch.setattr(time, "time", real)
        assert identity == procs.identify(pid, procs.boot_id())


async def test_injected_clock_drives_uptime(tmp_path: Path, marker: str) -> None:
    now = [1000.0]
    ticking = spec("ticking", SLEEP, marker)
    async with supervising([ticking], tmp_path, clock=lambda: now[0]) as supervisor:
        await until(lambda: row(supervisor, "ticking")["pid"] is not None, what="running")
        now[0] += 7200.0  # two hours pass on the supervisor's clock, none on the wall
        await asyncio.sleep(0.1)
        shown = row(supervisor, "ticking")
        assert shown["uptime"] == pytest.approx(7200.0)
        assert shown["restarts"] == 0


# ---- limits and accounts ------------------------------------------------------------------


def _address_space_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            return line.split()[3]
    return ""


async def test_memory_limit_is_applied_and_reported(tmp_path: Path, marker: str) -> None:
    limited = spec("limited", SLEEP, marker, memory_max=256 * 1024 * 1024, cpu_max=0.5)
    greedy = spec("greedy", "b = b'x' * (1024 * 1024 * 1024)\nprint('allocated')", marker,
                  memory_max=128 * 1024 * 1024, restart="never")
    async with supervising([limited, greedy], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "limited")["pid"] is not None, what="running")
        await until(lambda: row(supervisor, "greedy")["state"] == "failed", what="greedy fails")
        shown = row(supervisor, "limited")
        pid = shown["pid"]
        if shown["limits"] == "cgroup":
            assert "memory.max=268435456" in shown["limits_applied"]
            assert "edge-limited" in await asyncio.to_thread(
                Path(f"/proc/{pid}/cgroup").read_text)
        else:
            assert shown["limits"] == "rlimit"
            assert shown["limits_applied"] == ["RLIMIT_AS=268435456"]
            assert any("cpu_max" in m for m in shown["limits_missing"])
            assert await asyncio.to_thread(_address_space_limit, pid) == "268435456"
        assert row(supervisor, "greedy")["last_exit"] != 0
        assert "allocated" not in row(supervisor, "greedy")["log_tail"]
        assert row(supervisor, "limited")["restarts"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_user_is_honoured_as_root(tmp_path: Path, marker: str) -> None:
    # /bin/sh, not this venv's python: nobody may not be able to reach that.
    nobody = ServiceSpec(name="nobody", command=("/bin/sh", "-c", 'echo uid $(id -u) $(id -g)',
                                                 marker), user="nobody", restart="never")
    async with supervising([nobody], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "nobody")["state"] == "stopped", what="done")
        import pwd
        entry = pwd.getpwnam("nobody")
        assert f"uid {entry.pw_uid} {entry.pw_gid}" in supervisor.logs("nobody", 10)


def test_user_needs_root_or_a_known_account(tmp_path: Path) -> None:
    unknown = ServiceSpec(name="x", command=("/bin/true",), user="no-such-user-here")
    with pytest.raises(ServiceError, match=r"\[services.x\] user"):
        Supervisor({"x": unknown}, tmp_path, env_extra={})


async def test_a_command_that_cannot_start_is_retried_and_shown(
        tmp_path: Path, marker: str) -> None:
    ghost = ServiceSpec(name="ghost", command=(str(tmp_path / "no-such-program"), marker),
                        backoff_initial=0.02, backoff_max=0.1)
    async with supervising([ghost], tmp_path) as supervisor:
        await until(lambda: row(supervisor, "ghost")["state"] == "crash-looping",
                    what="crash-looping")
        assert "cannot start" in row(supervisor, "ghost")["reason"]


async def test_supervisor_work_runs_without_blocking_calls_on_the_loop(
        tmp_path: Path, marker: str) -> None:
    blockbuster = pytest.importorskip("blockbuster", reason="blockbuster is in the test extras")
    port = free_port()
    specs = [
        spec("crashing", "import sys; print('x'); sys.exit(2)", marker),
        spec("checked", SLEEP, marker, health=HealthSpec(
            kind="tcp", host="127.0.0.1", port=port, interval=0.05, timeout=1.0, retries=2)),
        spec("limited", SLEEP, marker, memory_max=512 * 1024 * 1024),
    ]
    with blockbuster.blockbuster_ctx("edge"):
        async with supervising(specs, tmp_path) as supervisor:
            await until(lambda: row(supervisor, "checked")["restarts"] >= 1
                        and row(supervisor, "crashing")["restarts"] >= 2, what="restarts")
            await supervisor.restart("limited")
    assert await count(marker) == 0

