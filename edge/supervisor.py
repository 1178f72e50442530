"""Keep local services running: start in dependency order, restart with backoff, stop in order.

Each service runs in a session (and process group) of its own, so a stop
reaches everything it started: SIGTERM to the group, SIGKILL after
`stop_timeout`, and done only when no process of the session is left. Its
output goes through a pipe the agent reads into rotating files.

No orphans, no doubles: the pid and start identity of each child are written
to `services/state.json` (atomically) as soon as it runs. An agent started
after a `kill -9` ends the leftovers recorded there, those whose identity
still matches, before it starts anything; a pid now worn by a stranger is
never signalled. What the file cannot know of (an agent killed between a
spawn and its record, a child that left its session) carries
`EDGE_SUPERVISOR=<data_dir>/services` in its environment and is ended too.
Identities and every timing come from monotonic clocks, so a wall-clock step
changes nothing.

The restart policy, per service:

- exit (or a failed start) -> `restart` decides: `always`, `on-failure`
  (a non-zero exit or a signal), `never`; the delay grows from
  `backoff_initial` to `backoff_max` and is retried there forever. Three
  failures in a row, none of them a run of at least `backoff_max`, show as
  `crash-looping`.
- `health.retries` failed checks in a row -> the service is stopped and
  counted as a failure (restarted unless `restart = "never"`).
- `restart(name)` -> stopped and started at once, backoff reset.

Services come from the config file (fixed) and from the desired state
(`apply()`): those are started, restarted with a new spec, or stopped and
forgotten while the others run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import random
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from edge import health, limits, procs
from edge.backoff import Backoff
from edge.limits import NO_LIMITS, Limits, Placement
from edge.reconcile import plan_services
from edge.servicelog import RotatingFile, Tail
from edge.services import ServiceError, ServiceSpec, check_dependencies

__all__ = ["Supervisor"]

log = logging.getLogger("edge.supervisor")

_CRASH_LOOP = 3             # failures in a row (no stable run between) that make a crash loop
_TAIL_LINES = 200           # lines of output kept in memory per service
_SNAPSHOT_TAIL = 10         # ... of them in a snapshot
_FIRST_CHECK_MAX = 1.0      # seconds: the first health check comes no later than this
_POLL = 0.05                # seconds between looks at a session that is stopping
_KILL_WAIT = 5.0            # seconds SIGKILL may take to empty a session
_PUMP_GRACE = 1.0           # seconds the output reader may outlive its service
_READ = 64 * 1024
_FOLLOW_QUEUE = 1000        # lines a slow follower may fall behind before lines are skipped
_LEFTOVER_TIMEOUT = 10.0    # stop_timeout for a leftover of a service no longer configured
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# In every service's environment, naming the supervisor (by its directory) that started it.
_MARK = "EDGE_SUPERVISOR"


@dataclass(frozen=True)
class _Account:
    """Who a service runs as: the agent's own user, or (as root) the one it names."""

    name: str
    home: str
    user: int | None = None
    group: int | None = None
    extra_groups: tuple[int, ...] | None = None

    def popen(self) -> dict[str, Any]:
        """Popen's user/group arguments; none when nothing changes."""
        chosen: dict[str, Any] = {"user": self.user, "group": self.group}
        if self.extra_groups is not None:
            chosen["extra_groups"] = list(self.extra_groups)
        return {key: value for key, value in chosen.items() if value is not None}


@dataclass(frozen=True)
class _Outcome:
    """How one run of a service ended."""

    kind: str                  # "exited", "unhealthy", "restart", "unstartable" or "closed"
    code: int | None = None    # the exit status; negative: the signal that ended it
    ran: float = 0.0           # seconds it ran
    reason: str = ""


@dataclass(eq=False)
class _Follower:
    """One reader of a service's output as it comes (`edge logs -f`)."""

    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(_FOLLOW_QUEUE))
    skipped: int = 0

    def put(self, line: str) -> None:
        """Queue a line, or count it as skipped when the reader is too far behind."""
        if self.skipped and not self.queue.full():
            self.queue.put_nowait(f"[edge] {self.skipped} lines skipped: the reader fell behind")
            self.skipped = 0
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.skipped += 1


class LogFeed:
    """A service's output line by line (async iteration); `close` when done with it."""

    def __init__(self, follower: _Follower, followers: list[_Follower]) -> None:
        self._follower = follower
        self._followers: list[_Follower] | None = followers

    def __aiter__(self) -> LogFeed:
        return self

    async def __anext__(self) -> str:
        if self._followers is None:
            raise StopAsyncIteration
        return await self._follower.queue.get()

    def queued(self) -> list[str]:
        """Take the lines waiting now (right after `follow`: the tail)."""
        queue = self._follower.queue
        return [queue.get_nowait() for _ in range(queue.qsize())]

    def close(self) -> None:
        """Stop following (idempotent)."""
        if self._followers is not None:
            self._followers.remove(self._follower)
            self._followers = None


@dataclass(eq=False)
class _Service:
    """What the supervisor knows of one service while it keeps it."""

    spec: ServiceSpec
    account: _Account
    env: dict[str, str]
    file: RotatingFile
    tail: Tail = field(default_factory=lambda: Tail(_TAIL_LINES))
    state: str = "starting"
    reason: str | None = None
    process: asyncio.subprocess.Process | None = None
    started_at: float | None = None
    restarts: int = 0
    failures: int = 0          # in a row
    last_exit: int | None = None
    health: str | None = None  # None (no check), "starting", "passing", "failing"
    health_fails: int = 0
    limits: Limits = NO_LIMITS
    next_start_at: float | None = None
    waiting_for: tuple[str, ...] = ()
    log_failed: bool = False
    source: str = "config"     # "config" (the file's) or "desired" (the registry's)
    retired: bool = False      # being stopped for good: removed or replaced
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # a restart request
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)    # starts and stops, one at a time
    log_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    followers: list[_Follower] = field(default_factory=list)


class Supervisor:
    """Run `specs` as child processes until closed, with their state under `data_dir`.

    `run()` keeps them until `close()` (call it even after cancelling `run()`:
    closing is what stops the children). A snapshot row holds: name, state
    ("starting", "running", "unhealthy", "crash-looping", "stopped", "failed"),
    reason (why that state, in words, or None), pid, restarts, last_exit (the
    exit status; negative: the signal), uptime (seconds), health (None without
    a check, else "starting", "passing", "failing"), waiting_for (dependencies
    not yet healthy), next_start_in (seconds, while backing off), limits
    ("cgroup", "rlimit", "none"), limits_applied, limits_missing, log_tail.
    """

    def __init__(
        self,
        specs: Mapping[str, ServiceSpec],
        data_dir: Path,
        *,
        env_extra: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_dependencies(specs, "<services>")
        self._dir = Path(data_dir) / "services"
        self._clock = clock
        self._env_extra = dict(env_extra)
        self._fixed = dict(specs)
        self._levels = _levels(specs)
        self._services: dict[str, _Service] = {}
        for level in self._levels:
            for name in level:
                self._services[name] = self._service(specs[name], _account(specs[name]),
                                                     "config")
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._apply_lock = asyncio.Lock()
        self._boot = ""
        self._cgroups: Path | None = None
        self._records: dict[str, procs.Identity] = {}
        self._save_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing = False
        self._close_done = asyncio.Event()
        self._started = False

    # ---- what status, `edge services` and `edge logs` show ---------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per service, in start order."""
        now = self._clock()
        return [self._row(service, now) for service in self._services.values()]

    def _service(self, spec: ServiceSpec, account: _Account, source: str) -> _Service:
        env = {**_environment(spec, account, self._env_extra), _MARK: str(self._dir)}
        return _Service(
            spec=spec, account=account, env=env, source=source,
            file=RotatingFile(self._dir / spec.name, spec.log_max_bytes, spec.log_keep),
        )

    def _row(self, service: _Service, now: float) -> dict[str, Any]:
        running = service.process is not None and service.process.returncode is None
        return {
            "name": service.spec.name,
            "source": service.source,
            "state": service.state,
            "reason": service.reason,
            "pid": service.process.pid if running and service.process else None,
            "restarts": service.restarts,
            "last_exit": service.last_exit,
            "uptime": (now - service.started_at
                       if running and service.started_at is not None else None),
            "health": service.health,
            "waiting_for": list(service.waiting_for),
            "next_start_in": (max(0.0, service.next_start_at - now)
                              if service.next_start_at is not None else None),
            "limits": service.limits.mode,
            "limits_applied": list(service.limits.applied),
            "limits_missing": list(service.limits.missing),
            "log_tail": service.tail.lines(_SNAPSHOT_TAIL),
        }

    def logs(self, name: str, lines: int) -> list[str]:
        """The last `lines` lines of the service's output (up to 200 are kept in memory)."""
        return self._get(name).tail.lines(lines)

    def follow(self, name: str, lines: int = 10) -> LogFeed:
        """The last `lines` lines, then each new line as it comes, until the feed is closed.

        The reader is registered before this returns: no line falls between the tail
        and the feed.
        """
        service = self._get(name)
        follower = _Follower()
        for line in service.tail.lines(lines):
            follower.put(line)
        service.followers.append(follower)
        return LogFeed(follower, service.followers)

    def log_path(self, name: str) -> Path:
        """The service's current log file (`output.log`, rotated to `output.log.1` ...)."""
        return self._get(name).file.path

    def _get(self, name: str) -> _Service:
        try:
            return self._services[name]
        except KeyError:
            known = ", ".join(self._services) or "none"
            raise ServiceError(f"no service {name!r} (configured: {known})") from None

    # ---- lifetime ----------------------------------------------------------------

    async def run(self) -> None:
        """End leftovers of an earlier agent, then keep every service running until closed."""
        if self._started:
            raise RuntimeError("Supervisor.run() was already called")
        self._started = True
        leftovers = await asyncio.to_thread(self._prepare)
        await asyncio.gather(*(self._end_leftover(name, identity)
                               for name, identity in leftovers.items()))
        await self._end_unrecorded()
        await self._save()
        async with asyncio.TaskGroup() as group:
            self._group = group
            for service in self._services.values():
                self._start_keeping(service)
            await self._closed.wait()  # with no services at all, too: run() lasts until close()
        self._group = None

    def _start_keeping(self, service: _Service) -> None:
        assert self._group is not None
        name = service.spec.name
        self._tasks[name] = self._group.create_task(self._keep(service), name=f"service {name}")

    # ---- desired-state services ---------------------------------------------------

    async def apply(self, wanted: Mapping[str, ServiceSpec]) -> dict[str, tuple[str, str | None]]:
        """Make the desired-state services be `wanted`; the config file's stay as they are.

        Returns, per service touched, ("applied" | "failed" | "removed", reason).
        Before `run()` it only records them; `run()` starts them.
        """
        async with self._apply_lock:
            if self._closing:
                raise ServiceError("the supervisor is closing")
            refused: dict[str, str] = {}
            accounts: dict[str, _Account] = {}
            for name, spec in wanted.items():
                if name in self._fixed:
                    continue
                try:
                    accounts[name] = _account(spec)
                except ServiceError as exc:
                    refused[name] = str(exc)
            current = {name: service.spec for name, service in self._services.items()
                       if service.source == "desired"}
            plan = plan_services(self._fixed, current, wanted, refused)
            going = set(plan.remove) | set(plan.replace)
            for level in reversed(self._levels):  # dependants first
                await asyncio.gather(*(self._retire(self._services[name],
                                                    replaced=name in plan.replace)
                                       for name in level if name in going))
            for name, spec in {**plan.start, **plan.replace}.items():
                if self._closing:
                    break
                service = self._service(spec, accounts[name], "desired")
                self._services[name] = service
                if self._group is not None:
                    self._start_keeping(service)
            # The config file's services, then the desired ones in the document's order.
            order = [*self._fixed, *(name for name in wanted if name not in self._fixed),
                     *self._services]
            self._services = {name: self._services[name]
                              for name in dict.fromkeys(order) if name in self._services}
            self._levels = _levels({name: service.spec
                                    for name, service in self._services.items()})
            self._notify()
            results: dict[str, tuple[str, str | None]] = {}
            for name in wanted:
                if name in plan.failed:
                    kept = " (the version that ran before goes on)" if name in plan.kept else ""
                    results[name] = ("failed", plan.failed[name] + kept)
                else:
                    results[name] = ("applied", None)
            for name in plan.remove:
                results.setdefault(name, ("removed", None))
            for name in plan.start:
                log.info("service %s: added by the desired state", name)
            for name in plan.replace:
                log.info("service %s: changed by the desired state", name)
            return results

    async def _retire(self, service: _Service, *, replaced: bool = False) -> None:
        """Stop a desired-state service for good and forget it (`replaced`: a new
        version of it starts next)."""
        name = service.spec.name
        service.retired = True
        service.wake.set()
        self._notify()  # one waiting for its dependencies stops waiting
        await self._stop_service(service)
        task = self._tasks.pop(name, None)
        if task is not None:
            await asyncio.wait({task})
        what = ("stopped: the desired state changed it, the new version starts now" if replaced
                else "removed by the desired state")
        await self._note(service, what)
        if self._services.get(name) is service:
            del self._services[name]
        self._records.pop(name, None)
        if self._started:
            await self._save()
        if not replaced:
            log.info("service %s: removed by the desired state", name)

    async def close(self) -> None:
        """Stop every service, dependants before what they depend on (idempotent)."""
        if self._closing:
            await self._close_done.wait()
            return
        self._closing = True
        self._closed.set()
        self._notify()
        try:
            async with self._apply_lock:  # an apply under way starts nothing more; wait for it
                pass
            for level in reversed(self._levels):
                await asyncio.gather(*(self._stop_service(self._services[name])
                                       for name in level))
            if self._started:
                self._records.clear()
                await self._save()
        finally:
            for service in self._services.values():
                _resolve(service)
            self._close_done.set()

    async def restart(self, name: str) -> None:
        """Stop the service if it runs and start it again now; returns once it was started."""
        service = self._get(name)
        if not self._started or self._closing:
            raise ServiceError(f"service {name}: the supervisor is not running")
        waiter = asyncio.get_running_loop().create_future()
        service.waiters.append(waiter)
        service.wake.set()
        await waiter

    def _prepare(self) -> dict[str, procs.Identity]:
        """Read what an earlier agent left (blocks: run in a thread)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._boot = procs.boot_id()
        if any(service.spec.has_limits for service in self._services.values()):
            self._cgroups = limits.delegated_cgroup()
        for service in self._services.values():
            earlier = service.file.read_tail()
            service.tail.feed(earlier if earlier.endswith(b"\n") or not earlier
                              else earlier + b"\n")
            if service.spec.has_limits:
                service.limits = Limits(mode="cgroup" if self._cgroups else "rlimit")
        records = procs.load_records(self._dir / "state.json")
        return {name: identity for name, identity in records.items()
                if identity.boot == self._boot}  # after a reboot, every one of them is gone

    async def _end_leftover(self, name: str, identity: procs.Identity) -> None:
        session = await asyncio.to_thread(_leftover_session, identity, self._boot)
        if session is None:
            return
        service = self._services.get(name)
        timeout = service.spec.stop_timeout if service else _LEFTOVER_TIMEOUT
        log.warning("service %s: ending pid %d and its process group, left running by an"
                    " earlier agent", name, session)
        await self._end_session(session, timeout, NO_LIMITS, None)

    async def _end_unrecorded(self) -> None:
        """End what our services started that state.json does not know of.

        An agent killed between a spawn and its record, or a child that left its
        session, is found by the mark in its environment instead.
        """
        sessions = await asyncio.to_thread(_marked_sessions, str(self._dir))
        for session in sessions:
            log.warning("process group %d was started by an earlier agent's service (its"
                        " environment says %s) and is not recorded: ending it", session, _MARK)
        await asyncio.gather(*(self._end_session(session, _LEFTOVER_TIMEOUT, NO_LIMITS, None)
                               for session in sessions))

    # ---- one service ------------------------------------------------------------------

    async def _keep(self, service: _Service) -> None:
        """Start, watch and restart one service until the supervisor closes."""
        backoff = _backoff(service.spec)
        try:
            while not self._closing and not service.retired:
                try:
                    if not await self._cycle(service, backoff):
                        break
                except Exception as exc:
                    # A bug or a surprise from the OS must not end the other services,
                    # nor this one for good: say so, and try again at the slowest pace.
                    log.exception("service %s: supervising it failed", service.spec.name)
                    await self._recover(service, exc)
        finally:
            _resolve(service)

    async def _cycle(self, service: _Service, backoff: Backoff) -> bool:
        """Run the service once and wait until it is due again; False once closing."""
        spec = service.spec
        if not await self._wait_for_dependencies(service):
            return False
        outcome = await self._run_once(service)
        if self._closing or service.retired or outcome.kind == "closed":
            return False
        if outcome.kind == "restart":
            backoff.reset()
            service.failures = 0
            service.restarts += 1
            return True
        failed = outcome.kind != "exited" or outcome.code != 0
        if outcome.ran >= spec.backoff_max:  # a stable run: start the schedule again
            backoff.reset()
            service.failures = 0
        service.failures += failed
        if not (spec.restart == "always" or (spec.restart == "on-failure" and failed)):
            self._set_state(service, "failed" if failed else "stopped", outcome.reason)
            await self._either(service.wake, None)
            backoff.reset()
            service.failures = 0
        else:
            delay = backoff.next()
            looping = service.failures >= _CRASH_LOOP
            service.next_start_at = self._clock() + delay
            self._set_state(service, "crash-looping" if looping else "starting",
                            f"{outcome.reason}; starting again in {delay:.3g}s")
            await self._note(service, f"starting again in {delay:.3g}s")
            await self._either(service.wake, delay)
            service.next_start_at = None
        if not self._closing:
            service.restarts += 1
        return True

    async def _recover(self, service: _Service, exc: Exception) -> None:
        """After a failure of our own: end what may still run, wait `backoff_max`."""
        with contextlib.suppress(Exception):
            async with service.lock:
                await self._stop(service)  # never two of it, even after a bug
        service.process = None
        service.started_at = None
        self._set_state(service, "failed", f"supervisor error: {exc!r}; trying again in"
                        f" {service.spec.backoff_max:g}s")
        await self._either(service.wake, service.spec.backoff_max)
        if not self._closing:
            service.restarts += 1

    async def _wait_for_dependencies(self, service: _Service) -> bool:
        """Wait until every dependency is healthy; False when the supervisor closes first."""
        while not self._closing and not service.retired:
            missing = tuple(name for name in service.spec.depends_on
                            if name not in self._services
                            or self._services[name].state != "running")
            service.waiting_for = missing
            if not missing:
                return True
            self._set_state(service, "starting", f"waiting for {', '.join(missing)} to be healthy")
            _resolve(service)  # a restart request is taken: it waits like any start
            await self._either(self._changed, None)
        return False

    async def _run_once(self, service: _Service) -> _Outcome:
        """Start the service, watch it until it ends, and clean up after it."""
        spec = service.spec
        async with service.lock:
            if self._closing or service.retired:
                return _Outcome("closed")
            service.wake.clear()
            process, output, reason = await self._spawn(service)
            _resolve(service)
            if process is None or output is None:
                await self._note(service, reason)
                return _Outcome("unstartable", reason=reason)
        started = self._clock()
        pipe = os.fdopen(output, "rb", buffering=0)
        pump = asyncio.create_task(self._pump(service, pipe), name=f"log {spec.name}")
        try:
            identity = await asyncio.to_thread(procs.identify, process.pid, self._boot)
            if identity is not None and process.returncode is None and not self._closing:
                self._records[spec.name] = identity
                await self._save()
            kind, reason = await self._watch(service, process)
            async with service.lock:
                if not self._closing:
                    # A stop for health or restart, or stragglers of a main process that exited.
                    await self._stop(service)
            await asyncio.wait({pump}, timeout=_PUMP_GRACE)
        finally:
            pump.cancel()
            await asyncio.wait({pump})
            pipe.close()  # when the pump was cancelled before it took the pipe over
        code = process.returncode
        service.last_exit = code
        service.process = None
        service.started_at = None
        service.health = None
        self._records.pop(spec.name, None)
        await self._save()
        await asyncio.to_thread(limits.remove, service.limits)
        if self._closing or service.retired:
            return _Outcome("closed", code)
        if kind == "exited":
            reason = _describe_exit(code)
        await self._note(service, f"{reason} (pid {process.pid})")
        return _Outcome(kind, code, self._clock() - started, reason)

    async def _spawn(self, service: _Service) -> tuple[
            asyncio.subprocess.Process | None, int | None, str]:
        """Start the process; return it and the read end of its output pipe, or why not."""
        spec = service.spec
        # A pipe of our own, not asyncio's: Process.wait() waits for asyncio's pipes to
        # close too, and a straggler the service left behind may hold them open forever.
        output, output_write = os.pipe()
        try:
            chosen = await asyncio.to_thread(limits.prepare, spec, self._cgroups)
            placement = await asyncio.to_thread(Placement, chosen)
            try:
                process = await asyncio.create_subprocess_exec(
                    *spec.command, stdin=subprocess.DEVNULL, stdout=output_write,
                    stderr=output_write, env=service.env, cwd=spec.working_dir or "/",
                    start_new_session=True, preexec_fn=placement.preexec(),
                    **service.account.popen(),
                )
            finally:
                placement.close()
                os.close(output_write)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            os.close(output)
            reason = f"cannot start {spec.command[0]}: {exc}"
            log.warning("service %s: %s", spec.name, reason)
            service.last_exit = None
            return None, None, reason
        except BaseException:  # cancelled: no child, and no pipe left open
            os.close(output)
            raise
        service.process = process
        service.limits = chosen
        service.started_at = self._clock()
        service.health = None if spec.health is None else "starting"
        service.health_fails = 0
        service.waiting_for = ()
        self._set_state(service, "starting" if spec.health else "running", None)
        await self._note(service, f"started pid {process.pid}: {' '.join(spec.command)}")
        return process, output, ""

    async def _watch(self, service: _Service, process: asyncio.subprocess.Process) -> tuple[
            str, str]:
        """Wait for the first of: the process exits, its health fails, a restart is asked."""
        watchers = {
            asyncio.create_task(process.wait()): "exited",
            asyncio.create_task(self._health_loop(service)): "unhealthy",
            asyncio.create_task(service.wake.wait()): "restart",
        }
        try:
            done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        kinds = {watchers[task] for task in done}
        for task in done:
            if watchers[task] == "unhealthy" and task.exception() is not None:
                error = task.exception()
                log.error("service %s: the health check failed unexpectedly",
                          service.spec.name, exc_info=error)
                return "unhealthy", f"unhealthy: the health check failed: {error!r}"
        for kind in ("exited", "unhealthy", "restart"):
            if kind in kinds:
                return kind, {"unhealthy": f"unhealthy: {service.reason}",
                              "restart": "restarted on request"}.get(kind, "")
        raise AssertionError("asyncio.wait returned no finished task")

    async def _health_loop(self, service: _Service) -> None:
        """Check until `retries` checks in a row fail, then return (the service must go)."""
        spec = service.spec.health
        if spec is None:
            await asyncio.Event().wait()
            return
        started = self._clock()
        passed = False  # a first passing check ends the start period early
        await asyncio.sleep(min(spec.interval, _FIRST_CHECK_MAX))
        while True:
            failure = await health.check(spec, service.env, service.spec.working_dir,
                                         service.account.popen())
            if failure is None:
                passed = True
                service.health, service.health_fails = "passing", 0
                self._set_state(service, "running", None)
            elif passed or self._clock() - started >= spec.start_period:
                service.health_fails += 1
                service.health = "failing"
                self._set_state(service, "unhealthy",
                                f"{failure} ({service.health_fails} of {spec.retries} in a row)")
                if service.health_fails >= spec.retries:
                    return
            await asyncio.sleep(spec.interval)

    async def _stop_service(self, service: _Service) -> None:
        async with service.lock:
            await self._stop(service)
            self._set_state(service, "stopped", "stopped by the agent")

    async def _stop(self, service: _Service) -> None:
        """End the running service's whole session (the lock is held), and what left it."""
        process = service.process
        if process is None:
            return
        if process.returncode is None:
            log.info("service %s: stopping pid %d", service.spec.name, process.pid)
        await self._end_session(process.pid, service.spec.stop_timeout, service.limits, process)
        await self._end_strays(service)

    async def _end_strays(self, service: _Service) -> None:
        """End processes of the service that left its session (setsid, a daemon's fork).

        They still carry the service's mark and name in their environment.
        """
        name = service.spec.name
        sessions = await asyncio.to_thread(_marked_sessions, str(self._dir),
                                           f"EDGE_SERVICE={name}")
        for session in sessions:
            log.warning("service %s: process group %d left the service's session but carries"
                        " its environment: ending it too", name, session)
        await asyncio.gather(*(self._end_session(session, service.spec.stop_timeout,
                                                 NO_LIMITS, None) for session in sessions))

    async def _end_session(self, session: int, timeout: float, chosen: Limits,
                           leader: asyncio.subprocess.Process | None) -> None:
        """SIGTERM the session; SIGKILL what is left after `timeout`; wait until it is empty."""
        await asyncio.to_thread(procs.signal_session, session, signal.SIGTERM)
        if await self._session_gone(session, leader, timeout):
            return
        log.warning("process group %d still running %gs after SIGTERM: sending SIGKILL",
                    session, timeout)
        await asyncio.to_thread(_kill, session, chosen)
        if not await self._session_gone(session, leader, _KILL_WAIT):
            log.error("process group %d survived SIGKILL for %gs", session, _KILL_WAIT)

    async def _session_gone(self, session: int, leader: asyncio.subprocess.Process | None,
                            timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if leader is not None:
            try:
                await asyncio.wait_for(leader.wait(), timeout)
            except TimeoutError:
                return False
        while await asyncio.to_thread(procs.session_members, session):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL)
        return True

    # ---- output ------------------------------------------------------------------------

    async def _pump(self, service: _Service, pipe: BinaryIO) -> None:
        """Copy the child's output into its log until the pipe closes (or this is cancelled)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
        try:
            while chunk := await reader.read(_READ):
                await self._log(service, chunk)
        finally:
            transport.close()

    async def _note(self, service: _Service, text: str) -> None:
        """A line of the supervisor's own in the service's log."""
        await self._log(service, f"[edge] {text}\n".encode())

    async def _log(self, service: _Service, data: bytes) -> None:
        for line in service.tail.feed(data):
            for follower in service.followers:
                follower.put(line)
        async with service.log_lock:  # one writer at a time: rotation keeps a count
            try:
                await asyncio.to_thread(service.file.write, data)
                service.log_failed = False
            except OSError as exc:
                if not service.log_failed:  # once per outage, not once per chunk
                    log.warning("service %s: cannot write %s: %s", service.spec.name,
                                service.file.path, exc)
                service.log_failed = True

    # ---- small parts ---------------------------------------------------------------

    def _set_state(self, service: _Service, state: str, reason: str | None) -> None:
        if self._closing and state != "stopped":
            return  # a late health result or exit must not undo the stop
        if state != service.state:
            log.info("service %s: %s%s", service.spec.name, state, f" ({reason})" if reason else "")
        service.state, service.reason = state, reason
        self._notify()

    def _notify(self) -> None:
        """Wake everyone waiting for a change of state."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _either(self, event: asyncio.Event, timeout: float | None) -> None:
        """Wait for `event`, the supervisor's close, or `timeout`, whichever comes first."""
        waits = [asyncio.create_task(event.wait()), asyncio.create_task(self._closed.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _save(self) -> None:
        records = dict(self._records)
        commands = {name: list(self._services[name].spec.command) for name in records
                    if name in self._services}
        async with self._save_lock:
            try:
                await asyncio.to_thread(procs.save_records, self._dir / "state.json",
                                        records, commands)
            except OSError as exc:
                log.warning("cannot record service pids in %s: %s", self._dir, exc)


def _resolve(service: _Service) -> None:
    """Answer the restart requests waiting on this service."""
    waiters, service.waiters = service.waiters, []
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _kill(session: int, chosen: Limits) -> None:
    procs.signal_session(session, signal.SIGKILL)
    limits.kill_cgroup(chosen)


def _leftover_session(identity: procs.Identity, boot: str) -> int | None:
    """The session to end for a recorded child, or None when it is not ours (blocks)."""
    current = procs.identify(identity.pid, boot)
    if current is not None:
        return identity.pid if current.starttime == identity.starttime else None
    # The main process is gone. Linux keeps its pid from reuse while any process of
    # its session lives, so members of that session are our service's own.
    return identity.pid if procs.session_members(identity.pid) else None


def _marked_sessions(directory: str, *also: str) -> set[int]:
    """Sessions holding a process with our mark (and `also`), but not our own (blocks)."""
    own = procs.session_of(os.getpid())
    sessions = {procs.session_of(pid) for pid in procs.marked(_MARK, directory, *also)}
    return {session for session in sessions if session is not None and session != own}


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with {code}"


def _backoff(spec: ServiceSpec) -> Backoff:
    jitter = spec.backoff_jitter
    # Backoff spreads a delay over [ceiling/2, ceiling] as rand() goes from 0 to 1;
    # this rand makes it ceiling * (1 - jitter * u): cut by up to `jitter`, as configured.
    return Backoff(spec.backoff_initial, spec.backoff_max,
                   rand=lambda: 1 - 2 * jitter * random.random())


def _levels(specs: Mapping[str, ServiceSpec]) -> list[list[str]]:
    """Services by depth: those with no dependency first, then those that need only them..."""
    depth: dict[str, int] = {}

    def measure(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((measure(d) for d in specs[name].depends_on), default=-1)
        return depth[name]

    for name in specs:
        measure(name)
    return [[name for name in specs if depth[name] == level]
            for level in range(max(depth.values(), default=-1) + 1)]


def _account(spec: ServiceSpec) -> _Account:
    """Resolve `user`/`group`; refuse them when the agent cannot switch to them."""
    if spec.user is None and spec.group is None:
        uid = os.geteuid()
        try:
            entry = pwd.getpwuid(uid)
            return _Account(name=entry.pw_name, home=entry.pw_dir)
        except KeyError:
            return _Account(name=str(uid), home="/")
    where = f"[services.{spec.name}] {'user' if spec.user else 'group'}"
    if os.geteuid() != 0:
        raise ServiceError(f"{where}: the agent runs as uid {os.geteuid()}, not root, so it"
                           " cannot switch users; remove user/group or run the agent as root")
    try:
        entry = (pwd.getpwuid(int(spec.user)) if spec.user and spec.user.isdigit()
                 else pwd.getpwnam(spec.user or "root"))
    except KeyError:
        raise ServiceError(f"[services.{spec.name}] user: no such user {spec.user!r}") from None
    gid = entry.pw_gid
    if spec.group is not None:
        try:
            gid = (int(spec.group) if spec.group.isdigit()
                   else grp.getgrnam(spec.group).gr_gid)
        except KeyError:
            raise ServiceError(
                f"[services.{spec.name}] group: no such group {spec.group!r}") from None
    extra = tuple(os.getgrouplist(entry.pw_name, gid)) if spec.user else None
    return _Account(name=entry.pw_name, home=entry.pw_dir, user=entry.pw_uid if spec.user
                    else None, group=gid, extra_groups=extra)


def _environment(spec: ServiceSpec, account: _Account, extra: Mapping[str, str]) -> dict[str, str]:
    """A small environment of its own, not the agent's: the service's, then the agent's."""
    env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": account.home, "USER": account.name,
           "LOGNAME": account.name, "EDGE_SERVICE": spec.name}
    env.update(spec.env)
    env.update(extra)
    return env
