"""Fleet benchmark: N simulated nodes against the registry; broker-restart convergence, ingest.

Run from the repository root:

    .venv/bin/python bench/fleet.py [--quick]

Per run it starts a private mosquitto (persistence on, raised fd limit) on a
free loopback port, one or two `edge registry serve` workers on one shared
subscription (SQLite file or a database in a PostgreSQL cluster the bench
starts itself), and one simulator process that holds N MQTT connections on
one asyncio loop, each with its own client id and Last Will, speaking the
status and reported documents of docs/registry.md. It prints figures; it is
not a test. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cbor2
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the simulator is spawned as a fresh interpreter

from benchkit import BenchError, die_with_parent, free_port, port_accepts, wait_for  # noqa: E402

from edge.backoff import Backoff  # noqa: E402  (the agent's own reconnect schedule)

MOSQUITTO = "/usr/sbin/mosquitto"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PREFIX = "edge/v1"
NOFILE = 65536
KEEPALIVE = 60          # seconds, the simulated nodes' MQTT keepalive
HEARTBEAT = 60.0        # what the nodes announce in their status documents
JITTER = 2.0            # reconnect after a lost connection: uniform(0, jitter) s (--jitter)
POLL = 0.25             # seconds between convergence checks
HANDSHAKE_TIMEOUT = 15.0
FIRST_CONNECTS = 200    # handshakes in flight while the fleet first comes up
MiB = 1024 * 1024


# ---- small helpers ----------------------------------------------------------------------


def _raise_nofile() -> None:
    """RLIMIT_NOFILE to NOFILE (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _child_setup() -> None:
    die_with_parent()
    _raise_nofile()


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (not its children)."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def peak_rss(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fd_limit(pid: int) -> str:
    """The soft `Max open files` of a running process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL; by this process's own handle."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# ---- the MQTT 3.1.1 wire, just what a simulated node needs -------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, keepalive: int, will_topic: str, will: bytes) -> bytes:
    """CONNECT, clean session, with a retained QoS 1 Last Will."""
    flags = 0x02 | 0x04 | (1 << 3) | 0x20  # clean, will, will QoS 1, will retain
    body = (_utf8("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
            + _utf8(client_id) + _utf8(will_topic) + _utf8(will))
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, pid: int) -> bytes:
    """PUBLISH QoS 1, retained."""
    body = _utf8(topic) + pid.to_bytes(2, "big") + payload
    return b"\x33" + _varint(len(body)) + body


def subscribe_packet(topic: str, pid: int) -> bytes:
    """SUBSCRIBE to one filter at QoS 1."""
    body = pid.to_bytes(2, "big") + _utf8(topic) + b"\x01"
    return b"\x82" + _varint(len(body)) + body


PINGREQ = b"\xc0\x00"


class Wire(asyncio.Protocol):
    """One node's connection: writes packets, resolves CONNACK and PUBACK/SUBACK futures."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._buf = bytearray()
        self._next = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            length, mult, i = 0, 1, 1
            while True:
                if i >= len(buf):
                    return
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(buf) < i + length:
                return
            kind = buf[0] >> 4
            body = bytes(buf[i:i + length])
            del buf[:i + length]
            if kind == 2 and not self.connack.done():      # CONNACK
                self.connack.set_result(body[1] if len(body) > 1 else 255)
            elif kind in (4, 9):                             # PUBACK, SUBACK
                fut = self._acks.pop(int.from_bytes(body[:2], "big"), None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        err = ConnectionError("connection closed")
        if not self.connack.done():
            self.connack.set_exception(err)
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(err)
        self._acks.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def _pid(self) -> int:
        self._next = self._next % 65535 + 1
        return self._next

    def _send(self, packet: Callable[[int], bytes]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.transport is None:
            fut.set_exception(ConnectionError("not connected"))
            return fut
        pid = self._pid()
        self._acks[pid] = fut
        self.transport.write(packet(pid))
        return fut

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        """A retained QoS 1 PUBLISH; the future resolves on its PUBACK."""
        return self._send(lambda pid: publish_packet(topic, payload, pid))

    def subscribe(self, topic: str) -> asyncio.Future[None]:
        """SUBSCRIBE; the future resolves on its SUBACK."""
        return self._send(lambda pid: subscribe_packet(topic, pid))

    def ping(self) -> None:
        if self.transport is not None:
            self.transport.write(PINGREQ)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# ---- the simulated fleet (runs in its own process) -------------------------------------


SERVICES = [
    {"name": "web", "state": "running", "reason": None, "pid": 410, "restarts": 0,
     "last_exit": None, "source": "config"},
    {"name": "collector", "state": "running", "reason": None, "pid": 415, "restarts": 1,
     "last_exit": 1, "source": "desired"},
]


class SimNode:
    """One node: connect with an offline Last Will, then status online and reported."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.node = f"sim-{index:05d}"
        self.index = index
        self.topic = f"{PREFIX}/nodes/{self.node}/"
        self.boot = time.time()
        self.conn = 0           # connections started (the status documents' `conn`)
        self.done_conn = 0      # the last connection whose documents were all acknowledged
        self.done_at = 0.0      # time.monotonic() of that
        self.version = fleet.base
        self.wire: Wire | None = None
        self.failures = 0

    def status(self, state: str) -> bytes:
        doc: dict[str, Any] = {"state": state, "ts": time.time(), "boot": self.boot,
                               "conn": self.conn, "heartbeat": HEARTBEAT}
        if state == "online":
            doc["queue"] = {"depth": 0, "oldest_age": None}
        return bytes(cbor2.dumps(doc))

    def reported(self) -> bytes:
        self.version += 1
        now = time.time()
        return bytes(cbor2.dumps({
            "v": 1, "node": self.node, "version": self.version, "ts": now,
            "agent": "0.1.0", "profile": "raspberry-pi-4",
            "labels": {"site": f"site-{self.index % 20:02d}", "ring": "stable"},
            "services": SERVICES, "peers": [],
            "queue": {"depth": 0, "bytes": 0, "oldest_age": None, "dropped": 0,
                      "expired": 0, "dead": 0},
            "uplink": {"state": "online", "since": now, "connects": self.conn,
                       "last_error": None},
            "desired_applied": 0, "desired": None, "desired_rejected": None,
        }))

    async def run(self) -> None:
        """Connect, stay connected, and come back after a uniform(0, jitter) pause."""
        backoff = Backoff(0.5, 30.0)  # the agent's [uplink] backoff after a failed attempt
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay)
            try:
                await self.session()
            except (OSError, TimeoutError) as exc:
                self.failures += 1
                self.fleet.errors[type(exc).__name__] = \
                    self.fleet.errors.get(type(exc).__name__, 0) + 1
                delay = backoff.next()
            else:
                backoff.reset()
                delay = random.uniform(0.0, self.fleet.jitter)

    async def session(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn += 1
        wire = Wire()
        first = self.done_conn == 0
        try:
            async with self.fleet.first_gate if first else contextlib.nullcontext():
                started = time.monotonic()
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    await loop.create_connection(lambda: wire, "127.0.0.1", self.fleet.port)
                    assert wire.transport is not None
                    wire.transport.write(connect_packet(
                        self.node, KEEPALIVE, self.topic + "status", self.status("offline")))
                    rc = await wire.connack
                    if rc != 0:
                        raise ConnectionRefusedError(f"CONNACK {rc}")
                    acks = [wire.subscribe(self.topic + "desired"),
                            wire.publish(self.topic + "status", self.status("online")),
                            wire.publish(self.topic + "reported", self.reported())]
                    await asyncio.gather(*acks)
                self.fleet.handshakes.append(time.monotonic() - started)
            self.done_conn, self.done_at = self.conn, time.monotonic()
            self.wire = wire
            await wire.lost
        finally:
            self.wire = None
            wire.close()

    async def burst(self, k: int, window: int) -> int:
        """Publish `k` new reported documents, at most `window` unacknowledged; sent count."""
        sent = 0
        while sent < k:
            wire = self.wire
            if wire is None:
                return sent
            n = min(window, k - sent)
            try:
                await asyncio.gather(*(wire.publish(self.topic + "reported", self.reported())
                                       for _ in range(n)))
            except ConnectionError:
                return sent
            sent += n
        return sent


class Fleet:
    """N nodes on one loop, driven by commands from the benchmark over a pipe."""

    def __init__(self, port: int, n: int, base: int, jitter: float) -> None:
        self.port = port
        self.jitter = jitter
        self.base = base
        self.errors: dict[str, int] = {}
        self.handshakes: list[float] = []
        self.first_gate = asyncio.Semaphore(FIRST_CONNECTS)
        self.nodes = [SimNode(self, i) for i in range(n)]

    async def serve(self, pipe: Connection) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        loop.add_reader(pipe.fileno(), lambda: commands.put_nowait(pipe.recv()))
        tasks = [asyncio.create_task(node.run()) for node in self.nodes]
        pinger = asyncio.create_task(self._ping())
        try:
            while True:
                cmd = await commands.get()
                if cmd[0] == "stop":
                    return
                pipe.send(await getattr(self, f"cmd_{cmd[0]}")(*cmd[1:]))
        finally:
            loop.remove_reader(pipe.fileno())
            for t in [*tasks, pinger]:
                t.cancel()
            await asyncio.gather(*tasks, pinger, return_exceptions=True)

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE / 2)
            for node in self.nodes:
                if node.wire is not None:
                    node.wire.ping()

    async def cmd_ready(self, conn: int, timeout: float) -> dict[str, Any]:
        """Wait until every node finished connection number `conn` (documents acked)."""
        deadline = time.monotonic() + timeout
        while True:
            behind = sum(1 for n in self.nodes if n.done_conn < conn)
            if not behind or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return {"behind": behind, "last": max(n.done_at for n in self.nodes),
                **await self.cmd_stats()}

    async def cmd_burst(self, k: int, window: int) -> dict[str, Any]:
        """Every node publishes `k` reported documents as fast as the window allows."""
        started = time.monotonic()
        sent = await asyncio.gather(*(n.burst(k, window) for n in self.nodes))
        return {"sent": sum(sent), "short": sum(1 for s in sent if s < k),
                "seconds": time.monotonic() - started}

    async def cmd_stats(self) -> dict[str, Any]:
        hs = sorted(self.handshakes)
        self.handshakes.clear()
        return {
            "connected": sum(1 for n in self.nodes if n.wire is not None),
            "failures": sum(n.failures for n in self.nodes), "errors": dict(self.errors),
            "min_version": min(n.version for n in self.nodes),
            "handshake_p50": hs[len(hs) // 2] if hs else None,
            "handshake_p99": hs[int(len(hs) * 0.99)] if hs else None,
            "handshake_max": hs[-1] if hs else None,
        }


def _fleet_main(pipe: Connection, port: int, n: int, base: int, jitter: float) -> None:
    _child_setup()
    random.seed(os.getpid())

    async def main() -> None:
        await Fleet(port, n, base, jitter).serve(pipe)

    asyncio.run(main())


class Simulator:
    """The simulator process, seen from the benchmark."""

    def __init__(self, port: int, n: int, base: int, jitter: float) -> None:
        ctx = mp.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_fleet_main, args=(child, port, n, base, jitter),
                                daemon=True)
        self.proc.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def send(self, *cmd: Any) -> None:
        self._pipe.send(cmd)

    def reply(self, timeout: float) -> dict[str, Any]:
        if not self._pipe.poll(timeout):
            raise BenchError(f"the simulator did not answer in {timeout:.0f}s")
        answer: dict[str, Any] = self._pipe.recv()
        return answer

    def ask(self, *cmd: Any, timeout: float) -> dict[str, Any]:
        self.send(*cmd)
        return self.reply(timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.send("stop")
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ---- mosquitto, PostgreSQL, registry workers --------------------------------------------


class Broker:
    """A private mosquitto with persistence (retained messages survive a restart)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "user root",
            "max_connections -1",
            "persistence true",
            f"persistence_location {workdir}/",
            "autosave_interval 3600",          # saved at shutdown; no saves mid-run
            "max_queued_messages 1000000",     # the registry's queue in an ingest burst
            "max_inflight_messages 100",
            "connection_messages false",
            "log_type error", "log_type warning",
            f"log_dest file {self.log}",
        ]) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_before = 0.0  # CPU of earlier incarnations (a restart is a new process)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_child_setup)
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"mosquitto exited with {proc.returncode}; see {self.log}")
            return port_accepts(self.port)

        wait_for(up, 20, f"mosquitto on port {self.port}", every=0.01)

    def cpu(self) -> float:
        return self.cpu_before + (cpu_seconds(self.pid) if self.proc else 0.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cpu_before += cpu_seconds(self.proc.pid)
        proc, self.proc = self.proc, None
        terminate(proc, 30)


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    """Debian's PostgreSQL 15 on a fresh cluster (as the postgres user; initdb refuses root).

    Durable defaults (fsync and synchronous_commit on), unlike the tests' cluster.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edge-bench-pg-", dir="/var/tmp"))
        self.data, self.sock = self.dir / "data", self.dir / "sock"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._n = 0

    def start(self) -> Postgres:
        self.sock.mkdir()
        if os.geteuid() == 0:
            for p in (self.dir, self.sock):
                shutil.chown(p, "postgres", "postgres")
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U",
                                     "postgres", "-A", "trust", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120)
        log = self.dir / "postgres.log"
        with open(log, "ab") as out:
            if os.geteuid() == 0:
                shutil.chown(log, "postgres", "postgres")
            self.proc = subprocess.Popen(
                _as_postgres([str(PG_BIN / "postgres"), "-D", str(self.data), "-h", "127.0.0.1",
                              "-p", str(self.port), "-k", str(self.sock),
                              "-c", "max_connections=50", "-c", "shared_buffers=128MB"]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent)
        wait_for(lambda: port_accepts(self.port) and self.psql("SELECT 1", check=False) == 0,
                 30, "postgres", every=0.1)
        return self

    def psql(self, command: str, *, check: bool = True) -> int:
        return subprocess.run(
            _as_postgres([str(PG_BIN / "psql"), "-h", str(self.sock), "-p", str(self.port),
                          "-U", "postgres", "-d", "postgres", "-qAt", "-c", command]),
            capture_output=True, check=check, timeout=60).returncode

    def pids(self) -> list[int]:
        """The postmaster and its backends (their CPU is the database's)."""
        try:
            master = int((self.data / "postmaster.pid").read_text().split()[0])
            proc = psutil.Process(master)
            return [master, *(c.pid for c in proc.children(recursive=True))]
        except (OSError, ValueError, psutil.Error):
            return []

    def cpu(self) -> float:
        """CPU seconds of the cluster, including backends that already ended."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def create_database(self) -> str:
        self._n += 1
        name = f"fleet_{os.getpid()}_{self._n}"
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.kill(int((self.data / "postmaster.pid").read_text().split()[0]),
                        signal.SIGINT)
            except (OSError, ValueError, IndexError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Worker:
    """One `edge registry serve` process."""

    def __init__(self, workdir: Path, index: int, broker_port: int, db_url: str) -> None:
        self.index = index
        self.http = free_port()
        self.log = workdir / f"registry-{index}.log"
        self.cmd = [sys.executable, "-m", "edge", "registry", "serve",
                    "--broker", f"mqtt://127.0.0.1:{broker_port}", "--db", db_url,
                    "--http", f"127.0.0.1:{self.http}", "--client-id", f"fleet-registry-{index}",
                    "--log-level", "INFO"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def get(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}",
                                    timeout=timeout) as r:
            return json.loads(r.read())

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_child_setup)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"registry worker {self.index} exited; see {self.log}")
            try:
                return self.get("/healthz", 2).get("broker") == "online"
            except OSError:
                return False

        wait_for(ready, 30, f"registry worker {self.index}", every=0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        terminate(proc)

    def warnings(self) -> list[str]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [ln for ln in lines if " WARNING " in ln or " ERROR " in ln]


# ---- the convergence check: straight from the store ------------------------------------


class Probe:
    """How many nodes the store shows online on a connection >= C with a version >= V."""

    QUERY = ("SELECT count(*) FROM nodes WHERE reported_version >= {v} AND status_conn >= {c}"
             " AND status_offline = 0")

    def __init__(self, db_url: str, sqlite_path: Path | None) -> None:
        self.sqlite_path = sqlite_path
        self.db_url = db_url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pg: Any = None
        self._lite: sqlite3.Connection | None = None

    def _run(self, coro: Any) -> Any:
        assert self._loop is not None
        return self._loop.run_until_complete(coro)

    def open(self) -> None:
        if self.sqlite_path is not None:
            self._lite = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True,
                                         timeout=5)
        else:
            import asyncpg
            self._loop = asyncio.new_event_loop()
            self._pg = self._run(asyncpg.connect(self.db_url))

    def scalar(self, query: str) -> int:
        if self._lite is not None:
            return int(self._lite.execute(query).fetchone()[0] or 0)
        return int(self._run(self._pg.fetchval(query)) or 0)

    def converged(self, version: int, conn: int) -> int:
        return self.scalar(self.QUERY.format(v=version, c=conn))

    def table_bytes(self) -> int:
        """The table's bytes: SQLite's pages (WAL frames included), or PostgreSQL's heap,
        TOAST and index (dead row versions included: that is what a fleet pays)."""
        if self.sqlite_path is not None:
            return self.scalar("PRAGMA page_count") * self.scalar("PRAGMA page_size")
        return self.scalar("SELECT pg_total_relation_size('nodes')")

    def live_bytes(self) -> int:
        """The live rows' bytes (PostgreSQL: pg_column_size of each row; SQLite: its pages)."""
        if self.sqlite_path is not None:
            return self.table_bytes()
        return self.scalar("SELECT sum(pg_column_size(nodes.*)) FROM nodes")

    def doc_bytes(self) -> tuple[int, int]:
        """Average stored size of a status and of a reported document."""
        return (self.scalar("SELECT avg(length(status)) FROM nodes"),
                self.scalar("SELECT avg(length(reported)) FROM nodes"))

    def close(self) -> None:
        if self._lite is not None:
            self._lite.close()
        if self._pg is not None:
            self._run(self._pg.close())
        if self._loop is not None:
            self._loop.close()


def wait_converged(probe: Probe, n: int, version: int, conn: int, timeout: float,
                   t0: float) -> tuple[float | None, int]:
    """Poll every POLL s; (seconds since t0 when all n matched, or None; last count)."""
    deadline = t0 + timeout
    seen = 0
    while True:
        seen = probe.converged(version, conn)
        now = time.monotonic()
        if seen >= n:
            return now - t0, seen
        if now > deadline:
            return None, seen
        time.sleep(POLL)


# ---- one run ---------------------------------------------------------------------------


@dataclass
class Run:
    """The figures of one run."""

    n: int
    workers: int
    store: str
    first_up: float | None = None      # s from simulator start to all seen
    converge: float | None = None      # s from broker stop to all online with new versions
    reconnected: float | None = None   # s from broker stop to the simulator's last ack
    broker_down: float = 0.0           # s the broker was not listening
    ingest_rate: float | None = None   # documents/s
    ingest_docs: int = 0
    ingest_handled: int = 0            # documents the workers decoded (stats)
    reg_cpu_restart: float = 0.0
    reg_cpu_ingest: float = 0.0
    reg_cpu_total: float = 0.0
    reg_rss: float = 0.0
    sim_cpu_restart: float = 0.0
    sim_cpu_ingest: float = 0.0
    sim_cpu_total: float = 0.0
    broker_cpu: float = 0.0
    db_cpu: float | None = None
    bytes_per_node: float = 0.0
    live_per_node: float = 0.0
    doc_bytes: tuple[int, int] = (0, 0)  # status, reported
    catchup: float | None = None       # s for a fresh worker on an empty store to hold all
    catchup_cpu: float = 0.0
    api_ms: float | None = None
    api_ok: bool = False
    handshake_p99: float | None = None
    sim_failures: int = 0
    notes: list[str] = field(default_factory=list)


def one_run(work: Path, n: int, workers: int, store: str, k: int, jitter: float,
            pg: Postgres | None, rep: int) -> Run:
    """Bring up N nodes, restart the broker, time the convergence, then the ingest burst."""
    res = Run(n, workers, store)
    tag = f"n{n}-w{workers}-{store}-{rep}"
    rdir = work / tag
    rdir.mkdir()
    broker = Broker(rdir / "broker")
    sqlite_path: Path | None = None
    if store == "sqlite":
        sqlite_path = rdir / "registry.db"
        db_url = f"sqlite://{sqlite_path}"
    else:
        assert pg is not None
        db_url = pg.create_database()
    regs = [Worker(rdir, i, broker.port, db_url) for i in range(workers)]
    sim: Simulator | None = None
    probe = Probe(db_url, sqlite_path)
    db_cpu0 = pg.cpu() if pg is not None else None
    try:
        broker.start()
        for w in regs:
            w.start()
        probe.open()
        base = int(time.time() * 1000)
        t_sim = time.monotonic()
        sim = Simulator(broker.port, n, base, jitter)
        up = sim.ask("ready", 1, 120.0, timeout=150)
        if up["behind"]:
            raise BenchError(f"{up['behind']} of {n} nodes never connected: {up['errors']}")
        res.first_up, seen = wait_converged(probe, n, base + 1, 1, 60, t_sim)
        if res.first_up is None:
            raise BenchError(f"only {seen} of {n} nodes in the store after the first connect")

        # -- the broker restart: every node is disconnected and comes back with conn 2
        reg0 = sum(cpu_seconds(w.pid) for w in regs)
        sim0 = cpu_seconds(sim.pid)
        t0 = time.monotonic()
        broker.stop()
        broker.start()
        res.broker_down = time.monotonic() - t0
        timeout = 60 + n / 50
        res.converge, seen = wait_converged(probe, n, base + 2, 2, timeout, t0)
        back = sim.ask("ready", 2, 30.0, timeout=60)
        res.reconnected = back["last"] - t0 if not back["behind"] else None
        res.handshake_p99 = back["handshake_p99"]
        res.sim_failures = back["failures"]
        res.reg_cpu_restart = sum(cpu_seconds(w.pid) for w in regs) - reg0
        res.sim_cpu_restart = cpu_seconds(sim.pid) - sim0
        if res.converge is None:
            res.notes.append(f"{tag}: only {seen} of {n} converged within {timeout:.0f}s")
        unusual = {k: v for k, v in back["errors"].items() if k != "ConnectionRefusedError"}
        if unusual:  # refused while the broker restarts is normal: counted as failed attempts
            res.notes.append(f"{tag}: simulator connect errors {unusual}")
        t_api = time.monotonic()
        nodes = regs[0].get("/api/v1/nodes")["nodes"]
        res.api_ms = (time.monotonic() - t_api) * 1000
        res.api_ok = len(nodes) == n and all(
            x["online"] and (x["reported_version"] or 0) >= base + 2 for x in nodes)
        if not res.api_ok:
            res.notes.append(f"{tag}: GET /api/v1/nodes does not show all {n} online and new")

        # -- ingest: K reported documents per node, as fast as each node's window allows
        target = back["min_version"] + k
        handled0 = sum(w.get("/api/v1/stats")["documents"] for w in regs)
        reg0 = sum(cpu_seconds(w.pid) for w in regs)
        sim0 = cpu_seconds(sim.pid)
        t1 = time.monotonic()
        sim.send("burst", k, 10)
        took, seen = wait_converged(probe, n, target, 2, 120 + n * k / 500, t1)
        burst = sim.reply(120)
        res.ingest_docs = burst["sent"]
        res.reg_cpu_ingest = sum(cpu_seconds(w.pid) for w in regs) - reg0
        res.sim_cpu_ingest = cpu_seconds(sim.pid) - sim0
        res.ingest_handled = sum(w.get("/api/v1/stats")["documents"] for w in regs) - handled0
        if took is None:
            res.notes.append(f"{tag}: ingest: only {seen} of {n} at their newest version")
        else:
            res.ingest_rate = burst["sent"] / took
        if burst["short"]:
            res.notes.append(f"{tag}: ingest: {burst['short']} nodes could not send all {k}")

        res.bytes_per_node = probe.table_bytes() / n
        res.live_per_node = probe.live_bytes() / n
        res.doc_bytes = probe.doc_bytes()
        newest = probe.scalar("SELECT min(reported_version) FROM nodes")
        res.reg_cpu_total = sum(cpu_seconds(w.pid) for w in regs)
        res.reg_rss = max(peak_rss(w.pid) for w in regs)
        res.sim_cpu_total = cpu_seconds(sim.pid)
        res.broker_cpu = broker.cpu()
        if pg is not None and db_cpu0 is not None:
            res.db_cpu = pg.cpu() - db_cpu0
        for w in regs:
            for line in w.warnings()[:3]:
                if not any(x in line for x in ("reconnecting", "retained read", "(older)")):
                    res.notes.append(f"{tag}: worker {w.index}: {line[-160:]}")

        # -- catch-up: one more worker on an empty store rebuilds it from retained documents
        for w in regs:
            w.stop()
        res.catchup, res.catchup_cpu = catch_up(rdir, broker, pg, n, newest)
    finally:
        if sim is not None:
            sim.stop()
        probe.close()
        for w in regs:
            w.stop()
        broker.stop()
    return res


def catch_up(rdir: Path, broker: Broker, pg: Postgres | None, n: int,
             newest: int) -> tuple[float | None, float]:
    """A fresh worker on an empty store: seconds until it holds all n newest, its CPU."""
    path = None if pg is not None else rdir / "catchup.db"
    url = pg.create_database() if pg is not None else f"sqlite://{path}"
    worker = Worker(rdir, 9, broker.port, url)
    probe = Probe(url, path)
    try:
        t0 = time.monotonic()
        worker.start()
        probe.open()
        took, _ = wait_converged(probe, n, newest, 2, 60 + n / 100, t0)
        return took, cpu_seconds(worker.pid)
    finally:
        probe.close()
        worker.stop()


def describe(res: Run) -> str:
    def s(x: float | None, fmt: str = "{:.1f}") -> str:
        return "n/a" if x is None else fmt.format(x)
    return (f"    converged {s(res.converge)}s after the broker stop (broker down"
            f" {res.broker_down:.2f}s, last node acked at {s(res.reconnected)}s,"
            f" handshake p99 {s(res.handshake_p99, '{:.2f}')}s, {res.sim_failures} failed"
            f" attempts); ingest {s(res.ingest_rate, '{:.0f}')} docs/s"
            f" ({res.ingest_docs} sent, {res.ingest_handled} decoded by the registry);"
            f" registry CPU {res.reg_cpu_restart:.1f}s restart, {res.reg_cpu_ingest:.1f}s"
            f" ingest; sim CPU {res.sim_cpu_restart:.1f}s / {res.sim_cpu_ingest:.1f}s;"
            f" GET /api/v1/nodes {s(res.api_ms, '{:.0f}')} ms; catch-up of an empty store"
            f" {s(res.catchup)}s ({res.catchup_cpu:.1f}s CPU)")


# ---- the report -------------------------------------------------------------------------


TARGETS = {1000: 10.0, 5000: 40.0}


def _med(rs: list[Run], get: Callable[[Run], float | None], fmt: str = "{:.1f}") -> str:
    values = [v for v in map(get, rs) if v is not None]
    return fmt.format(median(values)) if len(values) == len(rs) else "n/a"


# (heading, second heading line, width, cell); cells are medians over the runs of a row
COLUMNS: list[tuple[str, str, int, Callable[[list[Run]], str]]] = [
    ("converge", "s", 8, lambda rs: _med(rs, lambda r: r.converge)),
    ("last ack", "s", 8, lambda rs: _med(rs, lambda r: r.reconnected)),
    ("lag", "s", 5, lambda rs: _med(
        rs, lambda r: None if r.converge is None or r.reconnected is None
        else max(0.0, r.converge - r.reconnected))),
    ("ingest", "docs/s", 7, lambda rs: _med(rs, lambda r: r.ingest_rate, "{:.0f}")),
    ("catch-up", "s", 8, lambda rs: _med(rs, lambda r: r.catchup)),
    ("reg CPU s", "rst/ing", 9, lambda rs: _med(rs, lambda r: r.reg_cpu_restart) + "/"
     + _med(rs, lambda r: r.reg_cpu_ingest)),
    ("reg RSS", "MiB", 7, lambda rs: f"{max(r.reg_rss for r in rs):.0f}"),
    ("sim CPU s", "rst/ing", 9, lambda rs: _med(rs, lambda r: r.sim_cpu_restart) + "/"
     + _med(rs, lambda r: r.sim_cpu_ingest)),
    ("mosq CPU", "s/run", 8, lambda rs: _med(rs, lambda r: r.broker_cpu)),
    ("db CPU", "s/run", 6, lambda rs: _med(rs, lambda r: r.db_cpu)),
    ("table", "B/node", 6, lambda rs: _med(rs, lambda r: r.bytes_per_node, "{:.0f}")),
    ("live", "B/node", 6, lambda rs: _med(rs, lambda r: r.live_per_node, "{:.0f}")),
]


def report(runs: list[Run], args: argparse.Namespace, plan: list[tuple[int, int, str, int]],
           skipped: list[str], took: float) -> None:
    """The table, one row per (N, workers, store), and what it rests on."""
    rule = "=" * 131
    print()
    print(rule)
    print(f"edge fleet benchmark ({'quick' if args.quick else 'full'}), took {took:.0f}s;"
          f" host {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f} now,"
          f" python {sys.version.split()[0]}, {mosquitto_version()}")
    print(f"simulator: one process, one asyncio loop, its own MQTT 3.1.1 client, one connection"
          f" and client id per node, keepalive {KEEPALIVE}s, Last Will = retained offline status;")
    print(f"  after a lost connection it reconnects after uniform(0, {args.jitter:g}) s, after a"
          f" failed attempt edge.backoff.Backoff(0.5, 30) (doubling, jitter in [c/2, c])")
    print(f"converge: broker SIGTERM -> restart (persistence on, retained kept) -> every node"
          f" online with its new version in the store, checked every {POLL}s in the store:")
    print("  reported_version >= new AND status_conn >= new AND status_offline = 0;"
          " then one GET /api/v1/nodes must agree (notes say if not)")
    print("last ack: the simulator's last node had its documents PUBACKed; lag = converge - last"
          " ack (the registry's share)")
    print(f"ingest: every node publishes {args.k} reported documents (10 in flight per node);"
          " docs/s = documents sent / time until the store holds every node's newest")
    print("catch-up: a fresh worker on an empty store, from start to holding all N (retained"
          " read); table B/node: SQLite pages (WAL incl.), PostgreSQL heap+TOAST+index;"
          " live: PostgreSQL's live rows")
    print("CPU: user+system seconds in the restart phase / the ingest phase; registry = sum over"
          " workers, RSS = peak (VmHWM) of the largest worker")
    print("-" * 131)
    lead = f"{'N':>6} {'wrk':>3} {'store':<8} {'runs':>4} {'target':>11}"
    print(lead + "".join(f" {h:>{w}}" for h, _, w, _ in COLUMNS))
    print(f"{'':>6} {'':>3} {'':<8} {'':>4} {'converge':>11}"
          + "".join(f" {h2:>{w}}" for _, h2, w, _ in COLUMNS))
    for n, workers, store, _reps in plan:
        rs = [r for r in runs if (r.n, r.workers, r.store) == (n, workers, store)]
        if not rs:
            print(f"{n:>6} {workers:>3} {store:<8} (not run)")
            continue
        conv = [r.converge for r in rs]
        target = TARGETS.get(n)
        if None in conv:
            verdict = "NOT MET"
        elif target is None:
            verdict = "-"
        else:
            verdict = "met" if median([c for c in conv if c is not None]) <= target \
                else "NOT MET"
        if target is not None:
            verdict = f"<={target:.0f}s {verdict}"
        print(f"{n:>6} {workers:>3} {store:<8} {len(rs):>4} {verdict:>11}"
              + "".join(f" {cell(rs):>{w}}" for _, _, w, cell in COLUMNS))
        if len(rs) > 1:
            print(f"{'':>24} runs: converge "
                  + ", ".join("n/a" if r.converge is None else f"{r.converge:.1f}" for r in rs)
                  + "; ingest " + ", ".join("n/a" if r.ingest_rate is None
                                            else f"{r.ingest_rate:.0f}" for r in rs)
                  + "; catch-up " + ", ".join("n/a" if r.catchup is None
                                              else f"{r.catchup:.1f}" for r in rs))
    print("-" * 131)
    ok = [r for r in runs if r.converge is not None and r.first_up is not None]
    if ok:
        per_doc_restart = median([r.reg_cpu_restart / (2 * r.n) * 1e6 for r in ok])
        per_doc_ingest = median([r.reg_cpu_ingest / max(r.ingest_docs, 1) * 1e6 for r in ok])
        per_doc_catchup = median([r.catchup_cpu / (2 * r.n) * 1e6 for r in ok])
        sim_share = median([r.sim_cpu_restart / r.converge for r in ok if r.converge])
        sim_us = median([r.sim_cpu_ingest / max(r.ingest_docs, 1) * 1e6 for r in ok])
        api = median([r.api_ms / r.n * 1000 for r in ok if r.api_ms is not None])
        status, reported = (median([float(r.doc_bytes[i]) for r in ok]) for i in (0, 1))
        print(f"registry CPU per document (all workers): restart storm {per_doc_restart:.0f} us"
              f" (status + reported per node, incl. every worker's retained read), ingest"
              f" {per_doc_ingest:.0f} us, catch-up {per_doc_catchup:.0f} us (incl. start-up)")
        print(f"simulator: {sim_share * 100:.0f}% of one core during the restart phase,"
              f" {sim_us:.0f} us CPU per reported document in the ingest burst")
        print(f"documents as stored: status {status:.0f} B, reported {reported:.0f} B;"
              f" GET /api/v1/nodes: {api:.0f} us per node listed (median)")
    for line in skipped:
        print(f"note: {line}")
    notes = [note for r in runs for note in r.notes]
    if notes:
        print("notes:")
        for note in notes:
            print(f"  - {note}")
    print(rule)


def mosquitto_version() -> str:
    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0].strip()


# ---- main -------------------------------------------------------------------------------


def main() -> int:
    """Run the matrix and print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=200, one run of each cell")
    parser.add_argument("--n", type=int, action="append",
                        help="fleet sizes (repeatable; default 1000 and 5000)")
    parser.add_argument("--reps", type=int, help="runs per cell for N <= 1000 (default 3)")
    parser.add_argument("--big-reps", type=int,
                        help="runs per cell for N > 1000 (default: as --reps)")
    parser.add_argument("--k", type=int, help="reported documents per node in the ingest burst")
    parser.add_argument("--store", choices=["sqlite", "postgres"], action="append",
                        help="stores to run (repeatable; default both)")
    parser.add_argument("--jitter", type=float, default=JITTER,
                        help=f"reconnect after a lost connection within uniform(0, J) s"
                             f" (default {JITTER:g}; the agent's default is [0.25, 0.5])")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    sizes = args.n or ([200] if args.quick else [1000, 5000])
    reps = args.reps or (1 if args.quick else 3)
    args.k = args.k or (5 if args.quick else 20)
    stores = args.store or ["sqlite", "postgres"]
    skipped: list[str] = []
    if not os.access(MOSQUITTO, os.X_OK):
        print(f"mosquitto not found at {MOSQUITTO}", file=sys.stderr)
        return 2
    if "postgres" in stores and not os.access(PG_BIN / "postgres", os.X_OK):
        stores.remove("postgres")
        skipped.append(f"PostgreSQL not found in {PG_BIN}: postgres rows skipped")

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    _raise_nofile()
    # Two SQLite workers: the registry opens the file in WAL with busy_timeout=5000 and
    # writes each batch in BEGIN IMMEDIATE, so two processes on one file serialise.
    big_reps = args.big_reps or reps
    plan = [(n, w, s, reps if n <= 1000 else big_reps)
            for n in sizes for s in stores for w in (1, 2)]
    if big_reps != reps and any(n > 1000 for n in sizes):
        skipped.append(f"N>1000: {big_reps} run(s) per cell; N<=1000: {reps}")

    work = Path(tempfile.mkdtemp(prefix="edge-fleet-", dir="/var/tmp"))
    print(f"work dir {work}; RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)}",
          flush=True)
    pg: Postgres | None = None
    runs: list[Run] = []
    started = time.monotonic()
    try:
        if "postgres" in stores:
            pg = Postgres().start()
            print(f"postgres on port {pg.port} (fsync on, synchronous_commit on)", flush=True)
        probe_broker = Broker(work / "fd-check")
        probe_broker.start()
        print(f"mosquitto fd limit {fd_limit(probe_broker.pid)}", flush=True)
        probe_broker.stop()
        for n, workers, store, cell_reps in plan:
            for rep in range(1, cell_reps + 1):
                print(f"N={n} workers={workers} store={store} run {rep}/{cell_reps}", flush=True)
                try:
                    res = one_run(work, n, workers, store, args.k, args.jitter,
                                  pg if store == "postgres" else None, rep)
                except BenchError as exc:
                    print(f"    FAILED: {exc}", flush=True)
                    res = Run(n, workers, store, notes=[f"n{n}-w{workers}-{store}-{rep}:"
                                                        f" FAILED: {exc}"])
                runs.append(res)
                if res.first_up is not None:
                    print(describe(res), flush=True)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); stopping everything", file=sys.stderr)
        return 130
    finally:
        if pg is not None:
            pg.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(runs, args, plan, skipped, time.monotonic() - started)
    return 0 if all(r.converge is not None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
