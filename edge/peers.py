"""The peer table: what the agent knows of the other agents on its LAN.

Pure bookkeeping, fed by discovery with what arrived on the wire: no I/O,
no zeroconf. Rows are keyed by instance name, so a peer that comes back with
a new address is the same row, updated. Liveness runs on monotonic seconds,
so a wall-clock step never makes a peer look silent; rows show the wall-clock
time each event happened at.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_PEERS", "TXT_MAX_BYTES", "TXT_MAX_ENTRIES", "TXT_VALUE_MAX", "Peer", "PeerTable",
    "format_address", "parse_txt",
]

TXT_VALUE_MAX = 200  # bytes: a longer TXT value is skipped as over-long
TXT_MAX_BYTES = 1300  # a larger TXT record is refused unread (RFC 6763 6.2: keep under 1300)
TXT_MAX_ENTRIES = 32  # entries kept from one record; ours has 5
MAX_PEERS = 1000  # rows: a LAN host announcing endless instances must not eat the memory
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as [node] id
_UPLINK_STATES = ("online", "offline")
_FLUSH_GRACE = 1.0  # seconds: RFC 6762 10.2, a cache-flush spares records this fresh


@dataclass
class Peer:
    """One peer as last heard of."""

    instance: str
    node: str
    first_seen: float  # monotonic
    last_seen: float  # monotonic
    first_seen_wall: float
    last_seen_wall: float
    port: int = 0
    server: str = ""
    txt: dict[str, Any] = field(default_factory=dict)
    addresses: dict[str, float] = field(default_factory=dict)  # address -> when heard
    state: str = "up"
    lost_at: float | None = None  # monotonic
    lost_at_wall: float | None = None

    def view(self) -> dict[str, Any]:
        """The row as `peers` and `edge peers --json` give it."""
        uplink = self.txt.get("uplink")
        uplink = uplink if uplink in _UPLINK_STATES else None
        return {
            "node": self.node,
            "instance": self.instance,
            "state": self.state,
            "addresses": sorted(self.addresses, key=_address_order),
            "port": self.port,
            "txt": dict(self.txt),
            "uplink": uplink,
            "first_seen": self.first_seen_wall,
            "last_seen": self.last_seen_wall,
            "lost_at": self.lost_at_wall,
        }


def _address_order(address: str) -> tuple[int, str]:
    return (0 if ":" not in address else 1, address)


def parse_txt(raw: bytes) -> tuple[dict[str, Any], list[str]]:
    """Decode a TXT record's strings; return the entries and what was wrong with it.

    A value that is not UTF-8 is kept as {"base64": ...}; a key that is empty,
    not printable ASCII, or repeated, a value over TXT_VALUE_MAX bytes and the
    entries after the first TXT_MAX_ENTRIES are skipped. A bare key (no "=") maps
    to None (RFC 6763 6.4). A record over TXT_MAX_BYTES is not read at all
    ("txt_too_large"). Each problem is named once.
    """
    if len(raw) > TXT_MAX_BYTES:
        return {}, ["txt_too_large"]
    entries: dict[str, Any] = {}
    problems: list[str] = []
    i = 0
    while i < len(raw):
        length = raw[i]
        item = raw[i + 1 : i + 1 + length]
        i += 1 + length
        if len(item) < length:
            problems.append("txt_truncated")
            break
        if not item:
            continue  # an empty string: the whole TXT record is empty
        if len(entries) >= TXT_MAX_ENTRIES:
            problems.append("txt_too_many_entries")
            break
        key_bytes, eq, value = item.partition(b"=")
        if not key_bytes:
            problems.append("txt_empty_key")
            continue
        if any(b < 0x20 or b > 0x7E for b in key_bytes):
            problems.append("txt_bad_key")
            continue
        key = key_bytes.decode("ascii").lower()
        if key in entries:
            problems.append("txt_repeated_key")  # RFC 6763 6.4: the first one counts
            continue
        if not eq:
            entries[key] = None
            continue
        if len(value) > TXT_VALUE_MAX:
            problems.append("txt_value_too_long")
            continue
        try:
            entries[key] = value.decode("utf-8")
        except UnicodeDecodeError:
            problems.append("txt_value_not_utf8")
            entries[key] = {"base64": base64.b64encode(value).decode("ascii")}
    return entries, list(dict.fromkeys(problems))


class PeerTable:
    """Peers by instance name, with their addresses by server name."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._peers: dict[str, Peer] = {}
        self._wall = wall

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, instance: str) -> Peer | None:
        """The row for an instance, if any."""
        return self._peers.get(instance)

    def rows(self) -> list[dict[str, Any]]:
        """Every row, up ones first, then by node id."""
        peers = sorted(self._peers.values(), key=lambda p: (p.state != "up", p.node, p.instance))
        return [p.view() for p in peers]

    def counts(self) -> dict[str, int]:
        """Rows up and lost."""
        up = sum(p.state == "up" for p in self._peers.values())
        return {"up": up, "lost": len(self._peers) - up}

    def _heard(self, peer: Peer, now: float) -> None:
        peer.last_seen, peer.last_seen_wall = now, self._wall()
        if peer.state != "up":
            peer.state, peer.lost_at, peer.lost_at_wall = "up", None, None

    def _lose(self, peer: Peer, now: float) -> None:
        peer.state, peer.lost_at, peer.lost_at_wall = "lost", now, self._wall()
        # Still shown, but stale: whatever it announces when it is back replaces them,
        # even within the second a cache-flush spares (it may be back within one).
        for address in peer.addresses:
            peer.addresses[address] = float("-inf")

    def service(self, instance: str, now: float, *, server: str, port: int) -> bool:
        """An SRV record: where the instance lives (only this makes a new row).

        Returns False, changing nothing, when it would be a row over MAX_PEERS.
        """
        peer = self._peers.get(instance)
        if peer is None:
            if len(self._peers) >= MAX_PEERS:
                return False
            wall = self._wall()
            peer = self._peers[instance] = Peer(instance, instance, now, now, wall, wall)
        if server != peer.server:
            peer.server = server
            peer.addresses.clear()  # they belonged to the old host name
        peer.port = port
        self._heard(peer, now)
        return True

    def text(self, instance: str, now: float, entries: dict[str, Any]) -> list[str]:
        """A TXT record of a peer we know the SRV of; return what was wrong with it.

        `node` is taken only in the form of a node id, so a LAN host cannot put
        arbitrary text in the node column; the TXT itself is kept as it came.
        """
        peer = self._peers.get(instance)
        if peer is None:
            return []  # a TXT alone says nothing of where a peer is: wait for its SRV
        problems = []
        peer.txt = entries
        node = entries.get("node")
        if isinstance(node, str) and _NODE_ID.fullmatch(node):
            peer.node = node
        elif "node" in entries:
            problems.append("txt_bad_node")
        uplink = entries.get("uplink")
        if "uplink" in entries and uplink not in _UPLINK_STATES:
            problems.append("txt_bad_uplink")
        self._heard(peer, now)
        return problems

    def pointer(self, instance: str, now: float) -> None:
        """A PTR record naming a peer we know: it is there."""
        peer = self._peers.get(instance)
        if peer is not None:
            self._heard(peer, now)

    def address(self, server: str, address: str, now: float, *, flush: bool) -> None:
        """An A/AAAA record for a host name; `flush` is its cache-flush bit."""
        family_v6 = ":" in address
        for peer in self._peers.values():
            if peer.server != server:
                continue
            if flush:
                # RFC 6762 10.2: older records of this name and type are replaced.
                for old, heard in list(peer.addresses.items()):
                    if (":" in old) == family_v6 and heard < now - _FLUSH_GRACE:
                        del peer.addresses[old]
            peer.addresses[address] = now
            if peer.state == "up":
                # Only the service's own records bring a lost peer back: its host may
                # still answer for other services after its goodbye for this one.
                self._heard(peer, now)

    def address_gone(self, server: str, address: str) -> None:
        """A goodbye (TTL 0) for one address of a host name that is still up.

        A peer that said goodbye altogether keeps its last addresses: where it was
        is what a person looking at a lost peer wants to know.
        """
        for peer in self._peers.values():
            if peer.server == server and peer.state == "up":
                peer.addresses.pop(address, None)

    def goodbye(self, instance: str, now: float) -> bool:
        """The instance said goodbye; return True if that made it lost."""
        peer = self._peers.get(instance)
        if peer is None or peer.state == "lost":
            return False
        self._lose(peer, now)
        return True

    def quiet(self, now: float, after: float) -> list[Peer]:
        """Peers up but not heard of for `after` seconds."""
        return [p for p in self._peers.values() if p.state == "up" and now - p.last_seen >= after]

    def expire(self, now: float, peer_timeout: float, forget_after: float) -> list[Peer]:
        """Mark silent peers lost and drop long-lost ones; return those newly lost."""
        lost = []
        for peer in list(self._peers.values()):
            if peer.state == "up" and now - peer.last_seen >= peer_timeout:
                self._lose(peer, now)
                lost.append(peer)
            elif peer.state == "lost" and peer.lost_at is not None:
                if now - peer.lost_at >= forget_after:
                    del self._peers[peer.instance]
        return lost

    def states(self) -> dict[str, str]:
        """Instance name -> state, for noticing changes."""
        return {name: peer.state for name, peer in self._peers.items()}

    def instances(self) -> set[str]:
        """Instance names of every row."""
        return set(self._peers)


def format_address(packed: bytes, scope: str | None) -> str | None:
    """Text form of a packed address; link-local IPv6 gets `%scope` or is dropped."""
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed))
    address = ipaddress.IPv6Address(packed)
    if address.is_link_local:
        return f"{address}%{scope}" if scope else None
    return str(address)
