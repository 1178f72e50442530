"""Real hosts on a real LAN: Linux network namespaces joined by a bridge.

A `Lan` owns a "switch" namespace holding a bridge, and one namespace per
host. Each host's `eth0` is one end of a veth pair whose other end is a port
of that bridge, so hosts exchange unicast and multicast (mDNS) exactly as
machines on one Ethernet segment do, and nothing touches the root
namespace's network: the veth pairs are created inside the switch
namespace with their host end moved straight into the host's namespace.

Because every Lan is its own segment, all Lans use the same subnet
(198.18.7.0/24, from the benchmarking range 198.18.0.0/15); only namespace
names must be unique: `edge-PID-TAG-HOST`, with the pid of the test process
and a random tag per Lan. `sweep_leftovers()` deletes the namespaces of test
processes that are gone (a run killed before its teardown).

    with Lan(tmp_path / "lan") as lan:
        a, b = lan.add_host("a"), lan.add_host("b")
        b.run(["dig", "-p", "5353", f"@{a.ip}", "_edge-agent._tcp.local", "PTR"])
        agent = a.agent(overrides={"discovery": {"peer_timeout": "4s"}})

Closing the Lan stops its agents, kills every process left in its
namespaces (whoever started it) and deletes the namespaces, which takes
their interfaces with them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .agent import Agent, Overrides
from .net import wait_until

__all__ = ["SUBNET", "Host", "Lan", "NetnsError", "netns_unavailable", "sweep_leftovers"]

SUBNET = ipaddress.IPv4Network("198.18.7.0/24")
_MULTICAST = "224.0.0.0/4"
_BRIDGE = "br0"
_CMD_TIMEOUT = 15.0
_LINK_TIMEOUT = 5.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_CLONE_NEWNET = 0x40000000
_OURS = re.compile(r"edge-(\d+)-[0-9a-f]{6}-\S+")


class NetnsError(RuntimeError):
    """A command that builds or inspects the LAN failed."""


def _cmd(argv: Sequence[str], timeout: float = _CMD_TIMEOUT) -> str:
    """Run a setup command; return its stdout, or raise with its stderr."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: no answer within {timeout}s") from exc
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {said}")
    return done.stdout


def _write_sysctl(namespace: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (no dependency on procps's `sysctl`)."""
    path = "/proc/sys/" + key.replace(".", "/")
    _cmd(["ip", "netns", "exec", namespace, "sh", "-c", f'echo {value} > "$1"', "sh", path])


def netns_unavailable() -> str | None:
    """Why this process cannot build a Lan (None when it can): probe once, for real."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "`ip` is not installed (apt-get install iproute2; scripts/test does)"
    probe = f"edge-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _cmd(["ip", "netns", "add", probe])
        _cmd(["ip", "-n", probe, "link", "add", "pbr", "type", "bridge"])
        _cmd(["ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
    except NetnsError as exc:
        return f"cannot build a network namespace with a bridge and a veth pair: {exc}"
    finally:
        with contextlib.suppress(NetnsError):
            _cmd(["ip", "netns", "del", probe])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers() -> list[str]:
    """Delete the namespaces (and what runs in them) of test runs whose process is gone.

    Only names this module makes are touched, and only when their owner is
    dead; a parallel run's namespaces are left alone. Returns what was deleted.
    """
    swept = []
    for line in _cmd(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _OURS.fullmatch(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        Lan._kill_inside(name)
        with contextlib.suppress(NetnsError):
            _cmd(["ip", "netns", "del", name])
            swept.append(name)
    return swept


class Host:
    """One machine on the Lan: a network namespace with `lo` and usually `eth0`."""

    def __init__(self, lan: Lan, name: str, namespace: str) -> None:
        self.lan = lan
        self.name = name
        self.namespace = namespace
        self._agents = 0

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.namespace!r}, ip={self.ip!r})"

    @property
    def prefix(self) -> list[str]:
        """The argv that runs a command inside this host (`ip netns exec` execs it)."""
        return ["ip", "netns", "exec", self.namespace]

    # -- processes ------------------------------------------------------------

    def run(
        self, argv: Sequence[str], *, timeout: float = 30.0, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run(argv) inside this host; output captured as text unless `kw` says."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        if "stdout" not in kw and "stderr" not in kw:
            kw["capture_output"] = True
        kw.setdefault("text", True)
        kw.setdefault("check", False)
        return subprocess.run([*self.prefix, *argv], timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen(argv) inside this host; the Lan kills it at close if still running.

        The Popen's pid is the command's own: `ip netns exec` execs it.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.prefix, *argv], **kw)
        self.lan._procs.append(proc)
        return proc

    def socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM, proto: int = 0
    ) -> socket.socket:
        """A socket of this test process that lives in this host's network namespace.

        A short-lived thread enters the namespace (setns only moves the calling
        thread), makes the socket and ends; the socket stays in the namespace.
        """
        made: list[socket.socket | BaseException] = []

        def inside() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.namespace}", os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.namespace}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                made.append(socket.socket(family, kind, proto))
            except BaseException as exc:
                made.append(exc)

        thread = threading.Thread(target=inside, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout=_CMD_TIMEOUT)
        if not made:
            raise NetnsError(f"{self.name}: no socket made within {_CMD_TIMEOUT}s")
        if isinstance(made[0], BaseException):
            raise NetnsError(f"{self.name}: cannot make a socket there: {made[0]}") from made[0]
        return made[0]

    def agent(
        self,
        node_id: str | None = None,
        *,
        overrides: Overrides | None = None,
        start: bool = True,
        name: str | None = None,
    ) -> Agent:
        """An agent inside this host with `[discovery] enabled = true` plus `overrides`.

        node_id defaults to the host's name. Each call gets its own work dir
        (config, data, socket), so a second agent on a host starts fresh.
        """
        self._agents += 1
        workdir = self.lan.workdir / (name or f"{self.name}-{self._agents}")
        socket_path = workdir / "agent.sock"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            raise NetnsError(f"socket path too long for AF_UNIX: {socket_path}")
        merged: dict[str, dict[str, Any]] = {"discovery": {"enabled": True}}
        for section, keys in (overrides or {}).items():
            merged.setdefault(section, {}).update(keys)
        agent = Agent(workdir, node_id=node_id or self.name, overrides=merged, prefix=self.prefix)
        self.lan._agents.append(agent)
        return agent.start() if start else agent

    # -- addresses --------------------------------------------------------------

    def _ip(self, *args: str) -> str:
        return _cmd(["ip", "-n", self.namespace, *args])

    def links(self) -> list[dict[str, Any]]:
        """`ip -j addr show` inside this host: one dict per interface."""
        links: list[dict[str, Any]] = json.loads(self._ip("-j", "addr", "show") or "[]")
        return links

    def interfaces(self) -> list[str]:
        """Names of this host's interfaces (`lo` included)."""
        return [link["ifname"] for link in self.links()]

    def addresses(self, dev: str = "eth0", family: int = 4) -> list[str]:
        """The addresses (without prefix length, without scope) of `dev` for IPv4 or IPv6."""
        inet = "inet" if family == 4 else "inet6"
        for link in self.links():
            if link["ifname"] == dev:
                return [a["local"] for a in link.get("addr_info", []) if a["family"] == inet]
        raise NetnsError(f"{self.name}: no interface {dev!r} (has {self.interfaces()})")

    @property
    def ip(self) -> str | None:
        """The current IPv4 address of eth0 (None when there is no eth0 or no address)."""
        if "eth0" not in self.interfaces():
            return None
        found = self.addresses("eth0", 4)
        return found[0] if found else None

    def link_local(self, dev: str = "eth0") -> str:
        """The fe80:: address of `dev`, without scope."""
        for addr in self.addresses(dev, 6):
            if ipaddress.IPv6Address(addr).is_link_local:
                return addr
        raise NetnsError(f"{self.name}: {dev} has no IPv6 link-local address")

    def add_address(self, cidr: str, dev: str = "eth0") -> None:
        """Add an IPv4 address (e.g. "198.18.7.99/24") to `dev`."""
        self._ip("addr", "add", cidr, "dev", dev)

    def remove_address(self, cidr: str, dev: str = "eth0") -> None:
        """Remove one address from `dev`."""
        self._ip("addr", "del", cidr, "dev", dev)

    def set_address(self, cidr: str, dev: str = "eth0") -> None:
        """Replace every IPv4 address of `dev` by `cidr`, keeping its multicast route.

        The new address goes on before the old ones come off: removing a
        device's last IPv4 address would flush its routes, the multicast one too.
        """
        old = [
            f"{a['local']}/{a['prefixlen']}"
            for link in self.links()
            if link["ifname"] == dev
            for a in link.get("addr_info", [])
            if a["family"] == "inet"
        ]
        new = ipaddress.IPv4Interface(cidr)
        if new.with_prefixlen not in old:
            self.add_address(new.with_prefixlen, dev)
        for addr in old:
            if addr != new.with_prefixlen:
                self.remove_address(addr, dev)
        if dev == "eth0":
            self._ip("route", "replace", _MULTICAST, "dev", dev)

    def add_interface(self, name: str, cidr: str | None = None) -> str:
        """A second port into the same bridge, called `name` here (e.g. "dock0"); its CIDR.

        It carries no multicast route: only eth0 has the host's 224.0.0.0/4 route.
        """
        cidr = cidr or self.lan.next_cidr()
        self.lan._plug(self, name, cidr)
        return cidr


class Lan:
    """A bridge in its own namespace and the host namespaces plugged into it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tag = secrets.token_hex(3)
        self.switch = f"edge-{os.getpid()}-{self.tag}-switch"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._agents: list[Agent] = []
        self._ports = 0
        self._octets = iter(range(10, 250))
        self._open = False

    def __enter__(self) -> Lan:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Lan:
        """Create the switch namespace and its bridge."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._open = True
        try:
            self._build_switch()
        except BaseException:
            self.close()
            raise
        return self

    def _build_switch(self) -> None:
        self._add_namespace(self.switch)
        # The switch only forwards frames: it has no addresses and sends nothing.
        _write_sysctl(self.switch, "net.ipv6.conf.all.disable_ipv6", "1")
        _write_sysctl(self.switch, "net.ipv6.conf.default.disable_ipv6", "1")
        # No IGMP/MLD snooping: every multicast frame floods to every port, as
        # on an unmanaged switch, whatever the group joins' timing.
        _cmd(["ip", "-n", self.switch, "link", "add", _BRIDGE, "type", "bridge",
              "mcast_snooping", "0", "stp_state", "0"])  # fmt: skip
        _cmd(["ip", "-n", self.switch, "link", "set", _BRIDGE, "up"])

    def next_cidr(self) -> str:
        """The next unused address of SUBNET, as "198.18.7.N/24"."""
        return f"{SUBNET.network_address + next(self._octets)}/{SUBNET.prefixlen}"

    def add_host(self, name: str, *, cidr: str | None = None, link: bool = True) -> Host:
        """A new host; with `link`, its eth0 is plugged into the bridge and addressed.

        Without `link` the host has only `lo` (no multicast-capable interface).
        """
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        namespace = f"edge-{os.getpid()}-{self.tag}-{name}"
        self._add_namespace(namespace)
        host = Host(self, name, namespace)
        self.hosts[name] = host
        # Before any interface exists, so every one inherits it: no
        # duplicate-address-detection delay before fe80:: is usable.
        _write_sysctl(namespace, "net.ipv6.conf.default.accept_dad", "0")
        _write_sysctl(namespace, "net.ipv6.conf.all.accept_dad", "0")
        # Deleting a primary address then keeps the others (set_address relies on it).
        _write_sysctl(namespace, "net.ipv4.conf.default.promote_secondaries", "1")
        _write_sysctl(namespace, "net.ipv4.conf.all.promote_secondaries", "1")
        _cmd(["ip", "-n", namespace, "link", "set", "lo", "up"])
        if link:
            self._plug(host, "eth0", cidr or self.next_cidr())
            _cmd(["ip", "-n", namespace, "route", "add", _MULTICAST, "dev", "eth0"])
        return host

    def _add_namespace(self, namespace: str) -> None:
        _cmd(["ip", "netns", "add", namespace])
        self._namespaces.append(namespace)

    def _plug(self, host: Host, ifname: str, cidr: str) -> None:
        """A veth pair: port pN on the bridge, `ifname` with `cidr` inside `host`, both up."""
        self._ports += 1
        port = f"p{self._ports}"
        _cmd(["ip", "-n", self.switch, "link", "add", port, "type", "veth",
              "peer", "name", ifname, "netns", host.namespace])  # fmt: skip
        _cmd(["ip", "-n", self.switch, "link", "set", port, "master", _BRIDGE, "up"])
        _cmd(["ip", "-n", host.namespace, "addr", "add", cidr, "dev", ifname])
        _cmd(["ip", "-n", host.namespace, "link", "set", ifname, "up"])

        def ready() -> bool:
            link = next(x for x in host.links() if x["ifname"] == ifname)
            v6 = [a for a in link.get("addr_info", []) if a["family"] == "inet6"]
            return link.get("operstate") == "UP" and any(
                a.get("scope") == "link" and not a.get("tentative") for a in v6
            )

        wait_until(ready, _LINK_TIMEOUT, what=f"{host.name}: {ifname} up with an fe80:: address")

    def describe(self) -> str:
        """Every host's interfaces and addresses, for failure messages."""
        lines = []
        for host in self.hosts.values():
            try:
                addrs = [
                    f"{link['ifname']}=" + ",".join(a["local"] for a in link.get("addr_info", []))
                    for link in host.links()
                ]
            except NetnsError as exc:
                addrs = [f"({exc})"]
            lines.append(f"{host.name} ({host.namespace}): {' '.join(addrs)}")
        return "\n".join(lines)

    def close(self) -> None:
        """Stop agents, kill every process in the Lan's namespaces, delete the namespaces."""
        if not self._open:
            return
        self._open = False
        for agent in reversed(self._agents):
            with contextlib.suppress(Exception):
                agent.close()
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for namespace in reversed(self._namespaces):
            self._kill_inside(namespace)
            with contextlib.suppress(NetnsError):
                _cmd(["ip", "netns", "del", namespace])

    @staticmethod
    def _kill_inside(namespace: str) -> None:
        """SIGKILL what still runs in `namespace`: a live process keeps it (and its links) alive."""
        try:
            pids = _cmd(["ip", "netns", "pids", namespace]).split()
        except NetnsError:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
