"""Supervised services: `[services.NAME]` tables turned into validated, frozen specs.

A spec is only data: what to run, how to restart it, how to tell it is healthy
and what it may use. The supervisor (edge/supervisor.py) acts on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.errors import ConfigError, EdgeError
from edge.units import integer_in, parse_duration, parse_size
from edge.units import show as _show

__all__ = ["RESTART_POLICIES", "HealthSpec", "ServiceError", "ServiceSpec", "check_dependencies",
           "parse_services"]

RESTART_POLICIES = ("always", "on-failure", "never")

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ACCOUNT = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}|[0-9]+")
_MIN_LOG_BYTES = 1024


class ServiceError(EdgeError):
    """A service cannot be run as configured, or a request names no service."""


@dataclass(frozen=True)
class HealthSpec:
    """How to tell a running service is healthy: one of `exec`, `tcp` or `http`."""

    kind: str                          # "exec", "tcp" or "http"
    exec: tuple[str, ...] = ()         # argv, for "exec": exit 0 is healthy
    host: str = ""                     # for "tcp" and "http"
    port: int = 0
    path: str = "/"                    # for "http": GET, 2xx or 3xx is healthy
    interval: float = 10.0             # seconds between checks
    timeout: float = 5.0               # seconds one check may take
    retries: int = 3                   # failures in a row that restart the service
    start_period: float = 0.0          # seconds after a start in which failures do not count

    def __post_init__(self) -> None:
        if self.kind not in ("exec", "tcp", "http"):
            raise ValueError(f'kind: expected "exec", "tcp" or "http", got {_show(self.kind)}')
        if self.kind == "exec" and not _is_argv(self.exec):
            raise ValueError(f"exec: expected a non-empty argv list, got {_show(self.exec)}")
        if self.kind != "exec" and (not self.host or not 0 < self.port < 65536):
            raise ValueError(f"{self.kind}: expected a host and a port, got "
                             f"{_show(self.host)} and {self.port}")
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("interval, timeout: expected durations above 0s, got "
                             f"{self.interval:g}s and {self.timeout:g}s")
        if self.retries < 1:
            raise ValueError(f"retries: expected at least 1, got {self.retries}")

    def describe(self) -> str:
        """The check as a person reads it: `tcp 127.0.0.1:8080`."""
        if self.kind == "exec":
            return "exec " + " ".join(self.exec)
        if self.kind == "tcp":
            return f"tcp {self.host}:{self.port}"
        return f"http http://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True)
class ServiceSpec:
    """One `[services.NAME]` table: what to run and how to keep it running."""

    name: str
    command: tuple[str, ...]           # argv; never a shell string
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: Path | None = None
    user: str | None = None            # honoured only when the agent runs as root
    group: str | None = None
    restart: str = "on-failure"        # "always", "on-failure" or "never"
    backoff_initial: float = 1.0       # seconds before the first restart
    backoff_max: float = 60.0          # ... doubling up to this, forever
    backoff_jitter: float = 0.1        # each delay is cut by up to this fraction, at random
    stop_timeout: float = 10.0         # seconds from SIGTERM to SIGKILL (to the process group)
    depends_on: tuple[str, ...] = ()
    health: HealthSpec | None = None
    memory_max: int | None = None      # bytes
    cpu_max: float | None = None       # fraction of one CPU
    log_max_bytes: int = 1024 * 1024   # per log file
    log_keep: int = 3                  # rotated files kept besides the current one

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, bool, str, object], ...] = (
            ("name", bool(_NAME.fullmatch(self.name)),
             "a name of 1 to 64 characters A-Z a-z 0-9 _ -", self.name),
            ("command", _is_argv(self.command), "a non-empty argv list", list(self.command)),
            ("restart", self.restart in RESTART_POLICIES, _one_of(RESTART_POLICIES),
             self.restart),
            ("backoff_initial", 0 < self.backoff_initial <= self.backoff_max,
             "a duration above 0s, no longer than backoff_max", self.backoff_initial),
            ("backoff_jitter", 0 <= self.backoff_jitter <= 1, "a number from 0 to 1",
             self.backoff_jitter),
            ("stop_timeout", self.stop_timeout > 0, "a duration above 0s", self.stop_timeout),
            ("depends_on", self.name not in self.depends_on, "other services' names",
             list(self.depends_on)),
            ("memory_max", self.memory_max is None or self.memory_max > 0, "a size above 0",
             self.memory_max),
            ("cpu_max", self.cpu_max is None or self.cpu_max > 0, "a fraction of a CPU above 0",
             self.cpu_max),
            ("log_max_bytes", self.log_max_bytes >= _MIN_LOG_BYTES, "a size of at least 1KiB",
             self.log_max_bytes),
            ("log_keep", self.log_keep >= 0, "an integer of at least 0", self.log_keep),
        )
        for key, ok, expected, got in checks:
            if not ok:
                raise ValueError(f"{key}: expected {expected}, got {_show(got)}")

    @property
    def has_limits(self) -> bool:
        """Whether the spec asks for a memory or CPU limit."""
        return self.memory_max is not None or self.cpu_max is not None


def parse_services(
    table: dict[str, Any], source: str, *, check_depends: bool = True
) -> dict[str, ServiceSpec]:
    """Turn the `services` table of a config file into specs, in the file's order.

    `check_depends=False` leaves dependencies to the caller (a desired document's
    services may depend on those of the node's config file).

    Raises ConfigError naming the file, the service and the key:
    `config FILE: [services.NAME] KEY: expected ..., got ...`.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"config {source}: [services]: expected [services.NAME] tables, "
                          f"got {_show(table)}")
    specs: dict[str, ServiceSpec] = {}
    for name, body in table.items():
        where = f"config {source}: [services.{name}]"
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: expected a service name of 1 to 64 characters"
                              " A-Z a-z 0-9 _ -")
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a table, got {_show(body)}")
        specs[name] = _parse_one(name, body, where)
    if check_depends:
        check_dependencies(specs, source)
    return specs


# -- value parsers: raw TOML value -> spec value, or ValueError("expected ..., got ...") ----

Parser = Callable[[Any], Any]


def _one_of(options: tuple[str, ...]) -> str:
    return " or ".join(_show(option) for option in options)


def _is_argv(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(arg, str) and "\0" not in arg for arg in value)
        and bool(value[0])
    )


def _argv(value: Any) -> tuple[str, ...]:
    if not _is_argv(value):
        raise ValueError('expected an argv list like ["/usr/bin/app", "--flag"] (never a shell'
                         f" string), got {_show(value)}")
    return tuple(value)


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and _ENV_NAME.fullmatch(k) and isinstance(v, str) and "\0" not in v
        for k, v in value.items()
    ):
        raise ValueError(f'expected a table of strings like {{ LEVEL = "debug" }}, got '
                         f"{_show(value)}")
    return dict(value)


def _directory(value: Any) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError(f"expected an absolute path, got {_show(value)}")
    return Path(value)


def _account(value: Any) -> str:
    if not isinstance(value, str) or not _ACCOUNT.fullmatch(value):
        raise ValueError(f"expected a user or group name (or number), got {_show(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Parser:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected {_one_of(options)}, got {_show(value)}")
        return str(value)

    return parse


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above 0s, got {_show(value)}")
    return seconds


def _fraction(low: float, high: float, expected: str) -> Parser:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            low <= value <= high
        ):
            raise ValueError(f"expected {expected}, got {_show(value)}")
        return float(value)

    return parse


def _size(low: int, expected: str) -> Parser:
    def parse(value: Any) -> int:
        size = parse_size(value)
        if size < low:
            raise ValueError(f"expected {expected}, got {_show(value)}")
        return size

    return parse


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(name, str) and _NAME.fullmatch(name) for name in value
    ):
        raise ValueError(f'expected a list of service names like ["broker"], got {_show(value)}')
    return tuple(dict.fromkeys(value))


def _host_port(value: Any) -> tuple[str, int]:
    expected = f'expected "host:port" like "127.0.0.1:8080", got {_show(value)}'
    if not isinstance(value, str):
        raise ValueError(expected)
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]:80"
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(
        c.isspace() for c in host
    ):
        raise ValueError(expected)
    return host, int(port)


def _http_url(value: Any) -> tuple[str, int, str]:
    expected = f'expected a URL like "http://127.0.0.1:8080/healthz", got {_show(value)}'
    if not isinstance(value, str) or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(expected)
    try:
        parts = urlsplit(value)
        port = parts.port or 80
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme != "http" or not parts.hostname or parts.username is not None:
        raise ValueError(expected + " (only http:// is supported)" if parts.scheme == "https"
                         else expected)
    path = parts.path or "/"
    return parts.hostname, port, path + (f"?{parts.query}" if parts.query else "")


_KEYS: dict[str, Parser] = {
    "command": _argv,
    "env": _env,
    "working_dir": _directory,
    "user": _account,
    "group": _account,
    "restart": _choice(RESTART_POLICIES),
    "backoff_initial": _positive_duration,
    "backoff_max": _positive_duration,
    "backoff_jitter": _fraction(0, 1, "a number from 0 to 1"),
    "stop_timeout": _positive_duration,
    "depends_on": _names,
    "memory_max": _size(1024 * 1024, 'a size of at least 1MiB like "256MiB"'),
    "cpu_max": _fraction(0.01, 1024, "a fraction of one CPU like 0.5 (from 0.01)"),
    "log_max_bytes": _size(_MIN_LOG_BYTES, 'a size of at least 1KiB like "1MiB"'),
    "log_keep": integer_in(0, 100),
}

_HEALTH_KEYS: dict[str, Parser] = {
    "exec": _argv,
    "tcp": _host_port,
    "http": _http_url,
    "interval": _positive_duration,
    "timeout": _positive_duration,
    "retries": integer_in(1, 1000),
    "start_period": parse_duration,
}


def _parse_keys(body: dict[str, Any], parsers: dict[str, Parser], where: str,
                skip: tuple[str, ...] = ()) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in body.items():
        if key in skip:
            continue
        parse = parsers.get(key)
        if parse is None:
            known = ", ".join(sorted([*parsers, *skip]))
            raise ConfigError(f"{where} {key}: unknown key (known: {known})")
        try:
            values[key] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{where} {key}: {exc}") from exc
    return values


def _parse_one(name: str, body: dict[str, Any], where: str) -> ServiceSpec:
    values = _parse_keys(body, _KEYS, where, skip=("health",))
    if "command" not in values:
        raise ConfigError(f'{where} command: missing; expected an argv list like '
                          f'["/usr/bin/app", "--flag"]')
    if "health" in body:
        values["health"] = _parse_health(body["health"], f"{where[:-1]}.health]")
    initial = values.get("backoff_initial", ServiceSpec.backoff_initial)
    ceiling = values.get("backoff_max", ServiceSpec.backoff_max)
    if initial > ceiling:
        raise ConfigError(f"{where} backoff_initial: expected a duration no longer than"
                          f" backoff_max ({ceiling:g}s), got {_show(body.get('backoff_initial'))}"
                          if "backoff_initial" in body else
                          f"{where} backoff_max: expected a duration no shorter than"
                          f" backoff_initial (1s, the default), got {_show(body['backoff_max'])}")
    if name in values.get("depends_on", ()):
        raise ConfigError(f"{where} depends_on: a service cannot depend on itself, got "
                          f"{_show(body['depends_on'])}")
    try:
        return ServiceSpec(name=name, **values)
    except ValueError as exc:  # a check only the whole spec can make
        raise ConfigError(f"{where} {exc}") from exc


def _parse_health(body: Any, where: str) -> HealthSpec:
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: expected a table, got {_show(body)}")
    values = _parse_keys(body, _HEALTH_KEYS, where)
    kinds = [kind for kind in ("exec", "tcp", "http") if kind in values]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: expected exactly one of exec, tcp, http, got "
                          f"{', '.join(kinds) or 'none'}")
    kind = kinds[0]
    target = values.pop(kind)
    if kind == "exec":
        values["exec"] = target
    elif kind == "tcp":
        values["host"], values["port"] = target
    else:
        values["host"], values["port"], values["path"] = target
    return HealthSpec(kind=kind, **values)


def check_dependencies(specs: Mapping[str, ServiceSpec], source: str) -> None:
    """Raise ConfigError for a dependency on a service that is not there, or a cycle."""
    for spec in specs.values():
        for dependency in spec.depends_on:
            if dependency not in specs:
                raise ConfigError(
                    f"config {source}: [services.{spec.name}] depends_on: expected names of"
                    f" configured services, got {_show(dependency)} (there is no"
                    f" [services.{dependency}])"
                )
    done: set[str] = set()
    for name in specs:
        path: list[str] = []
        _visit(name, specs, path, done, source)


def _visit(name: str, specs: Mapping[str, ServiceSpec], path: list[str], done: set[str],
           source: str) -> None:
    if name in done:
        return
    if name in path:
        cycle = " -> ".join([*path[path.index(name):], name])
        raise ConfigError(f"config {source}: [services.{name}] depends_on: expected no cycle,"
                          f" got {cycle}")
    path.append(name)
    for dependency in specs[name].depends_on:
        _visit(dependency, specs, path, done, source)
    path.pop()
    done.add(name)
