"""The CBOR envelope: layout, ids, strict decoding."""

from __future__ import annotations

import time

import cbor2
import pytest

from edge.envelope import Envelope, new_message_id
from edge.errors import EnvelopeError


def _env(**kw: object) -> Envelope:
    base: dict[str, object] = dict(
        id=new_message_id(), node="n1", seq=7, ts=1.5, topic="a/b", ct="text/plain", data="x"
    )
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    env = _env(prio=3, exp=99.5, data=b"\x00\xff")
    assert Envelope.decode(env.encode()) == env


def test_map_has_exactly_the_design_keys_and_omits_unset_options() -> None:
    m = cbor2.loads(_env().encode())
    assert set(m) == {"v", "id", "node", "seq", "ts", "topic", "ct", "data"}
    assert m["v"] == 1
    m = cbor2.loads(_env(prio=2, exp=5.0).encode())
    assert m["prio"] == 2 and m["exp"] == 5.0


def test_ids_are_uuid7_and_time_ordered() -> None:
    now = time.time()
    a, b = new_message_id(now), new_message_id(now + 0.01)
    assert len(a) == 16
    assert a[6] >> 4 == 7 and a[8] >> 6 == 0b10
    assert a[:6] < b[:6]
    assert int.from_bytes(a[:6], "big") == int(now * 1000)


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (b"\xff\x00", "not valid CBOR"),
        (cbor2.dumps([1, 2]), "must be a CBOR map"),
        (cbor2.dumps({"v": 1}), "lacks the key"),
        (cbor2.dumps({**cbor2.loads(_env().encode()), "seq": "7"}), "'seq' has the wrong type"),
        (cbor2.dumps({**cbor2.loads(_env().encode()), "v": 2}), "version 2"),
        (cbor2.dumps({**cbor2.loads(_env().encode()), "prio": True}), "'prio'"),
    ],
)
def test_bad_frames_are_rejected_with_a_clear_error(frame: bytes, needle: str) -> None:
    with pytest.raises(EnvelopeError, match=needle):
        Envelope.decode(frame)


def test_size_is_checked_before_decoding() -> None:
    with pytest.raises(EnvelopeError, match="exceeds the limit"):
        Envelope.decode(b"\xa0" * 100, max_bytes=10)


def test_unknown_keys_are_ignored() -> None:
    m = cbor2.loads(_env().encode())
    m["future"] = {"x": 1}
    assert Envelope.decode(cbor2.dumps(m)).seq == 7
