"""The registry server's settings: built once from the command line, timings included."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from edge.registry.health import HealthPolicy

__all__ = ["RegistrySettings", "check_prefix", "check_share_group", "db_url_for_humans",
           "default_db_url", "parse_http"]

_PREFIX_JUNK = re.compile(r"[+#\x00-\x1f\x7f-\x9f]")
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")


def default_db_url() -> str:
    """sqlite:// under /var/lib/edge-registry (root) or $XDG_STATE_HOME/edge-registry."""
    if os.geteuid() == 0:
        base = Path("/var/lib/edge-registry")
    else:
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        base = Path(state) / "edge-registry"
    return f"sqlite://{base / 'registry.db'}"


def db_url_for_humans(url: str) -> str:
    """The URL with its password left out (for /healthz and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


def parse_http(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT like 127.0.0.1:8080, got {text!r}")
    return host, int(port)


def check_share_group(name: str) -> str:
    """A shared subscription group name; ValueError when it is not one."""
    if not _SHARE_GROUP.fullmatch(name):
        raise ValueError(f"expected 1 to 64 characters A-Z a-z 0-9 _ -, got {name!r}")
    return name


def check_prefix(prefix: str) -> str:
    """A topic prefix like edge/v1; ValueError when it is not one."""
    if not prefix or _PREFIX_JUNK.search(prefix) or prefix.startswith("$") \
            or prefix.strip("/") != prefix:
        raise ValueError(f"expected a topic prefix like edge/v1 (no +, #, leading $ or"
                         f" slashes at the ends), got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class RegistrySettings:
    """Everything `edge registry serve` runs with."""

    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    db_url: str = field(default_factory=default_db_url)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    prefix: str = "edge/v1"
    client_id: str = "edge-registry"
    share_group: str = "edge-registry"  # workers of one registry share it; other registries not
    health: HealthPolicy = field(default_factory=HealthPolicy)
    keepalive: float = 30.0
    connect_timeout: float = 10.0
    reconnect_initial: float = 0.2
    reconnect_max: float = 30.0
    catchup_idle: float = 1.0       # the retained read ends after this long without one
    catchup_max: float = 60.0       # and after this long in any case
    batch_max: int = 2000           # documents written in one go
    queue_high: int = 20000         # documents waiting to be written before reading pauses
    receive_maximum: int = 4000     # unacknowledged QoS 1 messages the broker may send us
    publish_timeout: float = 5.0    # waiting for the PUBACK of a desired document
    max_body: int = 256 * 1024      # HTTP request bodies
    broker_tls: bool = False        # mqtts://: files below are read at every connection
    ca_file: Path | None = None     # None: the system's CA store
    cert_file: Path | None = None   # the registry's certificate (mutual TLS)
    key_file: Path | None = None    # its key (None: inside cert_file)
    username: str = ""
    password_file: Path | None = None
    signing_key: Path | None = None  # Ed25519 private key (PEM) signing desired documents

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        check_share_group(self.share_group)
        if self.reconnect_initial <= 0 or self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect: expected 0 < initial <= max")
        if self.batch_max < 1 or self.receive_maximum < 1:
            raise ValueError("batch_max and receive_maximum: expected at least 1")
