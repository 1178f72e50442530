"""The desired state on the node (edge/desired.py) and the reported publisher (edge/reported.py),
with real files and a recording apply callback in place of the supervisor."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import cbor2
import pytest

from edge.desired import DesiredState
from edge.documents import Desired
from edge.reconcile import Items
from edge.reported import Reporter


def doc(version: int, **services: Any) -> bytes:
    return bytes(cbor2.dumps({"v": 1, "version": version, "services": services}))


class Recorder:
    def __init__(self) -> None:
        self.applied: list[Desired] = []

    async def __call__(self, desired: Desired) -> Items:
        self.applied.append(desired)
        return {f"services.{name}": {"result": "applied", "reason": None}
                for name in desired.services}


async def test_an_accepted_document_is_on_disk_before_its_future_resolves(tmp_path: Path) -> None:
    apply = Recorder()
    state = DesiredState(tmp_path / "desired.cbor", apply)
    runner = asyncio.create_task(state.run())
    try:
        fut = state.receive(doc(4, a={"command": ["/bin/true"]}))
        assert fut is not None
        await asyncio.wait_for(fut, 5)
        assert cbor2.loads((tmp_path / "desired.cbor").read_bytes())["version"] == 4
        await asyncio.sleep(0.05)
        assert [d.version for d in apply.applied] == [4]
        assert state.applied == 4 and state.items["services.a"]["result"] == "applied"
        # Not newer: ignored, nothing applied, nothing written.
        assert state.receive(doc(4)) is None and state.receive(doc(2)) is None
        assert state.ignored == 2 and len(apply.applied) == 1
    finally:
        runner.cancel()


async def test_an_invalid_document_is_rejected_with_its_reason_and_counted_once_per_copy(
    tmp_path: Path,
) -> None:
    apply = Recorder()
    state = DesiredState(tmp_path / "desired.cbor", apply)
    bad = bytes(cbor2.dumps({"v": 1, "version": 9, "services": {"x": {"command": "ls"}}}))
    assert state.receive(bad) is None
    assert state.rejected is not None
    assert state.rejected["version"] == 9 and "argv list" in state.rejected["reason"]
    changes = state.changes
    assert state.receive(bad) is None  # the retained copy again at a reconnect
    assert state.changes == changes
    assert not apply.applied and not (tmp_path / "desired.cbor").exists()


async def test_huge_or_garbage_documents_are_refused_before_decoding(tmp_path: Path) -> None:
    state = DesiredState(tmp_path / "desired.cbor", Recorder(), max_bytes=1024)
    assert state.receive(b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff") is None  # 2^64 items
    assert "not valid CBOR" in state.rejected["reason"]  # type: ignore[index]
    assert state.receive(b"\xa1" * 2000) is None
    assert "exceeds the limit of 1024" in state.rejected["reason"]  # type: ignore[index]
    assert state.rejections.counts == {"invalid": 2}


async def test_each_different_bad_document_is_counted_even_with_the_same_reason(
        tmp_path: Path) -> None:
    state = DesiredState(tmp_path / "desired.cbor", Recorder(), max_bytes=1024)
    for i in range(5):  # five different payloads that fail the same way
        assert state.receive(b"\xff" + bytes([i])) is None
    assert state.rejections.counts == {"invalid": 5}
    assert state.receive(b"\xff\x04") is None  # the same one again: the retained copy
    assert state.rejections.counts == {"invalid": 5}


async def test_a_document_that_cannot_be_stored_is_not_applied_nor_acknowledged(
    tmp_path: Path,
) -> None:
    apply = Recorder()
    state = DesiredState(tmp_path / "gone" / "desired.cbor", apply)  # no such directory
    runner = asyncio.create_task(state.run())
    try:
        fut = state.receive(doc(1))
        assert fut is not None
        with pytest.raises(OSError):
            await asyncio.wait_for(fut, 5)
        assert not apply.applied and state.applied == 0
    finally:
        runner.cancel()


async def test_restore_applies_the_stored_document_and_survives_a_corrupt_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "desired.cbor"
    path.write_bytes(doc(7, a={"command": ["/bin/true"]}))
    apply = Recorder()
    state = DesiredState(path, apply)
    await state.restore()
    assert state.applied == 7 and [d.version for d in apply.applied] == [7]

    path.write_bytes(b"\x00garbage")
    again = DesiredState(path, Recorder())
    with caplog.at_level(logging.ERROR, logger="edge.desired"):
        await again.restore()
    assert again.applied == 0
    assert "is not valid" in caplog.text and str(path) in caplog.text


async def test_restore_with_no_file_applies_nothing(tmp_path: Path) -> None:
    apply = Recorder()
    await DesiredState(tmp_path / "desired.cbor", apply).restore()
    assert not apply.applied


# ---- the reported publisher -------------------------------------------------------------


async def test_reported_documents_coalesce_changes_and_go_out_at_each_connect(
    tmp_path: Path,
) -> None:
    sent: list[dict[str, Any]] = []
    online = True
    mark = [0]

    async def build() -> dict[str, Any]:
        return {"v": 1, "mark": mark[0]}

    def publish(payload: bytes) -> bool:
        if online:
            sent.append(cbor2.loads(payload))
        return online

    clock = [1000.0]
    reporter = Reporter(tmp_path / "reported-version", build, lambda: mark[0], publish,
                        debounce=0.1, clock=lambda: clock[0])
    runner = asyncio.create_task(reporter.run())
    try:
        reporter.online()
        await asyncio.sleep(0.15)
        assert len(sent) == 1
        for _ in range(5):  # a burst of changes within one debounce
            mark[0] += 1
        await asyncio.sleep(0.3)
        assert len(sent) == 2 and sent[-1]["mark"] == 5
        await asyncio.sleep(0.3)
        assert len(sent) == 2  # nothing changed, nothing sent
        reporter.online()  # a reconnect: sent again though unchanged
        await asyncio.sleep(0.15)
        assert len(sent) == 3
        versions = [d["version"] for d in sent]
        assert versions == sorted(set(versions))
        assert int((tmp_path / "reported-version").read_text()) == versions[-1]
    finally:
        runner.cancel()


async def test_the_reported_version_starts_above_the_stored_one_on_a_clock_behind(
    tmp_path: Path,
) -> None:
    (tmp_path / "reported-version").write_text("5000000000000\n")  # far above the clock
    sent: list[int] = []

    async def build() -> dict[str, Any]:
        return {"v": 1}

    def publish(payload: bytes) -> bool:
        sent.append(cbor2.loads(payload)["version"])
        return True

    reporter = Reporter(tmp_path / "reported-version", build, lambda: 0, publish,
                        debounce=0.05, clock=lambda: 1.0)  # a Pi with no RTC: 1970
    runner = asyncio.create_task(reporter.run())
    try:
        reporter.online()
        await asyncio.sleep(0.1)
        assert sent == [5000000000001]
    finally:
        runner.cancel()


def test_the_desired_file_is_written_atomically(tmp_path: Path) -> None:
    from edge.desired import _write_synced

    path = tmp_path / "desired.cbor"
    _write_synced(path, b"one")
    _write_synced(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["desired.cbor"]
    assert oct(path.stat().st_mode & 0o777) == "0o640"


async def test_a_version_between_the_one_being_applied_and_the_applied_one_is_ignored(
    tmp_path: Path,
) -> None:
    """100 is applied, 102 is being applied: 101 arriving late must never be applied."""
    gate = asyncio.Event()
    order: list[int] = []

    async def slow_apply(desired: Desired) -> Items:
        order.append(desired.version)
        if desired.version == 102:
            await gate.wait()  # stopping a service takes a while
        return {}

    state = DesiredState(tmp_path / "desired.cbor", slow_apply)
    runner = asyncio.create_task(state.run())
    try:
        for version in (100, 102):
            fut = state.receive(doc(version))
            assert fut is not None
            await asyncio.wait_for(fut, 5)
            await asyncio.sleep(0.05)
        assert order == [100, 102] and state.applied == 100  # 102 not finished yet
        assert state.receive(doc(101)) is None and state.ignored == 1
        assert state.receive(doc(102)) is None  # the one being applied, again
        gate.set()
        for _ in range(100):
            if state.applied == 102:
                break
            await asyncio.sleep(0.01)
        assert order == [100, 102] and state.applied == 102
    finally:
        runner.cancel()
