"""The LAN fixture itself: hosts in network namespaces really talk, and leave nothing behind."""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.net import wait_until
from tests.support.netns import Host, Lan, NetnsError

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353

# Joins the mDNS group on eth0's address, says "ready", prints the first datagram's
# sender and payload.
_RECEIVE = """
import socket, struct, sys
group, port, local, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(local)))
s.settimeout(timeout)
print("ready", flush=True)
data, addr = s.recvfrom(2048)
print(addr[0], data.decode(), flush=True)
"""

_SEND = """
import socket, sys, time
group, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
for _ in range(3):
    s.sendto(payload, (group, port))
    time.sleep(0.1)
"""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(host: Host, target: str, dev: str = "eth0", timeout: float = 2.0) -> bool:
    """Send one ICMP(v6) echo request from `host` to `target`; tell whether its reply came.

    A raw socket made inside the host's namespace, so no `ping` binary is needed.
    For an fe80:: target the scope is `dev` as numbered inside `host`.
    """
    ident, seq = secrets.randbits(16), 1
    v6 = ":" in target
    if v6:
        sock = host.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        ifindex = next(link["ifindex"] for link in host.links() if link["ifname"] == dev)
        dest: tuple[str, int] | tuple[str, int, int, int] = (target, 0, 0, ifindex)
        # The kernel fills in the ICMPv6 checksum (it covers a pseudo-header).
        request = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"edge"
        reply_type, header = 129, 0
    else:
        sock = host.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        dest = (target, 0)
        body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"edge"
        request = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
        reply_type, header = 0, 20
    with sock:
        try:
            sock.sendto(request, dest)
        except OSError:
            return False  # no route: certainly no reply
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                packet, source = sock.recvfrom(2048)
            except TimeoutError:
                return False
            icmp = packet[header:]  # IPv4 raw sockets see the IP header, IPv6 ones do not
            if len(icmp) >= 8 and source[0].split("%")[0] == target:
                kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", icmp[:8])
                if (kind, got_ident, got_seq) == (reply_type, ident, seq):
                    return True
    return False


def test_hosts_reach_each_other_over_ipv4_and_ipv6_link_local(lan: Lan) -> None:
    a, b = lan.add_host("a"), lan.add_host("b")
    assert a.ip and b.ip and a.ip != b.ip, lan.describe()
    assert icmp_echo(b, a.ip), f"no echo reply from {a.ip}\n{lan.describe()}"
    assert icmp_echo(a, b.ip), f"no echo reply from {b.ip}\n{lan.describe()}"
    assert icmp_echo(b, a.link_local()), f"no echo reply from {a.link_local()}%eth0"
    unused = lan.next_cidr().split("/")[0]
    assert not icmp_echo(a, unused, timeout=0.5), f"{unused} answered, but no host has it"


def test_multicast_datagram_to_the_mdns_group_reaches_another_host(
    lan: Lan, tmp_path: Path
) -> None:
    a, b = lan.add_host("a"), lan.add_host("b")
    assert b.ip is not None
    out_path = tmp_path / "receiver.out"
    with out_path.open("w") as out:
        receiver = b.popen(
            [sys.executable, "-c", _RECEIVE, MDNS_GROUP, str(MDNS_PORT), b.ip, "5"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_until(
        lambda: "ready" in out_path.read_text() or receiver.poll() is not None,
        10,
        what="receiver joined the group",
    )
    assert "ready" in out_path.read_text(), out_path.read_text()
    token = secrets.token_hex(8)
    sent = a.run([sys.executable, "-c", _SEND, MDNS_GROUP, str(MDNS_PORT), token], timeout=10)
    assert sent.returncode == 0, sent.stderr
    assert receiver.wait(timeout=10) == 0, f"no datagram arrived in b: {out_path.read_text()}"
    lines = out_path.read_text().splitlines()
    assert lines[1].split() == [a.ip, token], f"b received {lines}, expected {token} from {a.ip}"


def test_set_address_replaces_the_ipv4_address_and_keeps_the_multicast_route(lan: Lan) -> None:
    a, b = lan.add_host("a"), lan.add_host("b")
    old = a.ip
    new = lan.next_cidr()
    a.set_address(new)
    assert a.addresses("eth0", 4) == [new.split("/")[0]], lan.describe()
    assert a.ip == new.split("/")[0]
    routes = a.run(["ip", "route", "show", "224.0.0.0/4"], timeout=10).stdout
    assert "dev eth0" in routes, f"multicast route gone after set_address: {routes!r}"
    assert icmp_echo(b, new.split("/")[0]), f"new address {new} unreachable"
    assert old is not None and not icmp_echo(b, old, timeout=0.5), f"old address {old} answers"


def test_added_interface_is_a_second_port_on_the_same_lan(lan: Lan) -> None:
    a, b = lan.add_host("a"), lan.add_host("b")
    cidr = a.add_interface("dock0")
    address = cidr.split("/")[0]
    assert set(a.interfaces()) == {"lo", "eth0", "dock0"}
    assert a.addresses("dock0", 4) == [address]
    assert address != a.ip
    assert icmp_echo(b, address), f"dock0's {address} unreachable from b\n{lan.describe()}"
    a.add_address(lan.next_cidr(), dev="dock0")
    assert len(a.addresses("dock0", 4)) == 2
    a.remove_address(cidr, dev="dock0")
    assert address not in a.addresses("dock0", 4)


def test_host_without_link_has_only_lo_and_reaches_nobody(lan: Lan) -> None:
    a = lan.add_host("a")
    alone = lan.add_host("alone", link=False)
    assert alone.interfaces() == ["lo"]
    assert alone.ip is None
    assert a.ip is not None and not icmp_echo(alone, a.ip, timeout=0.5)


def test_agent_runs_inside_its_host_and_answers_from_the_root_namespace(lan: Lan) -> None:
    host = lan.add_host("a")
    agent = host.agent("node-a")
    assert agent.status()["node"] == "node-a"
    ours = os.stat("/proc/self/ns/net").st_ino
    theirs = os.stat(f"/proc/{agent.pid}/ns/net").st_ino
    assert theirs == os.stat(f"/run/netns/{host.namespace}").st_ino, "agent not in its host"
    assert theirs != ours
    cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:4] == [b"-m", b"edge", b"run"], f"pid is not the agent's own: {cmdline!r}"
    assert agent.config["discovery"]["enabled"] is True
    agent.kill9()
    assert agent.returncode == -9


def _root_links() -> set[str]:
    out = subprocess.run(
        ["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return {link["ifname"] for link in json.loads(out)}


def _namespaces() -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_teardown_kills_what_runs_inside_and_deletes_every_namespace(
    tmp_path: Path, netns_ok: None
) -> None:
    links_before = _root_links()
    lan = Lan(tmp_path / "lan").open()
    try:
        a = lan.add_host("a")
        a.add_interface("dock0")
        lan.add_host("alone", link=False)
        tracked = a.popen(["sleep", "300"])
        # Started behind the Lan's back: teardown still finds it by namespace.
        untracked = subprocess.Popen(["ip", "netns", "exec", a.namespace, "sleep", "300"])
        mine = {lan.switch, *(h.namespace for h in lan.hosts.values())}
        assert mine <= _namespaces()
        assert _root_links() == links_before, "the Lan touched the root namespace's links"
    finally:
        lan.close()
    assert tracked.wait(timeout=5) == -9
    assert untracked.wait(timeout=5) == -9
    assert not mine & _namespaces(), f"left behind: {mine & _namespaces()}"
    assert _root_links() == links_before
    with pytest.raises(NetnsError):
        a.interfaces()
