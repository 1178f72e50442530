"""Configuration: TOML files, flags, defaults, node ids and units."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge import config
from edge.config import default_socket_path, load_settings, parse_mqtt_url
from edge.errors import ConfigError
from edge.nodeid import default_node_id, validate_node_id
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
from edge.units import parse_duration, parse_size

FULL = """\
[node]
id = "pi-kitchen_01"
profile = "raspberrypi-4"
data_dir = "/srv/edge"
labels = { site = "greenhouse-3", "row.no" = "7" }

[uplink]
url = "mqtts://broker.example.com:8884"
prefix = "acme/edge/v2"
keepalive = "45s"
inflight = 200
heartbeat = "2m"
protocol = "3.1.1"
backoff_initial = "250ms"
backoff_max = "5m"
connect_timeout = 3
session_expiry = "1d"
refused_limit = 5
ca_file = "/etc/edge/ca.pem"
cert_file = "/etc/edge/device.pem"
key_file = "/etc/edge/device.key"
tls_verify = true
username = "pi-kitchen_01"
password_file = "/etc/edge/password"

[queue]
max_bytes = "10MB"
on_full = "reject"
default_ttl = "7d"
durability = "full"
commit_interval = "20ms"
max_message_bytes = "64KiB"
retry_initial = "1s"
retry_max = "20s"

[local]
url = "mqtt://localhost"
forward = ["sensors/#", "alarms/+"]
protocol = "3.1.1"
client_id = "bus-7"
keepalive = "10s"
session_expiry = "2h"
inflight = 20
backoff_initial = "1s"
backoff_max = "5s"
connect_timeout = "3s"
inbox_max_bytes = "1MiB"

[api]
socket = "/tmp/edge-test/agent.sock"
group = "edge-users"
max_line_bytes = 8192

[telemetry]
interval = "0s"

[discovery]
enabled = false
interfaces = ["eth*", "wlan0"]
exclude = ["eth9"]
peer_timeout = "12s"
forget_after = "2h"
port = 8080
scan_interval = "5s"

[state]
debounce = "500ms"
desired_keys = ["/etc/edge/registry-2026.pub", "/etc/edge/registry-2027.pub"]

[fleet]
registry = "https://registry.example.com:8443/"
token_file = "/etc/edge/registry-token"
"""

FULL_SETTINGS = Settings(
    node=NodeSettings(id="pi-kitchen_01", profile="raspberrypi-4", data_dir=Path("/srv/edge"),
                      labels={"site": "greenhouse-3", "row.no": "7"}),
    uplink=UplinkSettings(
        url="mqtts://broker.example.com:8884",
        prefix="acme/edge/v2",
        keepalive=45.0,
        inflight=200,
        heartbeat=120.0,
        protocol="3.1.1",
        backoff_initial=0.25,
        backoff_max=300.0,
        connect_timeout=3.0,
        session_expiry=86400.0,
        refused_limit=5,
        ca_file=Path("/etc/edge/ca.pem"),
        cert_file=Path("/etc/edge/device.pem"),
        key_file=Path("/etc/edge/device.key"),
        tls_verify=True,
        username="pi-kitchen_01",
        password_file=Path("/etc/edge/password"),
    ),
    queue=QueueSettings(
        max_bytes=10_000_000,
        on_full="reject",
        default_ttl=7 * 86400.0,
        durability="full",
        commit_interval=0.02,
        max_message_bytes=64 * 1024,
        retry_initial=1.0,
        retry_max=20.0,
    ),
    local=LocalSettings(
        url="mqtt://localhost", forward=("sensors/#", "alarms/+"), protocol="3.1.1",
        client_id="bus-7", keepalive=10.0, session_expiry=7200.0, inflight=20,
        backoff_initial=1.0, backoff_max=5.0, connect_timeout=3.0, inbox_max_bytes=1024 * 1024,
    ),
    api=ApiSettings(socket=Path("/tmp/edge-test/agent.sock"), group="edge-users",
                    max_line_bytes=8192),
    telemetry=TelemetrySettings(interval=0.0),
    discovery=DiscoverySettings(
        enabled=False, interfaces=("eth*", "wlan0"), exclude=("eth9",), peer_timeout=12.0,
        forget_after=7200.0, port=8080, scan_interval=5.0,
    ),
    state=StateSettings(debounce=0.5, desired_keys=(Path("/etc/edge/registry-2026.pub"),
                                                    Path("/etc/edge/registry-2027.pub"))),
    fleet=FleetSettings(registry="https://registry.example.com:8443",
                        token_file=Path("/etc/edge/registry-token")),
)

SECTIONS = {
    "node": NodeSettings,
    "uplink": UplinkSettings,
    "queue": QueueSettings,
    "local": LocalSettings,
    "api": ApiSettings,
    "telemetry": TelemetrySettings,
    "discovery": DiscoverySettings,
    "state": StateSettings,
    "fleet": FleetSettings,
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def config_error(path: Path, **flags: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **flags)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults ----------------------------------------------------------------


def test_no_file_gives_defaults() -> None:
    settings = load_settings(None)
    assert settings.source == "<defaults>"
    validate_node_id(settings.node.id)
    assert settings.node.id != "auto"
    assert settings.uplink == UplinkSettings()
    assert settings.queue == QueueSettings()
    assert settings.local == LocalSettings()
    assert settings.telemetry == TelemetrySettings()
    assert settings.discovery == DiscoverySettings()
    assert settings.api.socket == default_socket_path()


def test_missing_default_file_gives_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "agent.toml")
    assert load_settings(tmp_path / "agent.toml").source == "<defaults>"


def test_missing_default_file_is_an_error_when_it_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "agent.toml")
    with pytest.raises(ConfigError, match=r"agent\.toml: no such file"):
        load_settings(tmp_path / "agent.toml", must_exist=True)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert str(missing) in config_error(missing)


def test_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    assert str(tmp_path) in config_error(tmp_path)  # a directory cannot be read as a file


def test_empty_file_gives_defaults_with_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    settings = load_settings(path)
    assert settings.source == str(path)
    assert settings.uplink == UplinkSettings()


def test_root_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    settings = load_settings(None)
    assert settings.node.data_dir == Path("/var/lib/edge")
    assert settings.api.socket == Path("/run/edge/agent.sock")


def test_non_root_defaults_follow_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    settings = load_settings(None)
    assert settings.node.data_dir == tmp_path / "state" / "edge"
    assert settings.api.socket == tmp_path / "run" / "edge" / "agent.sock"


def test_non_root_defaults_without_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = load_settings(None)
    assert settings.node.data_dir == tmp_path / ".local" / "state" / "edge"
    assert settings.api.socket == Path(f"/tmp/edge-{os.getuid()}/agent.sock")


# -- a valid file ------------------------------------------------------------


def test_full_file_sets_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    assert load_settings(path) == dataclasses.replace(FULL_SETTINGS, source=str(path))


def test_every_settings_field_is_a_config_key() -> None:
    import tomllib

    document = tomllib.loads(FULL)
    for section, cls in SECTIONS.items():
        assert set(document[section]) == {field.name for field in dataclasses.fields(cls)}


def test_numbers_are_accepted_for_sizes_and_durations(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\nmax_bytes = 4096\ndefault_ttl = 1.5\n")
    queue = load_settings(path).queue
    assert (queue.max_bytes, queue.default_ttl) == (4096, 1.5)


def test_node_id_auto_is_derived(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nid = "auto"\n')
    assert load_settings(path).node.id == default_node_id()


def test_services_become_specs_in_the_settings(tmp_path: Path) -> None:
    path = write(tmp_path, '[services.web]\ncommand = ["python", "-m", "http.server"]\n')
    [(name, spec)] = load_settings(path).services.items()
    assert name == "web" and spec.command == ("python", "-m", "http.server")


# -- bad files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "detail"),
    [
        ("[uplink]\nkepalive = '30s'\n", "[uplink] kepalive", "unknown key (known: "),
        ("[uplnk]\nurl = ''\n", "[uplnk]", "unknown section (known: "),
        ("node = 5\n", "[node]", "expected a table, got 5"),
        ("[uplink]\nkeepalive = true\n", "[uplink] keepalive", "got true"),
        ("[uplink]\ninflight = '50'\n", "[uplink] inflight", 'integer from 1 to 1000, got "50"'),
        ("[uplink]\ninflight = 0\n", "[uplink] inflight", "got 0"),
        ("[uplink]\ninflight = 1001\n", "[uplink] inflight", "got 1001"),
        ("[uplink]\nprefix = 5\n", "[uplink] prefix", "expected a string, got 5"),
        ("[discovery]\nenabled = 'yes'\n", "[discovery] enabled", 'true or false, got "yes"'),
        ("[discovery]\ninterfaces = 'eth0'\n", "[discovery] interfaces", 'like ["eth*", "wlan0"]'),
        ("[discovery]\nexclude = ['']\n", "[discovery] exclude", 'got [""]'),
        ("[discovery]\npeer_timeout = '1s'\n", "[discovery] peer_timeout", "at least 3s"),
        ("[discovery]\nport = 70000\n", "[discovery] port", "from 0 to 65535, got 70000"),
        ("[discovery]\nscan_interval = '0s'\n", "[discovery] scan_interval", "from 1s to 1h"),
        ("[discovery]\nscan_interval = '2h'\n", "[discovery] scan_interval", 'got "2h"'),
        ("[discovery]\ninterfaces = []\n", "[discovery] interfaces", "enabled = false"),
        ("[node]\nlabels = { 'a b' = 'x' }\n", "[node] labels", 'got {"a b": "x"}'),
        ("[node]\nlabels = { site = 3 }\n", "[node] labels", 'got {"site": 3}'),
        ("[node]\nlabels = 'site=x'\n", "[node] labels", 'got "site=x"'),
        ("[state]\ndebounce = '10ms'\n", "[state] debounce", "from 0.1s to 1h"),
        ("[fleet]\nregistry = 'ftp://r'\n", "[fleet] registry", 'got "ftp://r"'),
        ("[fleet]\nregistry = 'http://r:99999'\n", "[fleet] registry", "http:// or https://"),
        (
            "[queue]\nmax_bytes = 'lots'\n",
            "[queue] max_bytes",
            'expected a size like "256MiB", got "lots"',
        ),
        ("[queue]\nmax_bytes = '-1MiB'\n", "[queue] max_bytes", 'got "-1MiB"'),
        ("[queue]\nmax_bytes = 0\n", "[queue] max_bytes", "got 0"),
        ("[queue]\ndefault_ttl = 'soon'\n", "[queue] default_ttl", '"30s", got "soon"'),
        ("[queue]\ndefault_ttl = -1\n", "[queue] default_ttl", "got -1"),
        ("[telemetry]\ninterval = '5 fortnights'\n", "[telemetry] interval", "expected"),
        ("[uplink]\nkeepalive = '500ms'\n", "[uplink] keepalive", 'got "500ms"'),
        ("[uplink]\nheartbeat = '0s'\n", "[uplink] heartbeat", 'got "0s"'),
        ("[queue]\non_full = 'drop-newest'\n", "[queue] on_full", '"reject", got "drop-newest"'),
        ("[queue]\ndurability = 'paranoid'\n", "[queue] durability", '"full", got "paranoid"'),
        ("[uplink]\nprotocol = 5\n", "[uplink] protocol", '"3.1.1", got 5'),
        ("[uplink]\nurl = 'http://broker'\n", "[uplink] url", 'got "http://broker"'),
        ("[uplink]\nurl = 'mqtt://'\n", "[uplink] url", "mqtt://host[:port]"),
        ("[uplink]\nurl = 'mqtt://broker:99999'\n", "[uplink] url", "mqtt://host[:port]"),
        ("[uplink]\nurl = 'mqtt://broker/x'\n", "[uplink] url", "mqtt://host[:port]"),
        ("[uplink]\nprefix = ''\n", "[uplink] prefix", "expected a topic prefix"),
        ("[uplink]\nprefix = 'edge/+'\n", "[uplink] prefix", 'got "edge/+"'),
        ("[uplink]\nprefix = 'edge/#'\n", "[uplink] prefix", 'got "edge/#"'),
        ("[uplink]\nprefix = '/edge'\n", "[uplink] prefix", 'got "/edge"'),
        ("[uplink]\nprefix = 'edge/'\n", "[uplink] prefix", 'got "edge/"'),
        ("[local]\nforward = 'sensors/#'\n", "[local] forward", "expected a list"),
        ("[local]\nforward = ['a/#/b']\n", "[local] forward", "expected a list"),
        ("[local]\nclient_id = 'a b'\n", "[local] client_id", 'got "a b"'),
        ("[local]\nforward = ['sensors/#', '+/alarm']\n", "[local] forward",
         "'sensors/#' and '+/alarm' both match 'sensors/alarm'"),
        ("[local]\nforward = ['a/+/c', 'a/b/+']\n", "[local] forward", "both match 'a/b/c'"),
        ("[local]\nforward = ['$SYS/#']\n", "[local] forward", 'none may start with "$"'),
        ("[local]\nsession_expiry = '0s'\n", "[local] session_expiry", "from 1s"),
        ("[local]\nurl = 'mqtt://localhost:1884'\n[uplink]\nurl = 'mqtt://127.0.0.1:1884'\n",
         "[local] url", "the same broker as [uplink] url"),
        ("[local]\nurl = 'mqtt://127.1:1884'\n[uplink]\nurl = 'mqtt://127.0.0.1:1884'\n",
         "[local] url", "the same broker as [uplink] url"),
        ("[local]\nurl = 'mqtt://[::ffff:127.0.0.1]:1884'\n[uplink]\nurl = 'mqtt://[::1]:1884'\n",
         "[local] url", "the same broker as [uplink] url"),
        ("[local]\ninflight = 0\n", "[local] inflight", "got 0"),
        ("[local]\nbackoff_initial = '40s'\n", "[local] backoff_initial", "no longer than"),
        ("[node]\nid = 'a/b'\n", "[node] id", 'A-Z a-z 0-9 _ -, got "a/b"'),
        ("[node]\nid = 'a+b'\n", "[node] id", 'got "a+b"'),
        ("[node]\nid = 'a#b'\n", "[node] id", 'got "a#b"'),
        ("[node]\nid = 'a b'\n", "[node] id", 'got "a b"'),
        ("[node]\nid = ''\n", "[node] id", 'got ""'),
        (f"[node]\nid = '{'x' * 65}'\n", "[node] id", "1 to 64"),
        ("[node]\nid = 7\n", "[node] id", "got 7"),
        ("[node]\nprofile = '../etc'\n", "[node] profile", 'got "../etc"'),
        ("[node]\ndata_dir = ''\n", "[node] data_dir", 'expected a path, got ""'),
        ("[services]\nweb = 1\n", "[services.web]", "expected a table"),
    ],
)
def test_bad_value_names_file_key_and_expectation(
    tmp_path: Path, text: str, where: str, detail: str
) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"config {path}: {where}")
    assert detail in message


def test_bad_size_message_is_exactly_as_documented(tmp_path: Path) -> None:
    path = write(tmp_path, '[queue]\nmax_bytes = "lots"\n')
    assert config_error(path) == (
        f'config {path}: [queue] max_bytes: expected a size like "256MiB", got "lots"'
    )


def test_value_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nid = "a\\nb"\n')
    assert '"a\\nb"' in config_error(path)


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[uplink\nurl = \n")
    assert config_error(path).startswith(f"config {path}: not valid TOML: ")


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b"[node]\nid = '\xff'\n")
    assert config_error(path).startswith(f"config {path}: not valid TOML: ")


# -- values that load but cannot work ---------------------------------------


def test_socket_path_over_the_af_unix_limit_is_refused_naming_the_limit(tmp_path: Path) -> None:
    room = 107 - len(os.fsencode(tmp_path)) - 1  # the name after tmp_path and its "/"
    if room < 2:
        pytest.skip(f"tmp_path is too long to build a 107-byte socket path under it: {tmp_path}")
    longest = tmp_path / ("s" * room)
    assert len(os.fsencode(longest)) == 107
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(longest))  # the kernel takes 107 bytes ...
    longest.unlink()
    path = write(tmp_path, f'[api]\nsocket = "{longest}"\n')
    assert load_settings(path).api.socket == longest

    too_long = tmp_path / ("s" * (room + 1))
    path = write(tmp_path, f'[api]\nsocket = "{too_long}"\n')
    assert config_error(path) == (  # ... and refuses 108, so the config does too
        f"config {path}: [api] socket: expected a socket path of at most 107 bytes"
        f' (the AF_UNIX limit), got "{too_long}" (108 bytes)'
    )


def test_socket_path_limit_counts_encoded_bytes_not_characters(tmp_path: Path) -> None:
    path = write(tmp_path, f'[api]\nsocket = "/tmp/{"é" * 60}"\n')  # 65 characters, 125 bytes
    assert "(125 bytes)" in config_error(path)


@pytest.mark.parametrize(
    "prefix",
    [
        "$SYS/edge",
        "$edge",
        "edge\\u0000v1",
        "edge\\u0001",
        "edge\\tv1",
        "edge\\nv1",
        "edge\\u001f",
        "edge\\u007f",
        "edge\\u0085",
        "edge\\u009f",
        "edge\\ufffe",
        "edge\\uffff",
    ],
)
def test_prefix_with_a_leading_dollar_or_a_control_character_is_refused(
    tmp_path: Path, prefix: str
) -> None:
    path = write(tmp_path, f'[uplink]\nprefix = "{prefix}"\n')
    message = config_error(path)
    assert message.startswith(f"config {path}: [uplink] prefix: expected a topic prefix")
    assert 'a leading "$"' in message and "control characters" in message


@pytest.mark.parametrize("prefix", ["edge/$v1", "acme/édge", "a\u00a0b", "edge\u00a0"])
def test_prefix_with_dollar_inside_or_printable_unicode_is_accepted(
    tmp_path: Path, prefix: str
) -> None:
    path = write(tmp_path, f'[uplink]\nprefix = "{prefix}"\n')
    assert load_settings(path).uplink.prefix == prefix


@pytest.mark.parametrize(
    "url",
    ["mqtt://a b", "mqtt://h :1883", "mqtt://127.0.0.1 ", "mqtt://h:", "mqtt://h\\t"],
)
@pytest.mark.parametrize("section", ["uplink", "local"])
def test_url_with_whitespace_or_an_empty_host_or_port_is_refused(
    tmp_path: Path, section: str, url: str
) -> None:
    path = write(tmp_path, f'[{section}]\nurl = "{url}"\n')
    message = config_error(path)
    assert message.startswith(
        f"config {path}: [{section}] url: expected mqtt://host[:port] or mqtts://host[:port], got ")


def test_a_tls_flag_is_accepted_like_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""), uplink="mqtts://broker")
    assert settings.uplink.url == "mqtts://broker" and settings.uplink.tls_verify


@pytest.mark.parametrize("interval", ["1ms", "500ms", 0.999])
def test_telemetry_interval_under_a_second_is_refused(
    tmp_path: Path, interval: str | float
) -> None:
    value = f'"{interval}"' if isinstance(interval, str) else repr(interval)
    path = write(tmp_path, f"[telemetry]\ninterval = {value}\n")
    assert config_error(path) == (
        f'config {path}: [telemetry] interval: expected "0s" (off) or a duration of at least'
        f" 1s, got {value}"
    )


@pytest.mark.parametrize(("interval", "seconds"), [('"0s"', 0.0), ("0", 0.0), ('"1s"', 1.0)])
def test_telemetry_interval_off_or_from_a_second_is_accepted(
    tmp_path: Path, interval: str, seconds: float
) -> None:
    path = write(tmp_path, f"[telemetry]\ninterval = {interval}\n")
    assert load_settings(path).telemetry.interval == seconds


def test_backoff_initial_longer_than_backoff_max_is_refused_naming_both(tmp_path: Path) -> None:
    path = write(tmp_path, '[uplink]\nbackoff_initial = "2m"\nbackoff_max = "30s"\n')
    assert config_error(path) == (
        f"config {path}: [uplink] backoff_initial: expected a duration no longer than"
        ' backoff_max ("30s"), got "2m"'
    )


def test_backoff_max_below_the_default_initial_is_refused_naming_both(tmp_path: Path) -> None:
    path = write(tmp_path, '[uplink]\nbackoff_max = "100ms"\n')
    assert config_error(path) == (
        f"config {path}: [uplink] backoff_initial: expected a duration no longer than"
        ' backoff_max ("100ms"), got 0.5s (the default)'
    )


def test_backoff_initial_above_the_default_max_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[uplink]\nbackoff_initial = "2m"\n')
    assert config_error(path).endswith('backoff_max (60s, the default), got "2m"')


def test_backoff_initial_equal_to_backoff_max_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, '[uplink]\nbackoff_initial = "1s"\nbackoff_max = "1s"\n')
    uplink = load_settings(path).uplink
    assert (uplink.backoff_initial, uplink.backoff_max) == (1.0, 1.0)


@pytest.mark.parametrize("size", ["10", "4095", '"4095B"', '"1KiB"'])
def test_max_line_bytes_under_4kib_is_refused(tmp_path: Path, size: str) -> None:
    path = write(tmp_path, f"[api]\nmax_line_bytes = {size}\n")
    assert config_error(path) == (
        f'config {path}: [api] max_line_bytes: expected a size of at least 4KiB like "2MiB",'
        f" got {size}"
    )


def test_max_line_bytes_of_4kib_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nmax_line_bytes = "4KiB"\n')
    assert load_settings(path).api.max_line_bytes == 4096


def test_default_line_limit_carries_the_largest_binary_message_in_base64() -> None:
    settings = load_settings(None)
    assert settings.api.max_line_bytes == ApiSettings().max_line_bytes == 1_463_637
    largest = settings.queue.max_message_bytes
    line = json.dumps(
        {
            "op": "publish",
            "topic": "t" * 1023,
            "data_b64": base64.b64encode(b"\xff" * largest).decode(),
            "ct": "a" * 255,
            "prio": -1000,
            "ttl": 31536000.5,
        }
    ).encode() + b"\n"
    assert len(line) <= settings.api.max_line_bytes


def test_max_message_bytes_sets_the_default_line_limit(tmp_path: Path) -> None:
    path = write(tmp_path, '[queue]\nmax_message_bytes = "4MiB"\n')
    assert load_settings(path).api.max_line_bytes == 4 * 1024 * 1024 * 4 // 3 + 64 * 1024


def test_explicit_max_line_bytes_wins_over_the_derived_one(tmp_path: Path) -> None:
    path = write(tmp_path, '[queue]\nmax_message_bytes = "4MiB"\n[api]\nmax_line_bytes = "8MiB"\n')
    assert load_settings(path).api.max_line_bytes == 8 * 1024 * 1024


@pytest.mark.parametrize("interval", ['"10m"', '"1001ms"', "1.5"])
def test_commit_interval_over_a_second_is_refused(tmp_path: Path, interval: str) -> None:
    path = write(tmp_path, f"[queue]\ncommit_interval = {interval}\n")
    assert config_error(path) == (
        f"config {path}: [queue] commit_interval: expected a duration from 0s to 1s,"
        f" got {interval}"
    )


def test_commit_interval_of_a_second_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, '[queue]\ncommit_interval = "1s"\n')
    assert load_settings(path).queue.commit_interval == 1.0


# -- flags -------------------------------------------------------------------


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    settings = load_settings(
        path, uplink="mqtts://other:1884", data_dir=tmp_path / "data", node_id="flag-id"
    )
    assert settings.uplink.url == "mqtts://other:1884"
    assert settings.node.data_dir == tmp_path / "data"
    assert settings.node.id == "flag-id"
    assert settings.uplink.prefix == "acme/edge/v2"  # the rest still from the file


def test_flags_apply_without_a_file(tmp_path: Path) -> None:
    settings = load_settings(None, uplink="", data_dir=str(tmp_path), node_id="n1")
    assert (settings.uplink.url, settings.node.data_dir, settings.node.id) == ("", tmp_path, "n1")


@pytest.mark.parametrize(
    ("flags", "prefix"),
    [
        ({"node_id": "a/b"}, "--node-id: expected"),
        ({"node_id": "x" * 65}, "--node-id: expected"),
        ({"uplink": "tcp://broker"}, "--uplink: expected mqtt://host[:port]"),
        ({"data_dir": ""}, "--data-dir: expected a path"),
    ],
)
def test_bad_flag_is_named(tmp_path: Path, flags: dict[str, str], prefix: str) -> None:
    assert config_error(write(tmp_path, ""), **flags).startswith(prefix)


# -- node ids ----------------------------------------------------------------


def test_node_id_from_machine_id_is_stable_and_hides_it(tmp_path: Path) -> None:
    machine_id = "0123456789abcdef0123456789abcdef"
    path = tmp_path / "machine-id"
    path.write_text(machine_id + "\n")
    node = default_node_id(path, hostname="host")
    assert node == default_node_id(path, hostname="other")
    assert validate_node_id(node) == node
    assert node.startswith("edge-") and len(node) == len("edge-") + 12
    assert machine_id[:8] not in node
    path.write_text("fedcba9876543210fedcba9876543210\n")
    assert default_node_id(path) != node


@pytest.mark.parametrize("content", [None, "", "\n", "uninitialized\n"])
def test_node_id_falls_back_to_hostname(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "machine-id"
    if content is not None:
        path.write_text(content)
    assert default_node_id(path, hostname="pi-01") == "pi-01"


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("pi.local", "pi-local"),
        ("my host/+#", "my-host---"),
        ("ü", "-"),
        ("h" * 100, "h" * 64),
        ("", "edge"),
    ],
)
def test_hostname_fallback_is_sanitized(tmp_path: Path, hostname: str, expected: str) -> None:
    node = default_node_id(tmp_path / "missing", hostname=hostname)
    assert node == expected
    assert validate_node_id(node) == node


@pytest.mark.parametrize("node", ["a", "A-z_09", "x" * 64])
def test_valid_node_ids(node: str) -> None:
    assert validate_node_id(node) == node


@pytest.mark.parametrize("node", ["", "a/b", "a+b", "a#b", "a b", "a.b", "é", "x" * 65, "a\n"])
def test_invalid_node_ids(node: str) -> None:
    with pytest.raises(ValueError, match="A-Z a-z 0-9 _ -"):
        validate_node_id(node)


# -- units -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256MiB", 256 * 1024**2),
        ("10MB", 10_000_000),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("4096", 4096),
        ("100B", 100),
        ("0", 0),
        ("1.5KiB", 1536),
        ("2 mib", 2 * 1024**2),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1", "10XB", "MiB", "1.5.5MiB", -1, 1.5, True])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match='expected a size like "256MiB", got '):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "lots", "30", "-5s", "5 fortnights", "s", -1, float("inf"), float("nan"), True]
)
def test_parse_duration_rejects(text: str | float) -> None:
    with pytest.raises(ValueError, match='expected a duration like "30s", got '):
        parse_duration(text)


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("mqtt://broker", ("mqtt", "broker", 1883)),
        ("mqtt://10.0.0.1:1884", ("mqtt", "10.0.0.1", 1884)),
        ("mqtt://[::1]:8884/", ("mqtt", "::1", 8884)),
    ],
)
def test_parse_mqtt_url(url: str, parts: tuple[str, str, int]) -> None:
    assert parse_mqtt_url(url) == parts


@pytest.mark.parametrize(
    "url",
    [
        "",
        "broker:1883",
        "ws://broker",
        "mqtt://",
        "mqtt://b:0",
        "mqtt://u:p@b",
        "mqtt://b?x=1",
        "mqtt://a b",
        "mqtt://h :1883",
        "mqtt://127.0.0.1 ",
        " mqtt://h",
        "mqtt://h\t",
        "mqtt://h\n",
        "mqtt://h:",
        "mqtt://[::1]:",
        "mqtt://:1883",
    ],
)
def test_parse_mqtt_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="expected mqtt://host"):
        parse_mqtt_url(url)


@pytest.mark.parametrize("url", ["mqtts://broker", "mqtts://broker:8883", "MQTTS://broker"])
def test_tls_url_is_accepted(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f'[uplink]\nurl = "{url}"\n')
    assert load_settings(path).uplink.url == url


# -- the CLI -----------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A timeout, so that a CLI that does not refuse a bad file fails the test
    # instead of running an agent forever.
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_cli_config_check_accepts_a_valid_file(tmp_path: Path) -> None:
    # config check also loads the keys and looks up the group: give it real ones.
    from edge.signing import generate_key

    generate_key(tmp_path / "registry.key")
    text = FULL.replace('group = "edge-users"\n', "").replace(
        'desired_keys = ["/etc/edge/registry-2026.pub", "/etc/edge/registry-2027.pub"]',
        f'desired_keys = ["{tmp_path / "registry.key.pub"}"]')
    assert text != FULL
    path = write(tmp_path, text)
    result = run_cli(tmp_path, "config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_cli_config_check_rejects_a_bad_file_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[uplink]\nkepalive = '30s'\n")
    result = run_cli(tmp_path, "config", "check", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and "[uplink] kepalive" in lines[0]


def test_cli_run_refuses_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\nmax_bytes = 'lots'\n")
    result = run_cli(tmp_path, "run", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and "[queue] max_bytes" in lines[0]


@pytest.mark.parametrize(("section", "key"), [("node", "data_dir"), ("api", "socket")])
def test_a_relative_path_in_the_file_is_refused(tmp_path: Path, section: str, key: str) -> None:
    path = write(tmp_path, f'[{section}]\n{key} = "data/here"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == (
        f'config {path}: [{section}] {key}: expected an absolute path (from /), got "data/here"')


def test_a_relative_data_dir_flag_is_taken_from_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, data_dir="d").node.data_dir == tmp_path / "d"


@pytest.mark.parametrize(("text", "message"), [
    ('[uplink]\nurl = "mqtt://b"\nca_file = "/ca.pem"\n',
     '[uplink] ca_file: TLS settings need an mqtts:// url, got "mqtt://b"'),
    ('[uplink]\nurl = "mqtts://b"\nkey_file = "/k.pem"\n',
     "[uplink] key_file: needs cert_file"),
    ('[uplink]\nurl = "mqtts://b"\npassword_file = "/p"\n',
     "[uplink] password_file: needs username"),
    ('[local]\nurl = "mqtts://127.0.0.1"\n',
     "[local] url: expected mqtt://host[:port] (the device"),
    ('[api]\ngroup = "no group"\n', '[api] group: expected a group name or number, got "no group"'),
    ('[state]\ndesired_keys = "/k.pub"\n', "[state] desired_keys: expected a list of at most 16"),
])
def test_tls_and_key_settings_are_checked(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"config {path}: {message}")


def test_mqtts_url_defaults_to_port_8883(tmp_path: Path) -> None:
    from edge.config import parse_mqtt_url

    assert parse_mqtt_url("mqtts://broker.example") == ("mqtts", "broker.example", 8883)
    assert parse_mqtt_url("mqtt://broker.example") == ("mqtt", "broker.example", 1883)


def test_a_huge_config_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b"# " + b"x" * (1024 * 1024) + b"\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"config {path}: larger than 1024 KiB; not a config file?"
