"""Storage faults: a full disk under a running agent, on a real (small) tmpfs."""

from __future__ import annotations

import contextlib
import errno
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AgentFactory, SubscriberFactory, skip_missing
from tests.support.agent import Agent, publish_request
from tests.support.broker import Broker
from tests.support.steady import SteadyPublisher

INFLIGHT = 50
BACKLOG = 1500  # messages queued before the disk fills: many times the in-flight window


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 8 MiB tmpfs mounted under tmp_path (needs root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        skip_missing(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write zeros to `path` until the file system is full; return the bytes written."""
    chunk = b"\0" * 65536
    written = 0
    with open(path, "wb", buffering=0) as fh:
        for _ in range(100_000):  # 6 GiB at most: the disk is far smaller
            try:
                written += fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        for _ in range(1000):  # the last pages, a little at a time
            try:
                written += fh.write(b"\0" * 512)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return written


def warnings_since(agent: Agent, offset: int) -> list[str]:
    """The WARNING and ERROR lines the agent logged after byte `offset` of its log."""
    with open(agent.log_path, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]


def online_on(small_disk: Path, broker: Broker, agent_factory: AgentFactory,
              retry_max: str) -> Agent:
    """An agent with its data on `small_disk`, online to `broker` (started)."""
    broker.start()
    agent = agent_factory(broker, overrides={
        "node": {"data_dir": small_disk / "data"},
        "uplink": {"inflight": INFLIGHT},
        "queue": {"retry_initial": "0.2s", "retry_max": retry_max},
    })
    agent.wait_online()
    return agent


def test_a_full_disk_never_resends_acknowledged_rows_and_recovers_when_space_is_freed(
    broker: Broker, subscriber_factory: SubscriberFactory, agent_factory: AgentFactory,
    small_disk: Path,
) -> None:
    agent = online_on(small_disk, broker, agent_factory, retry_max="2s")
    sub = subscriber_factory(broker)
    publisher = SteadyPublisher(agent)
    publisher.start()
    try:
        sub.wait_for(200, timeout=20)
        filler = small_disk / "filler"
        log_at = agent.log_path.stat().st_size
        fill(filler)
        time.sleep(4.0)  # the disk stays full while the publisher goes on
        # Hundreds of refused publishes and a retry every two seconds: a few lines in all.
        lines = warnings_since(agent, log_at)
        assert 1 <= len(lines) <= 4, "\n".join(lines)
        duplicates = sub.duplicate_count()
        assert duplicates <= INFLIGHT, f"{duplicates} duplicates while the disk was full"
        agent.assert_alive()
        status = agent.wait_status(
            lambda s: s["queue"].get("storage_error"), 5, what="status shows the storage error"
        )
        assert "full" in status["queue"]["storage_error"]
        assert publisher.refused.get("storage_full", 0) > 0, publisher.refused

        filler.unlink()
        agent.wait_status(
            lambda s: s["queue"].get("storage_error") is None and s["queue"]["accepted"] > 0,
            15, what="storage recovered",
        )
        recovered_at = len(publisher.accepted)
        wait_until_more = time.monotonic() + 10
        while len(publisher.accepted) < recovered_at + 100 and time.monotonic() < wait_until_more:
            time.sleep(0.05)
        assert len(publisher.accepted) >= recovered_at + 100, "publishes not accepted again"
    finally:
        publisher.stop()

    sub.wait_for_seqs(publisher.accepted, timeout=30)
    agent.wait_drained(timeout=15)
    time.sleep(0.5)  # let any late copy arrive
    duplicates = sub.duplicate_count()
    assert duplicates <= INFLIGHT, f"{duplicates} duplicates in all"
    log = agent.log_path.read_text()
    failing = log.count("storage is failing")
    assert 1 <= failing <= 3, f"'storage is failing' logged {failing} times"
    assert log.count("commit failed") <= 2 * failing, "a line per failed commit"
    with contextlib.suppress(FileNotFoundError):
        filler.unlink()


def test_a_full_disk_keeps_draining_the_backlog_without_a_log_storm(
    broker: Broker, subscriber_factory: SubscriberFactory, agent_factory: AgentFactory,
    small_disk: Path,
) -> None:
    agent = online_on(small_disk, broker, agent_factory, retry_max="1s")
    sub = subscriber_factory(broker)
    broker.stop()  # a backlog builds up
    answers = agent.publish_many(
        publish_request("sensors/t", f"b{i:04d}" + "x" * 200) for i in range(BACKLOG))
    backlog = [int(a["seq"]) for a in answers if a.get("ok") is True]
    assert len(backlog) == BACKLOG
    filler = small_disk / "filler"
    log_at = agent.log_path.stat().st_size
    fill(filler)
    refused = agent.publish("sensors/t", "while full")
    assert refused.get("error", {}).get("code") == "storage_full", refused
    publisher = SteadyPublisher(agent, interval=0.01)
    publisher.start()
    full_since = time.monotonic()
    try:
        broker.start()
        # Acknowledgements cannot reach the database: the mark file takes them, and
        # the backlog drains far past the in-flight window while the disk stays full.
        sub.wait_for_seqs(backlog, timeout=20)
        status = agent.wait_status(lambda s: s["queue"]["depth"] == 0, 10,
                                   what="the backlog acknowledged while the disk is full")
        assert "full" in (status["queue"]["storage_error"] or ""), status["queue"]
        assert status["queue"]["sent"] >= BACKLOG
        time.sleep(max(0.0, 6.0 - (time.monotonic() - full_since)))  # retries go on failing
    finally:
        publisher.stop()
    assert not publisher.accepted and publisher.refused.get("storage_full", 0) > 100
    lines = warnings_since(agent, log_at)
    assert 1 <= len(lines) <= 5, "\n".join(lines)

    # A crash while the disk is still full: what the mark file recorded stays sent.
    received = len(sub.received)
    agent.kill9()
    filler.unlink()
    agent.start()
    agent.wait_online()
    agent.wait_status(lambda s: s["queue"]["depth"] == 0 and s["queue"]["storage_error"] is None,
                      10, what="empty and healthy after the restart")
    accepted = agent.publish_ok("sensors/t", "space again")["seq"]
    sub.wait_for_seqs([accepted], 10)
    time.sleep(0.5)  # let any late copy arrive
    resent = len(sub.received) - received - 1
    assert resent <= INFLIGHT, f"{resent} messages sent again after the restart"
    assert sub.duplicate_count() <= INFLIGHT
