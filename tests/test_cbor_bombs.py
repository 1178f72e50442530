"""CBOR bombs against every decoder of outside input: refused with a project error, fast,
in bounded memory (edge/cbor_safe.py).

Before the bounded decoder, cbor2 itself refused most of these, but not all:
tag 1 built datetimes (and 2^64 failed inside datetime), a string-reference
or shared-value frame decoded small and then expanded without bound when the
agent encoded `data` again (the process aborted in cbor2.dumps), and 1 MiB of
empty arrays took 70 MB and seconds.
"""

from __future__ import annotations

import logging
import random
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import cbor2
import pytest

from edge import cbor_safe
from edge.documents import MAX_DESIRED_BYTES, decode_document, parse_desired
from edge.downlink import parse_down
from edge.envelope import Envelope
from edge.errors import CborError, DocumentError, EnvelopeError
from edge.registry.records import Rejected, to_row
from edge.rejections import Rejections


def _stringrefs(size: int = 500_000, refs: int = 65_535) -> bytes:
    """Tag 256 (a string-reference namespace) over one long string and `refs` references
    to it (tag 25): 700 KB that re-encodes to 32 GB."""
    return (b"\xd9\x01\x00\x9a" + (refs + 1).to_bytes(4, "big")
            + b"\x5a" + size.to_bytes(4, "big") + b"a" * size + b"\xd8\x19\x00" * refs)


def _shared_doubling(depth: int = 40) -> bytes:
    """Shared values (tags 28/29): each level an array of the level below, twice by
    reference. 255 bytes that re-encode to 2^40 items."""
    frame = b"\xd8\x1c\x82\x00\x00"
    for level in reversed(range(depth - 1)):
        frame = b"\xd8\x1c\x82" + frame + b"\xd8\x1d" + cbor2.dumps(level + 1)
    return frame


def _empty_arrays(count: int = 1_000_000) -> bytes:
    return b"\x9a" + count.to_bytes(4, "big") + b"\x80" * count


# name -> (frame, the kind counted); the first five are issue 7's list.
BOMBS: dict[str, tuple[bytes, str]] = {
    "array of 2^63 items": (b"\x9b" + (2**63).to_bytes(8, "big"), cbor_safe.LENGTH),
    "byte string of 4 GB": (b"\x5b" + (2**32).to_bytes(8, "big") + b"x" * 12,
                            cbor_safe.LENGTH),
    "tag 1 with 2^64": (b"\xc1\xc2\x49\x01" + bytes(8), cbor_safe.TAG),
    "100,000 nested arrays": (b"\x81" * 100_000 + b"\x00", cbor_safe.DEPTH),
    # Its first item, a small integer, leaves a million bytes after it (seed 7).
    "1 MB of random bytes": (random.Random(7).randbytes(1_000_000), cbor_safe.INVALID),
    "tag 1 with 2^64 - 1": (b"\xc1\x1b" + b"\xff" * 8, cbor_safe.TAG),
    "map of 2^63 pairs": (b"\xbb" + (2**63).to_bytes(8, "big"), cbor_safe.LENGTH),
    "text string of 2^64 - 1 bytes": (b"\x7b" + b"\xff" * 8 + b"abc", cbor_safe.LENGTH),
    "100,000 nested maps": (b"\xa1\x00" * 100_000 + b"\x00", cbor_safe.DEPTH),
    "100,000 nested indefinite arrays": (b"\x9f" * 100_000, cbor_safe.DEPTH),
    "100,000 nested tags": (b"\xd8\x64" * 100_000 + b"\x00", cbor_safe.TAG),
    "string references": (_stringrefs(), cbor_safe.TAG),
    "shared values doubling": (_shared_doubling(), cbor_safe.TAG),
    "a million empty arrays": (_empty_arrays(), cbor_safe.ITEMS),
    "500,000 empty text chunks": (b"\x7f" + b"\x60" * 500_000 + b"\xff", cbor_safe.ITEMS),
    "bignum of 100,000 bytes": (b"\xc2\x5a" + (100_000).to_bytes(4, "big") + b"\xff" * 100_000,
                                cbor_safe.TAG),
    "set of an unhashable": (b"\xd9\x01\x02\x81\x80", cbor_safe.TAG),
    "regular expression": (b"\xd8\x23\x65(a+)+", cbor_safe.TAG),
    "array as a map key": (b"\xa1\x82\x01\x02\x00", cbor_safe.KEY),
    "10,000 times the same key": (b"\xb9\x27\x10" + b"\x61k\x00" * 10_000, cbor_safe.KEY),
    "undefined": (b"\xf7", cbor_safe.INVALID),
    "bytes after the item": (b"\xa0\x00", cbor_safe.INVALID),
}
ISSUE_BOMBS = list(BOMBS)[:5]


def _in_data(bomb: bytes) -> bytes:
    """The bomb as the `data` of an otherwise good down envelope."""
    return b"\xa2\x61v\x01\x64data" + bomb


def _in_services(bomb: bytes) -> bytes:
    """The bomb as the `services` of an otherwise good desired document."""
    return b"\xa3\x61v\x01\x67version\x05\x68services" + bomb


def _measured(call: Callable[[], Any]) -> tuple[Any, BaseException | None, int, float]:
    """(what `call` returned, what it raised, peak bytes allocated meanwhile, seconds)."""
    tracemalloc.start()
    started = time.perf_counter()
    result: Any = None
    raised: BaseException | None = None
    try:
        result = call()
    except BaseException as exc:
        raised = exc
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, raised, peak, elapsed


def _bounded(peak: int, elapsed: float) -> None:
    assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated"
    assert elapsed < 5.0, f"{elapsed:.1f} s"


@pytest.mark.parametrize("name", list(BOMBS))
@pytest.mark.parametrize("where", ["raw", "in data"])
def test_a_down_bomb_is_refused_with_its_kind_in_bounded_memory(name: str, where: str) -> None:
    bomb, kind = BOMBS[name]
    frame = bomb if where == "raw" else _in_data(bomb)
    _, raised, peak, elapsed = _measured(lambda: parse_down(frame))
    _bounded(peak, elapsed)
    assert isinstance(raised, CborError), raised
    assert raised.kind == kind, raised
    assert str(raised).startswith("envelope is not valid CBOR: CBOR ")


@pytest.mark.parametrize("name", list(BOMBS))
@pytest.mark.parametrize("where", ["raw", "in services"])
def test_a_desired_bomb_is_a_document_error(name: str, where: str) -> None:
    bomb, _ = BOMBS[name]
    payload = bomb if where == "raw" else _in_services(bomb)
    _, raised, peak, elapsed = _measured(
        lambda: parse_desired(decode_document(payload, MAX_DESIRED_BYTES, "desired")))
    _bounded(peak, elapsed)
    assert isinstance(raised, DocumentError), raised
    assert str(raised).startswith("desired: document "), raised


@pytest.mark.parametrize("name", ISSUE_BOMBS)
@pytest.mark.parametrize("kind", ["status", "reported", "desired"])
def test_the_registry_counts_a_bomb_as_invalid(name: str, kind: str) -> None:
    row, raised, peak, elapsed = _measured(lambda: to_row("node-a", kind, BOMBS[name][0], 1.0))
    _bounded(peak, elapsed)
    assert raised is None and isinstance(row, Rejected) and row.kind == "invalid", (row, raised)


@pytest.mark.parametrize("name", ISSUE_BOMBS)
def test_the_envelope_decoder_refuses_a_bomb(name: str) -> None:
    _, raised, peak, elapsed = _measured(lambda: Envelope.decode(BOMBS[name][0]))
    _bounded(peak, elapsed)
    assert isinstance(raised, EnvelopeError), raised


def test_limits_hold_at_their_edge_and_refuse_one_past_it() -> None:
    assert cbor_safe.loads(b"\x81" * 64 + b"\x00") is not None
    with pytest.raises(CborError, match="nesting deeper than 64"):
        cbor_safe.loads(b"\x81" * 65 + b"\x00")
    items = cbor_safe.MAX_ITEMS - 1  # the array itself is an item
    assert len(cbor_safe.loads(b"\x9a" + items.to_bytes(4, "big") + b"\x00" * items)) == items
    with pytest.raises(CborError, match="more than 100000 items"):
        cbor_safe.loads(b"\x9a" + (items + 1).to_bytes(4, "big") + b"\x00" * (items + 1))


@pytest.mark.parametrize(("frame", "message"), [
    (b"\x5b" + (2**32).to_bytes(8, "big") + b"x" * 12,
     "CBOR byte string at byte 0 claims 4294967296 bytes but 12 remain"),
    (b"\x9b" + (2**63).to_bytes(8, "big"),
     "CBOR array at byte 0 claims 9223372036854775808 items but 0 bytes remain"),
    (b"\xc1\x1a\x00\x00\x00\x00", "CBOR tag 1 at byte 0 not allowed"),
    (b"\xa2\x61a\x01\x61a\x02", "CBOR map has the key 'a' twice (at byte 4)"),
    (b"\xa1\xa0\x00", "CBOR map key at byte 1 is a map: only numbers, strings and simple"),
    (b"\x9f\x01", "CBOR ends early, at byte 2"),
    (b"\x19\x01", "CBOR ends early, in the head at byte 0"),
    (b"\x1c", "CBOR head 0x1c at byte 0 is reserved or not valid"),
    (b"\xff", "CBOR break code out of place at byte 0"),
    (b"\xbf\x61a\xff", "CBOR map ends after a key, at byte 3"),
    (b"\x5f\x61a\xff", "CBOR indefinite-length byte string holds a text string at byte 1"),
    (b"\x62\xff\xfe", "CBOR not valid: "),
])
def test_a_refusal_says_what_and_where(frame: bytes, message: str) -> None:
    with pytest.raises(CborError) as caught:
        cbor_safe.loads(frame)
    assert str(caught.value).startswith(message), caught.value


def test_plain_cbor_decodes_as_cbor2_decodes_it() -> None:
    value = {"v": 1, "id": bytes(16), "n": [0, -1, 2**64 - 1, -(2**64), 1.5, None, True],
             "s": "é" * 40, 7: {"deep": [[[[]]]]}, b"k": {}}
    assert cbor_safe.loads(cbor2.dumps(value)) == value
    indefinite = b"\xbf\x61a\x9f\x01\x02\xff\x61b\x5f\x41x\x41y\xff\x61c\x7f\x61p\x61q\xff\xff"
    assert cbor_safe.loads(indefinite) == {"a": [1, 2], "b": b"xy", "c": "pq"}
    assert cbor_safe.loads(b"\xd9\xd9\xf7" + cbor2.dumps({"a": 1})) == {"a": 1}  # self-describe


def test_rejections_are_counted_by_kind_and_logged_once_a_minute_per_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    rejected = Rejections(logging.getLogger("edge.downlink"), "down message",
                          clock=lambda: now[0])

    def refuse(name: str) -> None:
        with pytest.raises(CborError) as caught:
            parse_down(BOMBS[name][0])
        rejected(caught.value.kind, str(caught.value))

    with caplog.at_level(logging.WARNING, logger="edge.downlink"):
        for name in ISSUE_BOMBS * 3:
            refuse(name)
        first = len(caplog.records)
        now[0] = 61.0
        refuse("array of 2^63 items")
    assert rejected.total == 16
    assert first == len(rejected.counts)  # one line per kind, however many came
    assert rejected.counts[cbor_safe.LENGTH] == 7  # 2^63 items and 4 GB, three times; again
    assert "(cbor_length)" in caplog.records[-1].getMessage()
    assert "5 more since the last report" in caplog.records[-1].getMessage()
