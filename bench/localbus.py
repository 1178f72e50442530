"""Local-bus benchmark: local MQTT -> agent -> outbox -> cloud MQTT, against raw paho; services.

Run from the repository root:

    .venv/bin/python bench/localbus.py [--quick]

It starts its own mosquittos (a "cloud" one, and a fresh "local" one per run)
on free loopback ports and the agent as a real subprocess (`python -m edge run
--config FILE`), and prints figures; it is not a test. See bench/README.md for
what each figure means. The broker and agent plumbing comes from
bench/forward.py, the [services.NAME] TOML writer from bench/services.py.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from forward import (
    PREFIX,
    WINDOW,
    Agent,
    BenchError,
    Broker,
    cpu_seconds,
    fs_type,
    median,
    pick_workdir_base,
    wait_for,
)
from paho.mqtt.enums import CallbackAPIVersion
from services import _config as services_toml

NODE = "bench-node"
LOCAL_TOPIC = "bench/t"  # matches the agent's `[local] forward = ["bench/#"]`
RAW_TOPIC = "raw/t"
PAYLOAD_BYTES = 200
LOCAL_INFLIGHT = 100  # [local] inflight
TARGET = 0.5  # agent path / raw
IDLE_SERVICES = 20
BACKOFF = 0.1  # seconds, the crasher's backoff_initial = backoff_max
CRASHER_UPTIME = 0.2  # seconds the crasher runs before it exits 1

ONLINE_TIMEOUT = 30.0  # agent start to local and uplink both online
READY_TIMEOUT = 30.0  # the subscriber's SUBACK
STALL_TIMEOUT = 20.0  # the subscriber gives up after this long without a new message

SIZES: dict[bool, dict[str, Any]] = {  # --quick or not: under a minute / under five
    True: {"n": 5_000, "reps": 3, "window": 10.0, "crashes": 10},
    False: {"n": 20_000, "reps": 5, "window": 30.0, "crashes": 30},
}


def payload(i: int) -> bytes:
    """Message i: its number in 8 digits, padded to PAYLOAD_BYTES, so each one is distinct."""
    return f"{i:08d}".encode().ljust(PAYLOAD_BYTES, b".")


# ---- the subscriber (its own process: it must not share a GIL with the publisher) ------


@dataclass
class Tally:
    """What the subscriber saw: distinct messages by their number, first/last arrival."""

    distinct: int = 0
    duplicates: int = 0
    resent: int = 0  # of the duplicates, those with the same envelope `seq` as the first copy
    bad: int = 0  # not a CBOR envelope, or `data` is not one of the payloads sent
    first: float | None = None  # time.monotonic(), system-wide on Linux
    last: float | None = None
    missing: int = 0
    missing_sample: list[int] = field(default_factory=list)
    duplicate_sample: list[int] = field(default_factory=list)  # message numbers
    cpu: float = 0.0  # seconds of CPU the subscriber used


def _count_main(port: int, topic_filter: str, n: int, envelope: bool, deadline_s: float,
                ready: Any, results: Any) -> None:
    """Child process: subscribe QoS 1 (MQTT 3.1.1), set `ready`, count until n are in."""
    tally = Tally()
    seen = bytearray(n)
    seqs: dict[int, object] = {}  # message number -> the envelope's seq

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        data, seq = msg.payload, None
        try:
            if envelope:
                env = cbor2.loads(data)
                data, seq = env["data"], env.get("seq")
            i = int(data[:8])
            if data != payload(i) or not 0 <= i < n:
                raise ValueError(i)
        except Exception:
            tally.bad += 1
            return
        if seen[i]:
            tally.duplicates += 1
            tally.resent += seq is not None and seqs.get(i) == seq
            if len(tally.duplicate_sample) < 10:
                tally.duplicate_sample.append(i)
            return
        seen[i], seqs[i] = 1, seq
        tally.distinct += 1
        tally.first = tally.first or now
        tally.last = now

    subacked = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}",
                         protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
    client.on_subscribe = lambda *_: subacked.set()
    try:
        client.connect("127.0.0.1", port, keepalive=60)
        until = time.monotonic() + READY_TIMEOUT
        while not subacked.is_set() and time.monotonic() < until:
            client.loop(timeout=0.05)
        if not subacked.is_set():
            results.put(("error", f"no SUBACK from 127.0.0.1:{port}"))
            return
        ready.set()
        cpu0 = time.process_time()
        end = time.monotonic() + deadline_s
        heard = time.monotonic()
        while tally.distinct < n:
            before = tally.distinct + tally.duplicates + tally.bad
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
            now = time.monotonic()
            if tally.distinct + tally.duplicates + tally.bad != before:
                heard = now
            if now > end or now - heard > STALL_TIMEOUT:
                break
        tally.cpu = time.process_time() - cpu0
        gaps = [i for i in range(n) if not seen[i]]
        tally.missing, tally.missing_sample = len(gaps), gaps[:10]
        results.put(("tally", asdict(tally)))
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()


@contextlib.contextmanager
def counting(port: int, topic_filter: str, n: int, *, envelope: bool,
             deadline_s: float) -> Iterator[Any]:
    """A subscriber process, subscribed when the block starts; call the yielded to get its Tally."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_count_main, daemon=True,
                       args=(port, topic_filter, n, envelope, deadline_s, ready, results))
    proc.start()

    def outcome(timeout: float) -> Tally:
        try:
            kind, body = results.get(timeout=timeout)
        except Exception as exc:  # queue.Empty, or the child died
            raise BenchError(f"no answer from the subscriber in {timeout:.0f}s") from exc
        if kind != "tally":
            raise BenchError(f"subscriber: {body}")
        return Tally(**body)

    try:
        if not ready.wait(READY_TIMEOUT + 15):
            outcome(1.0)  # raises with the child's own error when it sent one
            raise BenchError("the subscriber did not get its SUBACK")
        yield lambda: outcome(deadline_s + STALL_TIMEOUT + 15)
    finally:
        proc.join(1.0)  # it ends by itself once it has sent its tally
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        results.close()


# ---- the publisher ---------------------------------------------------------------------


def publish(port: int, topic: str, n: int, deadline_s: float) -> tuple[float, float, float]:
    """Publish payload(0..n-1) QoS 1 (MQTT 5), WINDOW unacknowledged at most.

    Returns (t_first, t_last_puback, CPU seconds this process used). paho's
    network thread publishes the next message from each PUBACK callback.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(WINDOW)
    connected, done, turn = threading.Event(), threading.Event(), threading.Lock()
    counts = {"next": 0, "acked": 0}
    errors: list[str] = []

    def send() -> None:
        with turn:  # the first window goes out from this thread while PUBACKs come in
            i = counts["next"]
            counts["next"] += 1
        rc = client.publish(topic, payload(i), qos=1).rc
        if rc != mqtt.MQTT_ERR_SUCCESS:
            errors.append(f"publish #{i}: {mqtt.error_string(rc)}")
            done.set()

    def on_publish(*_: Any) -> None:
        counts["acked"] += 1
        if counts["acked"] >= n:
            done.set()
        elif counts["next"] < n:
            send()

    client.on_connect = lambda *_: connected.set()
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise BenchError(f"publisher: no CONNACK from 127.0.0.1:{port}")
        cpu0, t_first = time.process_time(), time.monotonic()
        for _ in range(min(WINDOW, n)):
            send()
        if not done.wait(deadline_s) or errors:
            raise BenchError(errors[0] if errors else
                             f"publisher: {counts['acked']} of {n} acked in {deadline_s:.0f}s")
        return t_first, time.monotonic(), time.process_time() - cpu0
    finally:
        client.disconnect()
        client.loop_stop()


# ---- the agent ---------------------------------------------------------------------------


class BusAgent(Agent):
    """forward.py's agent, with `[local]` pointed at a local broker, and services."""

    def __init__(self, workdir: Path, cloud_port: int, local_port: int, node: str = NODE,
                 services: dict[str, dict[str, object]] | None = None) -> None:
        super().__init__(workdir, node, cloud_port)
        extra = (f'\n[local]\nurl = "mqtt://127.0.0.1:{local_port}"\n'
                 f'forward = ["bench/#"]\ninflight = {LOCAL_INFLIGHT}\n\n')
        self.config.write_text(self.config.read_text() + extra
                               + services_toml(services or {}).lstrip("\n"))

    def wait_both_online(self) -> None:
        """Wait until `status` says the local bus and the uplink are online."""
        seen: dict[str, Any] = {}

        def online() -> bool:
            if not self.alive():
                raise BenchError(f"the agent exited:\n{self.log_tail()}")
            seen.update(self.status())
            return bool(seen.get("local", {}).get("state") == "online"
                        and seen["uplink"]["state"] == "online")

        try:
            wait_for(online, ONLINE_TIMEOUT, "local and uplink online", every=0.05)
        except BenchError as exc:
            raise BenchError(f"{exc}: local {seen.get('local')}, uplink {seen.get('uplink')}"
                             ) from exc

    def services(self) -> list[dict[str, Any]]:
        """The `services` answer's rows."""
        rows: list[dict[str, Any]] = self.request({"op": "services"})["services"]
        return rows


@contextlib.contextmanager
def running(agent: BusAgent, what: str, fig: Figures) -> Iterator[BusAgent]:
    """Start the agent for the block; afterwards note a bad exit and its log's warnings."""
    fig.agents += 1
    try:
        agent.start()
        yield agent
    finally:
        code = agent.stop()
        if code not in (0, None):
            fig.notes.append(f"{what}: agent exited with {code}; log tail:\n{agent.log_tail()}")
        for line in agent.log_problems():
            # The same warning from every agent is one finding: drop the time, mask ports.
            line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line.split(" ", 2)[-1])
            fig.log_lines.setdefault(line, []).append(what)


# ---- the measurements --------------------------------------------------------------------


@dataclass
class Figures:
    """Every figure, for the report; lists hold one entry per run (or per time slice)."""

    raw: list[float] = field(default_factory=list)
    agent: list[float] = field(default_factory=list)
    local_acked: list[float] = field(default_factory=list)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # per message
    idle: dict[int, float] = field(default_factory=dict)  # services -> % of one core
    crash: list[float] = field(default_factory=list)  # seconds beyond the back-off
    notes: list[str] = field(default_factory=list)
    agents: int = 0  # agents started
    log_lines: dict[str, list[str]] = field(default_factory=dict)  # warning -> which runs

    def per_msg(self, key: str, seconds: float, n: int) -> float:
        """Record CPU seconds spent on n messages as microseconds per message."""
        us = seconds / n * 1e6
        self.cpu_us.setdefault(key, []).append(us)
        return us


def check(tally: Tally, n: int, what: str, fig: Figures) -> float:
    """The last arrival; notes duplicates and bad messages, raises when some never came."""
    if tally.duplicates or tally.bad:
        fig.notes.append(f"{what}: {tally.duplicates} duplicates ({tally.resent} with the same"
                         f" seq; e.g. message numbers {tally.duplicate_sample}),"
                         f" {tally.bad} bad messages")
    if tally.missing or tally.last is None:
        raise BenchError(f"{what}: {tally.distinct} of {n} arrived; missing e.g."
                         f" {tally.missing_sample} ({tally.missing} in all)")
    return tally.last


def run_raw(cloud: Broker, n: int, rep: int, fig: Figures) -> None:
    """Raw paho publisher -> one mosquitto -> paho subscriber."""
    deadline = max(60.0, n / 200)
    with counting(cloud.port, RAW_TOPIC, n, envelope=False, deadline_s=deadline) as tally:
        b0 = cpu_seconds(cloud.pid)
        t0, _, pub_cpu = publish(cloud.port, RAW_TOPIC, n, deadline)
        got = tally()
        fig.per_msg("raw broker", cpu_seconds(cloud.pid) - b0, n)
    fig.raw.append(n / (check(got, n, f"raw #{rep}", fig) - t0))
    fig.per_msg("raw publisher", pub_cpu, n)
    fig.per_msg("raw subscriber", got.cpu, n)
    print(f"  raw #{rep}:   {fig.raw[-1]:7.0f} msg/s received", flush=True)


def run_agent_path(work: Path, cloud: Broker, n: int, rep: int, fig: Figures) -> None:
    """Publisher -> local mosquitto -> agent -> outbox -> cloud mosquitto -> subscriber."""
    deadline = max(120.0, n / 100)
    local = Broker(work / f"local-{rep}")
    try:
        local.start()
        agent = BusAgent(work / f"agent-{rep}", cloud.port, local.port)
        with running(agent, f"agent path #{rep}", fig):
            agent.wait_both_online()
            up = f"{PREFIX}/nodes/{NODE}/up/{LOCAL_TOPIC}"
            with counting(cloud.port, up, n, envelope=True, deadline_s=deadline) as tally:
                pids = {"agent": agent.pid, "local broker": local.pid, "cloud broker": cloud.pid}
                cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
                t0, t_acked, pub_cpu = publish(local.port, LOCAL_TOPIC, n, deadline)
                got = tally()
                cpu = {k: cpu_seconds(pid) - cpu0[k] for k, pid in pids.items()}
            status = agent.status()
        fig.agent.append(n / (check(got, n, f"agent path #{rep}", fig) - t0))
        fig.local_acked.append(n / (t_acked - t0))
        for k, seconds in cpu.items():
            fig.per_msg(f"agent {k}", seconds, n)
        fig.per_msg("agent publisher", pub_cpu, n)
        fig.per_msg("agent subscriber", got.cpu, n)
        busy = cpu["agent"] * fig.agent[-1] / n  # CPU seconds over wall seconds
        bus = status.get("local", {})
        print(f"  agent #{rep}: {fig.agent[-1]:7.0f} msg/s end to end (local broker acked all at"
              f" {fig.local_acked[-1]:.0f}/s; agent {1e6 * cpu['agent'] / n:.0f} us CPU/msg,"
              f" busy {100 * busy:.0f}% of a core; status.local"
              f" forwarded={bus.get('forwarded')} held={bus.get('held')}"
              f" rejected={bus.get('rejected')}; queue depth {status['queue']['depth']})",
              flush=True)
    finally:
        local.stop()


def run_idle(work: Path, cloud: Broker, window: float, fig: Figures) -> None:
    """Agent CPU (not its children) with 0 and with 20 idle services, side by side."""
    idle: dict[str, dict[str, object]] = {
        f"idle{i:02d}": {"command": ["sleep", "100000"]} for i in range(IDLE_SERVICES)}
    local = Broker(work / "local-idle")
    try:
        local.start()
        # Own node ids: one client id each on both brokers, or they would take turns.
        bare = BusAgent(work / "idle-0", cloud.port, local.port, "bench-idle-0")
        busy = BusAgent(work / f"idle-{IDLE_SERVICES}", cloud.port, local.port,
                        f"bench-idle-{IDLE_SERVICES}", idle)
        with running(bare, "idle, 0 services", fig), \
                running(busy, f"idle, {IDLE_SERVICES} services", fig):
            bare.wait_both_online()
            busy.wait_both_online()
            wait_for(lambda: all(r["pid"] for r in busy.services()), ONLINE_TIMEOUT,
                     f"{IDLE_SERVICES} services running", every=0.1)
            time.sleep(2.0)  # let start-up work settle
            # One window, not slices: psutil counts CPU in 10 ms ticks, and an idle
            # agent spends a few of them per second at most.
            agents = {0: bare, IDLE_SERVICES: busy}
            cpu0, t0 = {k: cpu_seconds(a.pid) for k, a in agents.items()}, time.monotonic()
            time.sleep(window)
            spent = {k: cpu_seconds(a.pid) - cpu0[k] for k, a in agents.items()}
            took = time.monotonic() - t0
            if not (bare.alive() and busy.alive()):
                raise BenchError("an agent exited during the idle window")
        fig.idle = {k: 100 * seconds / took for k, seconds in spent.items()}
        print(f"  idle: agent {fig.idle[0]:.2f}% of one core with 0 services,"
              f" {fig.idle[IDLE_SERVICES]:.2f}% with {IDLE_SERVICES}", flush=True)
    finally:
        local.stop()


def run_crashes(work: Path, cloud: Broker, crashes: int, fig: Figures) -> None:
    """A service that exits 1 after CRASHER_UPTIME: its exit to its next start, minus BACKOFF."""
    marks = work / "crash-marks"
    # bash, not Python: it starts in a few ms, so the gap is mostly the supervisor's.
    script = (f'echo "start $EPOCHREALTIME" >> {marks}; sleep {CRASHER_UPTIME};'
              f' echo "exit $EPOCHREALTIME" >> {marks}; exit 1')
    crasher = {"crasher": {"command": ["bash", "-c", script], "restart": "always",
                           "backoff_initial": f"{BACKOFF}s", "backoff_max": f"{BACKOFF}s",
                           "backoff_jitter": 0.0}}
    local = Broker(work / "local-crash")
    try:
        local.start()
        agent = BusAgent(work / "crash", cloud.port, local.port, services=crasher)
        with running(agent, "crash", fig):

            def enough() -> bool:
                if not agent.alive():
                    raise BenchError(f"the agent exited:\n{agent.log_tail()}")
                return marks.exists() and marks.read_text().count("start") > crashes

            wait_for(enough, 30 + crashes * (CRASHER_UPTIME + BACKOFF) * 3,
                     f"{crashes} restarts", every=0.1)
            row = agent.services()[0]
        events = [f for f in map(str.split, marks.read_text().splitlines()) if len(f) == 2]
        for (kind, at), (then, later) in itertools.pairwise(events):
            if (kind, then) == ("exit", "start"):
                fig.crash.append(float(later) - float(at) - BACKOFF)
        print(f"  crash: {len(fig.crash)} restarts, median {1000 * median(fig.crash):.1f} ms"
              f" beyond the back-off; services op: state {row['state']},"
              f" restarts {row['restarts']}, last_exit {row['last_exit']}", flush=True)
    finally:
        local.stop()


# ---- the report --------------------------------------------------------------------------


def report(fig: Figures, args: argparse.Namespace, base: Path) -> None:
    """Print the figures, medians first, then the single runs."""

    def runs(values: list[float], fmt: str = "{:.0f}") -> str:
        return "runs " + ", ".join(fmt.format(v) for v in values) if len(values) > 1 else ""

    def shown(value: float, fmt: str = "{:.0f}") -> str:
        return "n/a" if value != value else fmt.format(value)  # NaN: not measured

    ratio = median(fig.agent) / median(fig.raw)
    verdict = "" if ratio != ratio else "MET" if ratio >= TARGET else "NOT MET"
    rows = [
        ("raw paho -> mosquitto -> paho, received/s", shown(median(fig.raw)), "", runs(fig.raw)),
        ("agent path end to end, msg/s", shown(median(fig.agent)), "", runs(fig.agent)),
        ("  agent / raw", shown(ratio, "{:.2f}"), f">= {TARGET}", verdict),
        ("  local broker PUBACKs to the publisher/s", shown(median(fig.local_acked)), "",
         runs(fig.local_acked)),
    ]
    tick = 100 * 0.01 / args.window
    for k in sorted(fig.idle):
        rows.append((f"agent CPU idle, {k} services, % of a core", f"{fig.idle[k]:.2f}", "",
                     f"one {args.window:.0f}s window; 1 tick (10 ms) = {tick:.2f}"))
    if len(fig.idle) == 2:
        rows.append((f"  {IDLE_SERVICES} services minus 0 services",
                     f"{round(fig.idle[IDLE_SERVICES] - fig.idle[0], 2) + 0.0:.2f}", "",
                     "same window"))  # + 0.0: no "-0.00"
    if fig.crash:
        rows.append((f"crash -> running, ms beyond the {BACKOFF * 1000:.0f} ms back-off",
                     f"{1000 * median(fig.crash):.1f}", "",
                     f"worst {1000 * max(fig.crash):.1f} of {len(fig.crash)}"))
    width = max(len(r[0]) for r in rows)
    print("", "=" * 100,
          f"edge local-bus benchmark ({'quick' if args.quick else 'full'}): {args.reps} run(s),"
          f" median shown; {args.n:,} msgs per run, payload {PAYLOAD_BYTES} B, QoS 1",
          f"publisher paho MQTT 5, {WINDOW} in flight; subscriber paho MQTT 3.1.1 counts distinct"
          f" `data`; agent [uplink] inflight {WINDOW}, [local] inflight {LOCAL_INFLIGHT}",
          f"data dir under {base} ({fs_type(base)}); host {os.cpu_count()} CPUs, load avg"
          f" {os.getloadavg()[0]:.2f} now",
          "-" * 100,
          *(f"{name:<{width}} {value:>8}  {target:<8} {detail}".rstrip()
            for name, value, target, detail in rows),
          "-" * 100,
          "CPU us per message (median):", sep="\n")
    for phase, procs in (("raw", ["publisher", "broker", "subscriber"]),
                         ("agent", ["publisher", "local broker", "agent", "cloud broker",
                                    "subscriber"])):
        parts = [f"{p} {median(fig.cpu_us[f'{phase} {p}']):.0f}" for p in procs
                 if f"{phase} {p}" in fig.cpu_us]
        if parts:
            print(f"  {phase:<6} " + ", ".join(parts))
    print("=" * 100)
    notes = fig.notes + [
        f"agent log, {len(where)} of {fig.agents} agents ({where[0]}, ...): {line}"
        if len(where) > 1 else f"agent log, {where[0]}: {line}"
        for line, where in fig.log_lines.items()
    ]
    if notes:
        print("notes:", *(f"  - {note}" for note in notes), sep="\n")


def run_all(work: Path, cloud: Broker, args: argparse.Namespace, fig: Figures) -> None:
    """Raw and agent path in turns, so both see the same noise; then the services."""
    for rep in range(1, args.reps + 1):
        run_raw(cloud, args.n, rep, fig)
        if not args.only_raw:
            run_agent_path(work, cloud, args.n, rep, fig)
    if not args.only_raw:
        run_idle(work, cloud, args.window, fig)
        run_crashes(work, cloud, args.crashes, fig)


def main() -> int:
    """Run everything and print the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages, shorter windows")
    for flag, kind, text in (("--n", int, "messages per rate run"),
                             ("--reps", int, "runs per rate figure"),
                             ("--window", float, "seconds of idle CPU measurement"),
                             ("--crashes", int, "crashes to time")):
        parser.add_argument(flag, type=kind, help=f"{text} (default: quick / full: "
                            f"{SIZES[True][flag[2:]]:g} / {SIZES[False][flag[2:]]:g})")
    parser.add_argument("--only-raw", action="store_true", help="the raw baseline alone")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    for key, default in SIZES[args.quick].items():
        if getattr(args, key) is None:
            setattr(args, key, default)

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)  # unwind through the finally blocks
    signal.signal(signal.SIGHUP, interrupted)
    base = pick_workdir_base()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-localbus-", dir=base))
    fig = Figures()
    started = time.monotonic()
    print(f"work dir {work} ({fs_type(work)})", flush=True)
    with contextlib.ExitStack() as cleanup:  # last in, first out: the cloud broker first
        if args.keep:
            cleanup.callback(print, f"kept {work}")
        else:
            cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        cloud = Broker(work / "cloud")
        cleanup.callback(cloud.stop)
        try:
            cloud.start()
            run_all(work, cloud, args, fig)
        except BenchError as exc:
            fig.notes.append(f"ABORTED: {exc}")
            print(f"benchmark failed: {exc}", file=sys.stderr, flush=True)
        except KeyboardInterrupt as exc:
            print(f"interrupted ({exc or 'Ctrl-C'}); stopping everything", file=sys.stderr)
            return 130
    print(f"(took {time.monotonic() - started:.0f}s)")
    report(fig, args, base)
    return 1 if any(note.startswith("ABORTED") for note in fig.notes) else 0


if __name__ == "__main__":
    sys.exit(main())
