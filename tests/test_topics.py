"""MQTT topic filter matching, checked against the cases the MQTT specification spells out."""

from __future__ import annotations

import pytest

from edge.topics import FilterSet, filters_overlap, topic_matches


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "anything/at/all", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("a/b", "a/b", True),
    ("a/b", "a/bc", False),
    ("a/b", "a", False),
    ("#", "$SYS/broker/load", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/broker/load", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
])
def test_filters_match_as_the_mqtt_specification_says(
        topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_a_filter_set_matches_any_of_its_filters_and_answers_the_same_twice() -> None:
    filters = FilterSet(["sensors/#", "+/alarm"])
    for _ in range(2):  # the second round is answered from what the first remembered
        assert filters.matches("sensors/t/1")
        assert filters.matches("door/alarm")
        assert not filters.matches("door/open")


@pytest.mark.parametrize(("first", "second", "both"), [
    ("sensors/#", "sensors/+/temp", "sensors/x/temp"),
    ("sensors/#", "sensors", "sensors"),
    ("a/+", "+/b", "a/b"),
    ("#", "x/y", "x/y"),
    ("a/b", "a/c", None),
    ("a", "a/b", None),
    ("a/+", "a/+/c", None),
    ("a/+/+", "+/b/c", "a/b/c"),
    ("sensors/+", "sensors/+/#", "sensors/x"),
])
def test_overlap_names_a_topic_both_filters_match(
        first: str, second: str, both: str | None) -> None:
    assert filters_overlap(first, second) == both
    assert filters_overlap(second, first) == both
    if both is not None:
        assert topic_matches(first, both) and topic_matches(second, both)
