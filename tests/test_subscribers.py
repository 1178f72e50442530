"""Socket API subscribers: filters, matching, the stream lines and a slow reader's losses."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edge.errors import RequestError
from edge.rejections import Rejections
from edge.subscribers import Delivery, Subscribers, validate_filter


def message(topic: str, payload: bytes = b"on", ct: str = "text/plain") -> Delivery:
    return Delivery(topic, payload, ct, bytes(16), 1796320000.0)


@pytest.mark.parametrize("good", ["#", "cmd/#", "+/valve", "a/+/c", "a/b"])
def test_valid_filters_are_taken(good: str) -> None:
    assert validate_filter(good) == good


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", 5, None, "x" * 1025])
def test_invalid_filters_are_refused(bad: object) -> None:
    with pytest.raises(RequestError) as info:
        validate_filter(bad)
    assert info.value.code == "bad_request"


def test_lines_carry_text_as_data_and_anything_else_as_base64() -> None:
    assert message("a", b"21.5").line() == {
        "event": "message", "topic": "a", "ct": "text/plain", "data": "21.5",
        "id": "00" * 16, "ts": 1796320000.0}
    line = message("a", b"\xff\x00", "application/octet-stream").line()
    assert line["data_b64"] == "/wA=" and "data" not in line
    # Text that is not UTF-8 cannot travel as JSON text.
    assert message("a", b"\xff", "text/plain").line()["data_b64"] == "/w=="


async def test_offer_reaches_matching_subscribers_only() -> None:
    subs = Subscribers()
    cmd = subs.subscribe("cmd/#")
    other = subs.subscribe("alarm/+")
    assert len(subs) == 2  # listening from the call on, before any line is read
    first = asyncio.ensure_future(anext(cmd))
    second = asyncio.ensure_future(anext(other))
    assert subs.offer(message("cmd/valve")) == 1
    assert (await first)["topic"] == "cmd/valve"
    assert not second.done()
    second.cancel()
    other.close()  # a subscriber that goes away is forgotten
    assert len(subs) == 1
    cmd.close()
    assert len(subs) == 0


async def test_a_slow_subscriber_is_told_how_many_it_lost() -> None:
    subs = Subscribers()
    stream = subs.subscribe("#")
    pending = asyncio.ensure_future(anext(stream))
    taken = sum(subs.offer(message(f"t/{i}")) for i in range(1005))
    assert taken == 1000  # the queue holds 1000; the rest are lost and counted
    assert (await pending)["event"] == "dropped"
    assert (await anext(stream))["topic"] == "t/0"
    stream.close()
    assert len(subs) == 0


def test_rejections_are_counted_and_logged_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    reject = Rejections(logging.getLogger("test"), "thing", every=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            reject("bad", "it was bad")
        now[0] = 61.0
        reject("bad", "again")
        reject("worse", "other kind")
    assert reject.counts == {"bad": 6, "worse": 1} and reject.total == 7
    texts = [r.getMessage() for r in caplog.records]
    assert texts == ["thing rejected (bad): it was bad",
                     "thing rejected (bad): again (4 more since the last report)",
                     "thing rejected (worse): other kind"]
