"""Which network interfaces discovery may use: up, multicast, not loopback, allowed."""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = ["Interface", "host_token", "read_interfaces", "select_interfaces"]


@dataclass(frozen=True, slots=True)
class Interface:
    """One usable interface and its addresses."""

    name: str
    index: int
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]  # without a %scope
    mac: str = ""


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_interfaces(
    addrs: Mapping[str, Sequence[Any]],
    stats: Mapping[str, Any],
    allow: Sequence[str],
    deny: Sequence[str],
    index_of: Mapping[str, int],
) -> list[Interface]:
    """Interfaces that are up, multicast-capable, not loopback, with an address, allowed."""
    chosen = []
    for name in sorted(addrs):
        stat = stats.get(name)
        if stat is None or not stat.isup:
            continue
        flags = set(str(getattr(stat, "flags", "")).split(","))
        if "loopback" in flags or ("multicast" not in flags and flags != {""}):
            continue
        if not _matches(name, allow) or _matches(name, deny):
            continue
        ipv4, ipv6, mac = [], [], ""
        for entry in addrs[name]:
            if entry.family == socket.AF_INET:
                if not ipaddress.IPv4Address(entry.address).is_loopback:
                    ipv4.append(entry.address)
            elif entry.family == socket.AF_INET6:
                address = entry.address.split("%", 1)[0]
                if not ipaddress.IPv6Address(address).is_loopback:
                    ipv6.append(address)
            elif entry.family == psutil.AF_LINK:
                mac = entry.address
        if (ipv4 or ipv6) and name in index_of:
            chosen.append(Interface(name, index_of[name], tuple(ipv4), tuple(ipv6), mac))
    return chosen


def read_interfaces(allow: Sequence[str], deny: Sequence[str]) -> list[Interface]:
    """Read the machine's interfaces now (blocking: run it off the event loop)."""
    index_of = {name: index for index, name in socket.if_nameindex()}
    return select_interfaces(
        psutil.net_if_addrs(), psutil.net_if_stats(), allow, deny, index_of
    )


def host_token(interfaces: Sequence[Interface]) -> str:
    """A short token from the hardware addresses: tells clones of one image apart."""
    macs = sorted(i.mac for i in interfaces if i.mac)
    if not macs:
        return ""
    return hashlib.sha256(",".join(macs).encode()).hexdigest()[:6]
