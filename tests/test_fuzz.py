"""Fuzzing every parser of outside input: nothing but the project's own errors comes out.

The envelope decoder (down and stored envelopes), the desired document parser,
the socket request parser, the TXT parser and the config loader each get
random bytes, and inputs shaped like what they expect then broken: truncated,
bytes flipped, bytes inserted. Each may refuse with its EdgeError subclass;
any other exception (TypeError, OverflowError, RecursionError, MemoryError)
fails the test, and so does a call that allocates more than 8 MB at its peak.

Under CI the examples are the same on every run (derandomize); elsewhere each
run tries new ones, FUZZ_EXAMPLES of them per test (300 by default). Examples
are never stored (database=None): the tree stays clean.
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge import cbor_safe
from edge.api import parse_publish, parse_request
from edge.config import load_settings
from edge.documents import MAX_DESIRED_BYTES, decode_document, parse_desired
from edge.downlink import MAX_DOWN_BYTES, parse_down
from edge.envelope import Envelope
from edge.errors import CborError, ConfigError, DocumentError, EnvelopeError, RequestError
from edge.peers import TXT_MAX_BYTES, TXT_MAX_ENTRIES, TXT_VALUE_MAX, PeerTable, parse_txt
from edge.registry.records import Rejected, to_row

T = TypeVar("T")

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                derandomize=bool(os.environ.get("CI")), database=None,
                suppress_health_check=[HealthCheck.too_slow])


_MEMORY_BOUND = 8 * 1024 * 1024  # bytes one call may allocate at its peak


def bounded(call: Callable[[], T]) -> T:
    """call(), failing the test if it allocates more than _MEMORY_BOUND at any moment."""
    tracemalloc.start()
    try:
        return call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < _MEMORY_BOUND, f"{peak} bytes allocated"


# ---- inputs -----------------------------------------------------------------------

leaves = (st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=24)
          | st.binary(max_size=24))
keys = st.text(max_size=12) | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=6)
values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(keys, inner, max_size=6),
    max_leaves=40)


@st.composite
def broken(draw: st.DrawFn, frames: st.SearchStrategy[bytes]) -> bytes:
    """A frame as it is, or truncated, with bytes flipped or inserted."""
    frame = bytearray(draw(frames))
    for _ in range(draw(st.integers(0, 4))):
        how = draw(st.sampled_from(["cut", "flip", "insert", "head"]))
        at = draw(st.integers(0, len(frame)))
        if how == "cut":
            del frame[at:]
        elif how == "flip" and at < len(frame):
            frame[at] ^= draw(st.integers(1, 255))
        elif how == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=9))
        else:  # a head claiming a huge length, or a tag, or deep nesting
            frame[at:at] = draw(st.sampled_from([
                b"\x9b" + b"\x7f" * 8, b"\x5b" + b"\x00\x00\x00\x01" + bytes(4), b"\xc1",
                b"\xd9\x01\x00", b"\xd8\x1c", b"\x81" * 70, b"\x9f", b"\xff", b"\xf7"]))
    return bytes(frame)


def cbor(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda value: bytes(cbor2.dumps(value)))


envelope_maps = st.fixed_dictionaries(
    {"v": st.just(1) | values, "data": values},
    optional={"id": st.binary(min_size=16, max_size=16) | values, "node": st.text(max_size=8),
              "seq": st.integers(-5, 2**64 - 1) | values, "ts": st.floats() | values,
              "topic": st.text(max_size=12), "ct": st.text(max_size=12) | values,
              "exp": st.floats() | values, "prio": st.integers(-(2**64), 2**64 - 1) | values})
envelopes = broken(cbor(envelope_maps) | cbor(values) | st.binary(max_size=300))

service_keys = st.sampled_from([
    "command", "env", "working_dir", "user", "group", "restart", "backoff_initial",
    "backoff_max", "backoff_jitter", "stop_timeout", "depends_on", "memory_max", "cpu_max",
    "log_max_bytes", "log_keep", "health", "source", "x"])
health_keys = st.sampled_from(["exec", "tcp", "http", "interval", "timeout", "retries",
                               "start_period", "path", "x"])
sizes_and_durations = (
    st.from_regex(r"\A[0-9]{1,12}(\.[0-9]{1,20})?(ms|s|m|h|d|B|KiB|MiB|GiB|TiB|kb|x)?\Z")
    | st.sampled_from(["9" * 400 + unit for unit in ("", "GiB", "s", "d")])
    | st.integers(-(2**64), 2**64 - 1) | st.floats())
# Values a parser may not expect: out of float range, not finite, keys of every kind.
hostile = st.sampled_from([
    "9" * 400 + "GiB", "9" * 400 + "s", "1e999", float("inf"), float("nan"), 2**64, -(2**64),
    "", "\x00", {b"k": 1}, {1: 2}, {None: 1}, [{b"k": 1}], [[]], {"a": {b"b": []}}])
service_values = (hostile | sizes_and_durations | values
                  | st.lists(st.text(max_size=8) | hostile, max_size=4))
health_tables = st.dictionaries(health_keys, service_values, max_size=4)
service_bodies = (
    # A good command first, so that the keys after it are read too.
    st.dictionaries(service_keys, service_values | health_tables, max_size=4).map(
        lambda keys: {"command": ["/bin/true"], **keys})
    | st.dictionaries(service_keys, service_values | health_tables, max_size=6)
    | values)
services = st.dictionaries(st.text(max_size=10) | st.sampled_from(["web", "tick", "db"]),
                           service_bodies, max_size=3)
live_config = (
    st.dictionaries(
        st.sampled_from(["telemetry", "queue"]),
        st.dictionaries(st.sampled_from(["interval", "on_full", "max_bytes", "default_ttl"]),
                        hostile | sizes_and_durations
                        | st.sampled_from(["drop-oldest", "reject"]) | values, max_size=4),
        max_size=2)
    | st.dictionaries(st.text(max_size=6), values, max_size=3)
    | values)
desired_maps = st.fixed_dictionaries(
    {"v": st.just(1), "version": st.integers(1, 2**63 - 1)},
    optional={"services": services, "config": live_config, "ts": values,
              "by": st.text(max_size=8), "node": st.text(max_size=8)},
) | st.fixed_dictionaries({"v": values, "version": values, "services": values})
desired_frames = broken(cbor(desired_maps) | cbor(values) | st.binary(max_size=300))


# ---- the envelope decoder --------------------------------------------------------


@FUZZ
@given(envelopes)
def test_a_down_frame_is_parsed_or_refused_with_an_envelope_error(frame: bytes) -> None:
    try:
        payload, ct, msg_id, _, _ = bounded(lambda: parse_down(frame))
    except EnvelopeError:
        return
    assert isinstance(payload, bytes) and isinstance(ct, str) and len(payload) <= MAX_DOWN_BYTES
    assert msg_id is None or len(msg_id) == 16


@FUZZ
@given(envelopes)
def test_an_envelope_is_decoded_or_refused_with_an_envelope_error(frame: bytes) -> None:
    try:
        env = bounded(lambda: Envelope.decode(frame))
    except EnvelopeError:
        return
    assert env.v == 1 and len(env.id) == 16 and env.seq >= 1


@FUZZ
@given(values)
def test_plain_cbor_decodes_as_cbor2_decodes_it(value: Any) -> None:
    frame = bytes(cbor2.dumps(value))
    try:
        got = bounded(lambda: cbor_safe.loads(frame))
    except CborError as exc:
        # Only what the limits are for: a key twice (1 and True, say) or an array key.
        assert exc.kind == cbor_safe.KEY, exc
        return
    assert repr(got) == repr(cbor2.loads(frame))


@FUZZ
@given(broken(cbor(values) | st.binary(max_size=300)))
def test_what_the_bounded_decoder_accepts_cbor2_decodes_alike(frame: bytes) -> None:
    try:
        got = bounded(lambda: cbor_safe.loads(frame))
    except CborError:
        return
    assert repr(got) == repr(cbor2.loads(frame.removeprefix(b"\xd9\xd9\xf7")))


# ---- the desired document parser ----------------------------------------------


def _desired(**keys: Any) -> bytes:
    return bytes(cbor2.dumps({"v": 1, "version": 2, **keys}))


FOUND_SERVICE_BYTE_KEYS = _desired(services={"web": {"command": {b"k": 1}}})
FOUND_SERVICE_SIZE = _desired(services={"web": {"command": ["/bin/true"],
                                              "memory_max": "9" * 400 + "GiB"}})
FOUND_CONFIG_SIZE = _desired(config={"queue": {"max_bytes": "9" * 400 + "GiB"}})


@FUZZ
@given(cbor(desired_maps) | desired_frames)
@example(FOUND_SERVICE_BYTE_KEYS)
@example(FOUND_SERVICE_SIZE)
@example(FOUND_CONFIG_SIZE)
def test_a_desired_document_is_parsed_or_refused_with_a_document_error(payload: bytes) -> None:
    try:
        desired = bounded(lambda: parse_desired(
            decode_document(payload, MAX_DESIRED_BYTES, "desired")))
    except DocumentError:
        return
    assert desired.version >= 1


@FUZZ
@given(st.sampled_from(["status", "reported", "desired"]),
       broken(cbor(values) | cbor(desired_maps) | st.binary(max_size=200)))
def test_the_registry_turns_any_document_into_a_row_or_a_rejection(kind: str,
                                                                   payload: bytes) -> None:
    row = bounded(lambda: to_row("node-a", kind, payload, 1.0))
    assert not isinstance(row, Rejected) or row.kind in ("invalid", "spoofed")


# ---- the socket request parser ------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=30)
publish_requests = st.fixed_dictionaries(
    {"op": st.just("publish") | json_values},
    optional={"topic": st.text(max_size=20) | json_values, "data": st.text() | json_values,
              "data_b64": st.text(max_size=30) | json_values, "ct": st.text() | json_values,
              "prio": st.integers() | json_values, "ttl": st.floats() | json_values})


def _json_line(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


request_lines = broken(
    publish_requests.map(_json_line) | json_values.map(_json_line) | st.binary(max_size=200)
    | st.sampled_from([b"[" * 100_000, b'{"a":' * 100_000, b"1" * 5000, b'"\\ud800"',
                       b"NaN", b"-Infinity", b"1e999999"]))


@FUZZ
@given(request_lines)
def test_a_request_line_is_parsed_or_refused_with_a_request_error(line: bytes) -> None:
    try:
        req = bounded(lambda: parse_request(line, 2 * 1024 * 1024))
    except RequestError as exc:
        assert exc.code in ("bad_json", "bad_request", "too_long")
        return
    assert isinstance(req, dict) and isinstance(req["op"], str)
    try:
        topic, _, ct, prio, ttl = parse_publish(req)
    except RequestError as exc:
        assert exc.code == "bad_request"
        return
    assert topic and ct and isinstance(prio, int) and (ttl is None or ttl > 0)


def test_a_line_over_the_limit_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(b"[" * 1001 + b"\n", 1000)
    assert caught.value.code == "too_long"
    assert parse_request(b'{"op": "status"}' + b" " * 984 + b"\n", 1000) == {"op": "status"}


# ---- the TXT parser -------------------------------------------------------------


def _txt(strings: list[bytes]) -> bytes:
    return b"".join(bytes([len(s)]) + s for s in strings)


txt_strings = st.lists(
    st.binary(max_size=40) | st.builds(lambda k, v: k + b"=" + v,
                                       st.sampled_from([b"node", b"ver", b"uplink", b"api"])
                                       | st.binary(max_size=8), st.binary(max_size=250)),
    max_size=80)
txt_records = broken(txt_strings.map(lambda strings: _txt([s[:255] for s in strings]))
                     | st.binary(max_size=2000))


@FUZZ
@given(txt_records)
def test_a_txt_record_gives_bounded_entries_and_never_raises(raw: bytes) -> None:
    entries, problems = bounded(lambda: parse_txt(raw))
    assert len(entries) <= TXT_MAX_ENTRIES and len(problems) == len(set(problems))
    if len(raw) > TXT_MAX_BYTES:
        assert (entries, problems) == ({}, ["txt_too_large"])
    for key, value in entries.items():
        assert key.isascii() and key.isprintable() and key == key.lower()
        assert value is None or len(str(value)) <= 2 * TXT_VALUE_MAX
    table = PeerTable(wall=lambda: 0.0)
    assert table.service("peer", 0.0, server="peer.local.", port=1)
    problems = table.text("peer", 1.0, entries)
    assert set(problems) <= {"txt_bad_node", "txt_bad_uplink"}
    assert table.rows()[0]["txt"] == entries


# ---- the config loader ------------------------------------------------------------


toml_keys = st.sampled_from([
    "id", "profile", "data_dir", "labels", "url", "prefix", "keepalive", "inflight",
    "heartbeat", "max_bytes", "on_full", "default_ttl", "socket", "group", "interval",
    "enabled", "forward", "command", "env", "memory_max", "ca_file", "x-y", "é"])
toml_sections = st.sampled_from([
    "node", "uplink", "queue", "api", "telemetry", "discovery", "local", "state",
    "services.web", "services.web.health", "services", "nope", "a.b.c"])


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_scalar(v)}"
                               for k, v in value.items()) + "}"
    return json.dumps(str(value))


toml_values = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=20)
    | sizes_and_durations | st.sampled_from(["/abs/path", "mqtt://h:1883", "30s", "256MiB"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=12)
hostile_toml = st.sampled_from([
    '"' + "9" * 400 + 'GiB"', '"' + "9" * 400 + 's"', "9" * 5000, "[" * 600 + "]" * 600,
    "{a = " * 400 + "1" + "}" * 400, "nan", "inf", "-0", "0x7fffffffffffffff", '"\\u0000"'])
toml_documents = st.lists(
    st.tuples(toml_sections, st.dictionaries(toml_keys, toml_values.map(_toml_scalar)
                                             | hostile_toml, max_size=5)),
    max_size=5,
).map(lambda sections: "\n".join(
    f"[{name}]\n" + "".join(f"{json.dumps(key)} = {value}\n" for key, value in body.items())
    for name, body in sections))
config_texts = broken(toml_documents.map(str.encode) | st.binary(max_size=300))


def _load(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "agent.toml"
        path.write_bytes(text)
        load_settings(path, must_exist=True)


FOUND_TOML_DEPTH = b"[node]\nlabels = " + b"[" * 600 + b"]" * 600
FOUND_TOML_DIGITS = b"[uplink]\ninflight = " + b"9" * 5000
FOUND_CONFIG_SIZE_TEXT = b'[queue]\nmax_bytes = "' + b"9" * 400 + b'GiB"'
FOUND_TOML_DOTTED = b"a" + b".a" * 2000 + b" = 1"  # 4 KB; tomllib keeps every prefix: 16 MB


@FUZZ
@given(config_texts)
@example(FOUND_TOML_DEPTH)
@example(FOUND_TOML_DIGITS)
@example(FOUND_CONFIG_SIZE_TEXT)
def test_a_config_file_loads_or_is_refused_with_a_config_error(text: bytes) -> None:
    try:
        bounded(lambda: _load(text))
    except ConfigError:
        pass


def test_a_config_file_over_1_mib_is_refused_unread() -> None:
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        _load(b"# " + b"x" * (1024 * 1024))


# ---- what the fuzzing found once, outside the decoders: each is fixed --------------


def test_found_a_desired_service_value_with_byte_string_keys_is_a_document_error() -> None:
    with pytest.raises(DocumentError):
        parse_desired(decode_document(FOUND_SERVICE_BYTE_KEYS, MAX_DESIRED_BYTES, "desired"))


@pytest.mark.parametrize("payload", [FOUND_SERVICE_SIZE, FOUND_CONFIG_SIZE],
                         ids=["service memory_max", "config queue.max_bytes"])
def test_found_a_desired_size_beyond_a_float_is_a_document_error(payload: bytes) -> None:
    with pytest.raises(DocumentError):
        parse_desired(decode_document(payload, MAX_DESIRED_BYTES, "desired"))


@pytest.mark.parametrize("text", [FOUND_TOML_DEPTH, FOUND_TOML_DIGITS, FOUND_CONFIG_SIZE_TEXT],
                         ids=["600 nested arrays", "5000 digits", "size beyond a float"])
def test_found_a_hostile_config_file_is_a_config_error(text: bytes) -> None:
    with pytest.raises(ConfigError):
        _load(text)


def test_found_a_long_dotted_key_is_refused_in_bounded_memory() -> None:
    with pytest.raises(ConfigError):
        bounded(lambda: _load(FOUND_TOML_DOTTED))
