"""Storage faults: a full disk under a running agent, on a real (small) tmpfs."""

from __future__ import annotations

import contextlib
import errno
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AgentFactory, SubscriberFactory, skip_missing
from tests.support.agent import Agent, ApiError, publish_request
from tests.support.broker import Broker

INFLIGHT = 50


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


class Publisher(threading.Thread):
    """Publish one message at a time, steadily, recording what was accepted or refused."""

    def __init__(self, agent: Agent, interval: float = 0.003) -> None:
        super().__init__(name="steady-publisher", daemon=True)
        self.agent = agent
        self.interval = interval
        self.accepted: list[int] = []
        self.refused: dict[str, int] = {}
        self.failure: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with self.agent.connect(timeout=10) as api:
                for i in range(1_000_000):
                    if self._halt.is_set():
                        return
                    answer = api.request(publish_request("sensors/t", f"m{i}"))
                    if answer.get("ok") is True:
                        self.accepted.append(int(answer["seq"]))
                    else:
                        code = str(answer.get("error", {}).get("code"))
                        self.refused[code] = self.refused.get(code, 0) + 1
                    time.sleep(self.interval)
        except (OSError, ApiError) as exc:
            self.failure = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)
        assert not self.is_alive(), "publisher did not stop"
        assert self.failure is None, f"publisher failed: {self.failure!r}"


def test_a_full_disk_never_resends_acknowledged_rows_and_recovers_when_space_is_freed(
    broker: Broker, subscriber_factory: SubscriberFactory, agent_factory: AgentFactory,
    small_disk: Path,
) -> None:
    broker.start()
    sub = subscriber_factory(broker)
    agent = agent_factory(broker, overrides={
        "node": {"data_dir": small_disk / "data"},
        "uplink": {"inflight": INFLIGHT},
        "queue": {"retry_initial": "0.2s", "retry_max": "2s"},
    })
    agent.wait_online()
    publisher = Publisher(agent)
    publisher.start()
    try:
        sub.wait_for(200, timeout=20)
        filler = small_disk / "filler"
        fill(filler)
        time.sleep(4.0)  # the disk stays full while the publisher goes on
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
