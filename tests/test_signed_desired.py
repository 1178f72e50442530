"""Signed desired documents: the keys and signatures (edge/signing.py), the node's checks
(edge/desired.py), and the whole path with a real registry, broker and agent.

Forged documents are published straight on the broker, as a rogue client with
write access to a node's desired topic would.
"""

from __future__ import annotations

import asyncio
import base64
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.cli import main
from edge.desired import DesiredState
from edge.documents import Desired
from edge.errors import ConfigError, DocumentError
from edge.reconcile import Items
from edge.registry.desired import DesiredPublisher
from edge.registry.records import DesiredRow, Rejected, to_row
from edge.registry.store import open_store
from edge.signing import (
    Keyring,
    SignatureError,
    Signer,
    is_signed,
    load_keyring,
    load_public_key,
    load_signer,
    unwrap,
)
from tests.conftest import AgentFactory, RegistryFactory
from tests.support.agent import Agent, render_toml
from tests.support.broker import Broker
from tests.support.net import wait_until
from tests.support.registry import Registry
from tests.support.subscriber import publish_retained, read_retained
from tests.test_state_sync import SLEEP, desired_topic, service_rows, wait_node, wait_running

NODE = "node-a"
FAST = {"state": {"debounce": "0.2s"}}


def doc_bytes(version: int, node: str | None = NODE, **services: Any) -> bytes:
    doc: dict[str, Any] = {"v": 1, "version": version, "services": services}
    if node is not None:
        doc["node"] = node
    return bytes(cbor2.dumps(doc))


def new_signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def flip_byte(wrapper: bytes) -> bytes:
    """The same wrapper with one byte of the signed document changed."""
    outer = cbor2.loads(wrapper)
    doc = bytearray(outer["doc"])
    doc[-1] ^= 0x01
    return bytes(cbor2.dumps({**outer, "doc": bytes(doc)}))


def write_keys(tmp_path: Path, name: str) -> Path:
    """`edge registry keygen --out tmp_path/name`; the private key's path."""
    out = tmp_path / name
    assert main(["registry", "keygen", "--out", str(out)]) == 0
    return out


# ---- keys and signatures -----------------------------------------------------------------


def test_a_signed_document_verifies_against_its_key_and_carries_it_exactly() -> None:
    signer = new_signer()
    doc = doc_bytes(3, tick={"command": SLEEP})
    outer = cbor2.loads(signer.wrap(doc))
    assert set(outer) == {"v", "doc", "kid", "sig"} and outer["v"] == 1
    assert is_signed(outer) and not is_signed(cbor2.loads(doc))
    signed = unwrap(outer)
    assert signed.doc == doc and len(signed.sig) == 64 and signed.kid == signer.kid
    assert len(signer.kid) == 16 and int(signer.kid, 16) >= 0
    Keyring([new_signer().public_key, signer.public_key]).verify(signed)  # any key of the ring


def test_one_changed_byte_of_the_document_is_a_bad_signature() -> None:
    signer = new_signer()
    signed = unwrap(cbor2.loads(flip_byte(signer.wrap(doc_bytes(3)))))
    with pytest.raises(SignatureError, match="bad signature") as caught:
        Keyring([signer.public_key]).verify(signed)
    assert caught.value.kind == "bad_signature"


def test_a_key_outside_the_ring_is_unknown_and_a_borrowed_kid_does_not_help() -> None:
    ours, theirs = new_signer(), new_signer()
    ring = Keyring([ours.public_key])
    with pytest.raises(SignatureError, match=f"unknown key \\(kid {theirs.kid}; known:"
                                             f" {ours.kid}\\)") as caught:
        ring.verify(unwrap(cbor2.loads(theirs.wrap(doc_bytes(1)))))
    assert caught.value.kind == "unknown_key"
    forged = {**cbor2.loads(theirs.wrap(doc_bytes(1))), "kid": ours.kid}
    with pytest.raises(SignatureError, match="bad signature"):
        ring.verify(unwrap(forged))


@pytest.mark.parametrize(("change", "reason"), [
    ({"sig": b"\x00" * 63}, "sig: expected 64 bytes, got 63 bytes"),
    ({"sig": "text"}, "sig: expected 64 bytes, got str"),
    ({"doc": {"version": 1}}, "doc: expected the document's CBOR as a byte string"),
    ({"kid": 7}, "kid: expected a key id"),
    ({"v": 2}, "v: expected 1"),
    ({"extra": 1}, "unknown key 'extra'"),
])
def test_a_malformed_wrapper_is_refused_saying_what_is_wrong(
    change: dict[str, Any], reason: str,
) -> None:
    outer = {**cbor2.loads(new_signer().wrap(doc_bytes(1))), **change}
    with pytest.raises(DocumentError, match="signed wrapper: " + reason.replace("(", r"\(")):
        unwrap(outer)


def test_public_keys_load_from_pem_or_from_one_base64_line(tmp_path: Path) -> None:
    private = write_keys(tmp_path, "registry.key")
    signer = load_signer(private)
    pem = load_public_key(tmp_path / "registry.key.pub")
    raw = pem.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    line = tmp_path / "registry.b64"
    line.write_text(base64.b64encode(raw).decode() + "\n")
    ring = load_keyring([tmp_path / "registry.key.pub", line])
    assert ring.kids == (signer.kid,)  # the same key twice is one key
    ring.verify(unwrap(cbor2.loads(signer.wrap(doc_bytes(1)))))


@pytest.mark.parametrize("kind", ["missing", "garbage", "private", "short", "ed448"])
def test_a_public_key_file_that_is_not_one_is_an_error_naming_the_file(
    tmp_path: Path, kind: str,
) -> None:
    path = tmp_path / "key.pub"
    expected = {"missing": "cannot read: No such file", "garbage": "expected an Ed25519 public",
                "private": "this is a private key", "short": "holds 16 bytes",
                "ed448": "expected an Ed25519 public key"}[kind]
    if kind == "garbage":
        path.write_text("hello, I am not a key\n")
    elif kind == "private":
        write_keys(tmp_path, "registry.key").rename(path)
    elif kind == "short":
        path.write_text(base64.b64encode(b"x" * 16).decode())
    elif kind == "ed448":
        path.write_bytes(Ed448PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match=expected) as caught:
        load_keyring([path])
    assert str(caught.value).startswith(f"{path}: ")


def test_the_signing_key_must_be_an_unencrypted_ed25519_private_key(tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match=f"{encrypted}: the private key is encrypted"):
        load_signer(encrypted)
    public = write_keys(tmp_path, "registry.key").with_name("registry.key.pub")
    with pytest.raises(ConfigError, match=f"{public}: not a PEM private key"):
        load_signer(public)
    ed448 = tmp_path / "ed448.key"
    ed448.write_bytes(Ed448PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="expected an Ed25519 private key"):
        load_signer(ed448)


def test_keygen_writes_a_key_only_its_owner_reads_and_never_overwrites_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    private = write_keys(tmp_path, "registry.key")
    printed = capsys.readouterr().out
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    public = (tmp_path / "registry.key.pub").read_text()
    assert public.startswith("-----BEGIN PUBLIC KEY-----") and public in printed
    assert f"key id:      {load_signer(private).kid}" in printed
    before = private.read_bytes()
    assert main(["registry", "keygen", "--out", str(private)]) == 1
    assert "exists; a key is never overwritten" in capsys.readouterr().err
    assert private.read_bytes() == before


# ---- the node's checks, in process ----------------------------------------------------------


class Recorder:
    """The apply callback: records what it is given; `done` is set at each call."""

    def __init__(self) -> None:
        self.applied: list[Desired] = []
        self.done = asyncio.Event()

    async def __call__(self, desired: Desired) -> Items:
        self.applied.append(desired)
        self.done.set()
        return {}


async def take(state: DesiredState, apply: Recorder, payload: bytes, version: int) -> None:
    """Hand one payload over and wait until it is stored and applied."""
    apply.done.clear()
    fut = state.receive(payload)
    assert fut is not None, f"not taken: {state.rejected}"
    await asyncio.wait_for(fut, 5)
    await asyncio.wait_for(apply.done.wait(), 5)
    assert state.applied == version  # set as the callback returns, before anything else runs


async def test_with_keys_only_a_document_signed_for_this_node_and_newer_is_applied(
    tmp_path: Path,
) -> None:
    ours, theirs = new_signer(), new_signer()
    apply = Recorder()
    state = DesiredState(tmp_path / "desired.cbor", apply, node=NODE,
                         keys=Keyring([ours.public_key]))
    runner = asyncio.create_task(state.run())
    try:
        first = ours.wrap(doc_bytes(2, tick={"command": SLEEP}))
        await take(state, apply, first, 2)
        await take(state, apply, ours.wrap(doc_bytes(5)), 5)
        refused = [
            (doc_bytes(9), "unsigned", "unsigned: this node takes only documents signed"),
            (flip_byte(ours.wrap(doc_bytes(9))), "bad_signature", "bad signature (kid"),
            (theirs.wrap(doc_bytes(9)), "unknown_key",
             f"signed by an unknown key (kid {theirs.kid}"),
            (first, "replayed", "replayed: version 2 is not above applied 5"),
            (ours.wrap(doc_bytes(9, node="node-b")), "wrong_node",
             "for node 'node-b', not this node 'node-a'"),
            (ours.wrap(doc_bytes(9, node=None)), "wrong_node", "names no node"),
        ]
        for payload, kind, reason in refused:
            assert state.receive(payload) is None
            assert state.rejected is not None and reason in state.rejected["reason"], kind
            times = 2 if reason == "names no node" else 1  # the second wrong_node
            assert state.rejections.counts.get(kind) == times, kind
        assert state.rejected is not None
        assert state.rejected["version"] == 9  # what the refused document said, to match it
        assert state.applied == 5 and [d.version for d in apply.applied] == [2, 5]
        assert state.snapshot()["keys"] == [ours.kid]
        # The retained copy of the applied one at the next connection: not news, not a replay.
        rejected = state.rejected
        assert state.receive(ours.wrap(doc_bytes(5))) is None
        assert state.rejected is rejected and state.ignored == 1
    finally:
        runner.cancel()


async def test_without_keys_a_signed_document_is_taken_unverified_but_not_another_nodes(
    tmp_path: Path,
) -> None:
    signer = new_signer()
    apply = Recorder()
    state = DesiredState(tmp_path / "desired.cbor", apply, node=NODE)
    runner = asyncio.create_task(state.run())
    try:
        await take(state, apply, signer.wrap(doc_bytes(1)), 1)
        await take(state, apply, doc_bytes(2, node=None), 2)  # unsigned, as before signing
        assert state.receive(doc_bytes(3, node="node-b")) is None
        assert state.rejected is not None and "not this node 'node-a'" in state.rejected["reason"]
        assert state.receive(doc_bytes(1)) is None  # old: ignored, as before signing
        assert state.rejected["version"] == 3
        assert state.applied == 2
    finally:
        runner.cancel()


async def test_at_boot_the_stored_document_is_verified_again_and_a_changed_one_refused(
    tmp_path: Path,
) -> None:
    signer = new_signer()
    path = tmp_path / "desired.cbor"
    keys = Keyring([signer.public_key])
    first = Recorder()
    state = DesiredState(path, first, node=NODE, keys=keys)
    runner = asyncio.create_task(state.run())
    try:
        await take(state, first, signer.wrap(doc_bytes(4, tick={"command": SLEEP})), 4)
    finally:
        runner.cancel()
    assert is_signed(cbor2.loads(path.read_bytes()))  # stored as it came, signature and all

    again = DesiredState(path, Recorder(), node=NODE, keys=keys)
    await again.restore()
    assert again.applied == 4

    path.write_bytes(flip_byte(path.read_bytes()))
    apply = Recorder()
    changed = DesiredState(path, apply, node=NODE, keys=keys)
    await changed.restore()
    assert changed.applied == 0 and not apply.applied
    assert changed.rejected is not None
    assert changed.rejected["reason"].startswith("desired.cbor: bad signature")


# ---- the registry's side, in process ------------------------------------------------------


async def test_a_signing_registry_publishes_the_document_with_its_node_inside_the_signature(
    tmp_path: Path,
) -> None:
    signer = new_signer()
    store = await open_store(f"sqlite://{tmp_path / 'r.db'}")
    sent: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> bool:
        sent.append((topic, payload))
        return True

    try:
        publisher = DesiredPublisher(store, publish, "edge/v1", signer=signer)
        assert await publisher.put(NODE, {"services": {}}, by="test") == (1, True)
        topic, payload = sent[-1]
        assert topic == desired_topic()
        signed = unwrap(cbor2.loads(payload))
        Keyring([signer.public_key]).verify(signed)
        doc = cbor2.loads(signed.doc)
        assert (doc["node"], doc["version"], doc["services"]) == (NODE, 1, {})
        stored = await store.desired(NODE)
        assert stored is not None and "node" not in cbor2.loads(stored[1])  # as it was put
    finally:
        await store.close()


def test_a_signing_registry_takes_from_the_broker_only_what_it_signed() -> None:
    ours, theirs = new_signer(), new_signer()
    keys = Keyring([ours.public_key])
    row = to_row(NODE, "desired", ours.wrap(doc_bytes(4)), 0.0, keys=keys)
    assert isinstance(row, DesiredRow) and row.version == 4
    assert "node" not in cbor2.loads(row.body)
    for payload, kind, reason in [
        (doc_bytes(5), "invalid", "unsigned, and this registry signs"),
        (theirs.wrap(doc_bytes(5)), "invalid", "signed by an unknown key"),
        (flip_byte(ours.wrap(doc_bytes(5))), "invalid", "bad signature"),
        (ours.wrap(doc_bytes(5, node="node-b")), "spoofed", "node 'node-b' published on"),
    ]:
        refused = to_row(NODE, "desired", payload, 0.0, keys=keys)
        assert isinstance(refused, Rejected) and refused.kind == kind, refused
        assert reason in refused.reason
    # Without a key of its own, the registry reads signed documents and unsigned ones.
    assert isinstance(to_row(NODE, "desired", theirs.wrap(doc_bytes(6)), 0.0), DesiredRow)
    assert isinstance(to_row(NODE, "desired", doc_bytes(6, node=None), 0.0), DesiredRow)


# ---- the whole path: registry, broker, agent ---------------------------------------------------


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'registry.db'}"


def keyed(*keys: Path) -> dict[str, Any]:
    """Agent overrides: fast reports, and these public keys in [state] desired_keys."""
    return {"state": {**FAST["state"], "desired_keys": [str(k) for k in keys]}}


def put(registry: Registry, body: dict[str, Any], node: str = NODE,
        query: str = "") -> int:
    status, answer = registry.request("PUT", f"/api/v1/nodes/{node}/desired{query}", body)
    assert status == 200 and answer["published"] is True, answer
    version: int = answer["version"]
    return version


def rejected_reason(node: dict[str, Any]) -> str:
    return str(((node.get("reported") or {}).get("desired_rejected") or {}).get("reason"))


SignedFleet = Callable[..., tuple[Registry, Agent, Path]]


@pytest.fixture
def signed_fleet(tmp_path: Path, broker: Broker, registry_factory: RegistryFactory,
                 agent_factory: AgentFactory) -> SignedFleet:
    """signed_fleet(node_id=NODE, also_trusted=()): a registry signing with a new key
    (tmp_path/registry.key) and an agent with its public key, and these too, seen healthy."""
    def make(node_id: str = NODE, also_trusted: Sequence[Path] = ()) -> tuple[
            Registry, Agent, Path]:
        key = write_keys(tmp_path, "registry.key")
        broker.start()
        registry = registry_factory(broker, sqlite_url(tmp_path),
                                    extra=["--signing-key", str(key)])
        agent = agent_factory(broker, node_id=node_id, overrides=keyed(
            key.with_name("registry.key.pub"), *also_trusted))
        wait_node(registry, lambda n: n["health"] == "healthy", what="node healthy",
                  node=node_id)
        return registry, agent, key
    return make


def test_signed_desired_state_is_applied_and_forgeries_rejected_with_their_reasons(
    broker: Broker, signed_fleet: SignedFleet,
) -> None:
    registry, agent, key = signed_fleet()
    kid = load_signer(key).kid
    assert registry.get("/healthz")["signing_key"] == kid
    body = {"services": {"tick": {"command": SLEEP}}}
    first = put(registry, body)
    wait_node(registry, lambda n: n["desired_applied"] == first, what="first applied")
    old = read_retained(broker.port, desired_topic())
    assert old is not None and set(old) == {"v", "doc", "kid", "sig"} and old["kid"] == kid
    assert cbor2.loads(old["doc"])["node"] == NODE
    version = put(registry, body)
    wait_node(registry, lambda n: n["desired_applied"] == version, what="second applied")
    pid = wait_running(agent, "tick")["pid"]
    current = read_retained(broker.port, desired_topic())
    assert current is not None

    rogue = new_signer()
    forged = [
        (doc_bytes(version + 10), "unsigned"),
        (flip_byte(bytes(cbor2.dumps(current))), "bad signature"),
        (rogue.wrap(doc_bytes(version + 20)), f"signed by an unknown key (kid {rogue.kid}"),
        (bytes(cbor2.dumps(old)), f"replayed: version {first} is not above applied {version}"),
    ]
    for payload, reason in forged:
        publish_retained(broker.port, desired_topic(), payload)
        node = wait_node(registry, lambda n, r=reason: r in rejected_reason(n),  # type: ignore[misc]
                         what=f"the rejection {reason!r} reported")
        assert node["desired_applied"] == version
        assert node["desired_rejected"]["reason"] == rejected_reason(node)
    row = service_rows(agent)["tick"]
    assert row["pid"] == pid and row["state"] == "running"
    counts = agent.status()["desired"]["rejections"]
    assert counts == {"unsigned": 1, "bad_signature": 1, "unknown_key": 1, "replayed": 1}
    # The registry took none of the forgeries as its document: it signs only what it stores.
    node = registry.get(f"/api/v1/nodes/{NODE}")
    assert node["desired_version"] == version
    assert registry.get("/api/v1/stats")["rejected"]["invalid"] >= 3

    # The next document from the registry is served.
    final = put(registry, {"services": {}})
    node = wait_node(registry, lambda n: n["desired_applied"] == final, what="final applied")
    assert node["desired_rejected"] is None
    wait_until(lambda: "tick" not in service_rows(agent), 10, what="tick removed")


def test_during_a_key_rotation_a_node_with_both_keys_takes_documents_signed_by_either(
    tmp_path: Path, broker: Broker, registry_factory: RegistryFactory,
    signed_fleet: SignedFleet,
) -> None:
    new = write_keys(tmp_path, "new.key")
    registry, agent, old = signed_fleet(also_trusted=[new.with_name("new.key.pub")])
    assert agent.status()["desired"]["keys"] == [load_signer(old).kid, load_signer(new).kid]
    first = put(registry, {"services": {"tick": {"command": SLEEP}}})
    wait_node(registry, lambda n: n["desired_applied"] == first, what="old key's applied")

    registry.stop()  # the registry switches to the new key, same store
    registry = registry_factory(broker, sqlite_url(tmp_path),
                                extra=["--signing-key", str(new)])
    assert registry.get("/healthz")["signing_key"] == load_signer(new).kid
    second = put(registry, {"services": {"tock": {"command": SLEEP}}})
    node = wait_node(registry, lambda n: n["desired_applied"] == second,
                     what="new key's applied")
    assert node["desired_rejected"] is None
    wait_running(agent, "tock")
    retained = read_retained(broker.port, desired_topic())
    assert retained is not None and retained["kid"] == load_signer(new).kid

    # The old key leaves the node: what it holds was signed by the new one.
    agent.config["state"]["desired_keys"] = [str(new.with_name("new.key.pub"))]
    agent.config_path.write_text(render_toml(agent.config))
    broker.stop()  # the boot applies desired.cbor, verified with the new key alone
    agent.restart()
    assert wait_running(agent, "tock")["source"] == "desired"
    status = agent.status()["desired"]
    assert status["version"] == second and status["rejected"] is None


def test_a_document_signed_for_one_node_is_rejected_on_another_nodes_topic(
    broker: Broker, signed_fleet: SignedFleet,
) -> None:
    registry, agent, _ = signed_fleet(node_id="node-b")
    version = put(registry, {"services": {"tick": {"command": SLEEP}}}, node=NODE,
                  query="?provision=true")
    for_a = read_retained(broker.port, desired_topic(NODE))
    assert for_a is not None and is_signed(for_a)
    publish_retained(broker.port, desired_topic("node-b"), bytes(cbor2.dumps(for_a)))
    node = wait_node(registry, lambda n: "not this node" in rejected_reason(n), node="node-b",
                     what="node-b refuses node-a's document")
    assert rejected_reason(node) == "for node 'node-a', not this node 'node-b'"
    assert node["desired_rejected"]["version"] == version and node["desired_applied"] == 0
    assert "tick" not in service_rows(agent)
    assert registry.get("/api/v1/stats")["rejected"]["spoofed"] >= 1


def test_a_desired_cbor_changed_on_disk_is_not_applied_at_the_next_boot(
    tmp_path: Path, broker: Broker, agent_factory: AgentFactory,
) -> None:
    key = write_keys(tmp_path, "registry.key")
    signer = load_signer(key)
    broker.start()
    agent = agent_factory(broker, overrides=keyed(key.with_name("registry.key.pub")))
    agent.wait_online()
    publish_retained(broker.port, desired_topic(),
                     signer.wrap(doc_bytes(3, tick={"command": SLEEP})))
    wait_running(agent, "tick")

    agent.terminate()
    broker.stop()  # no network at boot: only the file speaks
    stored = agent.data_dir / "desired.cbor"
    stored.write_bytes(flip_byte(stored.read_bytes()))
    agent.start()
    status = agent.status()
    assert status["desired"]["version"] == 0
    assert status["desired"]["rejected"]["reason"].startswith("desired.cbor: bad signature")
    assert "tick" not in service_rows(agent)


def test_an_agent_whose_desired_key_does_not_load_refuses_to_start(
    tmp_path: Path, agent_factory: AgentFactory,
) -> None:
    bad = tmp_path / "registry.pub"
    bad.write_text("not a key\n")
    agent = agent_factory(None, overrides=keyed(bad), start=False)
    with pytest.raises(RuntimeError, match="exited with 2") as caught:
        agent.start()
    assert f"[state] desired_keys: {bad}: expected an Ed25519 public key" in str(caught.value)


def test_a_registry_whose_signing_key_does_not_load_refuses_to_start(
    tmp_path: Path, broker: Broker, registry_factory: RegistryFactory,
) -> None:
    broker.start()
    public = write_keys(tmp_path, "registry.key").with_name("registry.key.pub")
    registry = registry_factory(broker, sqlite_url(tmp_path),
                                extra=["--signing-key", str(public)], start=False)
    with pytest.raises(RuntimeError, match="exited with 2"):
        registry.start()
    assert f"--signing-key: {public}: not a PEM private key" in registry.log_tail()
