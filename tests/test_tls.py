"""mqtts:// with mutual TLS and passwords, against a real mosquitto with a test CA.

The agent runs as a subprocess and is talked to through its socket API; what
it delivered is read by a TLS subscriber with a certificate of its own.
Certificate problems must leave the agent running and queueing, with one
line saying which file is wrong and why, and a fixed file must be used at the
next reconnect without a restart.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge.agent import Agent as EdgeAgent
from edge.config import load_settings
from edge.errors import UplinkError
from edge.tls import Login, TlsFiles, client_context
from tests.conftest import AgentFactory, BrokerFactory
from tests.support.agent import Agent, render_toml
from tests.support.broker import Broker
from tests.support.net import wait_until
from tests.support.pki import CertFiles, Pki
from tests.support.tlspeer import TlsPeer

NODE = "node-a"
UP = f"edge/v1/nodes/{NODE}/up/#"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def tls_broker(broker_factory: BrokerFactory, pki: Pki, server: CertFiles | None = None,
               *, client_certificates: bool = True, extra: tuple[str, ...] = ()) -> Broker:
    broker = broker_factory(extra=[
        *pki.listener_lines(server or pki.server(), client_certificates=client_certificates),
        *extra])
    broker.start()
    return broker


def mqtts(broker: Broker, host: str = "127.0.0.1") -> str:
    return f"mqtts://{host}:{broker.port}"


def tls_keys(pki: Pki, identity: CertFiles | None, **more: Any) -> dict[str, Any]:
    keys: dict[str, Any] = {"ca_file": pki.ca_file}
    if identity is not None:
        keys.update(cert_file=identity.cert, key_file=identity.key)
    keys.update(more)
    return {"uplink": keys}


def cloud_app(pki: Pki, broker: Broker, topic_filter: str = UP) -> TlsPeer:
    peer = TlsPeer(broker.port, pki.ca_file, pki.client("cloud-app")).start()
    peer.subscribe(topic_filter)
    return peer


def wait_error(agent: Agent, *parts: str, timeout: float = 10.0) -> str:
    """Wait until status shows the uplink offline with a last_error holding every part."""
    status = agent.wait_status(
        lambda s: s["uplink"]["state"] == "offline"
        and all(p in (s["uplink"].get("last_error") or "") for p in parts),
        timeout, what=f"last_error with {parts}")
    error: str = status["uplink"]["last_error"]
    return error


def publish_offline(agent: Agent, count: int) -> None:
    for i in range(count):
        agent.publish_ok("t", f"queued {i}")
    assert agent.status()["queue"]["depth"] >= count
    assert agent.status()["uplink"]["state"] == "offline"


def replace_file(target: Path, source: Path) -> None:
    """Put `source`'s bytes at `target` the way an operator rotates a file: write, rename."""
    staging = target.with_suffix(".new")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def delivered(peer: TlsPeer, count: int, timeout: float = 10.0) -> None:
    wait_until(lambda: len(peer.messages()) >= count, timeout,
               what=f"{count} messages at the cloud application")


def warnings_about(agent: Agent, text: str) -> int:
    return sum(text in line for line in agent.log_path.read_text().splitlines())


# ---- delivery --------------------------------------------------------------------------


def test_node_with_a_valid_certificate_delivers_over_mutual_tls(
    broker_factory: BrokerFactory, agent_factory: AgentFactory, pki: Pki
) -> None:
    broker = tls_broker(broker_factory, pki)
    app = cloud_app(pki, broker)
    agent = agent_factory(mqtts(broker), node_id=NODE, overrides=tls_keys(pki, pki.client(NODE)))
    for i in range(20):
        agent.publish_ok("sensors/t", str(i))
    agent.wait_online()
    agent.wait_drained(10)
    delivered(app, 20)
    assert {topic for topic, _ in app.messages()} == {f"edge/v1/nodes/{NODE}/up/sensors/t"}
    assert "u'node-a'" in broker.log_path.read_text()  # the broker took the CN as user name
    app.close()


# ---- certificate problems: named, offline, queueing, fixed without a restart -----------


def test_expired_certificate_is_named_with_its_date_and_a_renewed_one_is_used_without_restart(
    broker_factory: BrokerFactory, agent_factory: AgentFactory, pki: Pki
) -> None:
    broker = tls_broker(broker_factory, pki)
    app = cloud_app(pki, broker)
    expired = pki.client(NODE, "expired", expired=True)
    agent = agent_factory(mqtts(broker), node_id=NODE, overrides=tls_keys(pki, expired))
    error = wait_error(agent, "expired")
    stamp = expired.not_after.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert error == (f"[uplink] cert_file {expired.cert}: the certificate expired on {stamp};"
                     " put a renewed one in its place (it is read again at every reconnect)")
    publish_offline(agent, 5)
    pid = agent.pid

    renewed = pki.client(NODE, "renewed")
    replace_file(expired.key, renewed.key)
    replace_file(expired.cert, renewed.cert)
    agent.wait_online(timeout=10)
    agent.wait_drained(10)
    delivered(app, 5)
    assert agent.pid == pid and agent.starts == 1
    assert warnings_about(agent, "the certificate expired on") == 1  # said once, not per attempt
    app.close()


def test_a_client_certificate_from_another_ca_is_refused_by_the_broker_and_named(
    broker_factory: BrokerFactory, agent_factory: AgentFactory, pki: Pki, tmp_path: Path
) -> None:
    broker = tls_broker(broker_factory, pki)
    stranger = Pki(tmp_path / "other").client(NODE)
    agent = agent_factory(mqtts(broker), node_id=NODE, overrides=tls_keys(pki, stranger))
    error = wait_error(agent, "refused")
    assert error == (f"the broker refused [uplink] cert_file {stranger.cert}: it does not trust"
                     " the CA that signed it (unknown CA) (tlsv1_alert_unknown_ca)")
    publish_offline(agent, 3)
    agent.assert_alive()


def test_a_broker_certificate_from_another_ca_is_refused_naming_ca_file(
    broker_factory: BrokerFactory, agent_factory: AgentFactory, pki: Pki, tmp_path: Path
) -> None:
    other = Pki(tmp_path / "other")
    broker = tls_broker(broker_factory, pki, other.server())
    ca_file = tmp_path / "agent-ca.pem"
    shutil.copyfile(pki.ca_file, ca_file)
    agent = agent_factory(mqtts(broker), node_id=NODE,
                          overrides=tls_keys(pki, pki.client(NODE), ca_file=ca_file))
    error = wait_error(agent, "not signed")
    assert error == (
        f"the broker's certificate (127.0.0.1:{broker.port}) is not signed by a CA in"
        f" [uplink] ca_file {ca_file}: certificate verify failed: unable to get local"
        " issuer certificate; is that the CA that issued the broker's certificate?")
    publish_offline(agent, 3)

    # The operator puts the CA that issued the broker's certificate in ca_file.
    replace_file(ca_file, other.ca_file)
    agent.wait_online()
    agent.wait_drained(10)
    assert agent.starts == 1


def test_a_broker_certificate_for_another_host_is_refused_naming_the_host(
    broker_factory: BrokerFactory, agent_factory: AgentFactory, pki: Pki
) -> None:
    broker = tls_broker(broker_factory, pki, pki.server("elsewhere", hosts=("broker.example",)))
    agent = agent_factory(mqtts(broker), node_id=NODE, overrides=tls_keys(pki, pki.client(NODE)))
    error = wait_error(agent, "not valid for")
    assert error == (
        "the broker's certificate is not valid for '127.0.0.1', the host in the url (IP address"
        " mismatch, certificate is not valid for '127.0.0.1'): connect to a name the"
        " certificate has, or have the broker's certificate issued for '127.0.0.1'")
    publish_offline(agent, 3)


def test_a_key_that_does_not_match_its_certificate_keeps_the_agent_queueing_until_fixed(
    broker_factory: BrokerFactory, agent_factory: AgentFactory, pki: Pki
) -> None:
    broker = tls_broker(broker_factory, pki)
    app = cloud_app(pki, broker)
    good = pki.client(NODE)
    wrong = pki.client("someone-else")
    installed = CertFiles(good.cert, wrong.key, good.not_after)
    agent = agent_factory(mqtts(broker), node_id=NODE, overrides=tls_keys(pki, installed))
    error = wait_error(agent, "does not belong")
    assert error == (f"[uplink] key_file {wrong.key}: this key does not belong to the certificate"
                     f" in [uplink] cert_file {good.cert} (their public keys differ)")
    publish_offline(agent, 4)
    replace_file(wrong.key, good.key)
    agent.wait_online()
    agent.wait_drained(10)
    delivered(app, 4)
    app.close()


def test_an_mqtts_url_to_a_plain_listener_is_never_sent_in_plaintext_and_says_so(
    broker_factory: BrokerFactory, agent_factory: AgentFactory, pki: Pki
) -> None:
    plain = broker_factory()
    plain.start()
    agent = agent_factory(mqtts(plain), node_id=NODE, overrides=tls_keys(pki, pki.client(NODE)))
    error = wait_error(agent, "TLS listener")
    assert error == (f"cannot connect to 127.0.0.1:{plain.port}: [Errno 104] Connection reset by"
                     " peer; is it a TLS listener? (mqtts:// needs one; plain MQTT is usually"
                     " port 1883)")
    publish_offline(agent, 2)
    assert "as node-a" not in plain.log_path.read_text()  # no MQTT session ever began


# ---- what each file problem says (no broker needed: checked before connecting) -----------


def _files(good: CertFiles, pki: Pki, **change: Any) -> TlsFiles:
    values: dict[str, Any] = {"ca_file": pki.ca_file, "cert_file": good.cert,
                              "key_file": good.key}
    values.update(change)
    return TlsFiles(**values)


def test_each_unusable_file_is_named_with_the_reason(pki: Pki, tmp_path: Path) -> None:
    good = pki.client(NODE)
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key at all\n")
    broken = tmp_path / "broken.key"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    later = pki.client(NODE, "later", not_yet_valid=True)
    cases = [
        (_files(good, pki, ca_file=missing),
         f"[uplink] ca_file {missing}: cannot read the CA file: No such file or directory"),
        (_files(good, pki, ca_file=garbage),
         f"[uplink] ca_file {garbage}: no PEM certificate in it (expected -----BEGIN"
         " CERTIFICATE-----)"),
        (_files(good, pki, cert_file=missing),
         f"[uplink] cert_file {missing}: cannot read the certificate: No such file or"
         " directory"),
        (_files(good, pki, key_file=missing),
         f"[uplink] key_file {missing}: cannot read the private key: No such file or"
         " directory"),
        (_files(good, pki, key_file=garbage),
         f"[uplink] key_file {garbage}: no PEM private key in it (expected -----BEGIN PRIVATE"
         " KEY-----)"),
        (_files(good, pki, key_file=encrypted),
         f"[uplink] key_file {encrypted}: the private key is encrypted; edge needs it"
         " unencrypted (protect the file with its permissions instead)"),
        (_files(later, pki),
         f"[uplink] cert_file {later.cert}: the certificate is not valid before"),
    ]
    for files, expected in cases:
        with pytest.raises(UplinkError) as caught:
            client_context(files)
        assert str(caught.value).startswith(expected), (files, str(caught.value))
    with pytest.raises(UplinkError, match=rf"key_file {broken}: the private key cannot be read"):
        client_context(_files(good, pki, key_file=broken))
    # A key in the certificate's file (no key_file) is found there.
    both = tmp_path / "both.pem"
    both.write_bytes(good.cert.read_bytes() + good.key.read_bytes())
    client_context(TlsFiles(pki.ca_file, both))
    # The device clock decides: valid today, expired a year on.
    year_on = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
    with pytest.raises(UplinkError, match="the certificate expired on"):
        client_context(_files(good, pki), now=year_on)


def test_a_password_file_gives_its_first_line_and_unusable_ones_are_named(
    tmp_path: Path,
) -> None:
    path = tmp_path / "password"
    path.write_text("s3cret\nanything after the first line is ignored\n")
    assert Login("node-a", path).read() == ("node-a", "s3cret")
    path.write_text("\n")
    with pytest.raises(UplinkError, match=rf"password_file {path}: the first line is empty"):
        Login("node-a", path).read()
    missing = tmp_path / "nope"
    with pytest.raises(UplinkError, match=rf"password_file {missing}: cannot read"):
        Login("node-a", missing).read()
    assert Login("node-a").read() == ("node-a", None)


# ---- user name and password from a file ------------------------------------------------


def _password_file(workdir: Path, user: str, password: str) -> Path:
    path = workdir / "mosquitto.passwd"
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (it comes with mosquitto)")
    path.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True,
                   capture_output=True, timeout=10)
    return path


def test_the_password_comes_from_its_file_and_a_wrong_one_is_not_authorised(
    broker_factory: BrokerFactory, agent_factory: AgentFactory, pki: Pki, tmp_path: Path
) -> None:
    password = "pw-4f9c1e7a"
    passwd = _password_file(tmp_path, NODE, password)
    broker = tls_broker(broker_factory, pki, client_certificates=False,
                        extra=(f"password_file {passwd}", "allow_anonymous false"))
    app = TlsPeer(broker.port, pki.ca_file, None, username=NODE, password=password).start()
    app.subscribe(UP)
    secret = tmp_path / "uplink.password"
    secret.write_text("wrong-password\n")
    env_dump = tmp_path / "service.env"
    overrides: dict[str, Any] = tls_keys(pki, None, username=NODE, password_file=secret)
    overrides["services.envdump"] = {
        "command": ["/bin/sh", "-c", f'env > "{env_dump}"; exec sleep 60'],
        "restart": "never",
    }
    agent = agent_factory(mqtts(broker), node_id=NODE, overrides=overrides)
    error = wait_error(agent, "not authorised")
    assert error.startswith("broker refused the connection: not authorised (")
    assert error.endswith(f"; user 'node-a', password from {secret}")
    publish_offline(agent, 3)

    secret.write_text(f"{password}\n")  # fixed in place: read again at the next attempt
    agent.wait_online()
    agent.wait_drained(10)
    delivered(app, 3)
    app.close()

    # The password was never on a command line, in an environment or in the log.
    wait_until(lambda: env_dump.exists() and env_dump.stat().st_size > 0, 10,
               what="the service's environment dump")
    assert password not in env_dump.read_text()
    assert password.encode() not in Path(f"/proc/{agent.pid}/cmdline").read_bytes()
    assert password.encode() not in Path(f"/proc/{agent.pid}/environ").read_bytes()
    assert password not in agent.log_path.read_text()


# ---- the event loop ------------------------------------------------------------------


async def test_tls_connects_and_reconnects_without_blocking_calls_on_the_loop(
    broker_factory: BrokerFactory, pki: Pki, tmp_path: Path
) -> None:
    blockbuster = pytest.importorskip("blockbuster", reason="blockbuster is in the test extras")
    broker = tls_broker(broker_factory, pki)
    app = cloud_app(pki, broker)
    identity = pki.client("loop-check")
    config = tmp_path / "agent.toml"
    config.write_text(render_toml({
        "node": {"id": "loop-check", "data_dir": tmp_path / "data"},
        "uplink": {"url": mqtts(broker), "keepalive": "2s", "backoff_initial": "0.1s",
                   "backoff_max": "0.3s", "ca_file": pki.ca_file,
                   "cert_file": identity.cert, "key_file": identity.key},
        "api": {"socket": tmp_path / "agent.sock"},
        "telemetry": {"interval": "0s"}, "discovery": {"enabled": False},
        "local": {"url": ""},
    }))
    app.subscribe("edge/v1/nodes/loop-check/up/#")
    settings = load_settings(config, must_exist=True)
    agent = EdgeAgent(settings)
    runner = asyncio.ensure_future(agent.run())
    try:
        for _ in range(200):
            if settings.api.socket.exists():
                break
            await asyncio.sleep(0.02)
        with blockbuster.blockbuster_ctx("edge"):
            # The first connection (files read, TLS handshake) happens under watch too.
            reader, writer = await asyncio.open_unix_connection(str(settings.api.socket))

            async def publish(data: str, count: int) -> None:
                writer.write(json.dumps({"op": "publish", "topic": "t", "data": data}).encode()
                             + b"\n")
                await writer.drain()
                assert json.loads(await reader.readline())["ok"] is True
                for _ in range(200):
                    if len(app.messages()) >= count:
                        return
                    await asyncio.sleep(0.05)

            await publish("1", 1)
            broker.stop()  # a reconnect: the files are read and the handshake made again
            await asyncio.sleep(0.5)
            broker.start()
            await publish("2", 2)
            writer.close()
            await writer.wait_closed()
        assert len(app.messages()) >= 2
        assert not runner.done(), "the agent stopped: a blocking call raised inside it"
    finally:
        agent.stop()
        await asyncio.wait_for(runner, 10)
        app.close()
