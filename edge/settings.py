"""Agent settings: frozen, validated values loaded once from TOML and flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.services import ServiceSpec

__all__ = [
    "ApiSettings",
    "DiscoverySettings",
    "FleetSettings",
    "LocalSettings",
    "NodeSettings",
    "QueueSettings",
    "Settings",
    "StateSettings",
    "TelemetrySettings",
    "UplinkSettings",
]


@dataclass(frozen=True)
class NodeSettings:
    id: str
    profile: str = "auto"
    data_dir: Path = Path("/var/lib/edge")
    labels: Mapping[str, str] = field(default_factory=dict)  # reported; groups in the registry


@dataclass(frozen=True)
class UplinkSettings:
    url: str = ""                      # "" = no cloud uplink
    prefix: str = "edge/v1"
    keepalive: float = 30.0            # seconds
    inflight: int = 50
    heartbeat: float = 60.0            # seconds between retained status refreshes
    protocol: str = "5"                # "5" or "3.1.1"
    backoff_initial: float = 0.5       # seconds
    backoff_max: float = 60.0          # seconds
    connect_timeout: float = 10.0      # seconds
    session_expiry: float = 7 * 86400  # seconds the broker keeps our session
    refused_limit: int = 3             # broker drops on one message before it is dead-lettered
    # TLS (mqtts:// only). Files are read again at every connection attempt.
    ca_file: Path | None = None        # None: the system's CA store
    cert_file: Path | None = None      # this device's certificate (mutual TLS)
    key_file: Path | None = None       # its private key (None: inside cert_file)
    tls_verify: bool = True            # false: no check of the broker's certificate at all
    username: str = ""                 # "" = none
    password_file: Path | None = None  # the password is the file's first line


@dataclass(frozen=True)
class QueueSettings:
    max_bytes: int = 256 * 1024 * 1024
    on_full: str = "drop-oldest"       # or "reject"
    default_ttl: float = 0.0           # seconds, 0 = never expires
    durability: str = "normal"         # SQLite synchronous: "off", "normal", "full"
    commit_interval: float = 0.0       # seconds a commit waits to gather more (0: natural batching)
    max_message_bytes: int = 1024 * 1024
    retry_initial: float = 0.5         # seconds before a failed commit is tried again
    retry_max: float = 30.0            # ... doubling up to this


@dataclass(frozen=True)
class LocalSettings:
    url: str = "mqtt://127.0.0.1:1883"  # "" = no local bus
    forward: tuple[str, ...] = ("#",)  # topic filters forwarded up
    protocol: str = "5"                # "5" or "3.1.1"
    client_id: str = ""                # "" = "edge-agent-{node}"
    keepalive: float = 30.0            # seconds
    session_expiry: float = 86400.0    # seconds the local broker keeps our session
    inflight: int = 100                # messages the broker may send us unacknowledged
    backoff_initial: float = 0.5       # seconds
    backoff_max: float = 30.0          # seconds
    connect_timeout: float = 10.0      # seconds
    inbox_max_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class ApiSettings:
    socket: Path = Path("/run/edge/agent.sock")
    group: str = ""                    # the socket's group ("": the agent's own); mode 0660
    # max_message_bytes * 4 // 3 + 64 KiB: a 1 MiB binary payload in base64, plus JSON.
    max_line_bytes: int = 1_463_637


@dataclass(frozen=True)
class TelemetrySettings:
    interval: float = 60.0             # seconds, 0 = off


@dataclass(frozen=True)
class DiscoverySettings:
    enabled: bool = True
    interfaces: tuple[str, ...] = ("*",)  # glob patterns of interface names to use
    # Container and virtual bridges: a peer is not to be found there.
    exclude: tuple[str, ...] = ("docker*", "veth*", "br-*", "virbr*", "cni*", "flannel*", "lo")
    peer_timeout: float = 30.0         # seconds: a peer silent this long (no goodbye) is lost
    forget_after: float = 86400.0      # seconds a lost peer stays in the table
    port: int = 0                      # the port in our SRV record (0: no service port)
    scan_interval: float = 10.0        # seconds between reads of the interfaces' addresses


@dataclass(frozen=True)
class StateSettings:
    debounce: float = 2.0              # seconds: changes within it make one reported document
    # Ed25519 public keys of the registry: when any is set, a desired document must be
    # signed by one of them.
    desired_keys: tuple[Path, ...] = ()


@dataclass(frozen=True)
class FleetSettings:
    registry: str = "http://127.0.0.1:8080"  # the registry's HTTP API, for `edge fleet`
    token_file: Path | None = None     # its API token: the file's first line


@dataclass(frozen=True)
class Settings:
    node: NodeSettings
    uplink: UplinkSettings = field(default_factory=UplinkSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    state: StateSettings = field(default_factory=StateSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    services: Mapping[str, ServiceSpec] = field(default_factory=dict)  # by name, in file order
    source: str = "<defaults>"         # the file these came from, for messages
    # "section.key" of every value the file or a flag set: the others may take a
    # firmware profile's policy default (edge/policy.py).
    given: frozenset[str] = field(default=frozenset(), compare=False)
