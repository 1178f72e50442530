"""Status documents across restarts: ordered by the boot number, whatever the wall clock.

Pure ordering first (the boot number from real files under tmp_path, clocks
given), then a real agent restarted a day behind, a real mosquitto and a real
registry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from edge.bootcount import next_boot
from edge.documents import Status, parse_status, status_order
from edge.errors import DocumentError
from tests.conftest import RegistryFactory
from tests.support.broker import Broker
from tests.support.faketime import agent_clock, faked_agent
from tests.support.net import wait_until
from tests.support.registry import Registry
from tests.support.subscriber import read_status

DAY = 86400.0
NOW = 1_796_278_031.8


def status(state: str, *, boot: float, conn: int, ts: float,
           bootn: int | None = None) -> Status:
    doc: dict[str, Any] = {"state": state, "ts": ts, "boot": boot, "conn": conn}
    if bootn is not None:
        doc["bootn"] = bootn
    return parse_status(doc)


def run(data_dir: Path, clock: float, conns: int = 3) -> tuple[Status, Status]:
    """One agent run started at `clock`: its last heartbeat and the offline status it left."""
    bootn = next_boot(data_dir / "boot-count", lambda: clock)
    beat = status("online", boot=clock, conn=conns, ts=clock + 50, bootn=bootn)
    gone = status("offline", boot=clock, conn=conns, ts=clock + 60, bootn=bootn)
    return beat, gone


def test_a_restart_with_the_clock_a_day_behind_is_newer_than_the_run_before(
    tmp_path: Path,
) -> None:
    _, left = run(tmp_path, NOW)
    first, _ = run(tmp_path, NOW - DAY, conns=1)
    assert status_order(first) > status_order(left)
    assert first.bootn == left.bootn + 1  # type: ignore[operator]


def test_a_restart_on_a_wiped_data_dir_with_a_right_clock_is_newer(tmp_path: Path) -> None:
    _, left = run(tmp_path / "old", NOW)
    first, _ = run(tmp_path / "wiped", NOW + 30, conns=1)
    assert status_order(first) > status_order(left)


def test_a_wiped_data_dir_and_a_clock_behind_together_still_lose(tmp_path: Path) -> None:
    # The one case the boot number cannot save (docs/registry.md): nothing remembers.
    _, left = run(tmp_path / "old", NOW)
    first, _ = run(tmp_path / "wiped", NOW - DAY, conns=1)
    assert status_order(first) < status_order(left)


def test_the_boot_number_only_grows_even_when_the_clock_is_far_behind(tmp_path: Path) -> None:
    path = tmp_path / "boot-count"
    numbers = [next_boot(path, lambda c=c: c) for c in (NOW, NOW - DAY, NOW - 2 * DAY, 0.0)]
    assert numbers == [int(NOW * 1000) + i for i in range(4)]
    assert int(path.read_text()) == numbers[-1]


def test_an_unreadable_boot_count_starts_from_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "boot-count"
    path.write_text("garbage\n")
    assert next_boot(path, lambda: NOW) == int(NOW * 1000)


def test_a_boot_count_that_cannot_be_stored_still_gives_a_number(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "boot-count"
    assert next_boot(missing, lambda: NOW) == int(NOW * 1000)


def test_older_agents_without_a_boot_number_are_ordered_by_boot() -> None:
    before = status("online", boot=NOW, conn=4, ts=NOW + 9)
    after = status("online", boot=NOW + 10, conn=1, ts=NOW + 11)
    assert before.bootn is None
    assert status_order(before) < status_order(after)


def test_a_mixed_fleet_upgrade_and_downgrade_move_forward(tmp_path: Path) -> None:
    old = status("offline", boot=NOW, conn=7, ts=NOW + 60)
    upgraded, left = run(tmp_path, NOW + 100, conns=1)  # no boot-count yet: the clock
    assert status_order(upgraded) > status_order(old)
    downgraded = status("online", boot=NOW + 200, conn=1, ts=NOW + 201)
    assert status_order(downgraded) > status_order(left)


def test_within_a_boot_the_will_comes_after_the_heartbeats_of_its_connection() -> None:
    beat = status("online", boot=NOW, conn=2, ts=NOW + 90, bootn=5)
    will = status("offline", boot=NOW, conn=2, ts=NOW + 1, bootn=5)
    nxt = status("online", boot=NOW, conn=3, ts=NOW + 2, bootn=5)
    assert status_order(beat) < status_order(will) < status_order(nxt)


@pytest.mark.parametrize("bootn", [-1, 1.5, "7", True, 2**53])
def test_a_bad_boot_number_is_refused(bootn: object) -> None:
    with pytest.raises(DocumentError, match="bootn"):
        parse_status({"state": "online", "ts": 1.0, "boot": 1.0, "conn": 1, "bootn": bootn})


# ---- a real agent, a real broker, a real registry -------------------------------------


def _node(registry: Registry, node: str) -> dict[str, Any] | None:
    code, body = registry.request("GET", f"/api/v1/nodes/{node}")
    return body if code == 200 else None


def _wait_node(registry: Registry, node: str, what: str, ok: Any,
               timeout: float = 15.0) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        row = _node(registry, node)
        if row is not None and ok(row):
            found.append(row)
            return True
        return False
    try:
        wait_until(check, timeout, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: node {node} is {_node(registry, node)}") from None
    return found[-1]


def test_an_agent_restarted_with_its_clock_a_day_behind_shows_online_not_offline(
    tmp_path: Path, libfaketime: Path, cloud: Broker, registry_factory: RegistryFactory,
) -> None:
    registry = registry_factory(cloud, f"sqlite://{tmp_path / 'registry.db'}")
    agent, offset, _ = faked_agent(tmp_path / "node", libfaketime, cloud.url, offset="+0",
                                   synced=True)
    node = agent.node_id
    try:
        agent.start()
        agent.wait_online()
        _wait_node(registry, node, "healthy", lambda n: n["health"] == "healthy")
        agent.terminate()  # a clean stop: its offline status, of this boot, is retained
        left = _wait_node(registry, node, "offline", lambda n: n["health"] == "offline")
        assert left["status"]["state"] == "offline"

        offset.write_text("-24h\n")  # a Pi without an RTC, started before NTP
        agent.start()
        agent.wait_online()
        assert agent_clock(agent) < time.time() - DAY + 60
        back = _wait_node(registry, node, "healthy after the restart a day behind",
                          lambda n: n["health"] == "healthy")
        assert back["status"]["boot"] < left["status"]["boot"] - DAY + 60  # shown as it is
        assert back["status"]["bootn"] == left["status"]["bootn"] + 1
        assert registry.get("/api/v1/stats")["rejected"].get("older", 0) == 0

        # Its Last Will belongs to this boot and connection: it wins over the heartbeats.
        agent.kill9()
        gone = _wait_node(registry, node, "offline after kill -9",
                          lambda n: n["health"] == "offline")
        will = read_status(cloud.port, node)
        assert will is not None and will["state"] == "offline"
        assert (will["bootn"], will["conn"]) == (back["status"]["bootn"],
                                                 back["status"]["conn"])
        assert gone["status"]["bootn"] == will["bootn"]
    finally:
        agent.close()
