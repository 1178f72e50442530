"""Discovery benchmark: how fast agents find and forget each other, and what it costs the LAN.

Run from the repository root, as root (it makes network namespaces):

    .venv/bin/python bench/discovery.py [--trials 20] [--steady 300] [--quick]

It builds a bridge and three hosts in network namespaces (addresses from
198.18.0.0/15), runs an observer agent in one, and starts a subject agent in
another, again and again:

- discovery: from the subject's process start (and from its socket API first
  answering) to `up` in the observer's peer table;
- goodbye: from SIGTERM to `lost`;
- crash: from SIGKILL to `lost`, with `[discovery] peer_timeout` set short;
- steady traffic: with three agents up, every mDNS multicast packet on the
  LAN (IPv4 and IPv6) is counted from a fourth namespace for `--steady` seconds
  and given as packets per agent per hour.

It prints figures; it is not a test. Every wait has a timeout, and everything
it made is removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge.client import ApiClient
from edge.errors import EdgeError

REPO = Path(__file__).resolve().parents[1]
SUBNET = "198.18.77"
PEER_TIMEOUT = 5.0  # seconds, for the crash trials
START_TIMEOUT = 20.0
LOST_TIMEOUT = 30.0
POLL = 0.01  # seconds between peer-table reads


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


class Lan:
    """A bridge in its own namespace and hosts joined to it by veth pairs."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.switch = f"bd-{self.tag}-sw"
        self.hosts: list[str] = []
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, n: int) -> str:
        ns = f"bd-{self.tag}-h{n}"
        sh("ip", "netns", "add", ns)
        port = f"p{n}"
        sh("ip", "link", "add", port, "netns", self.switch, "type", "veth",
           "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
           "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.eth0.accept_dad=0")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{10 + n}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        self.hosts.append(ns)
        return ns

    def close(self) -> None:
        for ns in [*self.hosts, self.switch]:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)


class AgentProc:
    """An agent subprocess in a namespace, and a client for its socket."""

    def __init__(self, workdir: Path, ns: str, node: str, **discovery: Any) -> None:
        self.ns, self.node = ns, node
        workdir.mkdir(parents=True, exist_ok=True)
        self.sock = workdir / "agent.sock"
        self.config = workdir / "agent.toml"
        self.log = workdir / "agent.log"
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in discovery.items())
        self.config.write_text(
            f'[node]\nid = "{node}"\ndata_dir = "{workdir / "data"}"\n'
            f'[api]\nsocket = "{self.sock}"\n[telemetry]\ninterval = "0s"\n'
            f"[discovery]\n{extra}"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> float:
        """Start the process; return its start time (monotonic)."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self.started_at = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "edge", "run",
                 "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        return self.started_at

    def wait_ready(self) -> float:
        """Wait until the socket API answers; return when (monotonic)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(EdgeError):
                if self.request({"op": "status"}).get("ok"):
                    return time.monotonic()
            time.sleep(POLL)
        raise RuntimeError(f"{self.node} did not start:\n{self.log.read_text()[-2000:]}")

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        with ApiClient(self.sock, timeout=5) as api:
            return api.request(req)

    def peer_state(self, node: str) -> str | None:
        for row in self.request({"op": "peers"})["peers"]:
            if row["node"] == node:
                return str(row["state"])
        return None

    def signal(self, sig: int) -> float:
        assert self.proc is not None
        at = time.monotonic()
        self.proc.send_signal(sig)
        return at

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_state(observer: AgentProc, node: str, state: str, timeout: float) -> float:
    """Poll the observer until `node` is in `state`; return when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if observer.peer_state(node) == state:
            return time.monotonic()
        time.sleep(POLL)
    raise RuntimeError(f"{node} not {state} at {observer.node} within {timeout}s")


def count_multicast(ns: str, seconds: float) -> dict[str, int]:
    """Count mDNS packets seen from a namespace for `seconds`, by source address."""
    code = f"""
import json, select, socket, struct, time
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s4.bind(("224.0.0.251", 5353))
s4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
              socket.inet_aton("224.0.0.251") + socket.inet_aton("0.0.0.0"))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s6.bind(("::", 5353))
idx = socket.if_nametoindex("eth0")
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
              socket.inet_pton(socket.AF_INET6, "ff02::fb") + struct.pack("@I", idx))
counts = {{}}
end = time.monotonic() + {seconds}
while (left := end - time.monotonic()) > 0:
    ready, _, _ = select.select([s4, s6], [], [], left)
    for s in ready:
        _, addr = s.recvfrom(9000)
        counts[addr[0]] = counts.get(addr[0], 0) + 1
print(json.dumps(counts))
"""
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=seconds + 30, check=True)
    counts: dict[str, int] = json.loads(out.stdout)
    return counts


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def line(name: str, values: list[float], target: str = "", ok: bool | None = None) -> str:
    mark = "" if ok is None else ("met" if ok else "NOT MET")
    return (f"{name:<44} p50 {statistics.median(values):6.2f}s  p95 {pct(values, 95):6.2f}s"
            f"  max {max(values):6.2f}s  {target:<16} {mark}")


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="edge-bench-discovery-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--steady", type=float, default=300.0, help="seconds of traffic counting")
    ap.add_argument("--quick", action="store_true", help="5 trials, 60 s of counting")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.steady = 5, 60.0
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("bench/discovery.py needs root and iproute2 (ip) to make network namespaces")
        return 2
    lan = Lan()
    agents: list[AgentProc] = []
    try:
        with workdir(args.keep) as work:
            obs_ns, sub_ns, third_ns, sniff_ns = (lan.add_host(n) for n in range(1, 5))
            observer = AgentProc(work / "observer", obs_ns, "observer",
                                 peer_timeout=f"{PEER_TIMEOUT:g}s")
            subject = AgentProc(work / "subject", sub_ns, "subject",
                                peer_timeout=f"{PEER_TIMEOUT:g}s")
            agents += [observer, subject]
            observer.start()
            observer.wait_ready()
            found_start, found_ready, goodbye, crash = [], [], [], []
            for trial in range(args.trials):
                started = subject.start()
                ready = subject.wait_ready()
                up = wait_state(observer, "subject", "up", START_TIMEOUT)
                found_start.append(up - started)
                found_ready.append(max(0.0, up - ready))
                if trial % 2 == 0:
                    at = subject.signal(signal.SIGTERM)
                    goodbye.append(wait_state(observer, "subject", "lost", LOST_TIMEOUT) - at)
                else:
                    at = subject.signal(signal.SIGKILL)
                    crash.append(wait_state(observer, "subject", "lost", LOST_TIMEOUT) - at)
                assert subject.proc is not None
                subject.proc.wait(10)
                print(f"  trial {trial + 1}/{args.trials}: up {found_start[-1]:.2f}s after start"
                      f" ({found_ready[-1]:.2f}s after ready)", flush=True)

            # Steady state: three agents up, counted from a fourth host.
            third = AgentProc(work / "third", third_ns, "third")
            agents.append(third)
            subject.start()
            third.start()
            for a in (subject, third):
                a.wait_ready()
            for node in ("subject", "third"):
                wait_state(observer, node, "up", START_TIMEOUT)
            time.sleep(5)  # past the start-up announcements and questions
            counts = count_multicast(sniff_ns, args.steady)
            total = sum(counts.values())
            per_agent_hour = total / 3 / args.steady * 3600
            peers_ok = all(a.peer_state(n) == "up" for a in agents
                           for n in ("observer", "subject", "third") if n != a.node)
            rss = [_rss(a) for a in agents]

            print()
            print(f"discovery benchmark: {args.trials} trials between network namespaces,"
                  f" peer_timeout {PEER_TIMEOUT:g}s")
            print("-" * 100)
            print(line("found: peer process start -> up", found_start, "p95 <= 1.5s",
                       pct(found_start, 95) <= 1.5))
            print(line("found: peer API ready -> up", found_ready))
            if goodbye:
                print(line("goodbye: SIGTERM -> lost", goodbye, "<= 2s", max(goodbye) <= 2.0))
            if crash:
                print(line("crash: SIGKILL -> lost", crash, f"<= {PEER_TIMEOUT + 2:g}s",
                           max(crash) <= PEER_TIMEOUT + 2))
            print(f"{'steady multicast, packets per agent per hour':<44} {per_agent_hour:7.1f}"
                  f"  ({total} packets from 3 agents in {args.steady:g}s, IPv4+IPv6)"
                  f"  <= 20  {'met' if per_agent_hour <= 20 else 'NOT MET'}")
            print(f"{'peers all up at the end of the count':<44} {peers_ok}")
            print(f"{'agent RSS with discovery, MiB':<44} "
                  + ", ".join(f"{r:.1f}" for r in rss))
            print("note: the steady count covers no hourly PTR refresh (one question per agent"
                  " per hour, and its answers) unless --steady is longer than an hour.")
            return 0
    finally:
        for a in agents:
            a.stop()
        lan.close()


def _rss(agent: AgentProc) -> float:
    assert agent.proc is not None
    try:
        status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    except OSError:
        return float("nan")
    for row in status.splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
