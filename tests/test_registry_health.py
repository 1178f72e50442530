"""The registry's health classification: a pure function of the stored state and the time."""

from __future__ import annotations

import pytest

from edge.registry.health import HealthPolicy, classify

POLICY = HealthPolicy(stale_after=3, backlog_depth=100, backlog_age=60.0)
NOW = 10_000.0


def health(**kw: object) -> str:
    state: dict[str, object] = {"online": True, "last_seen": NOW - 1, "heartbeat": 10.0,
                                "queue_depth": 0, "oldest_age": None}
    state.update(kw)
    return classify(now=NOW, policy=POLICY, **state)  # type: ignore[arg-type]


def test_online_node_heard_lately_with_a_short_queue_is_healthy() -> None:
    assert health() == "healthy"


def test_offline_status_or_no_status_is_offline_whatever_else() -> None:
    assert health(online=False) == "offline"
    assert health(online=None, last_seen=None) == "offline"
    assert health(online=False, queue_depth=10**6) == "offline"


def test_online_node_unheard_for_more_than_stale_after_heartbeats_is_stale() -> None:
    assert health(last_seen=NOW - 29.9) == "healthy"
    assert health(last_seen=NOW - 30.1) == "stale"
    assert health(last_seen=None) == "stale"


def test_stale_uses_the_default_heartbeat_when_the_status_has_none() -> None:
    assert health(heartbeat=None, last_seen=NOW - 179) == "healthy"
    assert health(heartbeat=None, last_seen=NOW - 181) == "stale"


def test_stale_wins_over_backlogged() -> None:
    assert health(last_seen=NOW - 100, queue_depth=10**6) == "stale"


def test_deep_or_old_queue_is_online_backlogged() -> None:
    assert health(queue_depth=100) == "healthy"
    assert health(queue_depth=101) == "online-backlogged"
    assert health(oldest_age=60.0) == "healthy"
    assert health(oldest_age=61.0) == "online-backlogged"


@pytest.mark.parametrize("bad", [{"stale_after": 0}, {"backlog_depth": -1},
                                 {"backlog_age": float("nan")}, {"backlog_depth": True}])
def test_policy_refuses_values_that_make_no_sense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        HealthPolicy(**bad)  # type: ignore[arg-type]
