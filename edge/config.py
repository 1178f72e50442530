"""Load Settings from a TOML file and command-line flags, naming the key in every error."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from edge.errors import ConfigError
from edge.nodeid import default_node_id, validate_node_id
from edge.profiles import check_profile_name
from edge.services import parse_services
from edge.settings import (
    ApiSettings,
    DiscoverySettings,
    FleetSettings,
    LocalSettings,
    NodeSettings,
    QueueSettings,
    Settings,
    StateSettings,
    TelemetrySettings,
    UplinkSettings,
)
from edge.topics import filters_overlap
from edge.units import integer_in, parse_duration, parse_size
from edge.units import show as _show

__all__ = [
    "DEFAULT_CONFIG",
    "default_data_dir",
    "default_socket_path",
    "is_topic_filter",
    "load_settings",
    "parse_mqtt_url",
]

DEFAULT_CONFIG = Path("/etc/edge/agent.toml")

log = logging.getLogger("edge.config")

T = TypeVar("T")
# A parser takes a raw TOML value and returns the settings value, or raises
# ValueError("expected ..., got ..."); the loader adds the file and key.
# Any, because the table below, not the type checker, pairs a parser with its
# field: each returns the type of the dataclass field it is named after.
Parser = Callable[[Any], Any]
Values = dict[str, dict[str, Any]]

_MQTT_PORT = 1883
_MQTTS_PORT = 8883
_CONFIG_MAX_BYTES = 1024 * 1024  # a config file is read whole: bounded before parsing
# tomllib keeps every prefix of a dotted key: memory grows as the square of its parts
# (10,000 parts in 20 KB took 400 MB). Refused before parsing; the pattern is linear
# (possessive, and a part starts only where no part character is before it).
_DOTTED_PARTS_MAX = 32
_KEY_PART = r"""(?>[A-Za-z0-9_-]++|"[^"\n]*+"|'[^'\n]*+')"""
_LONG_DOTTED_KEY = re.compile(
    rf"""(?<![A-Za-z0-9_"'-]){_KEY_PART}(?:[ \t]*+\.[ \t]*+{_KEY_PART}){{{_DOTTED_PARTS_MAX}}}""")
_PROFILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Whitespace and C0/C1 controls: urlsplit keeps some (a trailing space becomes
# part of the host name) and silently drops others (tab, newline).
_URL_JUNK = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
# The same controls, and the two Unicode non-characters, make a topic that
# brokers refuse or mangle.
_TOPIC_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffe\uffff]")
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
_SOCKET_PATH_MAX = 107
_MIN_LINE_BYTES = 4096
# The longest request line: a binary payload grows by a third in base64, and the
# JSON around it (topic, ct, escapes) fits in 64 KiB.
_LINE_OVERHEAD = 64 * 1024


def parse_mqtt_url(url: str) -> tuple[str, str, int]:
    """Split "mqtt://host[:port]" or "mqtts://host[:port]" into (scheme, host, port)."""
    expected = f"expected mqtt://host[:port] or mqtts://host[:port], got {_show(url)}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number from 0 to 65535
        raise ValueError(expected) from None
    if (
        _URL_JUNK.search(url)
        or parts.scheme not in ("mqtt", "mqtts")
        or not parts.hostname
        or parts.netloc.endswith(":")  # "host:" with the port left out
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or port == 0
    ):
        raise ValueError(expected)
    default_port = _MQTTS_PORT if parts.scheme == "mqtts" else _MQTT_PORT
    return parts.scheme, parts.hostname, port or default_port


def default_data_dir() -> Path:
    """Return /var/lib/edge for root, else $XDG_STATE_HOME/edge (~/.local/state/edge)."""
    if os.geteuid() == 0:
        return Path("/var/lib/edge")
    state = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says to ignore a relative path.
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "edge"


def default_socket_path() -> Path:
    """Return /run/edge/agent.sock for root, else $XDG_RUNTIME_DIR/edge/agent.sock."""
    if os.geteuid() == 0:
        return Path("/run/edge/agent.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return Path(runtime) / "edge" / "agent.sock"
    return Path(f"/tmp/edge-{os.getuid()}/agent.sock")


def load_settings(
    path: Path | None,
    *,
    uplink: str | None = None,
    data_dir: str | Path | None = None,
    node_id: str | None = None,
    must_exist: bool = False,
) -> Settings:
    """Return Settings from the file at `path` (None: defaults), overridden by the flags."""
    document, source = _read(path, must_exist)
    values = _parse_document(document, source)
    flags = (
        ("--uplink", "uplink", "url", uplink),
        # A flag's relative path is taken from where the command runs.
        ("--data-dir", "node", "data_dir",
         None if data_dir is None else os.path.abspath(data_dir) if data_dir else ""),
        ("--node-id", "node", "id", node_id),
    )
    for flag, section, key, value in flags:
        if value is not None:
            try:
                values.setdefault(section, {})[key] = _SECTIONS[section][key](value)
            except ValueError as exc:
                raise ConfigError(f"{flag}: {exc}") from exc
    _check_together(values, document, source)
    settings = _build(values, source)
    _check_brokers(settings, source)
    return settings


def _broker_of(url: str) -> tuple[str, int]:
    """(host, port) of a broker URL, with every spelling of this machine as one host."""
    _, host, port = parse_mqtt_url(url)
    host = host.lower().strip("[]").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback", port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.inet_aton(host))  # 127.1 and the like
        except OSError:
            return host, port
    mapped = getattr(address, "ipv4_mapped", None)
    if address.is_loopback or (mapped is not None and mapped.is_loopback):
        return "loopback", port
    return str(mapped or address), port


def _check_brokers(settings: Settings, source: str) -> None:
    """Refuse one broker as both the local bus and the uplink: the agent would forward
    its own cloud traffic back up, nesting topics without end."""
    local, cloud = settings.local.url, settings.uplink.url
    if local and cloud and _broker_of(local) == _broker_of(cloud):
        raise ConfigError(
            f"config {source}: [local] url: {local!r} is the same broker as [uplink] url"
            f" {cloud!r}; the local bus must be the device's own broker (or set"
            ' [local] url = "" for none)'
        )


# -- value parsers -----------------------------------------------------------


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"expected a path, got {_show(value)}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        # Relative to what? The agent's working directory is / under systemd.
        raise ValueError(f"expected an absolute path (from /), got {_show(value)}")
    return path


def _optional_path(value: Any) -> Path | None:
    return None if value == "" else _path(value)


def _paths(value: Any) -> tuple[Path, ...]:
    if not isinstance(value, list) or len(value) > 16:
        raise ValueError(f"expected a list of at most 16 paths, got {_show(value)}")
    return tuple(_path(item) for item in value)


def _group(value: Any) -> str:
    text = _text(value)
    if text and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}", text):
        raise ValueError(f"expected a group name or number, got {_show(value)}")
    return text


def _socket_path(value: Any) -> Path:
    path = _path(value)
    length = len(os.fsencode(path))
    if length > _SOCKET_PATH_MAX:
        raise ValueError(
            f"expected a socket path of at most {_SOCKET_PATH_MAX} bytes (the AF_UNIX limit),"
            f" got {_show(value)} ({length} bytes)"
        )
    return path


def _choice(*options: str) -> Parser:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            wanted = " or ".join(_show(option) for option in options)
            raise ValueError(f"expected {wanted}, got {_show(value)}")
        return value

    return parse


def _checked(parse: Callable[[Any], T], expected: str, ok: Callable[[T], bool]) -> Parser:
    """Parse with `parse`, then refuse a parsed value that `ok` rejects."""

    def parse_checked(value: Any) -> T:
        parsed = parse(value)
        if not ok(parsed):
            raise ValueError(f"expected {expected}, got {_show(value)}")
        return parsed

    return parse_checked


def _mqtt_url(value: Any) -> str:
    url = _text(value)
    if url:  # "" means no broker
        parse_mqtt_url(url)
    return url


def _local_mqtt_url(value: Any) -> str:
    url = _mqtt_url(value)
    if url.lower().startswith("mqtts://"):
        raise ValueError(f"expected mqtt://host[:port] (the device's own broker, over"
                         f" loopback or the LAN; no TLS), got {_show(url)}")
    return url


def _is_prefix(prefix: str) -> bool:
    return (
        bool(prefix)
        and not (set(prefix) & set("+#"))
        and not _TOPIC_JUNK.search(prefix)
        # Topics starting with "$" are the broker's ($SYS); clients may not publish there.
        and not prefix.startswith("$")
        and prefix.strip("/") == prefix
    )


def is_topic_filter(topic: str) -> bool:
    levels = topic.split("/")
    whole = all(("+" not in lv and "#" not in lv) or lv in ("+", "#") for lv in levels)
    return bool(topic) and whole and "#" not in levels[:-1] and "\0" not in topic


def _client_id(value: Any) -> str:
    text = _text(value)
    if len(text) > 64 or _URL_JUNK.search(text) or "/" in text:
        raise ValueError(
            'expected "" (edge-agent-{node id}) or a client id of at most 64 characters'
            f" without spaces or '/', got {_show(value)}"
        )
    return text


def _topic_filters(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(topic, str) and is_topic_filter(topic) and not topic.startswith("$")
        for topic in value
    ):
        raise ValueError(
            'expected a list of MQTT topic filters like ["sensors/#"] ("+" fills a whole'
            ' level, "#" is the whole last level, and none may start with "$": such topics'
            f" cannot be forwarded), got {_show(value)}"
        )
    for i, first in enumerate(value):
        for second in value[i + 1:]:
            both = filters_overlap(first, second)
            if both is not None:
                raise ValueError(
                    f"expected filters that do not overlap, but {first!r} and {second!r} both"
                    f" match {both!r} (the broker would deliver such a message twice), got"
                    f" {_show(value)}"
                )
    return tuple(value)


_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MAX_LABELS = 32


def _labels(value: Any) -> dict[str, str]:
    expected = (f'a table of at most {_MAX_LABELS} labels like {{ site = "greenhouse-3" }}: keys'
                ' of 1 to 63 characters A-Z a-z 0-9 _ . -, values text of 1 to 253'
                ' characters')
    if not isinstance(value, dict) or len(value) > _MAX_LABELS:
        raise ValueError(f"expected {expected}, got {_show(value)}")
    for key, text in value.items():
        if (not _LABEL_KEY.fullmatch(key) or not isinstance(text, str) or not 1 <= len(text) <= 253
                or _TOPIC_JUNK.search(text)):
            raise ValueError(f"expected {expected}, got {_show({key: text})}")
    return dict(value)


def _http_url(value: Any) -> str:
    expected = 'an http:// or https:// URL like "http://registry.example:8080"'
    if not isinstance(value, str) or _URL_JUNK.search(value):
        raise ValueError(f"expected {expected}, got {_show(value)}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"expected {expected}, got {_show(value)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected {expected}, got {_show(value)}")
    return value.rstrip("/")


def _globs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(pattern, str) and pattern and not _URL_JUNK.search(pattern)
        for pattern in value
    ):
        raise ValueError(
            f'expected a list of interface names or patterns like ["eth*", "wlan0"],'
            f" got {_show(value)}"
        )
    return tuple(value)


def _profile(value: Any) -> str:
    name = _checked(_text, 'a profile name like "generic-arm64" or "auto"',
                    lambda name: _PROFILE.fullmatch(name) is not None)(value)
    return check_profile_name(name)  # ValueError listing the known profiles


def _positive(seconds: float) -> bool:
    return seconds > 0


def _off_or_at_least_1s(seconds: float) -> bool:
    return seconds == 0 or seconds >= 1


# (section, key) -> parser. Keys are the field names of the section's dataclass.
_SECTIONS: dict[str, dict[str, Parser]] = {
    "node": {
        "id": validate_node_id,  # "auto" is valid and resolved in _build
        "profile": _profile,
        "data_dir": _path,
        "labels": _labels,
    },
    "uplink": {
        "url": _mqtt_url,
        "prefix": _checked(_text, 'a topic prefix like "edge/v1" without "+", "#", '
                           'control characters, a leading "$" or a leading or trailing "/"',
                           _is_prefix),
        # MQTT carries keepalive as a 16-bit number of seconds.
        "keepalive": _checked(parse_duration, "a duration from 1s to 65535s",
                              lambda seconds: 1 <= seconds <= 65535),
        "inflight": integer_in(1, 1000),
        "heartbeat": _checked(parse_duration, "a duration above 0s", _positive),
        "protocol": _choice("5", "3.1.1"),
        "backoff_initial": _checked(parse_duration, "a duration above 0s", _positive),
        "backoff_max": _checked(parse_duration, "a duration above 0s", _positive),
        "connect_timeout": _checked(parse_duration, "a duration above 0s", _positive),
        # MQTT 5 carries session expiry as a 32-bit number of seconds.
        "session_expiry": _checked(parse_duration, "a duration up to 4294967295s",
                                   lambda seconds: seconds <= 0xFFFFFFFF),
        "refused_limit": integer_in(1, 1000),
        "ca_file": _optional_path,
        "cert_file": _optional_path,
        "key_file": _optional_path,
        "tls_verify": _boolean,
        "username": _checked(_text, "a user name of at most 256 characters",
                             lambda name: len(name) <= 256 and "\0" not in name),
        "password_file": _optional_path,
    },
    "queue": {
        "max_bytes": _checked(parse_size, 'a size above 0 like "256MiB"', _positive),
        "on_full": _choice("drop-oldest", "reject"),
        "default_ttl": parse_duration,
        "durability": _choice("off", "normal", "full"),
        # Every publish waits this long for its answer: more than a second is a stall.
        "commit_interval": _checked(parse_duration, "a duration from 0s to 1s",
                                    lambda seconds: seconds <= 1),
        "max_message_bytes": _checked(parse_size, 'a size above 0 like "1MiB"', _positive),
        "retry_initial": _checked(parse_duration, "a duration above 0s", _positive),
        "retry_max": _checked(parse_duration, "a duration above 0s", _positive),
    },
    "local": {
        "url": _local_mqtt_url,
        "forward": _topic_filters,
        "protocol": _choice("5", "3.1.1"),
        "client_id": _client_id,
        "keepalive": _checked(parse_duration, "a duration from 1s to 18h",
                              lambda seconds: 1 <= seconds <= 65535),
        # 0 would end the session, and what the broker keeps for the agent, at each drop.
        "session_expiry": _checked(parse_duration, "a duration from 1s to 4294967295s",
                                   lambda seconds: 1 <= seconds <= 0xFFFFFFFF),
        # MQTT 5 carries receive maximum in 16 bits.
        "inflight": integer_in(1, 65535),
        "backoff_initial": _checked(parse_duration, "a duration above 0s", _positive),
        "backoff_max": _checked(parse_duration, "a duration above 0s", _positive),
        "connect_timeout": _checked(parse_duration, "a duration above 0s", _positive),
        "inbox_max_bytes": _checked(parse_size, 'a size above 0 like "16MiB"', _positive),
    },
    "api": {
        "socket": _socket_path,
        "group": _group,
        "max_line_bytes": _checked(parse_size, 'a size of at least 4KiB like "2MiB"',
                                   lambda size: size >= _MIN_LINE_BYTES),
    },
    "telemetry": {
        # Each sample is a queued message: sub-second sampling floods the outbox.
        "interval": _checked(parse_duration, '"0s" (off) or a duration of at least 1s',
                             _off_or_at_least_1s),
    },
    "state": {
        "debounce": _checked(parse_duration, "a duration from 0.1s to 1h",
                             lambda seconds: 0.1 <= seconds <= 3600),
        "desired_keys": _paths,
    },
    "fleet": {
        "registry": _http_url,
        "token_file": _optional_path,
    },
    "discovery": {
        "enabled": _boolean,
        # An empty allow list can only mean discovery off: say that with enabled = false.
        "interfaces": _checked(_globs, 'a non-empty list of interface names or patterns'
                               ' like ["eth*"] (to turn discovery off: enabled = false)', bool),
        "exclude": _globs,
        # Quiet peers are asked every sixth of it: below 3s that is a flood of questions.
        "peer_timeout": _checked(parse_duration, "a duration of at least 3s",
                                 lambda seconds: seconds >= 3),
        "forget_after": _checked(parse_duration, "a duration above 0s", _positive),
        "port": integer_in(0, 65535),
        "scan_interval": _checked(parse_duration, "a duration from 1s to 1h",
                                  lambda seconds: 1 <= seconds <= 3600),
    },
}

_KNOWN_SECTIONS = ", ".join(sorted([*_SECTIONS, "services"]))


# -- loading -----------------------------------------------------------------


def _read(path: Path | None, must_exist: bool) -> tuple[dict[str, Any], str]:
    """Return the parsed TOML document at `path` and its name for messages."""
    if path is None:
        return {}, "<defaults>"
    try:
        with path.open("rb") as file:
            data = file.read(_CONFIG_MAX_BYTES + 1)
        if len(data) > _CONFIG_MAX_BYTES:
            raise ConfigError(f"config {path}: larger than {_CONFIG_MAX_BYTES // 1024} KiB;"
                              " not a config file?")
        text = data.decode()
        if _LONG_DOTTED_KEY.search(text):
            raise ConfigError(f"config {path}: a dotted key of more than"
                              f" {_DOTTED_PARTS_MAX} parts; not a config file?")
        return tomllib.loads(text), str(path)
    except FileNotFoundError:
        if path == DEFAULT_CONFIG and not must_exist:
            return {}, "<defaults>"
        raise ConfigError(f"config {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {' '.join(str(exc).split())}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: not UTF-8 text") from exc
    except RecursionError:  # tomllib recurses once per level of nesting
        raise ConfigError(f"config {path}: not valid TOML: nested too deep") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None


def _parse_document(document: dict[str, Any], source: str) -> Values:
    """Parse every key of the document, or raise ConfigError naming the first bad one."""
    values: Values = {}
    for section, table in document.items():
        where = f"config {source}: [{section}]"
        if section == "services":
            values["services"] = dict(parse_services(table, source))
            continue
        parsers = _SECTIONS.get(section)
        if parsers is None:
            raise ConfigError(f"{where}: unknown section (known: {_KNOWN_SECTIONS})")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {_show(table)}")
        for key, value in table.items():
            parse = parsers.get(key)
            if parse is None:
                known = ", ".join(sorted(parsers))
                raise ConfigError(f"{where} {key}: unknown key (known: {known})")
            try:
                values.setdefault(section, {})[key] = parse(value)
            except ValueError as exc:
                raise ConfigError(f"{where} {key}: {exc}") from exc
    return values


def _check_together(values: Values, document: dict[str, Any], source: str) -> None:
    """Refuse keys that are valid alone but not together."""
    uplink = values.get("uplink", {})
    tls_keys = [key for key in ("ca_file", "cert_file", "key_file", "tls_verify") if key in uplink]
    if tls_keys and not str(uplink.get("url", "")).lower().startswith("mqtts://"):
        raise ConfigError(f"config {source}: [uplink] {tls_keys[0]}: TLS settings need an"
                          f" mqtts:// url, got {_show(uplink.get('url', ''))}")
    if "key_file" in uplink and uplink["key_file"] and not uplink.get("cert_file"):
        raise ConfigError(f"config {source}: [uplink] key_file: needs cert_file (the"
                          " certificate this key belongs to)")
    if uplink.get("password_file") and not uplink.get("username"):
        raise ConfigError(f"config {source}: [uplink] password_file: needs username")
    for section, first, cap, defaults in (
        ("uplink", "backoff_initial", "backoff_max", UplinkSettings()),
        ("queue", "retry_initial", "retry_max", QueueSettings()),
        ("local", "backoff_initial", "backoff_max", LocalSettings()),
    ):
        chosen = values.get(section, {})
        initial = chosen.get(first, getattr(defaults, first))
        ceiling = chosen.get(cap, getattr(defaults, cap))
        if initial > ceiling:
            given = document.get(section, {})
            got = (_show(given[first]) if first in given else f"{initial:g}s (the default)")
            ceiling_text = (_show(given[cap]) if cap in given else f"{ceiling:g}s, the default")
            raise ConfigError(
                f"config {source}: [{section}] {first}: expected a duration no longer than"
                f" {cap} ({ceiling_text}), got {got}"
            )


def _build(values: Values, source: str) -> Settings:
    """Lay the parsed values over the defaults."""
    node = replace(NodeSettings(id="auto", data_dir=default_data_dir()), **values.get("node", {}))
    if node.id == "auto":
        node = replace(node, id=default_node_id())
    api = dict(values.get("api", {}))
    if "max_message_bytes" in values.get("queue", {}):
        api.setdefault("max_line_bytes", _line_limit_for(values["queue"]["max_message_bytes"]))
    return Settings(
        node=node,
        uplink=replace(UplinkSettings(), **values.get("uplink", {})),
        queue=replace(QueueSettings(), **values.get("queue", {})),
        local=replace(LocalSettings(), **values.get("local", {})),
        api=replace(ApiSettings(socket=default_socket_path()), **api),
        telemetry=replace(TelemetrySettings(), **values.get("telemetry", {})),
        discovery=replace(DiscoverySettings(), **values.get("discovery", {})),
        state=replace(StateSettings(), **values.get("state", {})),
        fleet=replace(FleetSettings(), **values.get("fleet", {})),
        services=values.get("services", {}),
        source=source,
        given=frozenset(f"{section}.{key}" for section, table in values.items()
                        if section != "services" for key in table),
    )


def _line_limit_for(max_message_bytes: int) -> int:
    """Return the request line length that carries a `max_message_bytes` payload in base64."""
    return max_message_bytes * 4 // 3 + _LINE_OVERHEAD
