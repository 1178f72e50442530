"""The composition root: builds every component and owns their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import IO, Any

from edge import __version__
from edge.api import ApiServer, Stream
from edge.bootcount import next_boot
from edge.clock import ClockSync
from edge.desired import DesiredState
from edge.discovery import Discovery
from edge.downlink import Downlink
from edge.errors import ConfigError, EdgeError, RequestError
from edge.inbox import Inbox
from edge.localbus import LocalBus
from edge.notify import Notifier
from edge.outbox import Outbox
from edge.policy import shown, with_policy
from edge.profiles import UNKNOWN, Policy, Profile, facts_of, resolve
from edge.rates import RateMeter
from edge.reconcile import Reconciler
from edge.reported import Reporter
from edge.services import ServiceError
from edge.settings import Settings
from edge.signing import configured_keyring
from edge.subscribers import Subscribers, validate_filter
from edge.supervisor import Supervisor
from edge.telemetry import Telemetry, read_metrics
from edge.uplink import Uplink

__all__ = ["Agent"]

log = logging.getLogger("edge.agent")

_REPORTED_PEERS = 200  # peers named in the reported state, at most


class Agent:
    """One agent process: outbox, uplink, discovery, services, socket API and telemetry."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        # The profile first: its policy defaults fill what the config leaves out.
        self._profile, self._machine = _find_profile(settings.node.profile)
        settings, self.policy_taken = with_policy(
            settings, Policy() if self._profile is None else self._profile.policy)
        self.profile_name = UNKNOWN if self._profile is None else self._profile.name
        self.settings = settings
        self.node = settings.node.id
        self.boot = clock()
        data_dir = settings.node.data_dir
        self.clock_sync = ClockSync(wall=clock)
        self.outbox = Outbox(data_dir / "outbox.db", self.node, settings.queue, clock=clock,
                             sync=self.clock_sync)
        self.local = LocalBus(
            settings.local, self.node, self.outbox, state_path=data_dir / "local-session.json",
            cloud_prefix=settings.uplink.prefix, clock=clock,
        )
        self.subscribers = Subscribers()
        self.inbox = Inbox(
            data_dir / "inbox.db", max_bytes=settings.local.inbox_max_bytes,
            durability=settings.queue.durability, clock=clock,
        )
        self.downlink = Downlink(self.inbox, self.local, self.subscribers, clock=clock)
        self.local.on_online = self.downlink.wake
        self.uplink = Uplink(
            settings.uplink, self.node, self.outbox, boot=self.boot, clock=clock,
            on_down=self.downlink.receive,
        )
        self.discovery = Discovery(
            settings.discovery, self.node, version=__version__, profile=self.profile_name,
            uplink_state=lambda: self.uplink.snapshot().state, clock=clock,
        )
        try:
            self.supervisor = Supervisor(settings.services, data_dir, env_extra={
                "EDGE_NODE_ID": self.node,
                "EDGE_API_SOCKET": str(settings.api.socket),
                "EDGE_LOCAL_MQTT_URL": settings.local.url,
            })
        except ServiceError as exc:
            raise ConfigError(f"config {settings.source}: {exc}") from exc
        self.telemetry = Telemetry(settings.telemetry.interval, data_dir, self._submit_telemetry,
                                   sampler=self._sample)
        self.facts: dict[str, Any] = {}  # read when run() starts
        self._clock = clock
        self.reconciler = Reconciler(settings, self.supervisor, self.telemetry, self.outbox)
        # With keys, nothing unverified runs: a key that does not load stops the start.
        keys = configured_keyring(settings.state.desired_keys, settings.source)
        self.desired = DesiredState(data_dir / "desired.cbor", self.reconciler.apply,
                                    node=self.node, keys=keys, clock=clock)
        self.uplink.on_desired = self.desired.receive
        self.reporter = Reporter(
            data_dir / "reported-version", self._reported, self._reported_mark,
            partial(self.uplink.publish_retained, "reported"),
            debounce=settings.state.debounce, clock=clock,
        )
        self.uplink.on_online = self.reporter.online
        self.api = ApiServer(
            settings.api.socket,
            group=settings.api.group,
            max_line=settings.api.max_line_bytes,
            submit=self._submit,
            handlers={
                "status": self._status, "queue": self._queue, "peers": self._peers,
                "services": self._services, "service.restart": self._service_restart,
                "service.logs": self._service_logs, "subscribe": self._subscribe,
            },
            # Leave descriptors for the database, the broker and the process itself.
            max_connections=max(8, min(1024, self._raise_fd_limit() // 2 - 32)),
        )
        self.rates = RateMeter()
        self.notifier = Notifier()  # systemd's READY/WATCHDOG/STATUS, when it asks for them
        self._stop = asyncio.Event()
        self._lock: IO[str] | None = None

    # ---- running -----------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or `stop()`; shut down in order."""
        self._lock_data_dir()
        try:
            # Stored before the uplink connects: its status documents and its Will carry it.
            self.uplink.bootn = await asyncio.to_thread(
                next_boot, self.settings.node.data_dir / "boot-count", self._clock)
            await self.outbox.open()
            await self.inbox.open()
            await self._read_facts()
            await self.desired.restore()  # the last accepted desired state: no network needed
            await self.api.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self.stop)
            log.info(
                "edge %s running as node %s (data %s, socket %s, uplink %s)",
                __version__, self.node, self.settings.node.data_dir, self.settings.api.socket,
                self.settings.uplink.url or "none",
            )
            # The outbox is recovered and the socket listens: systemd may start what needs us.
            self.notifier.ready(self._status_line())
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.clock_sync.run(), name="clock"),
                    tg.create_task(self.outbox.run(), name="outbox"),
                    tg.create_task(self.uplink.run(), name="uplink"),
                    tg.create_task(self.local.run(), name="local"),
                    tg.create_task(self.downlink.run(), name="downlink"),
                    tg.create_task(self.discovery.run(), name="discovery"),
                    tg.create_task(self.supervisor.run(), name="services"),
                    tg.create_task(self.telemetry.run(), name="telemetry"),
                    tg.create_task(self.rates.run(self.outbox), name="rates"),
                    tg.create_task(self.desired.run(), name="desired"),
                    tg.create_task(self.reporter.run(), name="reported"),
                    tg.create_task(self.notifier.run(self._status_line), name="notify"),
                ]
                await self._stop.wait()
                log.info("stopping")
                await self.supervisor.close()  # first: services may publish as they stop
                await self.api.close()
                await self.local.close()  # what it has not acknowledged stays with the broker
                await self.discovery.close()  # goodbyes: peers mark us lost at once
                await self.uplink.close()
                for task in tasks:
                    task.cancel()
        finally:
            await self.supervisor.close()
            await self.api.close()
            await self.outbox.close()
            await self.inbox.close()
            self._unlock_data_dir()
            self.notifier.close()
            log.info("stopped")

    def stop(self) -> None:
        """Ask the agent to shut down (idempotent)."""
        if not self._stop.is_set():
            self.notifier.stopping()
        self._stop.set()

    def _status_line(self) -> str:
        """One line for `systemctl status`: the uplink and the backlog."""
        depth = sum(self.outbox.by_priority().values())
        return f"uplink {self.uplink.snapshot().state}, {depth} queued"

    @staticmethod
    def _raise_fd_limit() -> int:
        """Lift the soft descriptor limit to the hard one; return what we may use."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            except (ValueError, OSError):
                pass
        return int(soft if soft != resource.RLIM_INFINITY else 65536)

    def _lock_data_dir(self) -> None:
        data_dir = self.settings.node.data_dir
        try:
            # Messages are private to the agent's user and group ([node] data_dir).
            data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            fh = open(data_dir / "agent.lock", "a+")
        except OSError as exc:
            raise EdgeError(f"data dir {data_dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.close()
            raise EdgeError(f"another agent is already using the data dir {data_dir}") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock = fh

    def _unlock_data_dir(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None

    async def _read_facts(self) -> None:
        """Read the board's facts once, off the loop, for the reported state."""
        self.facts = await asyncio.to_thread(facts_of, self._profile, self._machine)
        taken = ", ".join(f"{key} {shown(key, value)}" for key, value in self.policy_taken.items())
        log.info("firmware profile %s%s", self.profile_name,
                 f" (its defaults in use: {taken})" if taken else "")

    def _sample(self, data_dir: Path) -> dict[str, object]:
        """One telemetry sample (blocks: runs on the telemetry thread), with the board's facts."""
        metrics = read_metrics(data_dir)
        metrics["facts"] = facts_of(self._profile, self._machine)
        return metrics

    # ---- ingress -------------------------------------------------------------

    def _submit(
        self, topic: str, data: Any, ct: str, prio: int, ttl: float | None
    ) -> tuple[int, str, asyncio.Future[None]]:
        env, committed = self.outbox.submit(topic, data, ct, prio, ttl)
        return env.seq, env.id.hex(), committed

    async def _submit_telemetry(self, metrics: dict[str, object]) -> None:
        ts = metrics.get("ts")
        await self.outbox.put(
            "telemetry", metrics, "application/cbor", ts=ts if isinstance(ts, float) else None,
            route="telemetry",
        )

    # ---- desired and reported state -------------------------------------------------

    async def _reported(self) -> dict[str, Any]:
        """The reported-state document (docs/registry.md), without its version."""
        up = self.uplink.snapshot()
        queue = await self._queue_view()
        desired = self.desired
        return {
            "v": 1,
            "node": self.node,
            "ts": self._clock(),
            "agent": __version__,
            "profile": self.profile_name,
            "facts": self.facts,
            "labels": dict(self.settings.node.labels),
            "services": [
                {key: row[key] for key in ("name", "state", "reason", "pid", "restarts",
                                           "last_exit", "source")}
                for row in self.supervisor.snapshot()
            ],
            "peers": [
                {key: row.get(key) for key in ("node", "state", "addresses", "last_seen")}
                for row in self.discovery.peers()[:_REPORTED_PEERS]
            ],
            "queue": {key: queue[key] for key in ("depth", "bytes", "oldest_age", "dropped",
                                                  "expired", "dead")},
            "uplink": {"state": up.state, "since": up.since, "connects": up.connects,
                       "last_error": up.last_error},
            "desired_applied": desired.applied,
            "desired": None if not desired.applied else {
                "version": desired.applied, "ts": desired.applied_ts,
                "items": self.reconciler.live_items(self.desired.items),
            },
            "desired_rejected": desired.rejected,
        }

    def _reported_mark(self) -> object:
        """What a change of makes a new reported document (not the queue: it always moves)."""
        return (
            tuple((row["name"], row["state"], row["restarts"], row["last_exit"], row["source"])
                  for row in self.supervisor.snapshot()),
            tuple((row.get("instance"), row.get("state"))
                  for row in self.discovery.peers()[:_REPORTED_PEERS]),
            self.desired.changes,
        )

    # ---- socket API ops ------------------------------------------------------------

    async def _queue_view(self) -> dict[str, Any]:
        stats = await self.outbox.stats()
        failing = self.outbox.storage_error
        return {
            "depth": stats.depth,
            "bytes": stats.bytes,
            "oldest_age": stats.oldest_age,
            "dropped": stats.dropped,
            "expired": stats.expired,
            "dead": stats.dead,
            "accepted": self.outbox.accepted_total,
            "sent": self.outbox.sent_total,
            "rate_in": self.rates.rate_in,
            "rate_out": self.rates.rate_out,
            "storage_error": None if failing is None else failing[0],
            "storage_error_since": None if failing is None else failing[1],
            "moved_aside": None if self.outbox.moved_aside is None else {
                "path": str(self.outbox.moved_aside), "ts": self.outbox.moved_aside_ts,
            },
        }

    async def _status(self, req: dict[str, Any]) -> dict[str, Any]:
        up = self.uplink.snapshot()
        return {
            "ok": True,
            "node": self.node,
            "version": __version__,
            "boot": self.boot,
            "profile": self.profile_name,
            "profile_policy": dict(self.policy_taken),
            "uplink": {
                "state": up.state, "since": up.since, "url": up.url, "connects": up.connects,
                "last_error": up.last_error, "inflight": up.inflight,
            },
            "queue": await self._queue_view(),
            "clock": {"synchronised": self.clock_sync.synced,
                      "synchronised_at": self.clock_sync.synced_at,
                      "boot_id": self.clock_sync.boot_id.hex()},
            "telemetry": {
                "interval": self.telemetry.interval,
                "samples": self.telemetry.samples,
                "last_sample_ts": self.telemetry.last_sample_ts,
            },
            "api": {"rejected": dict(self.api.rejected), "connections": self.api.connections},
            "local": asdict(self.local.snapshot()),
            "down": self.downlink.snapshot(),
            "discovery": self.discovery.snapshot(),
            "peers": self.discovery.table.counts(),
            "services": self._services_summary(),
            "desired": {**self.desired.snapshot(),
                        "items": self.reconciler.live_items(self.desired.items)},
            "reported": {"version": self.reporter.version, "published": self.reporter.published,
                         "last_ts": self.reporter.last_ts},
        }

    async def _subscribe(self, req: dict[str, Any]) -> Stream:
        topic_filter = validate_filter(req.get("filter"))
        # Listening before the answer goes out: nothing falls between the two.
        sub = self.subscribers.subscribe(topic_filter)
        self.downlink.wake()  # messages waiting for a subscriber (no local bus) may go now
        return Stream({"ok": True, "filter": topic_filter}, sub, sub.close)

    def _services_summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.supervisor.snapshot():
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        return counts

    async def _services(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "services": self.supervisor.snapshot()}

    @staticmethod
    def _service_name(req: dict[str, Any]) -> str:
        name = req.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError("bad_request", "'name' must be the name of a service")
        return name

    async def _service_restart(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._service_name(req)
        try:
            await self.supervisor.restart(name)
        except ServiceError as exc:
            raise RequestError("unknown_service", str(exc)) from exc
        return {"ok": True, "name": name}

    async def _service_logs(self, req: dict[str, Any]) -> dict[str, Any] | Stream:
        name = self._service_name(req)
        lines = req.get("lines", 50)
        if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= 200:
            raise RequestError("bad_request", "'lines' must be an integer from 1 to 200")
        follow = req.get("follow", False)
        if not isinstance(follow, bool):
            raise RequestError("bad_request", "'follow' must be true or false")
        try:
            if not follow:
                return {"ok": True, "name": name, "lines": self.supervisor.logs(name, lines)}
            feed = self.supervisor.follow(name, lines)
        except ServiceError as exc:
            raise RequestError("unknown_service", str(exc)) from exc
        # The tail and the lines after it come from one registered reader: no gap.
        answer = {"ok": True, "name": name, "lines": feed.queued()}
        return Stream(answer, _log_events(feed), feed.close)

    async def _peers(self, req: dict[str, Any]) -> dict[str, Any]:
        d = self.discovery.snapshot()
        return {"ok": True, "peers": self.discovery.peers(),
                "discovery": {"state": d["state"], "reason": d["reason"]}}

    async def _queue(self, req: dict[str, Any]) -> dict[str, Any]:
        view = await self._queue_view()
        view = {"ok": True, **view}
        view.update({
            "max_bytes": self.outbox.settings.max_bytes,
            "on_full": self.outbox.settings.on_full,
            "default_ttl": self.outbox.settings.default_ttl,
            "by_priority": {str(p): n for p, n in self.outbox.by_priority().items()},
            "dead_letters": await self.outbox.dead_letters(),
            "dead_kept": await self.outbox.dead_kept(),
        })
        return view


async def _log_events(feed: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in feed:
        yield {"event": "log", "line": line}


def _find_profile(name: str) -> tuple[Profile | None, str]:
    """(the firmware profile for `[node] profile`, the architecture); None: unknown."""
    try:
        return resolve(name)
    except EdgeError as exc:  # broken profile files: the agent runs on without them
        log.error("firmware profiles: %s; the profile is reported as unknown", exc)
        return None, os.uname().machine


def run_agent(settings: Settings) -> None:
    """Run an agent in a fresh event loop until it is told to stop."""
    asyncio.run(Agent(settings).run())

