"""`[services.NAME]` tables: what they turn into, and the message for each way to get one wrong."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.services import HealthSpec, ServiceSpec, parse_services

SOURCE = "/etc/edge/agent.toml"

FULL = """
[services.broker]
command = ["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/local.conf"]
restart = "always"
health = { tcp = "127.0.0.1:1883", interval = "2s", timeout = "500ms", retries = 5 }

[services.sensor]
command = ["/opt/sensor/bin/sensor", "--bus", "i2c-1"]
env = { LEVEL = "debug", EMPTY = "" }
working_dir = "/opt/sensor"
user = "sensor"
group = "i2c"
restart = "never"
backoff_initial = "250ms"
backoff_max = "2m"
backoff_jitter = 0.5
stop_timeout = "3s"
depends_on = ["broker"]
memory_max = "64MiB"
cpu_max = 0.25
log_max_bytes = "256KiB"
log_keep = 1

[services.sensor.health]
http = "http://127.0.0.1:8080/healthz?deep=1"
start_period = "30s"

[services.probe]
command = ["/opt/probe"]
health = { exec = ["/opt/probe", "--check"] }
"""


def parse(text: str) -> dict[str, ServiceSpec]:
    """Parse the `services` table of a TOML document."""
    return parse_services(tomllib.loads(text).get("services", {}), SOURCE)


def test_every_key_is_read_into_the_spec() -> None:
    specs = parse(FULL)
    assert list(specs) == ["broker", "sensor", "probe"]
    sensor = specs["sensor"]
    assert sensor == ServiceSpec(
        name="sensor", command=("/opt/sensor/bin/sensor", "--bus", "i2c-1"),
        env={"LEVEL": "debug", "EMPTY": ""}, working_dir=Path("/opt/sensor"), user="sensor",
        group="i2c", restart="never", backoff_initial=0.25, backoff_max=120.0,
        backoff_jitter=0.5, stop_timeout=3.0, depends_on=("broker",),
        health=HealthSpec(kind="http", host="127.0.0.1", port=8080, path="/healthz?deep=1",
                          start_period=30.0),
        memory_max=64 * 1024 * 1024, cpu_max=0.25, log_max_bytes=256 * 1024, log_keep=1,
    )
    assert specs["broker"].health == HealthSpec(kind="tcp", host="127.0.0.1", port=1883,
                                                interval=2.0, timeout=0.5, retries=5)
    assert specs["probe"].health == HealthSpec(kind="exec", exec=("/opt/probe", "--check"))


def test_defaults_match_the_documented_ones() -> None:
    spec = parse('[services.app]\ncommand = ["/bin/app"]\n')["app"]
    assert (spec.restart, spec.backoff_initial, spec.backoff_max, spec.backoff_jitter,
            spec.stop_timeout, spec.log_max_bytes, spec.log_keep) == (
        "on-failure", 1.0, 60.0, 0.1, 10.0, 1024 * 1024, 3)
    assert (spec.env, spec.depends_on, spec.health, spec.memory_max, spec.cpu_max,
            spec.user, spec.group, spec.working_dir) == ({}, (), None, None, None, None, None,
                                                          None)
    health = HealthSpec(kind="tcp", host="h", port=1)
    assert (health.interval, health.timeout, health.retries, health.start_period) == (
        10.0, 5.0, 3, 0.0)


BAD = [
    ('command = "/bin/app --flag"',
     '[services.app] command: expected an argv list like ["/usr/bin/app", "--flag"] (never a'
     ' shell string), got "/bin/app --flag"'),
    ("command = []", "[services.app] command: expected an argv list"),
    ('command = ["/bin/app", 3]', "[services.app] command: expected an argv list"),
    ('command = ["/bin/app"]\nrestrat = "always"',
     "[services.app] restrat: unknown key (known: backoff_initial,"),
    ('command = ["/bin/app"]\nrestart = "sometimes"',
     '[services.app] restart: expected "always" or "on-failure" or "never", got "sometimes"'),
    ('command = ["/bin/app"]\nstop_timeout = "soon"',
     '[services.app] stop_timeout: expected a duration like "30s", got "soon"'),
    ('command = ["/bin/app"]\nstop_timeout = "0s"',
     '[services.app] stop_timeout: expected a duration above 0s, got "0s"'),
    ('command = ["/bin/app"]\nbackoff_jitter = 1.5',
     "[services.app] backoff_jitter: expected a number from 0 to 1, got 1.5"),
    ('command = ["/bin/app"]\nbackoff_initial = "2m"',
     '[services.app] backoff_initial: expected a duration no longer than backoff_max (60s),'
     ' got "2m"'),
    ('command = ["/bin/app"]\nenv = { LEVEL = 3 }',
     "[services.app] env: expected a table of strings"),
    ('command = ["/bin/app"]\nworking_dir = "relative/dir"',
     '[services.app] working_dir: expected an absolute path, got "relative/dir"'),
    ('command = ["/bin/app"]\nmemory_max = "lots"',
     '[services.app] memory_max: expected a size like "256MiB", got "lots"'),
    ('command = ["/bin/app"]\ncpu_max = "half"',
     '[services.app] cpu_max: expected a fraction of one CPU like 0.5 (from 0.01), got "half"'),
    ('command = ["/bin/app"]\nlog_keep = -1',
     "[services.app] log_keep: expected an integer from 0 to 100, got -1"),
    ('command = ["/bin/app"]\nuser = "bad name"',
     '[services.app] user: expected a user or group name (or number), got "bad name"'),
    ('command = ["/bin/app"]\ndepends_on = ["ghost"]',
     '[services.app] depends_on: expected names of configured services, got "ghost"'
     " (there is no [services.ghost])"),
    ('command = ["/bin/app"]\ndepends_on = ["app"]',
     "[services.app] depends_on: a service cannot depend on itself"),
    ('restart = "always"', '[services.app] command: missing; expected an argv list'),
    ('command = ["/bin/app"]\nhealth = { tcp = "localhost" }',
     '[services.app.health] tcp: expected "host:port" like "127.0.0.1:8080", got "localhost"'),
    ('command = ["/bin/app"]\nhealth = { http = "https://x/health" }',
     "[services.app.health] http: expected a URL like"),
    ('command = ["/bin/app"]\nhealth = { tcp = "h:1", exec = ["/bin/true"] }',
     "[services.app.health]: expected exactly one of exec, tcp, http, got exec, tcp"),
    ('command = ["/bin/app"]\nhealth = { interval = "1s" }',
     "[services.app.health]: expected exactly one of exec, tcp, http, got none"),
    ('command = ["/bin/app"]\nhealth = { tcp = "h:1", retry = 2 }',
     "[services.app.health] retry: unknown key (known: exec, http, interval, retries,"),
    ('command = ["/bin/app"]\nhealth = { tcp = "h:1", retries = 0 }',
     "[services.app.health] retries: expected an integer from 1 to 1000, got 0"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m.split(":")[0] + " " + b.split()[0]
                                                        for b, m in BAD])
def test_a_bad_value_names_the_file_the_service_and_the_key(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"[services.app]\n{body}\n")
    assert str(caught.value).startswith(f"config {SOURCE}: "), caught.value
    assert message in str(caught.value)


def test_a_dependency_cycle_names_the_services_in_it() -> None:
    text = "".join(f'[services.{a}]\ncommand = ["/bin/{a}"]\ndepends_on = ["{b}"]\n'
                   for a, b in (("a", "b"), ("b", "c"), ("c", "a")))
    with pytest.raises(ConfigError, match=r"\[services.a\] depends_on: expected no cycle, got"
                                          r" a -> b -> c -> a"):
        parse(text)


def test_a_service_that_is_not_a_table_or_badly_named_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[services.app\]: expected a table, got 3"):
        parse_services({"app": 3}, SOURCE)
    with pytest.raises(ConfigError, match=r"\[services.no good\]: expected a service name"):
        parse_services({"no good": {"command": ["/bin/x"]}}, SOURCE)
    with pytest.raises(ConfigError, match=r"\[services\]: expected \[services.NAME\] tables"):
        parse_services(3, SOURCE)  # type: ignore[arg-type]


def test_a_spec_validates_itself_on_construction() -> None:
    with pytest.raises(ValueError, match="restart: expected"):
        ServiceSpec(name="x", command=("/bin/x",), restart="sometimes")
    with pytest.raises(ValueError, match="command: expected a non-empty argv list"):
        ServiceSpec(name="x", command=())
    with pytest.raises(ValueError, match="backoff_initial: expected"):
        ServiceSpec(name="x", command=("/bin/x",), backoff_initial=5.0, backoff_max=1.0)
    with pytest.raises(ValueError, match="kind: expected"):
        HealthSpec(kind="ping")
