"""The inbox: down messages kept in SQLite until delivered, across reopening, within a cap."""

from __future__ import annotations

from pathlib import Path

from edge.inbox import Inbox

ID = bytes(range(16))


async def test_messages_survive_reopening_until_removed(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox.db", max_bytes=1 << 20)
    await inbox.open()
    first = await inbox.add("cmd/a", b"one", "text/plain", ID, 1796320000.0, None)
    second = await inbox.add("cmd/b", b"\x00two", "application/octet-stream", None, None, 2e9)
    await inbox.remove([first.key])
    await inbox.close()

    again = Inbox(tmp_path / "inbox.db", max_bytes=1 << 20)
    await again.open()
    assert again.pending() == [second]
    third = await again.add("cmd/c", b"three", "text/plain", None, None, None)
    assert third.key > second.key  # keys never go back, even after the newest was removed
    await again.close()
    assert (tmp_path / "inbox.db").stat().st_mode & 0o777 == 0o640


async def test_the_oldest_go_when_the_cap_is_reached_and_are_counted(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox.db", max_bytes=1000)
    await inbox.open()
    rows = [await inbox.add("t", bytes(200), "application/octet-stream", None, None, None)
            for _ in range(6)]
    kept = inbox.pending()
    assert inbox.size <= 1000
    assert [r.key for r in kept] == [r.key for r in rows[-len(kept):]]
    assert inbox.dropped == len(rows) - len(kept) > 0
    await inbox.close()

    again = Inbox(tmp_path / "inbox.db", max_bytes=1000)
    await again.open()
    assert again.dropped == len(rows) - len(kept)  # the count is kept on disk
    assert [r.key for r in again.pending()] == [r.key for r in kept]
    await again.close()
