"""The peer table, TXT decoding and interface choice: pure policy, no network."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

import psutil
import pytest

from edge.interfaces import host_token, select_interfaces
from edge.peers import MAX_PEERS, TXT_VALUE_MAX, PeerTable, format_address, parse_txt


def txt(*items: bytes) -> bytes:
    return b"".join(bytes([len(item)]) + item for item in items)


# ---- TXT -----------------------------------------------------------------------


def test_txt_keeps_good_entries_and_says_what_was_wrong_with_the_rest() -> None:
    raw = txt(
        b"node=pi-1", b"\xff\xfekey=v", b"ver=\xc3(", b"bare", b"=x",
        b"long=" + b"v" * (TXT_VALUE_MAX + 1), b"NODE=again", b"api=1",
    )
    entries, problems = parse_txt(raw)
    assert entries == {
        "node": "pi-1", "ver": {"base64": "wyg="}, "bare": None, "api": "1",
    }
    assert sorted(problems) == sorted([
        "txt_bad_key", "txt_value_not_utf8", "txt_empty_key", "txt_value_too_long",
        "txt_repeated_key",
    ])


def test_txt_length_running_past_the_end_is_truncated_not_read_beyond() -> None:
    entries, problems = parse_txt(txt(b"node=a") + bytes([50]) + b"short")
    assert entries == {"node": "a"}
    assert problems == ["txt_truncated"]


def test_empty_txt_record_has_no_entries() -> None:
    assert parse_txt(b"\x00") == ({}, [])


# ---- the table ---------------------------------------------------------------------

WALL_OFFSET = 1_800_000_000.0


class Wall:
    """A wall clock the tests move along with the monotonic `now` they pass in."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now + WALL_OFFSET


def announce(table: PeerTable, instance: str, server: str, address: str, now: float) -> None:
    wall = getattr(table, "_wall", None)
    if isinstance(wall, Wall):
        wall.now = now
    table.pointer(instance, now)
    table.service(instance, now, server=server, port=0)
    table.text(instance, now, {"node": instance.split("-")[0], "uplink": "online"})
    table.address(server, address, now, flush=True)


def test_a_peer_back_with_a_new_address_is_the_same_row_with_only_the_new_address() -> None:
    table = PeerTable(wall=Wall())
    announce(table, "pi", "pi-abc.local.", "198.18.0.1", now=10.0)
    assert table.goodbye("pi", now=20.0)
    announce(table, "pi", "pi-abc.local.", "198.18.0.9", now=30.0)
    [row] = table.rows()
    assert row["state"] == "up"
    assert row["addresses"] == ["198.18.0.9"]
    assert row["first_seen"] == WALL_OFFSET + 10 and row["last_seen"] == WALL_OFFSET + 30
    assert row["lost_at"] is None and row["uplink"] == "online"


def test_cache_flush_spares_addresses_heard_within_the_last_second() -> None:
    table = PeerTable()
    announce(table, "pi", "pi.local.", "198.18.0.1", now=10.0)
    table.address("pi.local.", "198.18.0.2", 10.5, flush=True)  # same announcement burst
    table.address("pi.local.", "fe80::1%eth0", 10.5, flush=True)  # other family: untouched
    assert table.rows()[0]["addresses"] == ["198.18.0.1", "198.18.0.2", "fe80::1%eth0"]
    table.address("pi.local.", "198.18.0.3", 20.0, flush=True)
    assert table.rows()[0]["addresses"] == ["198.18.0.3", "fe80::1%eth0"]


def test_an_address_goodbye_removes_it_from_a_live_peer_but_a_lost_peer_keeps_its_last() -> None:
    table = PeerTable()
    announce(table, "pi", "pi.local.", "198.18.0.1", now=1.0)
    table.address("pi.local.", "198.18.0.2", 1.0, flush=False)
    table.address_gone("pi.local.", "198.18.0.1")
    assert table.rows()[0]["addresses"] == ["198.18.0.2"]
    table.goodbye("pi", 2.0)
    table.address_gone("pi.local.", "198.18.0.2")
    assert table.rows()[0]["addresses"] == ["198.18.0.2"]


def test_silent_peers_are_lost_after_the_timeout_and_forgotten_later() -> None:
    table = PeerTable()
    announce(table, "a", "a.local.", "198.18.0.1", now=0.0)
    announce(table, "b", "b.local.", "198.18.0.2", now=0.0)
    table.text("b", 25.0, {"node": "b"})  # its answer to a probe
    assert [p.instance for p in table.quiet(26.0, after=10.0)] == ["a"]
    assert [p.instance for p in table.expire(30.0, peer_timeout=30.0, forget_after=60.0)] == ["a"]
    assert table.counts() == {"up": 1, "lost": 1}
    assert table.expire(89.0, peer_timeout=100.0, forget_after=60.0) == []
    assert table.get("a") is not None
    table.expire(90.0, peer_timeout=100.0, forget_after=60.0)
    assert table.get("a") is None and table.get("b") is not None


def test_rows_show_the_wall_clock_of_each_event_and_liveness_ignores_wall_steps() -> None:
    wall = Wall()
    table = PeerTable(wall=wall)
    announce(table, "a", "a.local.", "198.18.0.1", now=5.0)
    wall.now = 5.0 - 86400  # the wall clock steps back a day (NTP at boot)
    table.text("a", 6.0, {"node": "a"})
    [row] = table.rows()
    assert row["first_seen"] == WALL_OFFSET + 5 and row["last_seen"] == WALL_OFFSET + 5 - 86400
    assert table.expire(7.0, peer_timeout=30.0, forget_after=60.0) == []
    assert table.rows() == [row]


def test_a_new_host_name_for_an_instance_drops_the_old_hosts_addresses() -> None:
    table = PeerTable()
    announce(table, "pi", "old.local.", "198.18.0.1", now=0.0)
    table.service("pi", 1.0, server="new.local.", port=0)
    table.address("new.local.", "198.18.0.7", 1.0, flush=True)
    table.address("old.local.", "198.18.0.1", 1.5, flush=True)  # the old host still talking
    assert table.rows()[0]["addresses"] == ["198.18.0.7"]


def test_link_local_ipv6_carries_its_scope_or_is_left_out() -> None:
    ll = socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert format_address(ll, "eth0") == "fe80::1%eth0"
    assert format_address(ll, None) is None
    assert format_address(socket.inet_pton(socket.AF_INET6, "2001:db8::1"), None) == "2001:db8::1"
    assert format_address(bytes([198, 18, 0, 1]), "eth0") == "198.18.0.1"


# ---- interfaces ---------------------------------------------------------------------


def addr(family: int, address: str) -> SimpleNamespace:
    return SimpleNamespace(family=family, address=address)


def stat(isup: bool = True, flags: str = "up,broadcast,running,multicast") -> SimpleNamespace:
    return SimpleNamespace(isup=isup, flags=flags)


def test_interfaces_up_multicast_addressed_allowed_and_not_loopback() -> None:
    addrs = {
        "lo": [addr(socket.AF_INET, "127.0.0.1")],
        "eth0": [addr(socket.AF_INET, "198.18.0.1"), addr(psutil.AF_LINK, "aa:bb:cc:00:00:01"),
                 addr(socket.AF_INET6, "fe80::1%eth0")],
        "wlan0": [addr(socket.AF_INET, "198.18.1.1")],
        "docker0": [addr(socket.AF_INET, "198.19.0.1")],
        "eth1": [addr(socket.AF_INET, "198.18.2.1")],
        "eth2": [],
        "tun0": [addr(socket.AF_INET, "198.18.3.1")],
    }
    stats = {
        "lo": stat(flags="up,loopback,running"), "eth0": stat(), "wlan0": stat(),
        "docker0": stat(), "eth1": stat(isup=False), "eth2": stat(),
        "tun0": stat(flags="up,pointopoint,running,noarp"),
    }
    index = {name: i for i, name in enumerate(addrs, 1)}
    chosen = select_interfaces(addrs, stats, ["*"], ["docker*", "lo"], index)
    assert [i.name for i in chosen] == ["eth0", "wlan0"]
    assert chosen[0].ipv6 == ("fe80::1",) and chosen[0].index == 2
    only = select_interfaces(addrs, stats, ["wlan*"], [], index)
    assert [i.name for i in only] == ["wlan0"]
    assert host_token(chosen) == host_token(chosen[:1]) != ""


def test_a_txt_or_ptr_alone_makes_no_row_but_updates_a_known_peer() -> None:
    table = PeerTable()
    table.text("ghost", 1.0, {"node": "ghost"})
    table.pointer("ghost", 1.0)
    assert len(table) == 0
    table.service("ghost", 2.0, server="ghost.local.", port=7)
    table.text("ghost", 3.0, {"node": "real-id"})
    [row] = table.rows()
    assert row["node"] == "real-id" and row["port"] == 7


def test_a_peer_back_within_a_second_of_its_goodbye_shows_only_its_new_address() -> None:
    table = PeerTable()
    announce(table, "pi", "pi.local.", "198.18.0.1", now=10.0)
    table.goodbye("pi", 10.1)
    assert table.rows()[0]["addresses"] == ["198.18.0.1"]  # a lost row keeps where it was
    announce(table, "pi", "pi.local.", "198.18.0.2", now=10.8)
    assert table.rows()[0]["addresses"] == ["198.18.0.2"]


def test_the_table_refuses_rows_past_its_cap_but_keeps_serving_known_peers() -> None:
    table = PeerTable()
    for i in range(MAX_PEERS):
        assert table.service(f"p{i}", 1.0, server=f"p{i}.local.", port=0)
    assert not table.service("one-more", 1.0, server="x.local.", port=0)
    assert table.get("one-more") is None and len(table) == MAX_PEERS
    assert table.service("p0", 2.0, server="p0.local.", port=9)  # a known one still updates
    assert table.get("p0") is not None and table.get("p0").port == 9  # type: ignore[union-attr]


def test_address_records_alone_do_not_bring_back_a_peer_that_said_goodbye() -> None:
    # Avahi withdraws one service but its host still answers A/AAAA with TTL 120.
    table = PeerTable()
    announce(table, "svc", "host.local.", "198.18.0.1", now=1.0)
    table.goodbye("svc", 2.0)
    table.address("host.local.", "198.18.0.1", 2.0, flush=True)
    assert table.rows()[0]["state"] == "lost"
    table.text("svc", 3.0, {"node": "svc"})  # the service itself announced again
    assert table.rows()[0]["state"] == "up"


def test_txt_node_and_uplink_are_taken_only_in_their_own_form() -> None:
    table = PeerTable()
    table.service("pi", 1.0, server="pi.local.", port=0)
    problems = table.text("pi", 1.0, {"node": "fake\nclone    up", "uplink": "\x1b[2Jonline"})
    assert sorted(problems) == ["txt_bad_node", "txt_bad_uplink"]
    [row] = table.rows()
    assert row["node"] == "pi" and row["uplink"] is None
    assert row["txt"]["node"] == "fake\nclone    up"  # the TXT as it came, for --json


def test_records_zeroconf_drops_from_its_cache_are_not_news_from_the_peer() -> None:
    from zeroconf import DNSService, RecordUpdate, current_time_millis
    from zeroconf.const import _CLASS_IN, _TYPE_SRV

    from edge.discovery import SERVICE_TYPE, _Records

    seen: list[object] = []
    owner = SimpleNamespace(on_records=seen.extend)
    name = f"pi.{SERVICE_TYPE}"
    expired = DNSService(name, _TYPE_SRV, _CLASS_IN, 120, 0, 0, 0, "pi.local.",
                         created=current_time_millis() - 200_000)
    goodbye = DNSService(name, _TYPE_SRV, _CLASS_IN, 0, 0, 0, 0, "pi.local.")
    fresh = DNSService(name, _TYPE_SRV, _CLASS_IN, 120, 0, 0, 0, "pi.local.")
    listener = _Records(owner)  # type: ignore[arg-type]
    listener.async_update_records(None, current_time_millis(),  # type: ignore[arg-type]
                                  [RecordUpdate(r) for r in (expired, goodbye, fresh)])
    assert seen == [goodbye, fresh]


def test_bad_records_from_many_peers_are_logged_once_a_minute_per_kind(
        caplog: pytest.LogCaptureFixture) -> None:
    from edge.discovery import Discovery
    from edge.settings import DiscoverySettings

    discovery = Discovery(DiscoverySettings(), "node-a", version="0", profile="x",
                          uplink_state=lambda: "offline")
    with caplog.at_level(logging.WARNING, logger="edge.discovery"):
        for i in range(500):
            discovery._reject(f"peer-{i}", "txt_value_not_utf8", "malformed TXT entry")
        discovery._reject("peer-x", "too_many_peers", "the peer table is full")
    assert discovery.rejected["txt_value_not_utf8"] == 500
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # one per kind, not one per peer
    assert "peer-0" in lines[0] and "too_many_peers" in lines[1]
