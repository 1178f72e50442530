"""`edge logs NAME -f` and the socket's `service.logs` with `follow`: new lines as they come."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any

import psutil
import pytest

from tests.conftest import AgentFactory
from tests.support.agent import REPO_ROOT, Agent
from tests.support.net import wait_until

_TICKER = (
    "import itertools, time\n"
    "for i in itertools.count():\n"
    "    print('tick', i, flush=True)\n"
    "    time.sleep(0.2)\n"
)
_TICK = re.compile(r"\btick (\d+)\b")


def _service(agent: Agent, name: str) -> dict[str, Any]:
    rows = {row["name"]: row for row in agent.request({"op": "services"})["services"]}
    return dict(rows[name])


def _ticks(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := _TICK.search(line))]


def _running(mark: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if mark in (p.info["cmdline"] or [])]


@pytest.fixture
def ticker(agent_factory: AgentFactory) -> Iterator[Agent]:
    """An agent running `tick`, a service printing `tick N` every 0.2 s, with some lines out."""
    mark = f"edge-test-ticker-{uuid.uuid4().hex}"
    agent = agent_factory(None, overrides={"services.tick": {
        "command": [sys.executable, "-c", _TICKER, mark], "stop_timeout": "2s",
    }})
    try:
        wait_until(lambda: _service(agent, "tick")["state"] == "running", 15, what="tick running")
        wait_until(lambda: len(_ticks(_logs(agent, "tick", 200))) >= 2, 10, what="two ticks")
        yield agent
    finally:
        for proc in _running(mark):
            proc.kill()


def _logs(agent: Agent, name: str, lines: int) -> list[str]:
    answer = agent.request({"op": "service.logs", "name": name, "lines": lines})
    assert answer.get("ok") is True, answer
    return list(answer["lines"])


class _FollowCli:
    """`edge logs ARGS -f` as a subprocess; its stdout read one line at a time, bounded."""

    def __init__(self, agent: Agent, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "logs", *args, "-f",
             "--socket", str(agent.socket_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )
        assert self.proc.stdout is not None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._pump.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, done: Any, timeout: float, what: str) -> list[str]:
        """Collect new lines until done(lines) is true; raise TimeoutError past `timeout`."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while not done(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: not within {timeout}s; got {got[-10:]!r}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"{what}: output ended ({self.stop()}); got {got[-10:]!r}")
            got.append(line)
        return got

    @property
    def running(self) -> bool:
        """True while the CLI process runs."""
        return self.proc.poll() is None

    def stop(self) -> str:
        """Terminate it (if still running), close its pipes; return what it said on stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._pump.join(timeout=10)
        err = ""
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            err = self.proc.stderr.read()
            self.proc.stderr.close()
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        return err

    def __enter__(self) -> _FollowCli:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def test_logs_follow_prints_new_lines_as_the_service_prints_them(ticker: Agent) -> None:
    before = max(_ticks(_logs(ticker, "tick", 200)))
    with _FollowCli(ticker, "tick", "-n", "5") as cli:
        lines = cli.until(
            lambda got: len([t for t in _ticks(got) if t > before]) >= 5,
            15,
            what="new tick lines from edge logs -f",
        )
        assert cli.running, "edge logs -f ended on its own"
    ticks = _ticks(lines)
    new = [t for t in ticks if t > before]
    # The tail first (at most 5 lines), then each new line once, in order.
    assert len(ticks) - len(new) <= 5, ticks
    assert ticks == sorted(set(ticks)), f"lines repeated or out of order: {ticks}"
    assert new[-3:] == list(range(new[-3], new[-3] + 3)), f"lines skipped: {ticks}"


def test_logs_follow_outlasts_the_request_timeout_on_a_quiet_service(
    agent_factory: AgentFactory,
) -> None:
    mark = f"edge-test-quiet-{uuid.uuid4().hex}"
    code = "import sys, time\nprint('hello', flush=True)\ntime.sleep(300)\n"
    agent = agent_factory(None, overrides={"services.quiet": {
        "command": [sys.executable, "-c", code, mark], "stop_timeout": "2s",
    }})
    try:
        wait_until(lambda: "hello" in _logs(agent, "quiet", 200), 15, what="quiet said hello")
        first_pid = _service(agent, "quiet")["pid"]
        with _FollowCli(agent, "quiet", "--timeout", "1") as cli:
            cli.until(lambda got: "hello" in got, 10, what="the tail")
            # Nothing is printed for twice the request timeout ...
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert cli.running, f"edge logs -f gave up: {cli.stop()}"
                time.sleep(0.1)
            # ... then a restart prints `hello` again, and edge logs -f shows it.
            assert agent.request({"op": "service.restart", "name": "quiet"})["ok"] is True
            cli.until(lambda got: "hello" in got, 15, what="the restarted service's hello")
            assert _service(agent, "quiet")["pid"] != first_pid
    finally:
        for proc in _running(mark):
            proc.kill()


def test_service_logs_follow_answers_the_tail_then_streams_log_events(ticker: Agent) -> None:
    with ticker.connect(timeout=10) as stream:
        answer = stream.request({"op": "service.logs", "name": "tick", "lines": 5, "follow": True})
        assert answer.get("ok") is True and answer.get("name") == "tick", answer
        tail = answer["lines"]
        assert isinstance(tail, list) and 1 <= len(tail) <= 5, tail
        last = max(_ticks(tail))
        events = [stream.read_response() for _ in range(4)]  # the socket timeout bounds each
    for event in events:
        assert event.get("event") == "log" and isinstance(event.get("line"), str), event
    ticks = _ticks([e["line"] for e in events])
    assert len(ticks) == 4 and all(t > last for t in ticks), (last, events)
    assert ticks == list(range(ticks[0], ticks[0] + 4)), f"lines skipped or repeated: {ticks}"

    unknown = ticker.request({"op": "service.logs", "name": "nope", "lines": 5, "follow": True})
    assert unknown.get("ok") is False and unknown["error"]["code"] == "unknown_service"
