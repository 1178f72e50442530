"""Timestamps taken before the wall clock is synchronised: marked, then dated again.

In-process first: the sync check, `retime`, and the outbox with fake clocks
(the wall clock and the monotonic one apart, as a clock step makes them).
Then the agent as a subprocess under libfaketime, its wall clock a day behind
and "not synchronised" (EDGE_TEST_CLOCK_SYNC_FILE absent), publishing to a
real mosquitto; the clock is then stepped to the right time and declared
synchronised, and what the cloud subscriber receives is checked.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import cbor2
import pytest

from edge.clock import TEST_SYNC_FILE_ENV, ClockSync, retime, synchronised
from edge.outbox import Outbox
from tests.conftest import SubscriberFactory
from tests.support.agent import Agent
from tests.support.broker import Broker
from tests.support.faketime import agent_clock, faked_agent
from tests.support.net import wait_until
from tests.test_outbox import opened as outbox_opened

DAY = 86400.0
BOOT = bytes(range(16))
OTHER_BOOT = bytes(range(1, 17))


class Clocks:
    """A wall clock and a monotonic clock that tests move apart."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 5_000.0
        self.synced = False

    def sync(self, boot: bytes = BOOT) -> ClockSync:
        return ClockSync(check=lambda: self.synced, wall=lambda: self.wall,
                         monotonic=lambda: self.mono, boot=boot)


def opened(
    path: Path, clocks: Clocks, sync: ClockSync | None
) -> AbstractAsyncContextManager[Outbox]:
    """The outbox on the wall and monotonic clocks of `clocks`."""
    return outbox_opened(path, lambda: clocks.wall, monotonic=lambda: clocks.mono, sync=sync)


async def sent(box: Outbox) -> list[dict[str, Any]]:
    """Fetch and acknowledge everything; the envelopes as they would be published."""
    out: list[dict[str, Any]] = []
    while rows := await box.fetch(100):
        out += [cbor2.loads(r.body) for r in rows]
        await box.ack(rows)
    return out


# ---- the check and the correction, pure -------------------------------------------


def test_the_test_sync_file_decides_while_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "synced"
    monkeypatch.setenv(TEST_SYNC_FILE_ENV, str(flag))
    assert synchronised() is False
    flag.touch()
    assert synchronised() is True


def test_synchronisation_once_seen_holds_and_fixes_the_offset() -> None:
    clocks = Clocks()
    sync = clocks.sync()
    assert not sync.synced and sync.offset is None
    clocks.wall += DAY  # NTP steps the clock, then says it is synchronised
    clocks.synced = True
    assert sync.look()
    assert sync.offset == clocks.wall - clocks.mono
    clocks.synced = False  # a daemon that stops disciplining it: still good enough
    clocks.wall += 10
    assert sync.look() and sync.offset == clocks.wall - 10 - clocks.mono


def test_retime_dates_a_marked_envelope_of_this_boot_and_leaves_others() -> None:
    marked = {"ts": 100.0, "exp": 160.0, "tsu": True, "mono": 40.0, "bootid": BOOT, "seq": 1}
    assert retime(marked, BOOT, offset=1_800_000_000.0)
    assert marked == {"ts": 1_800_000_040.0, "exp": 1_800_000_100.0, "seq": 1, "tsc": True}
    other = {"ts": 100.0, "tsu": True, "mono": 40.0, "bootid": OTHER_BOOT}
    assert not retime(other, BOOT, offset=1.0)
    assert other["ts"] == 100.0 and other["tsu"] is True
    assert not retime({"ts": 100.0}, BOOT, offset=1.0)


# ---- the outbox: mark, date again, and expiry on the outbox clock -----------------------


async def test_messages_accepted_unsynchronised_are_dated_again_once_synchronised(
    tmp_path: Path,
) -> None:
    clocks = Clocks()
    clocks.wall = 1_000.0  # a Pi without RTC: 1970
    sync = clocks.sync()
    async with opened(tmp_path / "o.db", clocks, sync) as box:
        env = await box.put("t", "early", "text/plain", ttl=60)
        assert (env.tsu, env.mono, env.bootid) == (True, clocks.mono, BOOT)
        accepted_at = clocks.mono
        clocks.mono += 5
        clocks.wall = 1_800_000_000.0  # NTP steps it
        clocks.synced = True
        sync.look()
        clocks.mono += 5
        clocks.wall += 5
        await box.put("t", "late", "text/plain")
        early, late = await sent(box)
    # Accepted 5 s before the clock was synchronised to 1_800_000_000.
    assert clocks.mono - accepted_at == 10
    assert early["ts"] == pytest.approx(1_800_000_000.0 - 5)
    assert early["exp"] == pytest.approx(early["ts"] + 60)
    assert early["tsc"] is True and not {"tsu", "mono", "bootid"} & set(early)
    assert late["ts"] == pytest.approx(1_800_000_005.0)
    assert not {"tsu", "tsc", "mono", "bootid"} & set(late)


async def test_a_marked_message_of_an_earlier_boot_keeps_its_mark(tmp_path: Path) -> None:
    clocks = Clocks()
    async with opened(tmp_path / "o.db", clocks, clocks.sync(boot=OTHER_BOOT)) as box:
        await box.put("t", "before the reboot", "text/plain")
    clocks.synced = True
    async with opened(tmp_path / "o.db", clocks, clocks.sync(boot=BOOT)) as box:
        [env] = await sent(box)
    assert env["tsu"] is True and env["bootid"] == OTHER_BOOT and "tsc" not in env


async def test_wall_clock_steps_change_no_ttl_and_no_age(tmp_path: Path) -> None:
    clocks = Clocks()
    clocks.synced = True
    async with opened(tmp_path / "o.db", clocks, clocks.sync()) as box:
        short = await box.put("t", "short", "text/plain", ttl=10)
        assert short.exp == short.ts + 10  # the envelope: wall clock
        clocks.wall -= DAY  # stepped back a day
        clocks.mono += 11  # ... and 11 s really pass: "short" is over
        await box.put("t", "behind", "text/plain", ttl=60)
        assert (await box.stats()).oldest_age == pytest.approx(11)
        clocks.wall += DAY  # forward again: "behind" has 60 s from its acceptance
        clocks.mono += 1
        envelopes = await sent(box)
        await asyncio.sleep(0.05)  # the expiry delete commits with the next batch
        stats = await box.stats()
    assert [e["data"] for e in envelopes] == ["behind"]
    assert envelopes[0]["exp"] == envelopes[0]["ts"] + 60
    assert stats.expired == 1


async def test_the_outbox_clock_holds_for_the_boot_across_restarts(tmp_path: Path) -> None:
    clocks = Clocks()
    clocks.synced = True
    async with opened(tmp_path / "o.db", clocks, clocks.sync()) as box:
        await box.put("t", "ttl 30", "text/plain", ttl=30)
    clocks.wall += DAY  # a step while the agent was down; 5 s really passed
    clocks.mono += 5
    async with opened(tmp_path / "o.db", clocks, clocks.sync()) as box:
        assert (await box.stats()).oldest_age == pytest.approx(5)
        rows = await box.fetch(10)
        assert [r.seq for r in rows] == [1]
        box.release(rows)
    clocks.mono += 30
    async with opened(tmp_path / "o.db", clocks, clocks.sync()) as box:
        assert await box.fetch(10) == []


# ---- the agent, its clock a day behind until NTP steps and synchronises it ---------------


def _wait_offline(agent: Agent) -> None:
    agent.wait_status(lambda s: s["uplink"]["state"] == "offline", 10, what="uplink offline")


def test_messages_queued_before_the_clock_is_synchronised_arrive_with_the_right_time(
    tmp_path: Path, libfaketime: Path, broker: Broker, subscriber_factory: SubscriberFactory,
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    # Booted without RTC: the wall clock a day behind, not synchronised.
    agent, offset, synced = faked_agent(tmp_path, libfaketime, broker.url, offset="-24h",
                                        synced=False)
    try:
        agent.start()
        agent.wait_online()
        clock = agent.status()["clock"]
        assert clock["synchronised"] is False
        # Sent at once, before the sync: nothing can date it again, it keeps the mark.
        unsynced = agent.publish_ok("sensors/t", "sent before the sync")["seq"]
        sub.wait_for_seqs([unsynced], 10)
        broker.stop()
        _wait_offline(agent)
        queued: dict[int, float] = {}  # seq -> real time of the publish
        for i in range(3):
            queued[agent.publish_ok("sensors/t", f"queued {i}", ttl=3600)["seq"]] = time.time()
            time.sleep(0.3)
        # NTP steps the clock to the right time, then says it is synchronised.
        offset.write_text("+0\n")
        wait_until(lambda: abs(agent_clock(agent) - time.time()) < 5, 10, what="clock stepped")
        synced.touch()
        agent.wait_status(lambda s: s["clock"]["synchronised"], 10, what="clock synchronised")
        after_at = time.time()
        after = agent.publish_ok("sensors/t", "after the sync")["seq"]
        broker.start()
        sub.wait_for_seqs([*queued, after], 20)
    finally:
        agent.close()

    by_seq = {r.envelope["seq"]: r.envelope for r in sub.first_arrivals()}
    early = by_seq[unsynced]
    assert early["tsu"] is True and "tsc" not in early
    assert early["bootid"].hex() == clock["boot_id"] and isinstance(early["mono"], float)
    assert early["ts"] == pytest.approx(time.time() - DAY, abs=60)
    for seq, real in queued.items():
        env = by_seq[seq]
        assert env["tsc"] is True and not {"tsu", "mono", "bootid"} & set(env), env
        assert abs(env["ts"] - real) < 1.0, (env["ts"] - real, env)
        assert env["exp"] - env["ts"] == pytest.approx(3600)
    late = by_seq[after]
    assert not {"tsu", "tsc", "mono", "bootid"} & set(late), late
    assert abs(late["ts"] - after_at) < 1.0
