"""LAN discovery over mDNS/DNS-SD: advertise this agent, keep a live table of its peers.

python-zeroconf sends and answers on the wire; this module decides what is
advertised, on which interfaces, and when a peer is up or lost:

- Every record that arrives is read here (a record listener), so a goodbye
  makes its peer `lost` at once instead of when a browser gets round to it.
- A peer gone quiet is asked directly: a QU question for its TXT record, sent
  by unicast to its port 5353 (RFC 6762 sections 5.4, 5.5). A responder answers
  that by unicast while it has multicast the record within a quarter of its
  TTL (75 minutes for TXT), so a healthy peer costs the LAN a few multicast
  packets an hour however many agents ask. Only a peer that does not answer
  is asked by multicast; it is `lost` at `peer_timeout`.
- Two agents with one instance name (cloned images) settle it by comparing
  their host names: the smaller one renames itself, without a goodbye for the
  name the other keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from zeroconf import (
    DNSAddress,
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
    _TYPE_TXT,
)

from edge.interfaces import Interface, host_token, read_interfaces
from edge.peers import MAX_PEERS, PeerTable, format_address, parse_txt
from edge.rejections import Rejections
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
_DRAIN_MAX = 1.5  # seconds a goodbye waits for answers zeroconf has queued (1.2 s at most)
_DRAIN_POLL = 0.02
_RESOLVE_TRIES = 3  # questions for an SRV, TXT or address a peer's packets left out
_ASKS_PER_TICK = 8  # questions sent per tick at most, however many peers went quiet
_GOODBYE_REPEAT = 0.125  # seconds between the two copies of a goodbye


class _Records(RecordUpdateListener):
    """Hands every record update zeroconf receives to discovery (on the loop)."""

    def __init__(self, owner: Discovery) -> None:
        self._owner = owner

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        # zeroconf also reports records it drops from its cache as they expire: those
        # are not news from the peer (a goodbye has TTL 0; an expired one does not).
        fresh = [u.new for u in records if u.new.ttl == 0 or not u.new.is_expired(now)]
        if fresh:
            self._owner.on_records(fresh)


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
        self.table = PeerTable(wall=clock)
        self._rejections = Rejections(log, "discovery record")
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
        self._probed_at: dict[str, float] = {}  # instance -> monotonic time of last probe
        self._asked_at: dict[str, float] = {}  # instance -> monotonic time of last multicast ask
        self._rename = asyncio.Event()
        self._defend_at: float | None = None
        self._browse_at: list[float] = []
        self._unresolved: dict[str, tuple[int, float]] = {}  # instance -> (tries, next at)

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
        return self.table.rows()

    # ---- lifetime --------------------------------------------------------------

    async def run(self) -> None:
        """Discover until cancelled; idle (and say why) while no interface fits."""
        if not self.settings.enabled:
            await asyncio.Event().wait()
        while True:
            interfaces: list[Interface] = []
            try:
                interfaces = await self._read_interfaces()
                if not interfaces:
                    await self._stop_engine()
                    self._interfaces = []
                    self._set_state("idle", "no interface is up, multicast-capable and allowed"
                                    " by [discovery] interfaces/exclude (loopback never is)")
                    await asyncio.sleep(self.settings.scan_interval)
                    continue
                if self._aiozc is None:
                    await self._start_engine(interfaces)
                elif interfaces != self._interfaces:
                    await self._follow_interfaces(interfaces)
                self._set_state("running", None)
                await self._serve_until_rescan()
            except Exception as exc:
                # A socket that cannot be made or joined, or a surprise from zeroconf:
                # discovery is off until the next scan; the agent's real work goes on.
                if not isinstance(exc, OSError | RuntimeError):
                    log.exception("discovery failed unexpectedly")
                names = ", ".join(i.name for i in interfaces) or "the interfaces"
                self._set_state("failed", f"mDNS on {names}: {exc}")
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
        self._aiozc.zeroconf.async_add_listener(_Records(self), None)
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
        if self._announcing is not None:
            self._announcing.cancel()
            self._announcing = None
        if aiozc is None:
            return
        zc = aiozc.zeroconf
        try:
            # Built while registered, and the service leaves the registry: no answer
            # is made for it from here on.
            farewell = zc.generate_unregister_all_services()
            if goodbye and farewell is not None:
                await self._drain(zc)
                for i in range(2):
                    if i:
                        await asyncio.sleep(_GOODBYE_REPEAT)
                    zc.async_send(farewell)
            await aiozc.async_close()
        except Exception as exc:
            log.warning("closing mDNS: %s", exc)
        self._info = None

    @staticmethod
    async def _drain(zc: Zeroconf) -> None:
        """Wait until the answers zeroconf queued (aggregated, delayed) have gone out.

        One sent after our goodbye would bring us back in every peer's table, and
        peers drop a repeated goodbye as a duplicate packet.
        """
        queues = [getattr(zc, name, None) for name in ("out_queue", "out_delay_queue")]
        for _ in range(round(_DRAIN_MAX / _DRAIN_POLL)):  # zeroconf has no event for it
            if not any(getattr(q, "queue", None) for q in queues):
                return
            await asyncio.sleep(_DRAIN_POLL)

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
        await zc.async_wait_for_start()  # a claim question sent before that is never sent
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
            "discovery: the name %r is taken on the LAN (another device with this node id,"
            " such as a clone of this SD image, or one renamed to it); advertising as %r"
            " instead. Give each device its own [node] id.",
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
            self._resolve()
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
            self._ask_peers()

    def _resolve(self) -> None:
        """Ask for what a peer's packets left out (some responders send the PTR alone)."""
        now = time.monotonic()
        for instance, (tries, next_at) in list(self._unresolved.items()):
            peer = self.table.get(instance)
            if (peer is not None and peer.addresses and peer.txt) or tries >= _RESOLVE_TRIES:
                del self._unresolved[instance]
                continue
            if now < next_at or self._aiozc is None:
                continue
            self._unresolved[instance] = (tries + 1, now + 2.0 ** tries)
            full = f"{instance}.{SERVICE_TYPE}"
            out = DNSOutgoing(_FLAGS_QR_QUERY)
            for qtype in (_TYPE_SRV, _TYPE_TXT):
                out.add_question(DNSQuestion(full, qtype, _CLASS_IN))
            if peer is not None and peer.server:
                for qtype in (_TYPE_A, _TYPE_AAAA):
                    out.add_question(DNSQuestion(peer.server, qtype, _CLASS_IN))
            self._aiozc.zeroconf.async_send(out)

    def _check_liveness(self) -> None:
        """Ask quiet peers directly; mark silent ones lost; forget long-lost ones."""
        timeout = self.settings.peer_timeout
        now = time.monotonic()
        budget = _ASKS_PER_TICK
        for peer in self.table.quiet(now, timeout / 3):
            if budget <= 0:
                break  # the rest next tick: a burst of silent peers is no flood
            silent = now - peer.last_seen
            if now - self._probed_at.get(peer.instance, -timeout) >= timeout / 6:
                self._probed_at[peer.instance] = now
                self._probe(peer.instance, list(peer.addresses))
                budget -= 1
            asked = self._asked_at.get(peer.instance, -timeout)
            if silent >= 2 * timeout / 3 and now - asked >= timeout / 6:
                # It does not answer unicast (or cannot be reached so): ask the LAN,
                # unless another agent just asked the same (RFC 6762 7.3).
                self._asked_at[peer.instance] = now
                self._ask_multicast(f"{peer.instance}.{SERVICE_TYPE}", _TYPE_SRV)
                budget -= 1
        for peer in self.table.expire(now, timeout, self.settings.forget_after):
            log.info("peer %r (%s) lost: silent for %.0fs", peer.instance, peer.node,
                     now - peer.last_seen)
        known = self.table.instances()
        for times in (self._probed_at, self._asked_at):
            for instance in [i for i in times if i not in known]:
                del times[instance]

    def _probe(self, instance: str, addresses: list[str]) -> None:
        """Ask one peer, by unicast from port 5353, for its TXT record (a QU question)."""
        if self._aiozc is None:
            return
        question = DNSQuestion(f"{instance}.{SERVICE_TYPE}", _TYPE_TXT, _CLASS_IN)
        question.unicast = True
        out = DNSOutgoing(_FLAGS_QR_QUERY)
        out.add_question(question)
        zc = self._aiozc.zeroconf
        # The answer comes back through zeroconf to on_records, like any other. One
        # address is enough (IPv4 first): the answer is about the instance, not the link.
        for address in sorted(addresses, key=lambda a: ":" in a)[:1]:
            host, _, scope = address.partition("%")
            try:
                if ":" in host:
                    index = socket.if_nametoindex(scope) if scope else 0
                    zc.async_send(out, host, _MDNS_PORT, (0, index))
                else:
                    zc.async_send(out, host, _MDNS_PORT)
            except OSError:
                pass  # no route to it any more: the timeout says so

    def _ask_peers(self) -> None:
        """Ask the LAN who is there, listing the peers we know (RFC 6762 7.1).

        A peer whose PTR we hold with more than half its TTL left stays quiet, so
        the hourly question costs a few answers, not one from every agent on the LAN.
        """
        if self._aiozc is None:
            return
        zc = self._aiozc.zeroconf
        out = DNSOutgoing(_FLAGS_QR_QUERY)
        out.add_question(DNSQuestion(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN))
        now = current_time_millis()
        for record in zc.cache.async_all_by_details(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN):
            out.add_answer_at_time(record, now)
        zc.async_send(out)

    def _ask_multicast(self, name: str, qtype: int) -> None:
        if self._aiozc is None:
            return
        zc = self._aiozc.zeroconf
        question = DNSQuestion(name, qtype, _CLASS_IN)
        if zc.question_history.suppresses(question, current_time_millis(), set()):
            return  # another host asked it within the second: its answer reaches us too
        out = DNSOutgoing(_FLAGS_QR_QUERY)
        out.add_question(question)
        zc.async_send(out)

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
            before = self.table.states()
            # Only an SRV makes a row, and addresses belong to its host name: SRV
            # records first, then PTR and TXT, then addresses.
            for kinds in ((DNSService,), (DNSPointer, DNSText), (DNSAddress,)):
                for record in records:
                    if isinstance(record, kinds):
                        self._on_record(record, now)
            self._log_changes(before, records)
        except Exception:
            # A record we failed to read must not stop the next one (or zeroconf).
            self._reject("-", "record_error", "a record could not be read", exc_info=True)

    def _log_changes(self, before: dict[str, str], records: list[DNSRecord]) -> None:
        for instance, state in self.table.states().items():
            was = before.get(instance)
            if state == was:
                continue
            if state == "lost":
                log.info("peer %r said goodbye", instance)
            else:
                peer = self.table.get(instance)
                where = ", ".join(peer.addresses) if peer is not None else ""
                log.info("peer %r %s (%s)%s", instance, "found" if was is None else "back",
                         where or "no address yet",
                         "" if log.isEnabledFor(logging.DEBUG) is False else f" from {records}")

    def _instance_of(self, name: str) -> str | None:
        suffix = "." + SERVICE_TYPE
        if len(name) > len(suffix) and name.lower().endswith(suffix):
            return name[: -len(suffix)]
        return None

    def _on_record(self, record: DNSRecord, now: float) -> None:
        if isinstance(record, DNSAddress):
            self._on_address(record, now)
            return
        gone = record.ttl == 0
        if isinstance(record, DNSPointer):
            if record.name.lower() != SERVICE_TYPE:
                return
            instance = self._instance_of(record.alias)
            if instance is None or self._is_own(instance, None):
                return
            if gone:
                self.table.goodbye(instance, now)
            elif self.table.get(instance) is None:
                if len(self._unresolved) < MAX_PEERS:
                    self._unresolved.setdefault(instance, (0, 0.0))  # a PTR without its SRV
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
                self.table.goodbye(instance, now)
                return
            known = self.table.get(instance)
            if not self.table.service(instance, now, server=record.server, port=record.port):
                self._reject(instance, "too_many_peers", "the peer table is full; peer ignored")
                return
            if known is None or known.server != record.server:
                # A new row, or a new host name: what came in earlier packets is in the
                # cache. A known host's cached addresses may be stale (it may be back with
                # a new one): its own announcement flushes and refills them instead.
                self._fill_from_cache(instance, record.server, now, txt=known is None)
            peer = self.table.get(instance)
            if peer is not None and (not peer.addresses or not peer.txt):
                self._unresolved.setdefault(instance, (0, 0.0))
        elif isinstance(record, DNSText):
            if not self._is_own(instance, None) and not gone:
                self._on_text(instance, record, now)

    def _on_text(self, instance: str, record: DNSText, now: float) -> None:
        if self.table.get(instance) is None:
            return  # no SRV yet: the TXT is read from the cache when it comes
        entries, problems = parse_txt(record.text)
        if problems != ["txt_too_large"]:  # refused unread: the peer keeps its last TXT
            problems += self.table.text(instance, now, entries)
        for problem in problems:
            self._reject(instance, problem, "malformed TXT entry skipped or kept as bytes")

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

    def _fill_from_cache(self, instance: str, server: str, now: float, *, txt: bool) -> None:
        """Records that came in an earlier packet than the SRV are in zeroconf's cache."""
        if self._aiozc is None:
            return
        cache, millis = self._aiozc.zeroconf.cache, current_time_millis()
        for record in cache.async_entries_with_name(server.lower()):
            if isinstance(record, DNSAddress) and not record.is_expired(millis):
                self._on_address(record, now, flush=False)
        if txt:
            for record in cache.async_entries_with_name(f"{instance}.{SERVICE_TYPE}".lower()):
                if isinstance(record, DNSText) and not record.is_expired(millis):
                    self._on_text(instance, record, now)

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

    def _reject(self, instance: str, kind: str, what: str, *, exc_info: bool = False) -> None:
        """Count it; log it once a minute per kind (a LAN of bad peers is no log storm)."""
        if exc_info:
            log.debug("discovery: %s from %r", what, instance, exc_info=True)
        self._rejections(kind, f"{what} from {instance!r}")

    @property
    def rejected(self) -> dict[str, int]:
        """Rejected records by kind, since start."""
        return self._rejections.counts

    # ---- our own addresses -----------------------------------------------------------

    def _own_addresses(self) -> list[str]:
        return self._own_addresses_of(self._interfaces)

    @staticmethod
    def _own_addresses_of(interfaces: list[Interface]) -> list[str]:
        out = [a for i in interfaces for a in i.ipv4]
        for i in interfaces:
            for a in i.ipv6:
                if not ipaddress.IPv6Address(a).is_link_local:
                    out.append(a)
                elif len(interfaces) == 1:
                    # Every address goes out on every link: a link-local one from
                    # another interface would be shown as on the receiver's link.
                    out.append(f"{a}%{i.name}")
        return out
