"""Decoding down envelopes from the cloud: what is taken, what is refused and why."""

from __future__ import annotations

import cbor2
import pytest

from edge.downlink import MAX_DOWN_BYTES, parse_down
from edge.errors import EnvelopeError, MessageTooLarge


def test_text_data_is_utf8_with_a_text_default_content_type() -> None:
    payload, ct, msg_id, ts, exp = parse_down(cbor2.dumps({"v": 1, "data": "open"}))
    assert (payload, ct, msg_id, ts, exp) == (b"open", "text/plain", None, None, None)


def test_bytes_and_other_values_get_their_own_content_types() -> None:
    assert parse_down(cbor2.dumps({"v": 1, "data": b"\x00\x01"}))[:2] == (
        b"\x00\x01", "application/octet-stream")
    payload, ct, *_ = parse_down(cbor2.dumps({"v": 1, "data": {"valve": 3}}))
    assert (cbor2.loads(payload), ct) == ({"valve": 3}, "application/cbor")


def test_optional_keys_are_used_and_unknown_ones_ignored() -> None:
    ident = bytes(range(16))
    frame = cbor2.dumps({"v": 1, "data": "{}", "ct": "application/json", "id": ident,
                         "ts": 1796320000, "exp": 1796323600.5, "whatever": [1, 2]})
    assert parse_down(frame) == (b"{}", "application/json", ident, 1796320000.0, 1796323600.5)


@pytest.mark.parametrize(("frame", "why"), [
    (b"\xff\xff not cbor", "not valid CBOR"),
    (cbor2.dumps([1, 2]), "must be a CBOR map"),
    (cbor2.dumps({"data": "x"}), "'v' must be 1"),
    (cbor2.dumps({"v": 2, "data": "x"}), "'v' must be 1"),
    (cbor2.dumps({"v": True, "data": "x"}), "'v' must be 1"),
    (cbor2.dumps({"v": 1}), "lacks the key 'data'"),
    (cbor2.dumps({"v": 1, "data": "x", "ct": 5}), "'ct' must be"),
    (cbor2.dumps({"v": 1, "data": "x", "ct": ""}), "'ct' must be"),
    (cbor2.dumps({"v": 1, "data": "x", "id": b"short"}), "'id' must be 16 bytes"),
    (cbor2.dumps({"v": 1, "data": "x", "exp": "tomorrow"}), "'exp' must be a number"),
    (cbor2.dumps({"v": 1, "data": "x", "ts": float("inf")}), "'ts' must be a number"),
    (cbor2.dumps({"v": 1, "data": "x", "exp": True}), "'exp' must be a number"),
])
def test_malformed_envelopes_are_refused_with_the_reason(frame: bytes, why: str) -> None:
    with pytest.raises(EnvelopeError, match=why):
        parse_down(frame)


def test_the_size_is_checked_before_decoding() -> None:
    # Not CBOR at all: only a size check before decoding can give this answer.
    with pytest.raises(MessageTooLarge, match="exceeds the limit"):
        parse_down(b"\xff" * (MAX_DOWN_BYTES + 1))
