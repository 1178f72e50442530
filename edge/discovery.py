"""LAN discovery over mDNS/DNS-SD: advertise this agent, keep a live table of its peers.

python-zeroconf sends and answers on the wire; this module decides what is
advertised, on which interfaces, and when a peer is up or lost:

- Every record that arrives is read here (a record listener), so a goodbye
  makes its peer `lost` at once instead of when a browser gets round to it.
- A peer gone quiet is asked directly, by a unicast query to its port 5353
  (RFC 6762 section 5.5), and only if that goes unanswered, by multicast: a
  crashed peer is `lost` within `peer_timeout`, and a healthy LAN carries no
  periodic multicast for it.
- Two agents with one instance name (cloned images) settle it by comparing
  their host names: the smaller one renames itself, without a goodbye for the
  name the other keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from zeroconf import (
    DNSAddress,
    DNSIncoming,
    DNSOutgoing,
    DNSPointer,
    DNSQuestion,
    DNSRecord,
    DNSService,
    DNSText,
    IPVersion,
    NonUniqueNameException,
    RecordUpdate,
    RecordUpdateListener,
    ServiceInfo,
    Zeroconf,
    current_time_millis,
)
from zeroconf.asyncio import AsyncZeroconf
from zeroconf.const import (
    _CLASS_IN,
    _CLASS_IN_UNIQUE,
    _FLAGS_AA,
    _FLAGS_QR_QUERY,
    _FLAGS_QR_RESPONSE,
    _TYPE_A,
    _TYPE_AAAA,
    _TYPE_PTR,
    _TYPE_SRV,
)

from edge.interfaces import Interface, host_token, read_interfaces
from edge.peers import PeerTable, format_address, parse_txt
from edge.settings import DiscoverySettings

__all__ = ["API_VERSION", "SERVICE_TYPE", "Discovery"]

log = logging.getLogger("edge.discovery")

SERVICE_TYPE = "_edge-agent._tcp.local."
API_VERSION = "1"
_MDNS_PORT = 5353
_TICK = 0.5  # seconds between liveness and TXT checks
_BROWSE_AT = (0.0, 1.0, 3.0)  # seconds after start: PTR queries for peers already up
_BROWSE_REFRESH = 3600.0  # seconds: RFC 6762 5.2, well before the PTR's 75 minutes
_TXT_MIN_INTERVAL = 5.0  # seconds between TXT re-announcements (a flapping uplink)
_DEFEND_DELAY = 1.0  # seconds: re-announce after the last conflicting record, not during
_CLAIM_WAIT = 0.3  # seconds to wait for another host to answer for a name we want


class _Records(RecordUpdateListener):
    """Hands every record update zeroconf receives to discovery (on the loop)."""

    def __init__(self, owner: Discovery) -> None:
        self._owner = owner

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        self._owner.on_records([update.new for update in records])


class _Probes(asyncio.DatagramProtocol):
    """The socket that asks quiet peers directly and hears their unicast answers."""

    def __init__(self, owner: Discovery) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        self._owner.on_probe_answer(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from a host that is gone: the timeout says so


class Discovery:
    """Advertise on the chosen interfaces and keep the peer table."""

    def __init__(
        self,
        settings: DiscoverySettings,
        node: str,
        *,
        version: str,
        profile: str,
        uplink_state: Callable[[], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.node = node
        self.version = version
        self.profile = profile
        self._uplink_state = uplink_state
        self._clock = clock
        self.table = PeerTable()
        self.rejected: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()
        self.state = "disabled" if not settings.enabled else "starting"
        self.reason: str | None = None if settings.enabled else "[discovery] enabled = false"
        self.instance: str | None = None
        self.conflict: dict[str, Any] | None = None
        self._interfaces: list[Interface] = []
        self._aiozc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None
        self._server = ""
        self._token = ""
        self._txt: dict[str, str] = {}
        self._txt_at = 0.0
        self._announcing: asyncio.Future[Any] | None = None
        self._probe4: asyncio.DatagramTransport | None = None
        self._probe6: asyncio.DatagramTransport | None = None
        self._probed_at: dict[str, float] = {}  # instance -> monotonic time of last probe
        self._asked_at: dict[str, float] = {}  # instance -> monotonic time of last multicast ask
        self._rename = asyncio.Event()
        self._defend_at: float | None = None
        self._browse_at: list[float] = []

    # ---- what status and `peers` show ---------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The `discovery` part of `status`."""
        return {
            "state": self.state,
            "reason": self.reason,
            "instance": self.instance,
            "interfaces": [i.name for i in self._interfaces],
            "addresses": self._own_addresses(),
            "conflict": self.conflict,
            "rejected": dict(self.rejected),
            "peer_timeout": self.settings.peer_timeout,
        }

    def peers(self) -> list[dict[str, Any]]:
        """The peer table's rows."""
        return self.table.rows(wall_offset=self._clock() - time.monotonic())

    # ---- lifetime --------------------------------------------------------------

    async def run(self) -> None:
        """Discover until cancelled; idle (and say why) while no interface fits."""
        if not self.settings.enabled:
            await asyncio.Event().wait()
        while True:
            interfaces = await self._read_interfaces()
            if not interfaces:
                await self._stop_engine()
                self._interfaces = []
                self._set_state("idle", "no interface is up, multicast-capable and allowed by"
                                " [discovery] interfaces/exclude (loopback never is)")
                await asyncio.sleep(self.settings.scan_interval)
                continue
            try:
                if self._aiozc is None:
                    await self._start_engine(interfaces)
                elif interfaces != self._interfaces:
                    await self._follow_interfaces(interfaces)
                self._set_state("running", None)
                await self._serve_until_rescan()
            except (OSError, RuntimeError) as exc:
                # A socket that cannot be made or joined: try again at the next scan.
                self._set_state("failed", f"mDNS on {', '.join(i.name for i in interfaces)}:"
                                f" {exc}")
                await self._stop_engine(goodbye=False)
                await asyncio.sleep(self.settings.scan_interval)

    async def close(self) -> None:
        """Say goodbye on the LAN and close the sockets (idempotent)."""
        await self._stop_engine()

    def _set_state(self, state: str, reason: str | None) -> None:
        if (state, reason) != (self.state, self.reason):
            if state == "running":
                log.info("discovery running as %r on %s", self.instance,
                         ", ".join(i.name for i in self._interfaces))
            elif reason:
                log.warning("discovery %s: %s", state, reason)
        self.state, self.reason = state, reason

    async def _read_interfaces(self) -> list[Interface]:
        return await asyncio.to_thread(
            read_interfaces, self.settings.interfaces, self.settings.exclude
        )

    # ---- the engine: zeroconf, our service, the probe sockets ---------------------

    async def _start_engine(self, interfaces: list[Interface]) -> None:
        self._interfaces = interfaces
        self._token = self._token or host_token(interfaces) or secrets.token_hex(3)
        label = "".join(c if c.isalnum() or c == "-" else "-" for c in self.node)
        self._server = f"{label}-{self._token}.local."
        try:
            self._aiozc = AsyncZeroconf(interfaces=self._zeroconf_interfaces(interfaces),
                                        ip_version=IPVersion.All)
        except OSError:
            # No IPv6 multicast here (disabled, or no route): IPv4 alone still works.
            self._aiozc = AsyncZeroconf(interfaces=[a for i in interfaces for a in i.ipv4],
                                        ip_version=IPVersion.V4Only)
        zc = self._aiozc.zeroconf
        zc.async_add_listener(_Records(self), None)
        loop = asyncio.get_running_loop()
        self._probe4, _ = await loop.create_datagram_endpoint(
            lambda: _Probes(self), local_addr=("0.0.0.0", 0), family=socket.AF_INET
        )
        with contextlib.suppress(OSError):
            self._probe6, _ = await loop.create_datagram_endpoint(
                lambda: _Probes(self), local_addr=("::", 0), family=socket.AF_INET6
            )
        start = time.monotonic()
        self._browse_at = [start + delay for delay in _BROWSE_AT]
        await self._register(self.node)

    @staticmethod
    def _zeroconf_interfaces(interfaces: list[Interface]) -> list[str | int]:
        chosen: list[str | int] = [a for i in interfaces for a in i.ipv4]
        chosen += [i.index for i in interfaces if i.ipv6]
        return chosen

    async def _stop_engine(self, goodbye: bool = True) -> None:
        aiozc, self._aiozc = self._aiozc, None
        for transport in (self._probe4, self._probe6):
            if transport is not None:
                transport.close()
        self._probe4 = self._probe6 = None
        if self._announcing is not None:
            self._announcing.cancel()
            self._announcing = None
        if aiozc is None:
            return
        if not goodbye and self._info is not None:
            aiozc.zeroconf.registry.async_remove(self._info)
        try:
            await aiozc.async_close()  # goodbyes for what is still registered
        except Exception as exc:
            log.warning("closing mDNS: %s", exc)
        self._info = None

    async def _follow_interfaces(self, interfaces: list[Interface]) -> None:
        """Addresses or interfaces changed: move the sockets, say goodbye for the old."""
        assert self._aiozc is not None and self._info is not None
        old = set(self._own_addresses_of(self._interfaces))
        self._interfaces = interfaces
        await self._aiozc.zeroconf.async_update_interfaces(self._zeroconf_interfaces(interfaces))
        gone = old - set(self._own_addresses_of(interfaces))
        if gone:
            self._goodbye_addresses(gone)
        log.info("discovery: interfaces now %s (addresses %s)",
                 ", ".join(i.name for i in interfaces), ", ".join(self._own_addresses()) or "-")
        self._info = self._service_info(self._info.name)
        await self._announce()
        self._browse_at = [time.monotonic()]  # peers on a new link: ask who is there

    def _service_info(self, full_name: str) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE, full_name, port=self.settings.port, properties=dict(self._txt),
            server=self._server,
            addresses=[ipaddress.ip_address(a).packed for a in self._own_addresses()],
        )

    def _wanted_txt(self) -> dict[str, str]:
        return {
            "node": self.node, "ver": self.version, "profile": self.profile,
            "uplink": self._uplink_state(), "api": API_VERSION,
        }

    async def _register(self, wanted: str) -> None:
        """Register under `wanted`, or the first free `wanted-N` if it is taken."""
        assert self._aiozc is not None
        zc = self._aiozc.zeroconf
        self._txt = self._wanted_txt()
        self._txt_at = time.monotonic()
        taken = self.table.instances()
        for n in range(1, 1000):
            name = wanted if n == 1 else f"{wanted}-{n}"
            if n > 1 and name in taken:
                continue
            full = f"{name}.{SERVICE_TYPE}"
            # One question instead of zeroconf's three probes (1.7 s): a host that
            # holds the name answers at once. Two hosts starting together both miss
            # it and settle it afterwards (see _is_own).
            self._ask_multicast(full, _TYPE_SRV)
            await asyncio.sleep(_CLAIM_WAIT)
            if self._claimed_by_other(full):
                continue
            self._info = self._service_info(full)
            self.instance = name
            self._rename.clear()
            try:
                self._announcing = asyncio.ensure_future(await zc.async_register_service(
                    self._info, allow_name_change=False, cooperating_responders=True
                ))
            except NonUniqueNameException:
                continue
            if name != self.node:
                self._renamed(name)
            return
        raise RuntimeError(f"no free instance name for {self.node!r}")

    def _claimed_by_other(self, full: str) -> bool:
        assert self._aiozc is not None
        now = current_time_millis()
        return any(
            isinstance(r, DNSService) and r.server.lower() != self._server.lower()
            and not r.is_expired(now)
            for r in self._aiozc.zeroconf.cache.async_entries_with_name(full.lower())
        )

    def _renamed(self, name: str) -> None:
        if self.conflict is None:
            self.conflict = {"wanted": self.node, "instance": name, "since": self._clock()}
        else:
            self.conflict["instance"] = name
        log.warning(
            "discovery: another device on the LAN uses the name %r (same node id: a cloned"
            " image?); advertising as %r instead. Give each device its own [node] id.",
            self.node, name,
        )

    async def _announce(self) -> None:
        assert self._aiozc is not None and self._info is not None
        if self._announcing is not None:
            self._announcing.cancel()
        self._announcing = asyncio.ensure_future(
            await self._aiozc.zeroconf.async_update_service(self._info)
        )

    # ---- the loop between scans ------------------------------------------------------

    async def _serve_until_rescan(self) -> None:
        rescan_at = time.monotonic() + self.settings.scan_interval
        while time.monotonic() < rescan_at:
            if self._rename.is_set():
                self._rename.clear()
                await self._rename_away()
            await self._keep_txt()
            await self._defend()
            self._browse()
            self._check_liveness()
            await asyncio.sleep(_TICK)

    async def _keep_txt(self) -> None:
        wanted = self._wanted_txt()
        if wanted != self._txt and time.monotonic() - self._txt_at >= _TXT_MIN_INTERVAL:
            self._txt, self._txt_at = wanted, time.monotonic()
            assert self._info is not None
            self._info = self._service_info(self._info.name)
            await self._announce()

    async def _rename_away(self) -> None:
        """We lost a name conflict: take the next free name, no goodbye for this one."""
        assert self._aiozc is not None and self._info is not None
        if self._announcing is not None:
            self._announcing.cancel()
            self._announcing = None
        self._aiozc.zeroconf.registry.async_remove(self._info)
        await self._register(self.node)

    async def _defend(self) -> None:
        if self._defend_at is not None and time.monotonic() >= self._defend_at:
            self._defend_at = None
            await self._announce()

    def _browse(self) -> None:
        now = time.monotonic()
        if self._browse_at and now >= self._browse_at[0]:
            self._browse_at.pop(0)
            if not self._browse_at:
                self._browse_at.append(now + _BROWSE_REFRESH)
            self._ask_multicast(SERVICE_TYPE, _TYPE_PTR)

    def _check_liveness(self) -> None:
        """Ask quiet peers directly; mark silent ones lost; forget long-lost ones."""
        timeout = self.settings.peer_timeout
        now = time.monotonic()
        for peer in self.table.quiet(now, timeout / 3):
            silent = now - peer.last_seen
            if now - self._probed_at.get(peer.instance, -timeout) >= timeout / 6:
                self._probed_at[peer.instance] = now
                self._probe(peer.instance, list(peer.addresses))
            asked = self._asked_at.get(peer.instance, -timeout)
            if silent >= 2 * timeout / 3 and now - asked >= timeout / 6:
                # It does not answer unicast (or cannot be reached so): ask the LAN.
                self._asked_at[peer.instance] = now
                self._ask_multicast(f"{peer.instance}.{SERVICE_TYPE}", _TYPE_SRV)
        for peer in self.table.expire(now, timeout, self.settings.forget_after):
            log.info("peer %s (%s) lost: silent for %.0fs", peer.instance, peer.node,
                     now - peer.last_seen)

    def _probe(self, instance: str, addresses: list[str]) -> None:
        out = DNSOutgoing(_FLAGS_QR_QUERY, multicast=False, id_=random.randint(1, 0xFFFF))
        out.add_question(DNSQuestion(f"{instance}.{SERVICE_TYPE}", _TYPE_SRV, _CLASS_IN))
        packet = out.packets()[0]
        for address in addresses:
            try:
                if ":" in address and self._probe6 is not None:
                    host, _, scope = address.partition("%")
                    index = socket.if_nametoindex(scope) if scope else 0
                    self._probe6.sendto(packet, (host, _MDNS_PORT, 0, index))
                elif ":" not in address and self._probe4 is not None:
                    self._probe4.sendto(packet, (address, _MDNS_PORT))
            except OSError:
                pass  # no route to it any more: the timeout says so

    def _ask_multicast(self, name: str, qtype: int) -> None:
        if self._aiozc is None:
            return
        out = DNSOutgoing(_FLAGS_QR_QUERY)
        out.add_question(DNSQuestion(name, qtype, _CLASS_IN))
        self._aiozc.zeroconf.async_send(out)

    def _goodbye_addresses(self, addresses: set[str]) -> None:
        assert self._aiozc is not None
        out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
        for address in addresses:
            packed = ipaddress.ip_address(address.partition("%")[0]).packed
            kind = _TYPE_A if len(packed) == 4 else _TYPE_AAAA
            out.add_answer_at_time(DNSAddress(self._server, kind, _CLASS_IN_UNIQUE, 0, packed), 0)
        self._aiozc.zeroconf.async_send(out)

    # ---- what arrives ------------------------------------------------------------------

    def on_records(self, records: list[DNSRecord]) -> None:
        """Records from one packet (zeroconf calls this on the loop, before caching them)."""
        try:
            now = time.monotonic()
            # Host names first need their SRV: read the service records before addresses.
            for record in records:
                if not isinstance(record, DNSAddress):
                    self._on_service_record(record, now)
            for record in records:
                if isinstance(record, DNSAddress):
                    self._on_address(record, now)
        except Exception:
            # A record we failed to read must not stop the next one (or zeroconf).
            self._reject("-", "record_error", "a record could not be read", exc_info=True)

    def _instance_of(self, name: str) -> str | None:
        suffix = "." + SERVICE_TYPE
        if len(name) > len(suffix) and name.lower().endswith(suffix):
            return name[: -len(suffix)]
        return None

    def _on_service_record(self, record: DNSRecord, now: float) -> None:
        gone = record.ttl == 0
        if isinstance(record, DNSPointer):
            if record.name.lower() != SERVICE_TYPE:
                return
            instance = self._instance_of(record.alias)
            if instance is None or self._is_own(instance, None):
                return
            if gone:
                self._lost_by_goodbye(instance, now)
            else:
                self.table.pointer(instance, now)
            return
        instance = self._instance_of(record.name)
        if instance is None:
            return
        if isinstance(record, DNSService):
            if self._is_own(instance, record.server, gone=gone):
                return
            if gone:
                self._lost_by_goodbye(instance, now)
                return
            self.table.service(instance, now, server=record.server, port=record.port)
            self._fill_addresses(instance, record.server, now)
        elif isinstance(record, DNSText):
            if self._is_own(instance, None) or gone:
                return
            entries, problems = parse_txt(record.text)
            for problem in problems:
                self._reject(instance, problem, "malformed TXT entry skipped or kept as bytes")
            self.table.text(instance, now, entries)

    def _is_own(self, instance: str, server: str | None, *, gone: bool = False) -> bool:
        """Whether a record names our own instance; notice a conflict if it is not ours."""
        if self.instance is None or instance.lower() != self.instance.lower():
            return False
        if server is None or server.lower() == self._server.lower():
            return True
        if gone:
            # Someone else said goodbye for our name: say again that it is ours.
            self._defend_at = time.monotonic() + _DEFEND_DELAY
        elif server.lower() < self._server.lower():
            # Another host claims our name. The smaller host name yields (both sides
            # see the same pair, so exactly one renames); the other re-announces.
            self._defend_at = time.monotonic() + _DEFEND_DELAY
        else:
            self._rename.set()
        return True

    def _lost_by_goodbye(self, instance: str, now: float) -> None:
        if self.table.goodbye(instance, now):
            log.info("peer %s said goodbye", instance)

    def _fill_addresses(self, instance: str, server: str, now: float) -> None:
        """Addresses that came in an earlier packet than the SRV are in zeroconf's cache."""
        if self._aiozc is None:
            return
        millis = current_time_millis()
        for record in self._aiozc.zeroconf.cache.async_entries_with_name(server.lower()):
            if isinstance(record, DNSAddress) and not record.is_expired(millis):
                self._on_address(record, now, flush=False)

    def _on_address(self, record: DNSAddress, now: float, *, flush: bool | None = None) -> None:
        address = format_address(record.address, self._scope_name(record))
        if address is None:
            return
        if record.ttl == 0:
            self.table.address_gone(record.name, address)
        else:
            self.table.address(record.name, address, now,
                               flush=record.unique if flush is None else flush)

    def _scope_name(self, record: DNSAddress) -> str | None:
        scope = getattr(record, "scope_id", None)
        if scope:
            with contextlib.suppress(OSError):
                return socket.if_indextoname(scope)
        # Heard over IPv4: with one interface, that is where the peer is.
        return self._interfaces[0].name if len(self._interfaces) == 1 else None

    def on_probe_answer(self, data: bytes) -> None:
        """A unicast answer to one of our direct questions."""
        try:
            message = DNSIncoming(data)
            if not message.valid:
                raise ValueError("not a DNS message")
            now = time.monotonic()
            for record in message.answers():
                instance = self._instance_of(record.name)
                if instance is not None and isinstance(record, DNSService) and record.ttl:
                    self.table.alive(instance, now)
        except Exception:
            self._reject("-", "probe_answer_malformed", "a unicast answer could not be read")

    def _reject(self, instance: str, kind: str, what: str, *, exc_info: bool = False) -> None:
        self.rejected[kind] += 1
        if (instance, kind) not in self._logged and len(self._logged) < 10_000:
            self._logged.add((instance, kind))
            log.warning("discovery: %s from %s (%s); logged once per peer",
                        what, instance, kind, exc_info=exc_info)

    # ---- our own addresses -----------------------------------------------------------

    def _own_addresses(self) -> list[str]:
        return self._own_addresses_of(self._interfaces)

    @staticmethod
    def _own_addresses_of(interfaces: list[Interface]) -> list[str]:
        out = [a for i in interfaces for a in i.ipv4]
        for i in interfaces:
            for a in i.ipv6:
                out.append(f"{a}%{i.name}" if ipaddress.IPv6Address(a).is_link_local else a)
        return out
