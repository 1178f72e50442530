"""Building requests in bulk and checking what arrived against what was accepted."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .agent import publish_request
from .subscriber import Received, Subscriber

__all__ = [
    "ID_HEX",
    "accepted_seqs",
    "assert_duplicates_identical",
    "assert_error",
    "by_seq",
    "publish_items",
]

ID_HEX = re.compile(r"[0-9a-f]{32}")


def publish_items(
    count: int, topic: str = "sensors/t", prefix: str = "m", start: int = 0, **fields: Any
) -> list[dict[str, Any]]:
    """`count` publish requests with data f"{prefix}{i}" for i from `start`."""
    return [publish_request(topic, f"{prefix}{i}", **fields) for i in range(start, start + count)]


def accepted_seqs(responses: Sequence[Mapping[str, Any]]) -> list[int]:
    """Assert every response is an accepted publish; return their seqs in order."""
    refused = [(i, r) for i, r in enumerate(responses) if r.get("ok") is not True]
    assert not refused, f"{len(refused)} publishes refused, first {refused[:3]!r}"
    for r in responses:
        assert isinstance(r.get("seq"), int), f"no int seq in {r!r}"
        assert ID_HEX.fullmatch(str(r.get("id"))), f"id is not 32 hex digits in {r!r}"
    seqs = [int(r["seq"]) for r in responses]
    assert all(a < b for a, b in itertools.pairwise(seqs)), "seqs not strictly increasing"
    return seqs


def assert_error(response: Mapping[str, Any], code: str) -> None:
    """Assert an error response with this code and a non-empty message."""
    assert response.get("ok") is False, f"expected error {code}, got {response!r}"
    error = response.get("error")
    assert isinstance(error, dict), f"no error object in {response!r}"
    assert error.get("code") == code, f"expected error {code}, got {response!r}"
    assert isinstance(error.get("message"), str) and error["message"], f"no message: {response!r}"


def by_seq(sub: Subscriber) -> dict[int, list[Received]]:
    """Every arrived copy, grouped by seq."""
    groups: dict[int, list[Received]] = defaultdict(list)
    for r in sub.received:
        groups[r.envelope["seq"]].append(r)
    return groups


def assert_duplicates_identical(sub: Subscriber) -> None:
    """Every copy of a seq carries the same id, topic and data."""
    for seq, copies in by_seq(sub).items():
        first = copies[0].envelope
        for other in copies[1:]:
            env = other.envelope
            assert (env["id"], env["topic"], env["data"]) == (
                first["id"],
                first["topic"],
                first["data"],
            ), f"copies of seq {seq} differ: {first!r} vs {env!r}"
