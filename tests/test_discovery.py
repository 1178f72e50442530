"""LAN discovery end to end: agents in network namespaces on one bridge, real multicast.

Every agent runs as a subprocess inside its own host namespace (tests/support/netns.py)
and is observed only through its socket API (`peers`, `status`) and the CLI.
Independent mDNS implementations (mdns-scan, dig, avahi-daemon) check that what
the agent sends is ordinary DNS-SD, and a hand-built packet checks that bad
input from the LAN is rejected without harm.

Contract: a row of `peers` is
  {"node", "instance", "state": "up"|"lost", "addresses", "port", "txt",
   "uplink", "first_seen", "last_seen", "lost_at"}
one per instance name; `status` has "discovery" and "peers": {"up", "lost"}.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.conftest import skip_missing
from tests.support.agent import Agent
from tests.support.net import wait_until
from tests.support.netns import Host, Lan
from tests.test_cli import edge as edge_cli

Row = dict[str, Any]

SERVICE = "_edge-agent._tcp.local."
MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
# How soon a peer must see a newcomer or a goodbye (the discovery contract).
SEE_WITHIN = 2.0
# Bounds for getting to the starting point of a test: not what it measures.
SETTLE = 8.0
ROW_KEYS = {
    "node",
    "instance",
    "state",
    "addresses",
    "port",
    "txt",
    "uplink",
    "first_seen",
    "last_seen",
    "lost_at",
}


# -- reading the agent ------------------------------------------------------------


def peers(agent: Agent) -> list[Row]:
    """The `peers` answer's rows (asserted ok, a list, one row per instance)."""
    answer = agent.request({"op": "peers"})
    assert answer.get("ok") is True, f"{agent.node_id}: peers failed: {answer!r}"
    rows = answer.get("peers")
    assert isinstance(rows, list), f"{agent.node_id}: peers is not a list: {answer!r}"
    instances = [row.get("instance") for row in rows]
    assert len(instances) == len(set(instances)), f"{agent.node_id}: duplicate rows: {rows!r}"
    return rows


def by_instance(rows: Iterable[Row]) -> dict[str, Row]:
    """Rows keyed by instance name."""
    return {row["instance"]: row for row in rows}


def up(rows: Iterable[Row]) -> set[str]:
    """Instance names of the rows that are `up`."""
    return {row["instance"] for row in rows if row.get("state") == "up"}


def ipv4s(row: Row) -> set[str]:
    """The row's IPv4 addresses."""
    return {a for a in row["addresses"] if ":" not in a}


def rejected_total(agent: Agent) -> int:
    """Sum of the `discovery.rejected` counters."""
    rejected = agent.status()["discovery"]["rejected"]
    assert isinstance(rejected, dict), f"discovery.rejected is not a map: {rejected!r}"
    return sum(int(n) for n in rejected.values())


def wait_peers(
    agent: Agent, predicate: Callable[[list[Row]], object], timeout: float, what: str
) -> list[Row]:
    """Poll `peers` until predicate(rows) holds; return those rows, or fail showing the last."""
    last: list[list[Row]] = []

    def check() -> bool:
        agent.assert_alive()
        last[:] = [peers(agent)]
        return bool(predicate(last[0]))

    try:
        wait_until(check, max(timeout, 0.0), interval=0.05, what=f"{agent.node_id}: {what}")
    except TimeoutError as exc:
        table = json.dumps(last[0] if last else None, indent=1)
        raise TimeoutError(f"{exc}; its peer table: {table}") from None
    return last[0]


def discovery_running(agent: Agent, timeout: float = SETTLE) -> dict[str, Any]:
    """Wait until the agent advertises (state running, an instance name); its `discovery`."""
    status = agent.wait_status(
        lambda s: (
            s.get("discovery", {}).get("state") == "running" and s["discovery"].get("instance")
        ),
        timeout,
        what=f"{agent.node_id}: discovery running",
    )
    discovery: dict[str, Any] = status["discovery"]
    return discovery


def wait_rows_up(observer: Agent, instances: set[str], timeout: float, what: str) -> list[Row]:
    """Wait until `observer` has every one of `instances` up."""
    return wait_peers(observer, lambda rows: up(rows) >= instances, timeout, what)


def same_time(a: float, b: float) -> bool:
    """Equal as timestamps: a new row would be seconds younger, not a rounding apart."""
    return abs(a - b) < 0.05


def left(deadline: float) -> float:
    """Seconds until `deadline` (monotonic), not below 0."""
    return max(0.0, deadline - time.monotonic())


# -- checking what the agent says against the contract -------------------------------


def check_row(row: Row, *, observer: Host, peer: Host | None = None) -> None:
    """Assert the row has the contract's fields and types, and its addresses make sense.

    IPv6 link-local addresses carry the scope of the interface the *observer*
    reached them on, by name (never `%0`, never a number); every address is
    one the peer host really has, when `peer` is given.
    """
    missing = ROW_KEYS - row.keys()
    assert not missing, f"row lacks {sorted(missing)}: {row!r}"
    assert isinstance(row["node"], str) and row["node"], row
    assert isinstance(row["instance"], str) and row["instance"], row
    assert row["state"] in ("up", "lost"), row
    assert isinstance(row["port"], int) and not isinstance(row["port"], bool), row
    assert row["uplink"] is None or isinstance(row["uplink"], str), row
    for key in ("first_seen", "last_seen"):
        assert isinstance(row[key], int | float) and not isinstance(row[key], bool), row
    assert row["first_seen"] <= row["last_seen"] <= time.time() + 1, row
    if row["state"] == "up":
        assert row["lost_at"] is None, f"an up row has lost_at: {row!r}"
    else:
        assert isinstance(row["lost_at"], int | float), f"a lost row without lost_at: {row!r}"
    txt = row["txt"]
    assert isinstance(txt, dict), row
    for key, value in txt.items():
        assert isinstance(key, str), row
        if isinstance(value, dict):
            assert set(value) == {"base64"}, f"txt {key!r}: {value!r}"
            base64.b64decode(value["base64"], validate=True)
        else:
            assert value is None or isinstance(value, str), f"txt {key!r}: {value!r}"
    addresses = row["addresses"]
    assert isinstance(addresses, list) and addresses, f"row without addresses: {row!r}"
    observer_ifs = observer.interfaces()
    for text in addresses:
        assert isinstance(text, str), row
        bare, _, scope = text.partition("%")
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            raise AssertionError(f"{text!r} is not an IP address: {row!r}") from None
        if isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
            assert scope and not scope.isdigit(), f"{text!r}: link-local without %ifname"
            assert scope in observer_ifs, f"{text!r}: {observer.name} has no {scope!r}"
        else:
            assert not scope, f"{text!r}: scope on a non-link-local address"
        if peer is not None:
            family = 4 if address.version == 4 else 6
            real = {a for dev in peer.interfaces() for a in peer.addresses(dev, family)}
            assert bare in real, f"{text!r} is not an address of {peer.name} ({sorted(real)})"


def check_agent_row(row: Row, agent: Agent, host: Host, observer: Host, port: int) -> None:
    """Assert a row describes `agent` on `host`: contract fields, its TXT keys, its eth0 IPv4."""
    check_row(row, observer=observer, peer=host)
    assert row["node"] == agent.node_id, row
    assert row["state"] == "up", row
    assert ipv4s(row) == {host.ip}, f"{agent.node_id} advertised {row['addresses']}, has {host.ip}"
    assert row["port"] == port, row
    txt = row["txt"]
    assert txt.get("node") == agent.node_id, txt
    assert txt.get("api") == "1", txt
    assert txt.get("uplink") == "offline", txt  # these agents have no uplink
    assert row["uplink"] == "offline", row
    for key in ("ver", "profile"):
        assert isinstance(txt.get(key), str) and txt[key], f"txt {key!r} missing: {txt!r}"


def binary(name: str, package: str) -> str:
    """Path of a tool (also looked for in /usr/sbin); skip with the reason when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        skip_missing(f"{name} is not installed (apt-get install {package}; scripts/test does)")
    return found


# -- a. newcomers ----------------------------------------------------------------------


def test_three_agents_on_one_lan_see_each_other_up_within_2s(lan: Lan) -> None:
    hosts = [lan.add_host(name) for name in ("a", "b", "c")]
    ports = {host.name: 7400 + i for i, host in enumerate(hosts)}
    agents = [
        host.agent(f"node-{host.name}", overrides={"discovery": {"port": ports[host.name]}})
        for host in hosts
    ]
    # The last agent's start returns when its status first answers.
    deadline = time.monotonic() + SEE_WITHIN
    nodes = {agent.node_id for agent in agents}
    for agent in agents:
        others = nodes - {agent.node_id}
        wait_rows_up(agent, others, left(deadline), f"{sorted(others)} up within {SEE_WITHIN}s")

    for agent, host in zip(agents, hosts, strict=True):
        status = agent.status()
        discovery = status["discovery"]
        assert discovery["state"] == "running", discovery
        assert discovery["reason"] is None, discovery
        assert discovery["instance"] == agent.node_id, discovery
        assert discovery["conflict"] is None, discovery
        assert "eth0" in discovery["interfaces"], discovery
        assert host.ip in discovery["addresses"], discovery
        counts = {key: status["peers"][key] for key in ("up", "lost")}
        assert counts == {"up": 2, "lost": 0}, status["peers"]
        rows = by_instance(peers(agent))
        # Its own instance is never in its own table.
        assert set(rows) == nodes - {agent.node_id}, rows
        for other, other_host in zip(agents, hosts, strict=True):
            if other is not agent:
                row = rows[other.node_id]
                check_agent_row(row, other, other_host, host, ports[other_host.name])


# -- b. leaving --------------------------------------------------------------------------


def test_stopped_peer_is_lost_within_2s_and_killed_peer_within_peer_timeout(lan: Lan) -> None:
    peer_timeout = 4.0
    overrides = {"discovery": {"peer_timeout": f"{peer_timeout:g}s"}}
    a, b, c = (lan.add_host(name).agent(f"node-{name}", overrides=overrides) for name in "abc")
    for agent in (a, b, c):
        wait_rows_up(agent, {"node-a", "node-b", "node-c"} - {agent.node_id}, SETTLE, "all up")

    stopped_at = time.monotonic()
    wall = time.time()
    assert c.terminate() == 0, c.log_tail()
    for observer in (a, b):
        rows = wait_peers(
            observer,
            lambda rows: by_instance(rows).get("node-c", {}).get("state") == "lost",
            left(stopped_at + SEE_WITHIN),
            f"node-c lost within {SEE_WITHIN}s of its SIGTERM",
        )
        row = by_instance(rows)["node-c"]
        assert wall - 1 <= row["lost_at"] <= time.time() + 1, row
        still_there = "node-b" if observer is a else "node-a"
        assert by_instance(rows)[still_there]["state"] == "up", rows
    status = a.status()
    assert (status["peers"]["up"], status["peers"]["lost"]) == (1, 1), status["peers"]

    killed_at = time.monotonic()
    b.kill9()
    rows = wait_peers(
        a,
        lambda rows: by_instance(rows).get("node-b", {}).get("state") == "lost",
        left(killed_at + peer_timeout + SEE_WITHIN),
        f"node-b lost within peer_timeout {peer_timeout}s + {SEE_WITHIN}s of its kill -9",
    )
    # A lost peer stays in the table (forget_after is 24h by default).
    assert set(by_instance(rows)) == {"node-b", "node-c"}, rows
    status = a.status()
    assert (status["peers"]["up"], status["peers"]["lost"]) == (0, 2), status["peers"]


def test_quiet_live_peer_is_not_lost_when_peer_timeout_passes(lan: Lan) -> None:
    # No goodbye and no traffic from the app: liveness must come from the
    # agent asking, not from a timer that only ever runs out.
    peer_timeout = 3.0
    overrides = {"discovery": {"peer_timeout": f"{peer_timeout:g}s"}}
    a = lan.add_host("a").agent("node-a", overrides=overrides)
    b = lan.add_host("b").agent("node-b", overrides=overrides)
    wait_rows_up(a, {"node-b"}, SETTLE, "node-b up")
    wait_rows_up(b, {"node-a"}, SETTLE, "node-a up")
    watch_until = time.monotonic() + 2 * peer_timeout
    while time.monotonic() < watch_until:
        for observer, other in ((a, "node-b"), (b, "node-a")):
            row = by_instance(peers(observer)).get(other)
            assert row is not None and row["state"] == "up", (
                f"{observer.node_id} lost the live {other} after {peer_timeout}s of quiet: {row!r}"
            )
        time.sleep(0.2)


# -- c. coming back with a new address -------------------------------------------------------


def test_peer_back_with_a_new_address_is_the_same_row(lan: Lan) -> None:
    watcher_host, mover_host = lan.add_host("w"), lan.add_host("m")
    watcher = watcher_host.agent("node-w")
    mover = mover_host.agent("node-m")
    before = by_instance(wait_rows_up(watcher, {"node-m"}, SETTLE, "node-m up"))["node-m"]
    old_ip = mover_host.ip
    assert ipv4s(before) == {old_ip}, before

    mover.terminate()
    wait_peers(
        watcher,
        lambda rows: by_instance(rows).get("node-m", {}).get("state") == "lost",
        SETTLE,
        "node-m lost after its SIGTERM",
    )
    new_cidr = lan.next_cidr()
    mover_host.set_address(new_cidr)
    new_ip = new_cidr.split("/")[0]
    mover.start()
    rows = wait_peers(
        watcher,
        lambda rows: (
            (row := by_instance(rows).get("node-m")) is not None
            and row["state"] == "up"
            and ipv4s(row) == {new_ip}
        ),
        SEE_WITHIN + 1,
        f"node-m back up at {new_ip} (and not {old_ip})",
    )
    assert [row["instance"] for row in rows] == ["node-m"], f"not one row for node-m: {rows!r}"
    after = rows[0]
    check_row(after, observer=watcher_host, peer=mover_host)
    assert same_time(after["first_seen"], before["first_seen"]), (before, after)
    assert after["last_seen"] >= before["last_seen"], (before, after)
    assert after["lost_at"] is None, after


def test_address_change_of_a_running_agent_reaches_its_peers(lan: Lan) -> None:
    overrides = {"discovery": {"scan_interval": "1s"}}
    watcher_host, mover_host = lan.add_host("w"), lan.add_host("m")
    watcher = watcher_host.agent("node-w", overrides=overrides)
    mover = mover_host.agent("node-m", overrides=overrides)
    before = by_instance(wait_rows_up(watcher, {"node-m"}, SETTLE, "node-m up"))["node-m"]
    old_ip = mover_host.ip

    new_cidr = lan.next_cidr()
    new_ip = new_cidr.split("/")[0]
    mover_host.set_address(new_cidr)
    # scan_interval 1s to notice, then an announcement and goodbyes for the old address.
    rows = wait_peers(
        watcher,
        lambda rows: (
            ipv4s(by_instance(rows)["node-m"]) == {new_ip}
            and by_instance(rows)["node-m"]["state"] == "up"
        ),
        5.0,
        f"node-m's row at {new_ip} and no longer at {old_ip}",
    )
    assert len(rows) == 1, f"not one row for node-m: {rows!r}"
    after = rows[0]
    check_row(after, observer=watcher_host, peer=mover_host)
    assert after["instance"] == before["instance"], (before, after)
    assert same_time(after["first_seen"], before["first_seen"]), (before, after)
    discovery = mover.status()["discovery"]
    assert new_ip in discovery["addresses"] and old_ip not in discovery["addresses"], discovery


# -- d. two devices, one node id ------------------------------------------------------------


def _two_names(first: Agent, second: Agent, timeout: float) -> tuple[dict[str, Any], ...]:
    """Wait until both advertise under distinct instance names; their `discovery` parts."""
    last: list[dict[str, Any]] = []

    def distinct() -> bool:
        last[:] = [first.status()["discovery"], second.status()["discovery"]]
        names = [d.get("instance") for d in last]
        states = [d.get("state") for d in last]
        return states == ["running", "running"] and None not in names and names[0] != names[1]

    try:
        wait_until(distinct, timeout, what="two instance names for one node id")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; discovery: {last!r}") from None
    return tuple(last)


def _check_one_renamed(discoveries: tuple[dict[str, Any], ...], wanted: str) -> dict[str, Any]:
    """Exactly one agent reports the conflict, and its report is consistent; return it."""
    conflicted = [d for d in discoveries if d["conflict"] is not None]
    assert len(conflicted) == 1, f"not exactly one conflict: {discoveries!r}"
    loser = conflicted[0]
    winner = next(d for d in discoveries if d is not loser)
    assert winner["instance"] == wanted, discoveries
    conflict = loser["conflict"]
    assert conflict["wanted"] == wanted, conflict
    assert conflict["instance"] == loser["instance"] != wanted, discoveries
    assert isinstance(conflict["since"], int | float), conflict
    assert time.time() - 60 < conflict["since"] <= time.time() + 1, conflict
    return loser


def _check_both_visible(watcher: Agent, twins: Mapping[Agent, str], timeout: float) -> None:
    """The watcher sees both instances (same node id) up; each twin sees the other one."""
    names = set(twins.values())
    rows = by_instance(wait_rows_up(watcher, names, timeout, f"both {sorted(names)} up"))
    assert {rows[name]["node"] for name in names} == {"node-dup"}, rows
    for twin, own in twins.items():
        other = (names - {own}).pop()
        seen = by_instance(wait_rows_up(twin, {other}, SEE_WITHIN, f"its twin {other} up"))
        assert own not in seen, f"{own} is in its own peer table: {seen!r}"


def test_second_agent_with_a_taken_node_id_takes_another_instance_name(lan: Lan) -> None:
    first = lan.add_host("a").agent("node-dup")
    assert discovery_running(first)["instance"] == "node-dup"
    second = lan.add_host("b").agent("node-dup")
    deadline = time.monotonic() + 10
    watcher = lan.add_host("w").agent("node-watch")
    discoveries = _two_names(first, second, left(deadline))
    loser = _check_one_renamed(discoveries, "node-dup")
    # The name was held when the second one came: the newcomer yields.
    assert loser is discoveries[1], f"the first holder was renamed: {discoveries!r}"
    twins = {first: discoveries[0]["instance"], second: discoveries[1]["instance"]}
    _check_both_visible(watcher, twins, SEE_WITHIN + 1)


def test_two_agents_started_at_once_with_one_node_id_end_with_two_names(lan: Lan) -> None:
    # Cloned boards on one power strip: both probe for the name in the same
    # instant, so neither hears an answer to its probe (RFC 6762 §8.2, §9).
    twins = [lan.add_host(name).agent("node-dup", start=False) for name in ("a", "b")]
    watcher = lan.add_host("w").agent("node-watch")
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda agent: agent.start(), twins))
    discoveries = _two_names(twins[0], twins[1], 10)
    _check_one_renamed(discoveries, "node-dup")
    names = {twins[0]: discoveries[0]["instance"], twins[1]: discoveries[1]["instance"]}
    _check_both_visible(watcher, names, SEE_WITHIN + 1)


# -- e. other mDNS implementations -------------------------------------------------------------


def test_mdns_scan_in_another_host_lists_the_agent(lan: Lan, tmp_path: Path) -> None:
    mdns_scan = binary("mdns-scan", "mdns-scan")
    agent = lan.add_host("a").agent("node-scan")
    instance = discovery_running(agent)["instance"]
    scanner = lan.add_host("scan")
    out_path = tmp_path / "mdns-scan.out"
    # mdns-scan never exits by itself; it prints "+ NAME" lines between progress spinners.
    with out_path.open("wb") as out:
        proc = scanner.popen([mdns_scan], stdout=out, stderr=subprocess.STDOUT)
    want = f"+ {instance}._edge-agent._tcp.local"
    try:
        wait_until(
            lambda: want in out_path.read_text(errors="replace"),
            8.0,
            what=f"mdns-scan printing {want!r}",
        )
    except TimeoutError as exc:
        printed = out_path.read_text(errors="replace")
        raise AssertionError(f"{exc}; it printed {printed!r}") from None
    finally:
        proc.kill()
        proc.wait(timeout=5)


def _dig_records(text: str) -> list[tuple[str, str, str]]:
    """(name, type, rdata) of each record line in dig's output."""
    records = []
    for line in text.splitlines():
        if line.strip() and not line.startswith(";"):
            name, _ttl, _cls, rtype, rdata = line.split(None, 4)
            records.append((name.lower(), rtype, rdata.strip()))
    return records


def test_dig_unicast_question_is_answered_with_ptr_srv_and_txt(lan: Lan) -> None:
    dig = binary("dig", "bind9-dnsutils")
    host = lan.add_host("a")
    agent = host.agent("node-dig", overrides={"discovery": {"port": 7411}})
    instance = discovery_running(agent)["instance"]
    client = lan.add_host("client")
    # A question from a port other than 5353 is a "legacy unicast" one (RFC
    # 6762 §6.7): the answer comes back to that port, as DNS.
    result = client.run(
        [dig, "-p", str(MDNS_PORT), f"@{host.ip}", "_edge-agent._tcp.local", "PTR",
         "+time=2", "+tries=3"],
        timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, f"dig failed: {result.stdout}{result.stderr}"
    assert "status: NOERROR" in result.stdout, result.stdout
    records = _dig_records(result.stdout)
    full = f"{instance}.{SERVICE}".lower()
    assert (SERVICE.lower(), "PTR", full) in records, result.stdout
    srv = [rdata.split() for name, rtype, rdata in records if (name, rtype) == (full, "SRV")]
    assert len(srv) == 1, f"no single SRV for {full}: {result.stdout}"
    _priority, _weight, port, target = srv[0]
    assert int(port) == 7411, srv
    txt = [rdata for name, rtype, rdata in records if (name, rtype) == (full, "TXT")]
    assert len(txt) == 1, f"no single TXT for {full}: {result.stdout}"
    assert f'"node={agent.node_id}"' in txt[0] and '"api=1"' in txt[0], txt
    a_records = {rdata for name, rtype, rdata in records if (name, rtype) == (target.lower(), "A")}
    # Addresses of the SRV target are optional extras (RFC 6763 §12.2), but must be right.
    assert a_records <= {host.ip}, f"A records {a_records} for {target}, host has {host.ip}"


_AVAHI_CONF = """\
[server]
host-name=avahi-peer-host
use-ipv4=yes
use-ipv6=yes
allow-interfaces=eth0
enable-dbus=no
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
publish-hinfo=no
publish-workstation=no

[reflector]
enable-reflector=no
"""

_AVAHI_SERVICE = """\
<?xml version="1.0" standalone='no'?>
<!DOCTYPE service-group SYSTEM "avahi-service.dtd">
<service-group>
  <name>avahi-peer</name>
  <service>
    <type>_edge-agent._tcp</type>
    <port>7000</port>
    <txt-record>node=avahi-peer</txt-record>
    <txt-record>ver=0.0.0</txt-record>
    <txt-record>profile=avahi</txt-record>
    <txt-record>uplink=offline</txt-record>
    <txt-record>api=1</txt-record>
  </service>
</service-group>
"""

# avahi-daemon reads static services only from its compiled-in directory and
# wants /run/avahi-daemon: in a private mount namespace, a tmpfs /run and our
# services directory bound over /etc/avahi/services change nothing outside.
_AVAHI_SH = (
    "mount -t tmpfs tmpfs /run && mkdir -p /run/avahi-daemon && "
    'mount --bind "$1" /etc/avahi/services && '
    'exec "$2" -f "$3" --no-drop-root --no-chroot --no-rlimits --no-proc-title'
)


def test_agent_sees_a_service_published_by_avahi(lan: Lan, tmp_path: Path) -> None:
    avahi = binary("avahi-daemon", "avahi-daemon")
    if not Path("/etc/avahi/services").is_dir():
        skip_missing("/etc/avahi/services is missing (reinstall avahi-daemon)")
    host = lan.add_host("a")
    agent = host.agent("node-a")
    discovery_running(agent)
    avahi_host = lan.add_host("avahi")
    services = tmp_path / "avahi-services"
    services.mkdir()
    (services / "edge-agent.service").write_text(_AVAHI_SERVICE)
    conf = tmp_path / "avahi-daemon.conf"
    conf.write_text(_AVAHI_CONF)
    log_path = tmp_path / "avahi.log"
    with log_path.open("wb") as log:
        avahi_host.popen(
            ["unshare", "--mount", "--propagation", "private",
             "sh", "-c", _AVAHI_SH, "sh", str(services), avahi, str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        rows = wait_peers(
            agent,
            lambda rows: "avahi-peer" in up(rows) and by_instance(rows)["avahi-peer"]["addresses"],
            10.0,  # avahi probes its host name, then the service
            "avahi's avahi-peer up and resolved",
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\navahi-daemon said:\n{log_path.read_text()}") from None
    row = by_instance(rows)["avahi-peer"]
    check_row(row, observer=host, peer=avahi_host)
    assert row["node"] == "avahi-peer", row
    assert ipv4s(row) == {avahi_host.ip}, row
    assert row["port"] == 7000, row
    assert row["txt"].get("node") == "avahi-peer" and row["txt"].get("api") == "1", row
    assert row["uplink"] == "offline", row


# -- f. bad input from the LAN --------------------------------------------------------------


def _name(name: str) -> bytes:
    labels = name.rstrip(".").encode().split(b".")
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def _record(name: str, rtype: int, rdata: bytes, ttl: int = 120, flush: bool = False) -> bytes:
    rclass = 1 | (0x8000 if flush else 0)  # IN, with the cache-flush bit for unique records
    return _name(name) + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def _response(records: list[bytes]) -> bytes:
    # id 0, flags: response + authoritative; no questions.
    return struct.pack("!6H", 0, 0x8400, 0, len(records), 0, 0) + b"".join(records)


def _txt_rdata(strings: list[bytes]) -> bytes:
    for s in strings:
        assert len(s) <= 255, "one TXT string is at most 255 bytes (its length is one byte)"
    return b"".join(bytes([len(s)]) + s for s in strings)


# What the bad peer's TXT holds, entry by entry. "Over-long": one TXT string is
# at most 255 bytes on the wire (a one-byte length), and DNS-SD wants a whole TXT
# record to stay within about 200 bytes (RFC 6763 §6.1-6.2); `long` is a string
# at that 255-byte limit whose value alone (250 bytes) is over the 200.
BAD_TXT = [
    b"node=bad-peer",
    b"\xff\xfekey=v",  # key not UTF-8 (keys must be printable US-ASCII, §6.4)
    b"val=\xff\xfe",  # value not UTF-8: kept as {"base64": ...} or rejected
    b"bare",  # key without '=': a boolean attribute, null in the row
    b"=x",  # empty key: must be ignored (§6.4)
    b"long=" + b"x" * 250,  # over-long, see above
]


def _bad_announcement(address: str) -> bytes:
    instance = f"bad.{SERVICE}"
    target = "bad-host.local."
    return _response(
        [
            _record(SERVICE, 12, _name(instance), ttl=4500),  # PTR
            _record(instance, 33, struct.pack("!HHH", 0, 0, 7001) + _name(target), flush=True),
            _record(target, 1, socket.inet_aton(address), flush=True),  # A
            _record(instance, 16, _txt_rdata(BAD_TXT), ttl=4500, flush=True),
        ]
    )


def _junk() -> list[bytes]:
    rng = random.Random(3)  # the same junk every run
    header = struct.pack("!6H", 0, 0x8400, 0, 1, 0, 0)
    overrun = _record(f"overrun.{SERVICE}", 16, b"\x50abc", flush=True)  # says 80 bytes, has 3
    return [
        b"",
        b"\x00",
        *(rng.randbytes(n) for n in (11, 12, 40, 512, 1400)),
        struct.pack("!6H", 0, 0x8400, 0, 0xFFFF, 0, 0),  # 65535 answers, none there
        header + b"\xc0\x0c" + b"\0" * 10,  # a name that points at itself
        header + _record(f"cut.{SERVICE}", 16, b"\x03abc")[:-6],  # record cut short
        _response([overrun]),
        _response([_record(f"neg.{SERVICE}", 33, b"\x00")]),  # SRV rdata of 1 byte
    ]


def test_malformed_txt_and_junk_datagrams_leave_the_agent_serving(lan: Lan) -> None:
    host = lan.add_host("a")
    victim = host.agent("node-a")
    discovery_running(victim)
    assert rejected_total(victim) == 0
    mallory = lan.add_host("mallory")
    assert mallory.ip is not None and host.ip is not None
    with mallory.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Responses must come from port 5353 to be believed (RFC 6762 §6).
        sock.bind(("0.0.0.0", MDNS_PORT))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        for datagram in _junk():
            sock.sendto(datagram, (host.ip, MDNS_PORT))
            sock.sendto(datagram, (MDNS_GROUP, MDNS_PORT))
        announcement = _bad_announcement(mallory.ip)
        for _ in range(3):
            sock.sendto(announcement, (MDNS_GROUP, MDNS_PORT))
            time.sleep(0.1)

    # Either the peer is kept, its bad entries left out (and counted) or kept as
    # raw bytes, or the whole record is rejected and counted: both are fine.
    try:
        rows = wait_peers(victim, lambda rows: "bad" in up(rows), 5.0, "the bad peer's row")
    except TimeoutError:
        rows = peers(victim)
        assert rejected_total(victim) > 0, (
            f"no row for the bad peer and nothing counted in discovery.rejected: {rows!r}"
        )
    victim.assert_alive()
    status = victim.status()
    assert status["discovery"]["state"] == "running", status["discovery"]
    assert set(by_instance(rows)) <= {"bad"}, f"junk made rows: {rows!r}"
    row = by_instance(rows).get("bad")
    if row is not None:
        check_row(row, observer=host)
        txt = row["txt"]
        for key in txt:
            assert key and all(0x20 <= ord(ch) <= 0x7E for ch in key) and "=" not in key, (
                f"TXT key {key!r} is not printable ASCII (RFC 6763 §6.4): {txt!r}"
            )
        assert txt.get("node") == "bad-peer", txt
        assert "bare" in txt and txt["bare"] is None, txt
        assert txt.get("val", {"base64": "//4="}) == {"base64": "//4="}, txt
        assert txt.get("long", "x" * 250) == "x" * 250, f"over-long value cut: {txt!r}"
        # The key that is not UTF-8 and the empty one cannot be in the row.
        assert "val" in txt or rejected_total(victim) > 0, (
            f"the row keeps no raw bytes and nothing is counted as rejected: {txt!r}"
        )
    assert "Traceback" not in victim.log_tail(400), victim.log_tail(400)

    newcomer = lan.add_host("b").agent("node-b")
    wait_rows_up(victim, {newcomer.node_id}, SEE_WITHIN, f"node-b up within {SEE_WITHIN}s")


# -- g. which interfaces --------------------------------------------------------------------


def _check_discovery_only_on(lan: Lan, discovery: Mapping[str, Any], used: str) -> None:
    """An agent on a host with eth0 and dock0 uses `used` alone; a peer sees only its addresses."""
    host, watcher_host = lan.add_host("a"), lan.add_host("w")
    host.add_interface("dock0")
    unused = ({"eth0", "dock0"} - {used}).pop()
    agent = host.agent("node-a", overrides={"discovery": dict(discovery)})
    watcher = watcher_host.agent("node-w")
    own = discovery_running(agent)
    assert own["interfaces"] == [used], own
    (address,) = host.addresses(used, 4)
    (not_there,) = host.addresses(unused, 4)
    assert address in own["addresses"] and not_there not in own["addresses"], own
    rows = wait_peers(
        watcher,
        lambda rows: "node-a" in up(rows) and ipv4s(by_instance(rows)["node-a"]) == {address},
        SETTLE,
        f"node-a up at {used}'s {address} only",
    )
    row = by_instance(rows)["node-a"]
    check_row(row, observer=watcher_host, peer=host)
    unused_ll = host.link_local(unused)
    assert all(a.split("%")[0] != unused_ll for a in row["addresses"]), (
        f"{unused}'s {unused_ll} advertised: {row!r}"
    )


def test_excluded_interface_is_not_used_or_advertised(lan: Lan) -> None:
    _check_discovery_only_on(lan, {"exclude": ["dock*"]}, used="eth0")


def test_allowed_interfaces_limit_discovery_to_them(lan: Lan) -> None:
    _check_discovery_only_on(lan, {"interfaces": ["dock*"]}, used="dock0")


def test_default_exclude_keeps_container_and_virtual_interfaces_out(lan: Lan) -> None:
    host = lan.add_host("a")
    for name in ("docker0", "veth9", "br-1a2b3c", "virbr0", "cni0", "flannel.1"):
        host.add_interface(name)
    agent = host.agent("node-a")
    assert discovery_running(agent)["interfaces"] == ["eth0"]


def test_agent_with_no_usable_interface_is_idle_with_a_reason(lan: Lan) -> None:
    only_lo = lan.add_host("alone", link=False).agent("node-alone")
    all_excluded = lan.add_host("a").agent(
        "node-a", overrides={"discovery": {"exclude": ["eth*", "lo"]}}
    )
    for agent in (only_lo, all_excluded):
        status = agent.wait_status(
            lambda s: s.get("discovery", {}).get("state") == "idle",
            SETTLE,
            what=f"{agent.node_id}: discovery idle",
        )
        reason = status["discovery"]["reason"]
        assert isinstance(reason, str) and reason.strip(), status["discovery"]
        assert status["discovery"]["interfaces"] == [], status["discovery"]
        assert (status["peers"]["up"], status["peers"]["lost"]) == (0, 0), status["peers"]
        answer = agent.request({"op": "peers"})
        assert answer["ok"] is True and answer["peers"] == [], answer
        assert answer["discovery"]["state"] == "idle" and answer["discovery"]["reason"], answer
        agent.assert_alive()


# -- h. the CLI -----------------------------------------------------------------------------


def test_cli_peers_prints_the_rows_as_json_and_a_table(lan: Lan) -> None:
    host, other_host = lan.add_host("a"), lan.add_host("b")
    agent = host.agent("node-a")
    other_host.agent("node-b")
    wait_rows_up(agent, {"node-b"}, SETTLE, "node-b up")
    sock = str(agent.socket_path)

    as_json = edge_cli("peers", "--json", "--socket", sock)
    assert as_json.returncode == 0, as_json
    rows = json.loads(as_json.stdout)
    assert isinstance(rows, list) and [row["node"] for row in rows] == ["node-b"], rows
    check_row(rows[0], observer=host, peer=other_host)
    assert rows[0]["state"] == "up" and ipv4s(rows[0]) == {other_host.ip}, rows

    table = edge_cli("peers", "--socket", sock)
    assert table.returncode == 0, table
    lines = [line for line in table.stdout.splitlines() if line.strip()]
    header = lines[0].lower()
    for column in ("node", "state", "addresses", "uplink", "last seen"):
        assert column in header, f"no {column!r} column in {lines[0]!r}"
    row_lines = [line for line in lines[1:] if "node-b" in line]
    assert len(row_lines) == 1, table.stdout
    for cell in ("up", str(other_host.ip), "offline"):
        assert cell in row_lines[0], f"{cell!r} not in {row_lines[0]!r}"
