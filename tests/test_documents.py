"""The state documents' parsers (edge/documents.py), shared by the agent and the registry."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from edge.documents import (
    check_reported,
    decode_document,
    parse_desired,
    parse_status,
    status_order,
)
from edge.errors import DocumentError

CMD = ["/usr/bin/app"]


def test_a_desired_document_gives_specs_and_live_config() -> None:
    desired = parse_desired({
        "v": 1, "version": 7,
        "services": {"app": {"command": CMD, "restart": "always", "env": {"A": "1"}}},
        "config": {"telemetry": {"interval": "30s"},
                   "queue": {"on_full": "reject", "max_bytes": "64MiB", "default_ttl": "7d"}},
    })
    assert desired.version == 7
    assert desired.services["app"].command == tuple(CMD)
    assert desired.services["app"].restart == "always"
    assert desired.config.items() == {
        "telemetry.interval": 30.0, "queue.on_full": "reject",
        "queue.max_bytes": 64 * 1024 * 1024, "queue.default_ttl": 7 * 86400.0,
    }


@pytest.mark.parametrize(("doc", "message"), [
    ({"version": 0}, "version: expected an integer from 1"),
    ({"version": True}, "version: expected an integer from 1"),
    ({"version": 1, "v": 2}, "v: expected 1"),
    ({"version": 1, "extra": 1}, "unknown key 'extra'"),
    ({"version": 1, "services": []}, "services: expected a map"),
    ({"version": 1, "services": {"a": {"command": "ls -l"}}}, "[services.a] command"),
    ({"version": 1, "services": {"a b": {"command": CMD}}}, "[services.a b]"),
    ({"version": 1, "services": {"a": {"command": CMD, "bogus": 1}}}, "bogus: unknown key"),
    ({"version": 1, "config": {"uplink": {"url": "mqtt://x"}}}, "[uplink] cannot be set"),
    ({"version": 1, "config": {"queue": {"durability": "off"}}}, "[queue] durability"),
    ({"version": 1, "config": {"queue": {"on_full": "panic"}}}, '"drop-oldest" or "reject"'),
    ({"version": 1, "config": {"telemetry": {"interval": "10ms"}}}, "at least 1s"),
    ({"version": 1, "config": {"queue": {"max_bytes": "0B"}}}, "above 0"),
    ({"version": 1, "config": []}, "config: expected a map"),
    ({"version": 1, "services": {"a": {"command": CMD, "depends_on": ["b"]},
                                 "b": {"command": CMD, "depends_on": ["a"]}}}, "no cycle"),
])
def test_a_bad_desired_document_names_what_is_wrong(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(DocumentError) as err:
        parse_desired(doc)
    assert message in str(err.value) and str(err.value).startswith("desired: ")


def test_a_dependency_outside_the_document_is_left_to_the_node() -> None:
    desired = parse_desired({"version": 1, "services": {
        "app": {"command": CMD, "depends_on": ["broker"]}}})
    assert desired.services["app"].depends_on == ("broker",)


def test_decoding_checks_the_size_first_and_wants_a_map() -> None:
    with pytest.raises(DocumentError, match="exceeds the limit of 10"):
        decode_document(b"\xa0" * 11, 10, "desired")
    with pytest.raises(DocumentError, match="must be a CBOR map"):
        decode_document(cbor2.dumps([1, 2]), 100, "desired")
    with pytest.raises(DocumentError, match="not valid CBOR"):
        decode_document(b"\x9b" + b"\xff" * 8, 100, "desired")  # an array of 2^64 items


def reported(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "node": "n1", "version": 5, "ts": 1.0, **fields}


def test_a_reported_document_must_be_of_its_topics_node() -> None:
    assert check_reported(reported(), "n1") == 5
    with pytest.raises(DocumentError, match="not the topic's node 'n2'"):
        check_reported(reported(), "n2")


@pytest.mark.parametrize(("fields", "message"), [
    ({"version": -1}, "version"),
    ({"ts": "now"}, "ts"),
    ({"services": {"a": 1}}, "services: expected a list"),
    ({"services": [{"name": "a"}]}, "a name and a state"),
    ({"labels": {"k": 1}}, "labels"),
    ({"queue": [1]}, "queue: expected a map"),
])
def test_a_bad_reported_document_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        check_reported(reported(**fields), "n1")


def test_status_order_puts_a_will_after_the_heartbeats_of_its_connection() -> None:
    will = parse_status({"state": "offline", "ts": 100.0, "boot": 50.0, "conn": 2})
    beat = parse_status({"state": "online", "ts": 160.0, "boot": 50.0, "conn": 2,
                         "heartbeat": 60.0, "queue": {"depth": 3, "oldest_age": 1.5}})
    next_conn = parse_status({"state": "online", "ts": 150.0, "boot": 50.0, "conn": 3})
    next_boot = parse_status({"state": "online", "ts": 10.0, "boot": 60.0, "conn": 1})
    assert beat.queue_depth == 3 and beat.oldest_age == 1.5 and beat.heartbeat == 60.0
    assert status_order(beat) < status_order(will) < status_order(next_conn)
    assert status_order(next_conn) < status_order(next_boot)


@pytest.mark.parametrize("doc", [
    {"state": "asleep", "ts": 1.0},
    {"state": "online", "ts": "x"},
    {"state": "online", "ts": 1.0, "conn": -1},
    {"state": "online", "ts": 1.0, "queue": {"depth": "many"}},
    {"state": "online", "ts": float("nan")},
])
def test_a_bad_status_is_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(DocumentError):
        parse_status(doc)
