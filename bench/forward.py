"""Forwarding benchmark: raw paho vs. the agent's durable path, drain, RSS, write amplification.

Run from the repository root:

    .venv/bin/python bench/forward.py [--quick]

It starts its own mosquitto on a free loopback port and the agent as a real
subprocess (`python -m edge run --config FILE`), and prints figures; it is
not a test and asserts nothing beyond "every message arrived". See
bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt
import paho.mqtt.client as mqtt
import psutil
from benchkit import BenchError, die_with_parent, free_port, port_accepts, wait_for
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = "/usr/sbin/mosquitto"
PAYLOAD = ("0123456789abcdefghijklmnopqrstuvwxyz" * 6)[:200]  # 200 bytes of text
WINDOW = 50  # MQTT in flight: the agent's default [uplink] inflight
API_WINDOW = 1000  # socket API requests outstanding on one connection
API_CHUNK = 100  # requests written per sendall
PREFIX = "edge/v1"
LOCAL_TOPIC = "bench/t"
MiB = 1024 * 1024

# Every wait is bounded; these are generous because the machine may be shared.
BROKER_START_TIMEOUT = 10.0
AGENT_START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SUBSCRIBE_TIMEOUT = 15.0
API_TIMEOUT = 60.0  # one recv on the socket API


# ---- small helpers -------------------------------------------------------------


def fs_type(path: Path) -> str:
    """The file system type of `path` (`stat -f`), e.g. ext2/ext3, tmpfs."""
    out = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip() or "unknown"


def pick_workdir_base() -> Path:
    """A temp directory on a real disk (write amplification means nothing on tmpfs)."""
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp"), REPO / "bench"]
    for base in candidates:
        if base.is_dir() and os.access(base, os.W_OK) and fs_type(base) not in ("tmpfs", "ramfs"):
            return base
    return candidates[0]


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


# ---- mosquitto -------------------------------------------------------------------


class Broker:
    """One mosquitto on a loopback port, no persistence; restartable on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            "\n".join([
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous true",
                "user root",
                "persistence false",
                "max_queued_messages 0",  # 0 = no limit: the broker must not drop QoS 1
                # mosquitto announces this as its MQTT 5 Receive Maximum (default 20);
                # the agent honours it, raw paho does not: lift it so both use WINDOW.
                "max_inflight_messages 100",
                f"log_dest file {self.log}",
            ]) + "\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """mosquitto's process id while it runs."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start mosquitto and wait until the port accepts connections."""
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"mosquitto exited with {proc.returncode}; see {self.log}")
            return port_accepts(self.port)

        wait_for(up, BROKER_START_TIMEOUT, f"mosquitto on port {self.port}", every=0.01)

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, then SIGKILL). Safe to call twice."""
        proc, self.proc = self.proc, None
        _terminate(proc)


def _terminate(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # in case it was paused
            proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    return proc.returncode


# ---- the agent -------------------------------------------------------------------


@dataclass
class IoCounters:
    """/proc/PID/io of one process."""

    write_bytes: int
    wchar: int
    cancelled: int

    def minus(self, other: IoCounters) -> IoCounters:
        """The difference self - other."""
        return IoCounters(
            self.write_bytes - other.write_bytes, self.wchar - other.wchar,
            self.cancelled - other.cancelled,
        )


class Agent:
    """`python -m edge run --config FILE` with its data dir and socket under `workdir`."""

    def __init__(self, workdir: Path, node: str, broker_port: int) -> None:
        self.workdir = workdir
        self.node = node
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.sock = workdir / "agent.sock"
        self.config = workdir / "agent.toml"
        self.log = workdir / "agent.log"
        self.config.write_text(
            f'[node]\nid = "{node}"\ndata_dir = "{self.data_dir}"\n\n'
            f'[uplink]\nurl = "mqtt://127.0.0.1:{broker_port}"\n'
            f'inflight = {WINDOW}\nkeepalive = "30s"\n'
            'backoff_initial = "0.1s"\nbackoff_max = "0.5s"\n\n'
            # Room for the 1M-message run: the default 256MiB would evict (drop-oldest).
            '[queue]\nmax_bytes = "2GiB"\n\n'
            f'[api]\nsocket = "{self.sock}"\n\n'
            '[telemetry]\ninterval = "0s"\n\n'
            "[discovery]\nenabled = false\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        """The agent's process id (it must be running)."""
        if self.proc is None:
            raise BenchError("the agent is not running")
        return self.proc.pid

    def start(self) -> None:
        """Start the agent and wait until its socket answers `status`."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", "--config", str(self.config)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"agent exited with {proc.returncode}:\n{self.log_tail()}")
            try:
                return bool(self.request({"op": "status"}).get("ok"))
            except OSError:
                return False

        wait_for(ready, AGENT_START_TIMEOUT, "the agent's socket", every=0.05)

    def stop(self) -> int | None:
        """SIGTERM the agent (SIGKILL if it hangs); returns its exit code. Safe twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            self.returncode = _terminate(proc)
        return self.returncode

    def pause(self) -> None:
        """SIGSTOP the agent."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the agent."""
        os.kill(self.pid, signal.SIGCONT)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def request(self, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One request on a fresh connection."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.sock))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise BenchError(f"agent closed the connection on {req}")
                buf += chunk
        answer: dict[str, Any] = json.loads(buf)
        return answer

    def status(self) -> dict[str, Any]:
        """The `status` answer; raises if it is not ok."""
        answer = self.request({"op": "status"})
        if not answer.get("ok"):
            raise BenchError(f"status failed: {answer}")
        return answer

    def wait_online(self, timeout: float = 20.0) -> None:
        """Wait until the uplink says online."""
        wait_for(lambda: self.status()["uplink"]["state"] == "online", timeout,
                 "the agent's uplink to come online", every=0.05)

    def wait_depth(self, depth: int, timeout: float) -> None:
        """Wait until the outbox holds exactly `depth` messages."""
        last: list[int] = []

        def check() -> bool:
            if not self.alive():
                raise BenchError(f"agent died (exit {self.proc and self.proc.returncode}):\n"
                                 f"{self.log_tail()}")
            last[:] = [self.status()["queue"]["depth"]]
            return last[0] == depth

        try:
            wait_for(check, timeout, f"queue depth {depth}", every=0.1)
        except BenchError as exc:
            raise BenchError(f"{exc} (last depth {last})") from exc

    def rss(self) -> int:
        """Resident set size in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def io(self) -> IoCounters:
        """The process's /proc/PID/io counters."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = int(value)
        return IoCounters(
            fields["write_bytes"], fields["wchar"], fields.get("cancelled_write_bytes", 0)
        )

    def log_tail(self, lines: int = 20) -> str:
        """The end of the agent's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_problems(self) -> list[str]:
        """WARNING/ERROR/Traceback lines of the agent's log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        keys = ("WARNING", "ERROR", "CRITICAL", "Traceback", "Exception")
        return [line for line in text.splitlines() if any(k in line for k in keys)]


def push(sock_path: Path, n: int, deadline_s: float) -> tuple[float, float]:
    """Publish `n` messages through the socket API, pipelined; returns (t_first, t_last_ok).

    Requests go out in chunks of API_CHUNK while at most API_WINDOW are
    unanswered; every answer must be `{"ok":true,...}` (sent after commit).
    """
    line = json.dumps(
        {"op": "publish", "topic": LOCAL_TOPIC, "data": PAYLOAD}, separators=(",", ":")
    ).encode() + b"\n"
    chunk = line * API_CHUNK
    deadline = time.monotonic() + deadline_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(API_TIMEOUT)
        s.connect(str(sock_path))
        sent = answered = 0
        buf = b""
        t_first = time.monotonic()
        while answered < n:
            if sent < n and sent - answered <= API_WINDOW - API_CHUNK:
                k = min(API_CHUNK, n - sent)
                s.sendall(chunk if k == API_CHUNK else line * k)
                sent += k
                continue
            data = s.recv(1 << 16)
            if not data:
                raise BenchError(f"agent closed the API connection after {answered} answers")
            buf += data
            *answers, buf = buf.split(b"\n")
            for answer in answers:
                if not answer.startswith(b'{"ok":true'):
                    raise BenchError(f"publish #{answered + 1} failed: {answer[:300]!r}")
                answered += 1
            if time.monotonic() > deadline:
                raise BenchError(f"pushing {n} messages took over {deadline_s:.0f}s"
                                 f" ({answered} answered)")
        return t_first, time.monotonic()


# ---- the subscriber (its own process, so it does not share a GIL with the pusher) ------


@dataclass
class Received:
    """What a subscriber saw."""

    unique: int = 0
    total: int = 0
    undecodable: int = 0
    first: float | None = None  # time.monotonic() (system-wide on Linux)
    last: float | None = None
    envelope_bytes: int | None = None
    cpu: float = 0.0  # seconds of CPU the subscriber used while receiving

    @property
    def duplicates(self) -> int:
        """Messages received more than once."""
        return self.total - self.unique - self.undecodable


def _subscriber_main(
    port: int, topic_filter: str, expected: int, decode: bool, deadline_s: float,
    conn: Connection,
) -> None:
    """Child process: subscribe at QoS 1, report `ready`, then count until `expected` arrived."""
    got = Received()
    seen: set[int] = set()
    subscribed = False

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        got.total += 1
        if decode:
            try:
                env = cbor2.loads(msg.payload)
                seq = env["seq"]
            except Exception:
                got.undecodable += 1
                return
            if seq in seen:
                return
            seen.add(seq)
        if got.envelope_bytes is None:
            got.envelope_bytes = len(msg.payload)
        got.unique += 1
        if got.first is None:
            got.first = now
        got.last = now

    def on_subscribe(*_args: Any) -> None:
        nonlocal subscribed
        subscribed = True

    # MQTT 3.1.1: paho spends about a third less CPU per message than with v5 (no
    # properties to decode), and the subscriber is measuring apparatus sharing the CPUs.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}",
                         protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
    try:
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        while True:
            try:
                client.connect("127.0.0.1", port, keepalive=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        while not subscribed and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        if not subscribed:
            conn.send(("error", f"no SUBACK from 127.0.0.1:{port}"))
            return
        conn.send(("ready", None))
        cpu0 = time.process_time()
        end = time.monotonic() + deadline_s
        while got.unique < expected and time.monotonic() < end:
            rc = client.loop(timeout=0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                conn.send(("error", f"subscriber connection lost: {mqtt.error_string(rc)}"))
                return
            if conn.poll():
                break  # the parent gave up
        got.cpu = time.process_time() - cpu0
        conn.send(("result", dataclasses.asdict(got)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()


class Subscriber:
    """The subscriber child process, as the parent sees it."""

    def __init__(self, port: int, topic_filter: str, expected: int, *, decode: bool,
                 deadline_s: float) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.deadline_s = deadline_s
        self.proc = ctx.Process(
            target=_subscriber_main, args=(port, topic_filter, expected, decode, deadline_s, child),
            daemon=True,
        )
        self.proc.start()
        child.close()
        kind, payload = self._recv(SUBSCRIBE_TIMEOUT + 15, "the subscriber's SUBACK")
        if kind != "ready":
            raise BenchError(f"subscriber: {payload}")

    def _recv(self, timeout: float, what: str) -> tuple[str, Any]:
        if not self._conn.poll(timeout):
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        try:
            kind, payload = self._conn.recv()
        except EOFError as exc:
            raise BenchError(f"the subscriber process died waiting for {what}") from exc
        return kind, payload

    def result(self) -> Received:
        """Wait for the child's tally (it ends at `expected` messages or its deadline)."""
        kind, payload = self._recv(self.deadline_s + 15, "the subscriber's tally")
        if kind != "result":
            raise BenchError(f"subscriber: {payload}")
        return Received(**payload)

    def close(self) -> None:
        """Stop the child. Safe to call twice."""
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()


@contextlib.contextmanager
def subscribed(port: int, topic_filter: str, expected: int, *, decode: bool,
               deadline_s: float) -> Iterator[Subscriber]:
    """A subscriber process for the duration of the block."""
    sub = Subscriber(port, topic_filter, expected, decode=decode, deadline_s=deadline_s)
    try:
        yield sub
    finally:
        sub.close()


# ---- the measurements ----------------------------------------------------------------


def raw_publish(port: int, n: int, topic: str, deadline_s: float) -> tuple[float, float]:
    """Raw paho: QoS 1, MQTT v5, at most WINDOW unacknowledged; returns (t_first, t_last_ack)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{os.getpid()}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)
    payload = PAYLOAD.encode()
    state = {"sent": 0, "acked": 0, "connected": False}

    def send_one() -> None:
        info = client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BenchError(f"raw publish failed: {mqtt.error_string(info.rc)}")
        state["sent"] += 1

    def on_publish(*_args: Any) -> None:
        state["acked"] += 1
        if state["sent"] < n:
            send_one()

    def on_connect(*_args: Any) -> None:
        state["connected"] = True

    client.on_publish = on_publish
    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=60)
    try:
        deadline = time.monotonic() + 10
        while not state["connected"]:
            client.loop(timeout=0.05)
            if time.monotonic() > deadline:
                raise BenchError("raw client: no CONNACK")
        t_first = time.monotonic()
        for _ in range(min(WINDOW, n)):
            send_one()
        deadline = t_first + deadline_s
        while state["acked"] < n:
            rc = client.loop(timeout=1.0)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise BenchError(f"raw client: {mqtt.error_string(rc)}")
            if time.monotonic() > deadline:
                raise BenchError(f"raw client: {state['acked']} of {n} acked in {deadline_s}s")
        return t_first, time.monotonic()
    finally:
        client.disconnect()
        with contextlib.suppress(Exception):
            client.loop(timeout=0.1)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


@dataclass
class Results:
    """Every figure, for the report. Rates are lists: one entry per run."""

    raw: list[float] = field(default_factory=list)
    raw_sub_ack: list[float] = field(default_factory=list)
    raw_sub_e2e: list[float] = field(default_factory=list)
    durable: list[float] = field(default_factory=list)
    durable_ack: list[float] = field(default_factory=list)
    online_wa: list[float] = field(default_factory=list)
    offline_ingest: list[float] = field(default_factory=list)
    drain: list[float] = field(default_factory=list)
    drain_from_resume: list[float] = field(default_factory=list)
    drain_from_broker: list[float] = field(default_factory=list)
    reconnect_delay: list[float] = field(default_factory=list)
    wa_ingest: list[float] = field(default_factory=list)
    wa_cycle: list[float] = field(default_factory=list)
    # CPU microseconds per message, by process and phase.
    cpu: dict[str, list[float]] = field(default_factory=dict)
    envelope_bytes: int | None = None
    io_counter: str = "write_bytes"
    rss_idle: float | None = None
    rss_queued: float | None = None
    rss_drained: float | None = None
    rss_n: int = 0
    rss_ingest: float | None = None
    rss_drain_rate: float | None = None
    rss_wa_ingest: float | None = None
    rss_wa_cycle: float | None = None
    notes: list[str] = field(default_factory=list)

    def add_cpu(self, key: str, seconds: float, n: int) -> float:
        """Record CPU seconds spent on `n` messages as microseconds per message."""
        us = seconds / n * 1e6
        self.cpu.setdefault(key, []).append(us)
        return us


def pick_io(delta: IoCounters, res: Results) -> int:
    """write_bytes, or wchar when the kernel does not count block writes here."""
    if delta.write_bytes > 0:
        res.io_counter = "write_bytes"
        return delta.write_bytes
    res.io_counter = "wchar (write_bytes was 0)"
    return delta.wchar


def wa(bytes_written: int, n: int, envelope: int | None) -> float:
    """Write amplification: disk bytes per message over envelope bytes per message."""
    return bytes_written / n / envelope if envelope else float("nan")


# Log lines the benchmark causes on purpose (the agent is pointed at a port with no broker).
_EXPECTED_LOG = ("Connection refused",)


def note_agent(agent: Agent, what: str, res: Results) -> None:
    """Stop the agent; note a bad exit, a slow stop, or unexpected log warnings."""
    t0 = time.monotonic()
    code = agent.stop()
    took = time.monotonic() - t0
    if code not in (0, None):
        res.notes.append(f"{what}: agent exited with {code}; log tail:\n{agent.log_tail()}")
    if took > 3.0:
        res.notes.append(f"{what}: the agent took {took:.1f}s to stop on SIGTERM")
    problems = [p for p in agent.log_problems() if not any(e in p for e in _EXPECTED_LOG)]
    if problems:
        shown = "\n    ".join(problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        res.notes.append(f"{what}: agent log has {len(problems)} warning/error lines{more}:"
                         f"\n    {shown}")


def run_raw(broker: Broker, n: int, rep: int, res: Results) -> None:
    """Raw paho publish rate, alone and with a subscriber attached."""
    topic = f"{PREFIX}/nodes/raw/up/{LOCAL_TOPIC}"
    deadline = max(60, n / 500)
    cpu0, b0 = time.process_time(), cpu_seconds(broker.pid)
    t0, t1 = raw_publish(broker.port, n, topic, deadline)
    res.raw.append(n / (t1 - t0))
    client_us = res.add_cpu("raw client", time.process_time() - cpu0, n)
    res.add_cpu("raw broker", cpu_seconds(broker.pid) - b0, n)
    with subscribed(broker.port, f"{PREFIX}/nodes/raw/up/#", n, decode=False,
                    deadline_s=deadline) as sub:
        t0, t1 = raw_publish(broker.port, n, topic, deadline)
        got = sub.result()
    if got.unique < n or got.last is None:
        raise BenchError(f"raw+subscriber: got {got.unique} of {n}")
    res.raw_sub_ack.append(n / (t1 - t0))
    res.raw_sub_e2e.append(n / (got.last - t0))
    res.add_cpu("raw subscriber", got.cpu, n)
    print(f"  raw #{rep}: {res.raw[-1]:7.0f} PUBACK/s alone ({client_us:.0f} us CPU/msg);"
          f" with a subscriber {res.raw_sub_ack[-1]:7.0f} PUBACK/s,"
          f" {res.raw_sub_e2e[-1]:7.0f} msg/s received", flush=True)


def run_durable(broker: Broker, work: Path, n: int, rep: int, res: Results) -> None:
    """Socket API -> outbox -> uplink -> broker -> subscriber, online all along."""
    node = f"bench-e2e-{rep}"
    agent = Agent(work / f"e2e-{rep}", node, broker.port)
    try:
        agent.start()
        agent.wait_online()
        deadline = max(120, n / 200)
        with subscribed(broker.port, f"{PREFIX}/nodes/{node}/up/#", n, decode=True,
                        deadline_s=deadline) as sub:
            io0 = agent.io()
            a0, b0, p0 = cpu_seconds(agent.pid), cpu_seconds(broker.pid), time.process_time()
            t0, t_acked = push(agent.sock, n, deadline)
            pusher = time.process_time() - p0
            got = sub.result()
            a1, b1 = cpu_seconds(agent.pid), cpu_seconds(broker.pid)
        if got.unique < n or got.last is None:
            raise BenchError(f"durable: subscriber got {got.unique} of {n}")
        agent.wait_depth(0, timeout=30)
        time.sleep(0.3)  # let the last delete commit settle
        written = pick_io(agent.io().minus(io0), res)
        res.envelope_bytes = res.envelope_bytes or got.envelope_bytes
        res.durable.append(n / (got.last - t0))
        res.durable_ack.append(n / (t_acked - t0))
        res.online_wa.append(wa(written, n, got.envelope_bytes))
        agent_us = res.add_cpu("online agent", a1 - a0, n)
        res.add_cpu("online broker", b1 - b0, n)
        res.add_cpu("online subscriber", got.cpu, n)
        res.add_cpu("online API client", pusher, n)
        if got.duplicates or got.undecodable:
            res.notes.append(f"durable #{rep}: {got.duplicates} duplicates,"
                             f" {got.undecodable} undecodable")
        print(f"  durable #{rep}: {res.durable[-1]:7.0f} msg/s end to end"
              f" (all {n} committed at {res.durable_ack[-1]:.0f}/s;"
              f" agent {agent_us:.0f} us CPU/msg); write amp online {res.online_wa[-1]:.2f}",
              flush=True)
    finally:
        note_agent(agent, f"durable #{rep}", res)


def queue_offline(agent: Agent, n: int) -> tuple[float, IoCounters, IoCounters]:
    """Push `n` messages to an agent with no broker; returns (accepted/s, io before, io after)."""
    if agent.status()["uplink"]["state"] != "offline":
        raise BenchError("the agent is online although no broker listens on its port")
    io0 = agent.io()
    t0, t1 = push(agent.sock, n, max(300, n / 200))
    agent.wait_depth(n, timeout=60)
    return n / (t1 - t0), io0, agent.io()


def run_drain(work: Path, n: int, rep: int, res: Results) -> None:
    """Queue `n` offline, then start the broker and time the drain to a subscriber."""
    node = f"bench-drain-{rep}"
    broker = Broker(work / f"drain-broker-{rep}")  # reserves the port; not started yet
    agent = Agent(work / f"drain-{rep}", node, broker.port)
    try:
        agent.start()
        ingest, io0, io1 = queue_offline(agent, n)
        # Hold the agent while the broker starts and the subscriber subscribes, so no
        # message goes out before someone listens (the broker keeps no sessions).
        agent.pause()
        t_broker = time.monotonic()
        broker.start()
        deadline = max(120, n / 200)
        with subscribed(broker.port, f"{PREFIX}/nodes/{node}/up/#", n, decode=True,
                        deadline_s=deadline) as sub:
            a0, b0 = cpu_seconds(agent.pid), cpu_seconds(broker.pid)
            t_resume = time.monotonic()
            agent.resume()
            got = sub.result()
            a1, b1 = cpu_seconds(agent.pid), cpu_seconds(broker.pid)
        if got.unique < n or got.last is None or got.first is None:
            raise BenchError(f"drain: subscriber got {got.unique} of {n}")
        agent.wait_depth(0, timeout=60)
        time.sleep(0.3)
        io2 = agent.io()
        res.envelope_bytes = res.envelope_bytes or got.envelope_bytes
        env = got.envelope_bytes
        res.offline_ingest.append(ingest)
        res.drain.append(n / (got.last - got.first))
        res.drain_from_resume.append(n / (got.last - t_resume))
        res.drain_from_broker.append(n / (got.last - t_broker))
        res.reconnect_delay.append(got.first - t_resume)
        res.wa_ingest.append(wa(pick_io(io1.minus(io0), res), n, env))
        res.wa_cycle.append(wa(pick_io(io2.minus(io0), res), n, env))
        agent_us = res.add_cpu("drain agent", a1 - a0, n)
        res.add_cpu("drain broker", b1 - b0, n)
        res.add_cpu("drain subscriber", got.cpu, n)
        if got.duplicates or got.undecodable:
            res.notes.append(f"drain #{rep}: {got.duplicates} duplicates,"
                             f" {got.undecodable} undecodable")
        print(f"  drain #{rep}: offline ingest {ingest:7.0f} msg/s;"
              f" drain {res.drain[-1]:7.0f} msg/s from the first message"
              f" (first {res.reconnect_delay[-1]:.2f}s after resume;"
              f" agent {agent_us:.0f} us CPU/msg);"
              f" write amp ingest {res.wa_ingest[-1]:.2f}, cycle {res.wa_cycle[-1]:.2f}",
              flush=True)
    finally:
        note_agent(agent, f"drain #{rep}", res)
        broker.stop()


def run_rss(work: Path, n: int, res: Results) -> None:
    """RSS idle, with `n` queued offline, and after draining them."""
    broker = Broker(work / "rss-broker")
    agent = Agent(work / "rss", "bench-rss", broker.port)
    try:
        agent.start()
        time.sleep(2.0)  # let start-up allocations settle
        res.rss_idle = agent.rss() / MiB
        print(f"  idle RSS {res.rss_idle:.1f} MiB; queueing {n:,} messages offline...",
              flush=True)
        res.rss_n = n
        res.rss_ingest, io0, io1 = queue_offline(agent, n)
        time.sleep(1.0)
        res.rss_queued = agent.rss() / MiB
        print(f"  {n:,} queued: RSS {res.rss_queued:.1f} MiB (ingest {res.rss_ingest:.0f} msg/s);"
              " draining to a broker with no subscriber...", flush=True)
        broker.start()
        t0 = time.monotonic()
        agent.wait_depth(0, timeout=max(300, n / 500))
        res.rss_drain_rate = n / (time.monotonic() - t0)
        time.sleep(1.0)
        res.rss_drained = agent.rss() / MiB
        io2 = agent.io()
        env = res.envelope_bytes
        res.rss_wa_ingest = wa(pick_io(io1.minus(io0), res), n, env)
        res.rss_wa_cycle = wa(pick_io(io2.minus(io0), res), n, env)
        files = ", ".join(f"{p.name} {p.stat().st_size / MiB:.1f}"
                          for p in sorted(agent.data_dir.iterdir()) if p.name.startswith("outbox"))
        print(f"  drained: RSS {res.rss_drained:.1f} MiB (drain ~{res.rss_drain_rate:.0f} msg/s"
              f" with no subscriber, polled); files now (MiB): {files}", flush=True)
    finally:
        note_agent(agent, "rss", res)
        broker.stop()


# ---- the report -----------------------------------------------------------------------


def report(res: Results, args: argparse.Namespace, reps: int, data_base: Path) -> None:
    """Print the figures with their targets."""
    raw = median(res.raw)

    def runs(values: list[float], fmt: str = "{:.0f}") -> str:
        if len(values) < 2:
            return ""
        return "runs " + ", ".join(fmt.format(v) for v in values)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    rows: list[tuple[str, str, str, str]] = []  # figure, value, target, verdict / detail

    def row(name: str, value: float | None, fmt: str = "{:.0f}", target: str = "",
            ok: bool | None = None, detail: str = "") -> None:
        shown = "n/a" if value is None or value != value else fmt.format(value)
        if ok is not None and shown != "n/a":
            detail = f"{verdict(ok)}  {detail}".rstrip()
        rows.append((name, shown, target, detail))

    durable, drain = median(res.durable), median(res.drain)
    row("raw paho QoS1, PUBACK/s", raw, detail=runs(res.raw))
    row("raw paho + subscriber, received/s", median(res.raw_sub_e2e),
        detail=runs(res.raw_sub_e2e))
    row("agent durable end to end, msg/s", durable, detail=runs(res.durable))
    row("  durable / raw", durable / raw, "{:.2f}", ">= 0.8", durable / raw >= 0.8)
    row("  durable / (raw + subscriber)", durable / median(res.raw_sub_e2e), "{:.2f}",
        detail="same set-up on both sides")
    row("  agent commits online (API answers)/s", median(res.durable_ack),
        detail=runs(res.durable_ack))
    row("offline ingest, accepted/s", median(res.offline_ingest),
        detail=runs(res.offline_ingest))
    row("drain, msg/s from the first received", drain, detail=runs(res.drain))
    row("  drain / raw", drain / raw, "{:.2f}", ">= 0.8", drain / raw >= 0.8)
    row("  drain / (raw + subscriber)", drain / median(res.raw_sub_e2e), "{:.2f}")
    row("  drain, msg/s from agent resume", median(res.drain_from_resume),
        detail=runs(res.drain_from_resume))
    row("  drain, msg/s from broker start", median(res.drain_from_broker),
        detail=runs(res.drain_from_broker))
    row("  first message after resume, s", median(res.reconnect_delay), "{:.2f}",
        detail=runs(res.reconnect_delay, "{:.2f}"))
    if res.rss_drain_rate is not None:
        row(f"  drain of {res.rss_n:,}, no subscriber, msg/s", res.rss_drain_rate,
            detail="status polled every 0.1s, incl. reconnect")
    idle = res.rss_idle
    row("RSS idle, MiB", idle, "{:.1f}", "<= 40", None if idle is None else idle <= 40)
    if idle is not None:
        queued = res.rss_queued
        row(f"RSS with {res.rss_n:,} queued, MiB", queued, "{:.1f}",
            f"<= idle + 10 = {idle + 10:.1f}", None if queued is None else queued <= idle + 10)
        row("RSS after the drain, MiB", res.rss_drained, "{:.1f}")
    wa_in, wa_cyc = median(res.wa_ingest), median(res.wa_cycle)
    row("write amplification, offline ingest", wa_in, "{:.2f}", "<= 4", wa_in <= 4,
        runs(res.wa_ingest, "{:.2f}"))
    row("write amp., ingest + drain + delete", wa_cyc, "{:.2f}", "<= 4", wa_cyc <= 4,
        runs(res.wa_cycle, "{:.2f}"))
    row("write amp., online run (info)", median(res.online_wa), "{:.2f}",
        detail=runs(res.online_wa, "{:.2f}"))
    if res.rss_wa_ingest is not None and res.rss_wa_cycle is not None:
        row(f"write amp., {res.rss_n:,} run: ingest", res.rss_wa_ingest, "{:.2f}", "<= 4",
            res.rss_wa_ingest <= 4)
        row(f"write amp., {res.rss_n:,} run: cycle", res.rss_wa_cycle, "{:.2f}", "<= 4",
            res.rss_wa_cycle <= 4)

    print()
    print("=" * 100)
    print(f"edge forward benchmark ({'quick' if args.quick else 'full'}): {reps} run(s) per rate,"
          f" median shown; {args.n:,} msgs per rate run, {args.drain_n:,} per drain run")
    print(f"payload {len(PAYLOAD)} B, envelope {res.envelope_bytes} B; MQTT in flight {WINDOW};"
          f" API pipeline window {API_WINDOW}; subscriber paho MQTT 3.1.1 QoS 1")
    print(f"data dir under {data_base} ({fs_type(data_base)}); disk bytes = /proc/PID/io"
          f" {res.io_counter}")
    print(f"host: {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f} now;"
          f" python {sys.version.split()[0]}, paho {paho.mqtt.__version__}")
    print("-" * 100)
    width = max(len(r[0]) for r in rows)
    for name, value, target, detail in rows:
        print(f"{name:<{width}} {value:>8}  {target:<24} {detail}".rstrip())
    print("-" * 100)
    print("CPU us per message (median; explains the rates on a small shared machine):")
    groups = [("raw", ["client", "broker", "subscriber"]),
              ("online", ["agent", "API client", "broker", "subscriber"]),
              ("drain", ["agent", "broker", "subscriber"])]
    for phase, procs in groups:
        parts = [f"{p} {median(res.cpu[f'{phase} {p}']):.0f}" for p in procs
                 if f"{phase} {p}" in res.cpu]
        if parts:
            print(f"  {phase:<7} " + ", ".join(parts))
    raw_us = median(res.cpu.get("raw client", []))
    for phase in ("online", "drain"):
        agent_us = median(res.cpu.get(f"{phase} agent", []))
        print(f"  raw client / agent {phase}: {raw_us / agent_us:.2f}"
              " (the rate ratio a CPU-bound agent could reach at best)")
    print("=" * 100)
    if res.notes:
        print("notes:")
        for note in res.notes:
            print(f"  - {note}")


# ---- main ----------------------------------------------------------------------------------


def main() -> int:
    """Run everything and print the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run each, fewer messages")
    parser.add_argument("--n", type=int, help="messages per rate run")
    parser.add_argument("--drain-n", type=int, help="messages per drain run")
    parser.add_argument("--rss-n", type=int, help="messages queued for the RSS figure")
    parser.add_argument("--reps", type=int, help="runs per rate figure")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    args.n = args.n or (20_000 if args.quick else 100_000)
    args.drain_n = args.drain_n or (20_000 if args.quick else 100_000)
    rss_n = args.rss_n or (200_000 if args.quick else 1_000_000)
    reps = args.reps or (1 if args.quick else 3)
    if not os.access(MOSQUITTO, os.X_OK):
        print(f"mosquitto not found at {MOSQUITTO}", file=sys.stderr)
        return 2

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally blocks stop every child.
    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    base = pick_workdir_base()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-", dir=base))
    res = Results()
    interrupted_by: KeyboardInterrupt | None = None
    started = time.monotonic()
    print(f"work dir {work} ({fs_type(work)})", flush=True)
    broker = Broker(work / "broker")
    try:
        broker.start()
        for rep in range(1, reps + 1):
            print(f"round {rep}/{reps}", flush=True)
            run_raw(broker, args.n, rep, res)
            run_durable(broker, work, args.n, rep, res)
            run_drain(work, args.drain_n, rep, res)
        broker.stop()
        print("memory", flush=True)
        run_rss(work, rss_n, res)
    except BenchError as exc:
        res.notes.append(f"ABORTED: {exc}")
        print(f"benchmark failed: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); stopping everything", file=sys.stderr)
        interrupted_by = exc
    finally:
        broker.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if interrupted_by is not None:
        return 130
    print(f"(took {time.monotonic() - started:.0f}s)")
    report(res, args, reps, base)
    return 1 if any(n.startswith("ABORTED") for n in res.notes) else 0


if __name__ == "__main__":
    sys.exit(main())
