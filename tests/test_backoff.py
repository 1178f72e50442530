"""The reconnect schedule: doubling, capped, jittered, reset after success."""

from __future__ import annotations

import pytest

from edge.backoff import Backoff


def test_delays_double_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    top = Backoff(1.0, 8.0, rand=lambda: 0.999999)
    bottom = Backoff(1.0, 8.0, rand=lambda: 0.0)
    highs = [round(top.next(), 3) for _ in range(6)]
    lows = [bottom.next() for _ in range(6)]
    assert highs == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert lows == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_reset_starts_again_from_initial() -> None:
    b = Backoff(0.5, 60.0, rand=lambda: 1.0)
    for _ in range(10):
        b.next()
    b.reset()
    assert b.next() == 0.5


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)
