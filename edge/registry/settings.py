"""The registry server's settings: built once from the command line, timings included."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from edge.registry.health import HealthPolicy

__all__ = ["RegistrySettings", "check_allow_host", "check_prefix", "check_share_group",
           "db_url_for_humans", "default_db_url", "is_loopback", "parse_http",
           "read_api_token"]

_PREFIX_JUNK = re.compile(r"[+#\x00-\x1f\x7f-\x9f]")
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HOST_NAME = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
_TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")  # printable ASCII: it goes into a header
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


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


def is_loopback(host: str) -> bool:
    """Whether an --http host is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_allow_host(name: str) -> str:
    """An --allow-host NAME or NAME:PORT, lowercased; ValueError when it is not one."""
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(f"expected a host name or address like registry.example.com or"
                         f" registry.example.com:8443, got {name!r}")
    return name.lower()


def read_api_token(path: Path) -> str:
    """The token: the first line of `path`; ValueError says what is wrong with the file."""
    try:
        with path.open("rb") as f:
            first = f.readline(8192)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        token = first.decode("ascii").strip()
    except UnicodeDecodeError:
        token = "\x00"  # refused below
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{path}: expected the token on its first line, 16 to 4096"
                         " printable ASCII characters without spaces (make one with"
                         f" `openssl rand -hex 32 > {path}`)")
    return token


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
    # "": no token (loopback only, or insecure_no_token); repr=False keeps it out of logs.
    api_token: str = field(default="", repr=False)
    allow_hosts: tuple[str, ...] = ()  # Host names besides the --http address and loopback
    insecure_no_token: bool = False

    @property
    def http_address(self) -> str:
        """HOST:PORT as a Host header or an Origin names it (IPv6 in brackets)."""
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        return f"{host.lower()}:{self.http_port}"

    @property
    def accepted_hosts(self) -> frozenset[str]:
        """The Host headers the HTTP API answers (lowercase): the rest may be DNS rebinding."""
        names = {self.http_address, *(f"{n}:{self.http_port}" for n in _LOOPBACK_NAMES)}
        for name in self.allow_hosts:
            names.add(name)
            if not re.search(r":[0-9]+$", name):
                names.add(f"{name}:{self.http_port}")
        return frozenset(names)

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        check_share_group(self.share_group)
        if self.reconnect_initial <= 0 or self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect: expected 0 < initial <= max")
        if self.batch_max < 1 or self.receive_maximum < 1:
            raise ValueError("batch_max and receive_maximum: expected at least 1")
        if not self.api_token and not self.insecure_no_token \
                and not is_loopback(self.http_host):
            raise ValueError(
                f"--http {self.http_address} without --api-token-file: anyone who reaches"
                " the port could change every node's desired state; give --api-token-file"
                " FILE (its first line is the token), or --insecure-no-token to run without"
                " one anyway")
