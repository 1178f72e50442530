"""`edge fleet ...` as a subprocess against a real registry, broker and simulated nodes."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from edge.documents import parse_desired
from edge.errors import DocumentError
from tests.conftest import RegistryFactory
from tests.support.broker import Broker
from tests.support.net import free_port, wait_until
from tests.support.registry import Registry
from tests.support.simnode import SimNodes

# The fields DESIGN.md promises for `edge fleet ls --json`.
LS_FIELDS = {"node", "health", "last_seen", "reported_version", "desired_version",
             "desired_applied"}
_CONSOLE_SCRIPT = Path(sys.executable).with_name("edge")


def fleet(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
          timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the installed `edge fleet ARGS...`; EDGE_REGISTRY(_TOKEN_FILE) only from `env`."""
    command = [str(_CONSOLE_SCRIPT)] if _CONSOLE_SCRIPT.exists() else [sys.executable, "-m",
                                                                       "edge"]
    environ = {k: v for k, v in os.environ.items()
               if k not in ("EDGE_REGISTRY", "EDGE_REGISTRY_TOKEN_FILE")}
    environ.update(env or {})
    return subprocess.run([*command, "fleet", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=environ,
                          stdin=None if stdin is not None else subprocess.DEVNULL)



@pytest.fixture
def registry(cloud: Broker, registry_factory: RegistryFactory, tmp_path: Path) -> Registry:
    return registry_factory(cloud, f"sqlite://{tmp_path / 'registry.db'}")


@pytest.fixture
def two_nodes(cloud: Broker, registry: Registry, sim_nodes: SimNodes) -> Registry:
    """n1 online and healthy, n2 gone offline; both labelled site=lab, n1 also role=gw."""
    n1 = sim_nodes(cloud.port, "n1")
    n1.reported(10, labels={"site": "lab", "role": "gw"}, profile="rpi4")
    n1.online()
    n2 = sim_nodes(cloud.port, "n2")
    n2.reported(20, labels={"site": "lab"})
    n2.online()
    n2.die()

    def seen() -> bool:
        nodes = registry.nodes()
        return (nodes.get("n1", {}).get("health") == "healthy"
                and nodes.get("n2", {}).get("health") == "offline")

    wait_until(seen, 10, what="n1 healthy and n2 offline in the registry")
    return registry


def test_ls_prints_one_aligned_row_per_node(two_nodes: Registry) -> None:
    done = fleet("ls", "--registry", two_nodes.url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["NODE", "HEALTH", "LAST"]
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert rows["n1"].split()[1] == "healthy" and rows["n2"].split()[1] == "offline"
    # Aligned: every column starts at the same offset as its header.
    health_at = lines[0].index("HEALTH")
    assert all(line[health_at:].split()[0] in ("healthy", "offline") for line in lines[1:3])
    assert "1/2" in rows["n1"] and "rpi4" in rows["n1"]  # services up/total, profile
    assert lines[-1] == "2 nodes: 1 offline, 1 healthy"


def test_ls_json_is_the_apis_node_list(two_nodes: Registry) -> None:
    done = fleet("ls", "--json", "--registry", two_nodes.url)
    assert done.returncode == 0, done.stderr
    nodes = json.loads(done.stdout)
    assert [n["node"] for n in nodes] == ["n1", "n2"]
    for n in nodes:
        assert LS_FIELDS <= n.keys()
    assert nodes == two_nodes.get("/api/v1/nodes")["nodes"]  # nothing published in between
    by_node = {n["node"]: n for n in nodes}
    assert by_node["n1"]["reported_version"] == 10 and by_node["n2"]["health"] == "offline"


def test_ls_filters_by_health_and_label(two_nodes: Registry) -> None:
    offline = json.loads(fleet("ls", "--json", "--health", "offline",
                               "--registry", two_nodes.url).stdout)
    assert [n["node"] for n in offline] == ["n2"]
    gateways = json.loads(fleet("ls", "--json", "--label", "role=gw",
                                "--registry", two_nodes.url).stdout)
    assert [n["node"] for n in gateways] == ["n1"]
    none = fleet("ls", "--health", "stale", "--registry", two_nodes.url)
    assert (none.returncode, none.stdout.strip()) == (0, "no nodes")


def test_show_prints_the_node_with_its_services(two_nodes: Registry) -> None:
    done = fleet("show", "n1", "--registry", two_nodes.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["node", "n1"]
    assert "health     healthy" in done.stdout
    services = done.stdout.split("SERVICES\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert services[0].split()[:2] == ["NAME", "STATE"]
    assert {line.split()[0]: line.split()[1] for line in services[1:]} == {
        "web": "running", "db": "failed"}
    as_json = json.loads(fleet("show", "n1", "--json", "--registry", two_nodes.url).stdout)
    assert as_json["node"] == "n1" and as_json["reported"]["version"] == 10
    assert {"desired", "status"} <= as_json.keys()


def test_show_an_unknown_node_exits_2_with_the_registrys_message(registry: Registry) -> None:
    done = fleet("show", "nobody", "--registry", registry.url)
    assert done.returncode == 2
    assert "unknown_node" in done.stderr and done.stdout == ""


def test_desired_from_a_json_file_answers_the_version(two_nodes: Registry,
                                                      tmp_path: Path) -> None:
    document = tmp_path / "web.json"
    document.write_text(json.dumps({"services": {"web": {"command": ["sleep", "60"]}}}))
    done = fleet("desired", "n1", str(document), "--registry", two_nodes.url)
    assert done.returncode == 0, done.stderr
    version = two_nodes.nodes()["n1"]["desired_version"]
    assert version >= 1
    assert done.stdout.strip() == f"n1: desired version {version}, published"
    desired = two_nodes.get("/api/v1/nodes/n1")["desired"]
    assert desired["services"] == {"web": {"command": ["sleep", "60"]}}


def test_desired_from_toml_on_stdin_for_a_label(two_nodes: Registry) -> None:
    toml = '[config.telemetry]\ninterval = "30s"\n\n[services.web]\ncommand = ["sleep", "5"]\n'
    done = fleet("desired", "--label", "site=lab", "-", "--json",
                 "--registry", two_nodes.url, stdin=toml)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)["nodes"]
    assert [a["node"] for a in answers] == ["n1", "n2"]
    nodes = two_nodes.nodes()
    assert {a["node"]: a["version"] for a in answers} == {
        n: nodes[n]["desired_version"] for n in ("n1", "n2")}
    desired = two_nodes.get("/api/v1/nodes/n2")["desired"]
    assert desired["config"] == {"telemetry": {"interval": "30s"}}


@pytest.mark.parametrize("what", ["json", "toml"])
def test_a_bad_document_exits_2_with_the_registrys_message(two_nodes: Registry,
                                                           tmp_path: Path, what: str) -> None:
    bad: dict[str, Any] = {"services": {"web": {"command": "sleep 60"}}}
    with pytest.raises(DocumentError) as parser:
        parse_desired(bad, need_version=False)
    if what == "json":
        document = tmp_path / "bad.json"
        document.write_text(json.dumps(bad))
        done = fleet("desired", "n1", str(document), "--registry", two_nodes.url)
    else:
        done = fleet("desired", "n1", "-", "--registry", two_nodes.url,
                     stdin='[services.web]\ncommand = "sleep 60"\n')
    assert done.returncode == 2
    assert done.stderr.strip() == f"edge: registry: invalid_desired: {parser.value}"
    assert two_nodes.nodes()["n1"]["desired_version"] in (None, 0)


def test_a_file_that_is_neither_json_nor_toml_exits_2(registry: Registry) -> None:
    done = fleet("desired", "n1", "-", "--registry", registry.url, stdin="services = [")
    assert done.returncode == 2
    assert "stdin: not valid TOML" in done.stderr


@pytest.mark.parametrize(("name", "content", "message"), [
    ("desired.toml", "", "the document is empty"),   # a truncated file
    ("desired.json", "{}", "the document is empty"),
    ("desired.json", "[" * 100_000, "nested too deeply"),
])
def test_an_empty_or_bomb_file_exits_2_before_asking_the_registry(
    registry: Registry, tmp_path: Path, name: str, content: str, message: str,
) -> None:
    path = tmp_path / name
    path.write_text(content)
    done = fleet("desired", "n1", str(path), "--registry", registry.url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_node_that_never_reported_needs_provision(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "desired.json"
    path.write_text('{"services": {}}')
    done = fleet("desired", "pi-new", str(path), "--registry", registry.url)
    assert done.returncode == 2 and "provision" in done.stderr
    done = fleet("desired", "--provision", "pi-new", str(path), "--registry", registry.url)
    assert done.returncode == 0, done.stderr
    assert "pi-new: desired version 1" in done.stdout


def test_an_unreachable_registry_exits_1_naming_its_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["ls"], ["show", "n1"]):
        done = fleet(*args, "--registry", url)
        assert done.returncode == 1
        assert f"registry {url} is unreachable" in done.stderr


def test_the_registry_comes_from_the_flag_then_env_then_config(tmp_path: Path) -> None:
    flag, env, conf = (f"http://127.0.0.1:{free_port()}" for _ in range(3))
    config = tmp_path / "agent.toml"
    config.write_text(f'[fleet]\nregistry = "{conf}"\n')
    cases = [
        (["--registry", flag, "--config", str(config)], {"EDGE_REGISTRY": env}, flag),
        (["--config", str(config)], {"EDGE_REGISTRY": env}, env),
        (["--config", str(config)], {}, conf),
    ]
    for args, environ, expected in cases:
        done = fleet("ls", *args, env=environ)
        assert done.returncode == 1
        assert f"registry {expected} is unreachable" in done.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert fleet("desired", "n1").returncode == 2  # no FILE
    both = fleet("desired", "n1", "-", "--label", "a=b", stdin="{}")
    assert both.returncode == 2 and "either NODE or --label" in both.stderr
    assert fleet("ls", "--label", "nolabel").returncode == 2
    missing = fleet("ls", "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and "none.toml" in missing.stderr


TOKEN = "fleet-token-0123456789abcdef"


@pytest.fixture
def locked(cloud: Broker, registry_factory: RegistryFactory, tmp_path: Path,
           sim_nodes: SimNodes) -> tuple[Registry, Path]:
    """A registry with --api-token-file that knows n1, and that token file."""
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n")
    reg = registry_factory(cloud, f"sqlite://{tmp_path / 'locked.db'}",
                           extra=["--api-token-file", str(token)])
    sim_nodes(cloud.port, "n1").reported(1)
    wait_until(lambda: "n1" in fleet("ls", "--registry", reg.url, "--token-file",
                                     str(token)).stdout, 10, what="n1 in the registry")
    return reg, token


def test_ls_with_a_token_file_reads_a_registry_with_a_token(
    locked: tuple[Registry, Path], tmp_path: Path,
) -> None:
    reg, token = locked
    done = fleet("ls", "--json", "--registry", reg.url, "--token-file", str(token))
    assert done.returncode == 0, done.stderr
    assert [n["node"] for n in json.loads(done.stdout)] == ["n1"]
    by_env = fleet("show", "n1", "--registry", reg.url,
                   env={"EDGE_REGISTRY_TOKEN_FILE": str(token)})
    assert by_env.returncode == 0, by_env.stderr
    document = tmp_path / "web.json"
    document.write_text(json.dumps({"services": {"web": {"command": ["sleep", "60"]}}}))
    put = fleet("desired", "n1", str(document), "--registry", reg.url, "--token-file",
                str(token))
    assert put.returncode == 0 and "n1: desired version" in put.stdout, put.stderr
    config = tmp_path / "agent.toml"
    config.write_text(f'[fleet]\nregistry = "{reg.url}"\ntoken_file = "{token}"\n')
    by_config = fleet("ls", "--config", str(config))
    assert by_config.returncode == 0, by_config.stderr


def test_without_the_token_fleet_says_how_to_give_it(
    locked: tuple[Registry, Path], tmp_path: Path,
) -> None:
    reg, _ = locked
    done = fleet("ls", "--registry", reg.url)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"edge: registry {reg.url} needs its API token: give the file it is in (its first"
        " line) with --token-file FILE, $EDGE_REGISTRY_TOKEN_FILE or [fleet] token_file")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-0123456789\n")
    done = fleet("ls", "--registry", reg.url, "--token-file", str(wrong))
    assert done.returncode == 2
    assert f"refused the API token of --token-file {wrong}" in done.stderr
    assert "not-the-token" not in done.stderr
    missing = fleet("ls", "--registry", reg.url, "--token-file", str(tmp_path / "none"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_the_token_never_follows_a_redirect(tmp_path: Path) -> None:
    seen: list[str | None] = []

    class Target(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"nodes": []}')

        def log_message(self, *args: Any) -> None:
            pass

    target = http.server.HTTPServer(("127.0.0.1", 0), Target)

    class Redirect(Target):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_port}/api/v1/nodes")
            self.end_headers()

    redirect = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (target,
                                                                                redirect)]
    for thread in threads:
        thread.start()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    try:
        done = fleet("ls", "--registry", f"http://127.0.0.1:{redirect.server_port}",
                     "--token-file", str(token))
    finally:
        for server in (target, redirect):
            server.shutdown()
            server.server_close()
    assert done.returncode == 1 and "HTTP 302" in done.stderr
    assert seen == []
