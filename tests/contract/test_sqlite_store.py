"""What the SQLite store promises beyond the shared contract: schema upgrades,
batched cursor writes that still reach the file, and a log that survives reopening."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from imfast.backends import sqlite as sqlite_module
from imfast.backends.base import StoredMessage
from imfast.backends.sqlite import _FLUSH_DELAY, SCHEMA_VERSION, SQLiteStore

_V1_SCHEMA = """
CREATE TABLE messages (
    conv TEXT NOT NULL, seq INTEGER NOT NULL, msg_id TEXT NOT NULL, sender TEXT NOT NULL,
    sender_device TEXT NOT NULL, cmid TEXT NOT NULL, body TEXT NOT NULL, ts INTEGER NOT NULL,
    kind TEXT NOT NULL, dedup_key TEXT, PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_dedup ON messages(dedup_key) WHERE dedup_key IS NOT NULL;
CREATE TABLE private_convs (user TEXT NOT NULL, conv TEXT NOT NULL, PRIMARY KEY (user, conv))
    WITHOUT ROWID;
CREATE TABLE cursors (user TEXT NOT NULL, device TEXT NOT NULL, conv TEXT NOT NULL,
    seq INTEGER NOT NULL, PRIMARY KEY (user, device, conv)) WITHOUT ROWID;
PRAGMA user_version=1;
"""


def _msg(conv: str, seq: int, sender: str = "alice", cmid: str = "") -> StoredMessage:
    return StoredMessage(conv, seq, f"m{conv}{seq}", sender, "d1", cmid or f"c{seq}",
                         f"body {seq}", 1000 + seq)


def _make_v1(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    rows = [(m.conv, m.seq, m.msg_id, m.sender, m.sender_device, m.cmid, m.body, m.ts, m.kind,
             f"{m.sender}:{m.cmid}") for m in (_msg("p:alice:bob", s) for s in (1, 2, 3))]
    db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    db.execute("INSERT INTO private_convs VALUES ('alice','p:alice:bob'), ('bob','p:alice:bob')")
    db.execute("INSERT INTO cursors VALUES ('bob','d1','p:alice:bob',2)")
    db.commit()
    db.close()


async def test_a_version_1_file_is_upgraded_with_its_messages_and_cursors(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    _make_v1(path)
    store = SQLiteStore(str(path))
    try:
        assert [m.seq for m in await store.fetch("p:alice:bob", 0, 10)] == [1, 2, 3]
        assert await store.latest_seq("p:alice:bob") == 3
        assert await store.cursors("bob", "d1") == {"p:alice:bob": 2}
        # dedup still finds the old entries, and the counter continues after them
        dup = await store.reserve("p:alice:bob", "alice:c2", "new", 0)
        assert (dup.duplicate, dup.seq) == (True, 2)
        fresh = await store.reserve("p:alice:bob", "alice:c9", "m9", 0)
        assert (fresh.duplicate, fresh.seq) == (False, 4)
        # the unique (conv, seq) rule survived the upgrade
        with pytest.raises(ValueError, match="already exists"):
            await store.append([_msg("p:alice:bob", 3, cmid="other")])
    finally:
        await store.close()
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 4


async def test_a_file_from_a_newer_imfast_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="upgrade imfast"):
        SQLiteStore(str(path))


async def _rows_once_written(path: str, sql: str) -> list[Any]:
    """``sql``'s rows once there are any: the batched write is due after
    _FLUSH_DELAY; a loaded machine may run it later (10 s: "never" fails)."""
    await asyncio.sleep(_FLUSH_DELAY)
    deadline = time.monotonic() + 10
    while True:
        rows = sqlite3.connect(path).execute(sql).fetchall()
        if rows or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_moved_cursors_reach_the_file_within_the_flush_delay(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    store = SQLiteStore(path)
    await store.append([_msg("p:alice:bob", s) for s in (1, 2, 3)])
    assert await store.advance("bob", "d1", "p:alice:bob", 2) == 2
    assert await store.advance("bob", "d1", "p:alice:bob", 1) == 2  # never back
    assert await store.cursors("bob", "d1") == {"p:alice:bob": 2}  # before the write, too
    on_disk = sqlite3.connect(path).execute("SELECT seq FROM cursors").fetchall()
    assert on_disk == []  # not yet: moves of half a second share one write
    assert await store.advance("bob", "d1", "p:alice:bob", 3) == 3
    await store.append([_msg("p:alice:bob", 4)])  # appends stay small: they do not carry it
    on_disk = sqlite3.connect(path).execute("SELECT seq FROM cursors").fetchall()
    assert on_disk == []
    on_disk = await _rows_once_written(path, "SELECT seq FROM cursors")
    assert on_disk == [(3,)]  # the latest of the moves, once
    await store.close()


async def test_read_receipts_move_forward_only_and_are_batched_like_cursors(
        tmp_path: Path) -> None:
    path = str(tmp_path / "rr.db")
    store = SQLiteStore(path)
    try:
        assert await store.mark_read("p:alice:bob", "bob", 2)
        assert not await store.mark_read("p:alice:bob", "bob", 1)  # never back
        assert await store.read_up_to("p:alice:bob") == {"bob": 2}  # before the write, too
        assert sqlite3.connect(path).execute("SELECT seq FROM read_receipts").fetchall() == []
        rows = await _rows_once_written(path, "SELECT user, seq FROM read_receipts")
        assert rows == [("bob", 2)]
        assert await store.mark_read("p:alice:bob", "bob", 5)
        assert await store.mark_read("p:alice:bob", "alice", 1)
    finally:
        await store.close()  # writes what is still pending
    again = SQLiteStore(path)
    try:
        assert await again.read_up_to("p:alice:bob") == {"bob": 5, "alice": 1}
        assert not await again.mark_read("p:alice:bob", "bob", 5)  # read back from the file
        assert await again.mark_read("p:alice:bob", "bob", 6)
    finally:
        await again.close()


async def test_a_reopened_store_knows_its_log_and_cursors(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    store = SQLiteStore(path)
    await store.append([_msg("p:alice:bob", s) for s in (1, 2)])
    await store.advance("bob", "d1", "p:alice:bob", 2)
    await store.close()  # flushes what the loop had not written yet
    again = SQLiteStore(path)
    try:
        assert await again.latest_seq("p:alice:bob") == 2
        assert await again.cursors("bob", "d1") == {"p:alice:bob": 2}
        assert await again.private_conversations("alice") == {"p:alice:bob": 2}
        nxt = await again.reserve("p:alice:bob", "alice:new", "m3", 0)
        assert nxt.seq == 3
    finally:
        await again.close()


async def test_the_wal_is_checkpointed_off_the_loop_and_truncated_on_close(
        tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    store = SQLiteStore(str(path))
    assert store._checkpointer is not None
    store._checkpointer.interval = 0.0  # every commit nudges the thread
    for seq in range(1, 51):
        await store.append([_msg("p:alice:bob", seq)])
    for _ in range(200):  # the thread runs beside the loop
        if store._checkpointer.checkpoints:
            break
        await asyncio.sleep(0.01)
    assert store._checkpointer.checkpoints >= 1
    # a reader on another connection sees everything the writer committed
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM messages").fetchone()
    assert rows == (50,)
    await store.close()
    wal = Path(str(path) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def _reads(store: SQLiteStore) -> list[str]:
    """Record every SELECT the store's writer connection runs from now on."""
    seen: list[str] = []
    store._db.set_trace_callback(lambda sql: seen.append(sql) if "SELECT" in sql else None)
    return seen


async def _until_ready(store: SQLiteStore) -> None:
    for _ in range(500):
        if store._known.ready():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the key scan did not finish within 5 s")


async def test_new_keys_cost_no_read_once_the_reopened_store_knows_its_keys(
        tmp_path: Path) -> None:
    path = str(tmp_path / "k.db")
    store = SQLiteStore(path)
    await store.append([_msg("p:alice:bob", s) for s in (1, 2)])
    await store.advance("bob", "d1", "p:alice:bob", 2)
    await store.mark_read("p:alice:bob", "bob", 2)
    await store.close()
    again = SQLiteStore(path)
    try:
        await _until_ready(again)
        reads = _reads(again)
        fresh = await again.reserve("p:alice:carol", "alice:brand-new", "m1", 0)
        assert (fresh.seq, fresh.duplicate) == (1, False)
        assert await again.advance("carol", "d1", "p:alice:carol", 1) == 1
        assert await again.mark_read("p:alice:carol", "carol", 1) is True
        assert reads == []  # all three answered "absent" from memory
        # Keys the file already held are still found, by reading it.
        dup = await again.reserve("p:alice:bob", "alice:c1", "mX", 0)
        assert (dup.seq, dup.msg_id, dup.duplicate) == (1, "mp:alice:bob1", True)
        assert await again.advance("bob", "d1", "p:alice:bob", 1) == 2  # never backwards
        assert await again.mark_read("p:alice:bob", "bob", 1) is False
        assert (await again.reserve("p:alice:bob", "alice:c9", "m3", 0)).seq == 3
        assert len(reads) >= 4
    finally:
        await again.close()


async def test_a_cast_ack_moves_a_cursor_it_does_not_hold_without_reading_it(
        tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    store = SQLiteStore(path)
    await store.append([_msg("p:alice:bob", s) for s in range(1, 13)])
    await store.advance("bob", "d1", "p:alice:bob", 10)
    await store.advance("bob", "d2", "p:alice:bob", 3)
    await store.close()
    again = SQLiteStore(path)
    try:
        await _until_ready(again)
        reads = _reads(again)
        # Rows the file holds and memory does not: moved blind, no read, a lower bound.
        assert again.advance_blind_now("bob", "d1", "p:alice:bob", 5) == 5
        assert again.advance_blind_now("bob", "d2", "p:alice:bob", 7) == 7
        assert again.advance_blind_now("bob", "d2", "p:alice:bob", 6) == 7  # its floor
        assert reads == []
        # Every read after that is exact: the larger of the row and the floors.
        assert await again.cursors("bob", "d1") == {"p:alice:bob": 10}
        assert again.advance_now("bob", "d1", "p:alice:bob", 0) == 10  # never back
        assert again.advance_now("bob", "d2", "p:alice:bob", 0) == 7
        assert len(reads) == 3  # cursors() and one read per blind cursor
        assert again.advance_blind_now("bob", "d1", "p:alice:bob", 11) == 11  # held: exact
        assert len(reads) == 3
        await asyncio.sleep(_FLUSH_DELAY * 3)  # written; then out of memory again
        again._cursor_cache.clear()
        assert again.advance_blind_now("bob", "d1", "p:alice:bob", 4) == 4  # blind, lower
        await asyncio.sleep(_FLUSH_DELAY * 3)
        rows = dict(sqlite3.connect(path).execute("SELECT device, seq FROM cursors").fetchall())
        assert rows == {"d1": 11, "d2": 7}  # the lower floor never moved a row back
        assert again.advance_own_now("bob", "d1", "p:alice:bob", [12]) == 12
        assert await again.cursors("bob", "d1") == {"p:alice:bob": 12}
    finally:
        await again.close()
    reopened = SQLiteStore(path)
    try:
        assert await reopened.cursors("bob", "d2") == {"p:alice:bob": 7}
        assert await reopened.cursors("bob", "d1") == {"p:alice:bob": 12}
    finally:
        await reopened.close()


async def test_until_the_scan_is_done_and_during_it_nothing_is_missed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from imfast.backends import sqlite_keys

    path = str(tmp_path / "s.db")
    store = SQLiteStore(path)
    await store.append([_msg("p:alice:bob", 1, cmid="old")])
    await store.advance("bob", "d1", "p:alice:bob", 1)
    await store.close()

    scanned, go = threading.Event(), threading.Event()
    scan = sqlite_keys.KnownKeys._scan

    def held_scan(self: sqlite_keys.KnownKeys, p: str) -> None:
        scan(self, p)  # its snapshot: the file as opened, before the writes below
        found, self._scanned = self._scanned, None
        scanned.set()
        go.wait(10)  # ... and it reports only after them
        self._scanned = found

    monkeypatch.setattr(sqlite_keys.KnownKeys, "_scan", held_scan)
    again = SQLiteStore(path)
    try:
        assert await asyncio.to_thread(scanned.wait, 10)
        assert again._known.ready() is False  # not reported yet: the file is read
        assert (await again.reserve("p:alice:bob", "alice:old", "mX", 0)).duplicate is True
        # Written after the scan's snapshot: only the live filters can know them.
        await again.append([_msg("p:alice:dave", 1, cmid="during")])
        assert await again.advance("dave", "d1", "p:alice:dave", 1) == 1
        await asyncio.sleep(_FLUSH_DELAY * 3)  # the cursor row reaches the file
        go.set()
        await _until_ready(again)
        assert (await again.reserve("p:alice:bob", "alice:old", "mY", 0)).duplicate is True
        assert (await again.reserve("p:alice:dave", "alice:during", "mZ", 0)).duplicate is True
        assert (await again.reserve("p:alice:dave", "alice:next", "mW", 0)).seq == 2
        again._cursor_cache.clear()  # make it ask the filter, then the file
        assert await again.advance("dave", "d1", "p:alice:dave", 0) == 1
        assert await again.advance("bob", "d1", "p:alice:bob", 0) == 1
    finally:
        go.set()
        await again.close()


def _aged(conv: str, seq: int, days: float) -> StoredMessage:
    return StoredMessage(conv, seq, f"m{conv}{seq}", "alice", "d1", f"c{conv}{seq}", "b",
                         int((time.time() - days * 24 * 3600) * 1000))


async def test_a_reopened_store_keeps_the_seq_of_a_conversation_retention_emptied(
        tmp_path: Path) -> None:
    """The key scan counts conversations with a floor as known: without that, a
    conversation whose entries were all deleted would start again at seq 1."""
    path = str(tmp_path / "r.db")
    store = SQLiteStore(path)
    await store.append([_aged("g:old", s, 40) for s in (1, 2, 3)] + [_aged("g:new", 1, 0)])
    await store.settle()
    assert await store.purge_messages(30 * 24 * 3600) == 3
    await store.close()
    again = SQLiteStore(path)
    try:
        await _until_ready(again)
        assert await again.latest_seq("g:old") == 3
        assert (await again.reserve("g:old", "alice:next", "m4", 0)).seq == 4
        assert [m.seq for m in await again.fetch("g:new", 0, 10)] == [1]
    finally:
        await again.close()


def _as_older_version(path: Path, script: str) -> SQLiteStore:
    """The closed store at ``path`` taken back to an older schema by ``script``, then
    opened again by this release (which upgrades it)."""
    db = sqlite3.connect(path)
    db.executescript(script)
    db.close()
    return SQLiteStore(str(path))


async def test_a_version_2_file_gains_the_floors_table_and_keeps_its_entries(
        tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    store = SQLiteStore(str(path))
    await store.append([_aged("p:alice:bob", s, 40) for s in (1, 2)])
    await store.close()
    store = _as_older_version(path, "DROP TABLE seq_floors; PRAGMA user_version=2;")
    try:
        assert [m.seq for m in await store.fetch("p:alice:bob", 0, 10)] == [1, 2]
        assert await store.purge_messages(30 * 24 * 3600) == 2
        assert await store.latest_seq("p:alice:bob") == 2
    finally:
        await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_version_3_file_gains_the_group_bars_table_and_keeps_its_groups(
        tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    store = SQLiteStore(str(path))
    assert await store.create("team", "alice", "Team")
    await store.close()
    store = _as_older_version(path, "DROP TABLE group_bars; PRAGMA user_version=3;")
    try:
        assert await store.members("team") == {"alice": "owner"}
        assert not await store.barred("team", "bob")
        await store.bar("team", "bob")
        assert await store.barred("team", "bob")
    finally:
        await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 4


async def test_retention_runs_off_the_loop_while_appends_go_on(tmp_path: Path) -> None:
    """Many batches on the purge thread, the store taking appends meanwhile: every
    old entry goes, every new one stays."""
    store = SQLiteStore(str(tmp_path / "busy.db"))
    try:
        await store.append([_aged("p:alice:bob", s, 40) for s in range(1, 2001)])
        await store.settle()
        purge = asyncio.ensure_future(store.purge_messages(30 * 24 * 3600, batch=500))
        for s in range(1, 51):
            await store.append([_aged("p:alice:carol", s, 0)])
            await asyncio.sleep(0)
        assert await purge == 2000
        await store.settle()
        assert await store.fetch("p:alice:bob", 0, 10) == []
        assert len(await store.fetch("p:alice:carol", 0, 100)) == 50
        assert (await store.reserve("p:alice:bob", "alice:x", "mx", 0)).seq == 2001
    finally:
        await store.close()


async def test_a_store_in_memory_purges_on_its_own_connection() -> None:
    """``:memory:`` has one connection (no thread can open another): the batches run
    on the loop's, with the same floors."""
    store = SQLiteStore(":memory:")
    try:
        await store.append([_aged("g:old", s, 40) for s in (1, 2, 3)] + [_aged("g:old", 4, 0)])
        await store.settle()
        assert await store.purge_messages(30 * 24 * 3600, batch=2) == 3
        assert [m.seq for m in await store.fetch("g:old", 0, 10)] == [4]
        assert (await store.reserve("g:old", "alice:next", "m5", 0)).seq == 5
    finally:
        await store.close()


async def test_retention_shrinks_the_dedup_filter_and_keeps_every_key_it_must(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once retention deleted half as many entries as the dedup filter holds keys, the
    filter is rebuilt from the table: the deleted entries' keys go, while those kept,
    those not moved into the table yet and those appended during the rebuild stay
    (a resend of any of them is still found to be a duplicate)."""
    monkeypatch.setattr(sqlite_module, "_DEDUP_REBUILD_MIN", 100)
    store = SQLiteStore(str(tmp_path / "keys.db"))
    try:
        await store.append([_aged("p:alice:bob", s, 40) for s in range(1, 3001)])
        await store.append([_aged("p:alice:carol", s, 0) for s in range(1, 11)])
        await store.settle()
        await store.append([_aged("p:alice:dave", 1, 0)])  # in the entry log, not the table
        assert "alice:cp:alice:dave1" in store._hot_dedup
        assert store._known.dedup.count == 3011
        purge = asyncio.ensure_future(store.purge_messages(30 * 24 * 3600, batch=1000))
        during = []
        while not purge.done():
            during.append(_aged("p:alice:erin", len(during) + 1, 0))
            await store.append([during[-1]])
            await asyncio.sleep(0.005)
        assert await purge == 3000
        assert store._known.dedup.count < 11 + len(during) + 10
        kept = ([_aged("p:alice:carol", s, 0) for s in range(1, 11)]
                + [_aged("p:alice:dave", 1, 0)] + during)
        await store.settle()
        for m in kept:
            key = f"{m.sender}:{m.cmid}"
            assert key in store._known.dedup
            found = await store.reserve(m.conv, key, "again", 0)
            assert found.duplicate and found.seq == m.seq
    finally:
        await store.close()


async def test_without_enough_deleted_the_dedup_filter_is_not_rebuilt(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "few.db"))
    try:
        await store.append([_aged("p:alice:bob", s, 40) for s in range(1, 101)])
        await store.settle()
        before = store._known.dedup
        assert await store.purge_messages(30 * 24 * 3600) == 100
        assert store._known.dedup is before and before.count == 100
    finally:
        await store.close()
