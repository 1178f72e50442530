"""The dashboard's pages, rendered from API objects: escaping, health, filter, odd documents."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest

from edge.registry.dashboard import HEALTHS, render_fleet, render_node

NOW = 1_700_000_000.0
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
# Every tag the pages are made of; a value that injects markup shows up as another one.
OWN_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "main", "nav",
    "a", "span", "table", "thead", "tbody", "tr", "th", "td", "p", "dl", "dt", "dd", "div",
    "section", "code", "pre",
}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(page: str) -> _Tags:
    tags = _Tags()
    tags.feed(page)
    tags.close()
    return tags


def rows(page: str) -> list[dict[str, str | None]]:
    """The attributes of the fleet table's node rows."""
    return [attrs for tag, attrs in parsed(page).tags if tag == "tr" and "data-node" in attrs]


def node(name: str, health: str = "healthy", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node": name, "health": health, "online": health != "offline",
        "last_seen": NOW - 30, "reported_version": 7, "desired_version": 2,
        "desired_applied": 2, "queue_depth": 3, "oldest_age": 12.0, "services_up": 1,
        "services_total": 2, "profile": "rpi4", "agent": "0.1.0", "labels": {"site": "lab"},
        "desired_rejected": None,
    }
    base.update(fields)
    return base


def assert_no_injected_markup(page: str) -> None:
    tags = parsed(page).tags
    assert {tag for tag, _ in tags} <= OWN_TAGS
    for tag, attrs in tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
    assert "<script" not in page and "<img" not in page


def test_hostile_node_fields_are_escaped_on_the_fleet_page() -> None:
    page = render_fleet(
        [node(HOSTILE, health=HOSTILE, profile=HOSTILE, agent=HOSTILE, labels={HOSTILE: HOSTILE},
              desired_rejected={"reason": HOSTILE, "version": 3})],
        health=None, now=NOW,
    )
    assert_no_injected_markup(page)
    (row,) = rows(page)
    assert row["data-node"] == HOSTILE  # the attribute holds the value, unmangled
    assert row["data-health"] == HOSTILE
    assert "&lt;script&gt;" in page


def test_hostile_filter_value_is_escaped() -> None:
    page = render_fleet([node("a")], health=HOSTILE, now=NOW)
    assert_no_injected_markup(page)
    assert rows(page) == []


def test_hostile_documents_are_escaped_on_the_node_page() -> None:
    reported = {
        "node": HOSTILE, "version": 9, "ts": NOW - 5, "agent": HOSTILE, "profile": HOSTILE,
        "labels": {HOSTILE: HOSTILE},
        "services": [{"name": HOSTILE, "state": HOSTILE, "reason": HOSTILE, "pid": 1,
                      "restarts": 0, "last_exit": None, "source": HOSTILE}],
        "peers": [{"node": HOSTILE, "state": HOSTILE, "addresses": [HOSTILE],
                   "last_seen": NOW}],
        "queue": {"depth": 0},
        "uplink": {"state": HOSTILE, "since": NOW - 10, "last_error": HOSTILE},
        "desired_applied": 2,
        "desired": {"version": 2, "items": {f"services.{HOSTILE}": {"result": HOSTILE,
                                                                    "reason": HOSTILE}}},
        "desired_rejected": {"version": 3, "reason": HOSTILE, "ts": NOW},
    }
    desired = {"v": 1, "version": 3, "by": HOSTILE,
               "services": {HOSTILE: {"command": [HOSTILE], HOSTILE: HOSTILE}},
               "config": {HOSTILE: {HOSTILE: HOSTILE}}}
    status = {"state": HOSTILE, "ts": NOW, "boot": NOW - 100, "conn": 1}
    page = render_node(node(HOSTILE, health=HOSTILE, labels={HOSTILE: "x"}, reported=reported,
                            desired=desired, status=status), now=NOW)
    assert_no_injected_markup(page)
    tags = parsed(page).tags
    services = [a for t, a in tags if t == "tr" and "data-service" in a]
    assert [s["data-service"] for s in services] == [HOSTILE]
    assert HOSTILE in "".join(parsed(page).text)  # shown as text, as it is


@pytest.mark.parametrize("health", HEALTHS)
def test_each_health_has_its_class_and_row_attribute(health: str) -> None:
    page = render_fleet([node("n1", health=health)], health=None, now=NOW)
    (row,) = rows(page)
    assert row["data-health"] == health
    badges = [a.get("class") for t, a in parsed(page).tags
              if t == "span" and "badge" in (a.get("class") or "")]
    assert badges == [f"badge health-{health}"]
    assert f".health-{health} {{" in page  # the class has a colour in the inline CSS


def test_health_colours_differ() -> None:
    page = render_fleet([], health=None, now=NOW)
    colours = {}
    for health in HEALTHS:
        rule = page.split(f".health-{health} {{", 1)[1].split("}", 1)[0]
        colours[health] = rule
    assert len(set(colours.values())) == len(HEALTHS)
    assert "#dcfce7" in colours["healthy"]  # green
    assert "#fef3c7" in colours["stale"]  # amber
    assert "#ffedd5" in colours["online-backlogged"]  # orange


def test_unknown_health_gets_a_neutral_class() -> None:
    page = render_fleet([node("n1", health="confused")], health=None, now=NOW)
    assert 'class="badge health-unknown"' in page


def test_filter_shows_only_that_health_and_keeps_it_on_reload() -> None:
    fleet = [node("a", "healthy"), node("b", "stale"), node("c", "stale"),
             node("d", "offline"), node("e", "online-backlogged")]
    page = render_fleet(fleet, health="stale", now=NOW)
    assert [(r["data-node"], r["data-health"]) for r in rows(page)] == [
        ("b", "stale"), ("c", "stale")]
    assert '<meta http-equiv="refresh" content="5; url=/?health=stale">' in page
    links = {a["data-filter"]: a for t, a in parsed(page).tags if t == "a" and "data-filter" in a}
    assert links["all"]["href"] == "/"
    assert links["stale"]["href"] == "/?health=stale"
    assert "current" in (links["stale"].get("class") or "")
    assert "current" not in (links["all"].get("class") or "")
    assert 'data-filter="stale">stale<span class="count">2</span>' in page
    assert 'data-filter="all">all<span class="count">5</span>' in page


def test_no_filter_lists_every_node_sorted_with_links() -> None:
    page = render_fleet([node("b"), node("a", "offline"), node("we ird/id")], health=None,
                        now=NOW)
    assert [r["data-node"] for r in rows(page)] == ["a", "b", "we ird/id"]
    hrefs = [a["href"] for t, a in parsed(page).tags if t == "a" and "data-filter" not in a]
    assert "/nodes/we%20ird%2Fid" in hrefs and "/nodes/a" in hrefs
    assert '<meta http-equiv="refresh" content="5; url=/">' in page


def test_empty_filter_says_so() -> None:
    page = render_fleet([node("a")], health="stale", now=NOW)
    assert rows(page) == []
    assert "no stale nodes" in page


def test_ages_and_counts_in_the_row() -> None:
    page = render_fleet([node("a", last_seen=NOW - 90, queue_depth=25000, oldest_age=5400,
                              services_up=1, services_total=3)], health=None, now=NOW)
    assert "90s ago" in page
    assert ">25000<" in page and ">90m<" in page and ">1/3<" in page


@pytest.mark.parametrize("odd", [
    {},
    {"node": None, "health": None},
    {"node": 5, "health": 3, "last_seen": "yesterday", "queue_depth": "many",
     "oldest_age": float("nan"), "services_up": True, "services_total": [],
     "labels": ["x"], "desired_rejected": "no", "desired_version": 10**400,
     "desired_applied": -1},
    {"node": "x", "last_seen": float("inf"), "oldest_age": -5, "labels": {1: None}},
])
def test_odd_fleet_fields_render(odd: dict[str, Any]) -> None:
    page = render_fleet([odd, "not a node", None], health=None,  # type: ignore[list-item]
                        now=NOW)
    assert page.rstrip().endswith("</html>")
    assert len(rows(page)) == 1


def test_odd_fleet_arguments_render() -> None:
    page = render_fleet(None, health=None, now=float("nan"))  # type: ignore[arg-type]
    assert "no nodes" in page


@pytest.mark.parametrize("odd", [
    {},
    {"node": "x", "reported": None, "desired": None, "status": None},
    {"node": "x", "reported": [], "desired": "v3", "status": 7},
    {"node": "x", "reported": {"services": {"a": 1}, "peers": "none", "desired": [],
                               "desired_rejected": "yes", "queue": None, "uplink": 3,
                               "labels": None, "desired_applied": "two"},
     "desired": {"services": ["a"], "config": {"queue": None, "x": {"k": object()}},
                 "version": "3"},
     "status": {"state": None, "ts": "now", "conn": 1.5}},
    {"node": "x", "reported": {"services": [None, 3, {"name": None, "pid": "p"}],
                               "peers": [{"addresses": "10.0.0.1"}, {}],
                               "desired": {"items": {"services.a": "applied", 3: {}}}}},
])
def test_odd_node_documents_render(odd: dict[str, Any]) -> None:
    page = render_node(odd, now=NOW)
    assert page.rstrip().endswith("</html>")


def test_node_page_shows_services_peers_and_desired_against_reported() -> None:
    reported = {
        "node": "n1", "version": 9, "ts": NOW - 5, "desired_applied": 4,
        "services": [
            {"name": "sensor", "state": "running", "pid": 12, "restarts": 0, "source": "config"},
            {"name": "uploader", "state": "failed", "reason": "exit 3", "pid": None,
             "restarts": 5, "last_exit": 3, "source": "desired"},
        ],
        "peers": [{"node": "n2", "state": "up", "addresses": ["10.0.0.2"], "last_seen": NOW}],
        "desired": {"version": 4, "items": {
            "services.uploader": {"result": "failed", "reason": "name taken by config"},
            "config.telemetry.interval": {"result": "applied", "reason": None},
        }},
        "desired_rejected": {"version": 5, "reason": "desired: v: expected 1, got 2",
                             "ts": NOW - 1},
    }
    desired = {"v": 1, "version": 5, "services": {"uploader": {"command": ["/bin/up"]}},
               "config": {"telemetry": {"interval": "30s"}}}
    page = render_node(node("n1", reported=reported, desired=desired,
                            status={"state": "online", "ts": NOW}), now=NOW)
    tags = parsed(page).tags
    services = {a["data-service"]: a["data-state"] for t, a in tags
                if t == "tr" and "data-service" in a}
    assert services == {"sensor": "running", "uploader": "failed"}
    peers = [a["data-peer"] for t, a in tags if t == "tr" and "data-peer" in a]
    assert peers == ["n2"]
    items = {a["data-item"]: a["data-result"] for t, a in tags if t == "tr" and "data-item" in a}
    assert items == {"services.uploader": "failed", "config.telemetry.interval": "applied"}
    assert "name taken by config" in page
    assert "applied version 4; version 5 not applied yet" in page
    assert "desired: v: expected 1, got 2" in page
    assert "/bin/up" in page and "30s" in page
    assert '<meta http-equiv="refresh" content="5; url=/nodes/n1">' in page


def test_node_page_without_documents() -> None:
    page = render_node(node("n1", reported=None, desired=None, status=None), now=NOW)
    assert "no services reported" in page and "no peers reported" in page
    assert "no desired state set" in page and "no status yet" in page


def test_node_page_says_when_the_desired_document_waits_for_the_broker() -> None:
    desired = {"v": 1, "version": 2, "services": {}}
    waiting = render_node(node("n1", desired=desired, desired_published=False), now=NOW)
    assert 'id="desired-unpublished"' in waiting
    sent = render_node(node("n1", desired=desired, desired_published=True), now=NOW)
    assert 'id="desired-unpublished"' not in sent
