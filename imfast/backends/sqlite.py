"""SQLite backend: the embedded node's durable store, in one file.

Guarantees beyond the contract:

* ``append`` commits before it returns (WAL journal; ``SQLITE_SYNCHRONOUS``
  NORMAL survives a process crash, FULL also a power cut), so an
  acknowledged message survives ``kill -9``;
* sequence counters are rebuilt from the log at start-up, and dedup keys are
  checked against the log itself, so neither can go backwards after a crash.

Calls are synchronous on the event loop: one indexed SQLite statement takes
microseconds, less than handing it to a thread would.  The router batches
appends per loop iteration (group commit), so one commit covers many
messages; WAL checkpoints (the part that waits for ``fsync``) run on a
thread of their own (:mod:`imfast.backends.sqlite_checkpoint`).

Questions whose answer is nearly always "no" - was this dedup key stored,
has this conversation entries, has this device a cursor row here - are
answered from in-memory filters once they know every key of the file
(:mod:`imfast.backends.sqlite_keys`; a scan thread reads the keys already
stored at start-up), so a new message costs no read.

Delivery cursors and read receipts are batched too: ``advance`` and
``mark_read`` answer from memory, and what moved is written at most
``_FLUSH_DELAY`` later, in one transaction of its own (one row per key per
flush, however often it moved).  A process crash in that window can only
move a cursor or receipt back: a redelivery the client drops by seq, or a
receipt the client sends again - never a lost message.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from imfast.backends.base import Reservation, StoredMessage
from imfast.backends.keyfilter import KeyFilters
from imfast.backends.sqlite_checkpoint import BackgroundCheckpointer
from imfast.backends.sqlite_keys import KnownKeys
from imfast.protocol.ids import conv_members_private

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 2
_DEDUP_CACHE = 100_000  # recent reservations kept in memory; older ones are read from the log
_CURSOR_CACHE = 200_000  # (user, device, conv) cursors kept in memory; older ones are re-read
_CACHE_KIB = 16 * 1024  # SQLite page cache of the writer connection
_PAIR_CACHE = 200_000  # private conversations known to be recorded for both users
_RECEIPT_CACHE = 200_000  # (conv, user) read receipts kept in memory; older ones are re-read
# Moved cursors and receipts are written this long after the first move.  Their rows are
# spread over the table (one page per key, each page a WAL frame at commit): written with
# every append, they cost a page per acknowledgement; half a second lets a page take the
# moves of many keys (store CPU per message ~10 % lower at 20K users, bench/store_bench.py).
_FLUSH_DELAY = 0.5

log = logging.getLogger("imfast.store")

# Version 2 keeps the log in insertion (rowid) order with small indexes beside it:
# entries of many conversations then share pages, and a commit writes a few
# pages instead of one per conversation touched (about 30 % less CPU per entry).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    cmid TEXT NOT NULL,
    body TEXT NOT NULL,
    ts INTEGER NOT NULL,
    kind TEXT NOT NULL,
    dedup_key TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_conv_seq ON messages(conv, seq);
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON messages(dedup_key) WHERE dedup_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS private_convs (
    user TEXT NOT NULL, conv TEXT NOT NULL, PRIMARY KEY (user, conv)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    user TEXT NOT NULL, device TEXT NOT NULL, conv TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (user, device, conv)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups_ (
    grp TEXT PRIMARY KEY, name TEXT NOT NULL, owner TEXT NOT NULL, created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    grp TEXT NOT NULL, user TEXT NOT NULL, role TEXT NOT NULL, PRIMARY KEY (grp, user)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS group_members_user ON group_members(user);
CREATE TABLE IF NOT EXISTS read_receipts (
    conv TEXT NOT NULL, user TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (conv, user)
) WITHOUT ROWID;
"""

_MIGRATE_1_TO_2 = """
ALTER TABLE messages RENAME TO messages_v1;
DROP INDEX IF EXISTS messages_dedup;
""" + _SCHEMA + """
INSERT INTO messages (conv, seq, msg_id, sender, sender_device, cmid, body, ts, kind, dedup_key)
    SELECT conv, seq, msg_id, sender, sender_device, cmid, body, ts, kind, dedup_key
    FROM messages_v1 ORDER BY ts, conv, seq;
DROP TABLE messages_v1;
"""

_COLUMNS = "conv, seq, msg_id, sender, sender_device, cmid, body, ts, kind"


def _row(r: tuple[str, int, str, str, str, str, str, int, str]) -> StoredMessage:
    return StoredMessage(*r)


class SQLiteStore:
    """All of :class:`~imfast.backends.base.Store` in one SQLite database file."""

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Small pages: a commit writes every page it touched to the WAL, and the
        # log's indexes take random keys (one page each per entry).  1 KiB pages
        # write a quarter of the bytes of 4 KiB ones (about 15 % more entries/s).
        # Only a new file takes it; an existing one keeps its page size.
        self._db.execute("PRAGMA page_size=1024")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA journal_size_limit=67108864")  # the WAL shrinks back to 64 MiB
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=OFF")
        # The pages every commit touches - each active conversation's tail in the
        # (conv, seq) index, each sender's in the dedup index, the cursor rows - outgrow
        # SQLite's 2 MiB default under load, and every miss is a pread of the WAL or the
        # file (two per message at 14K msgs/s; a third of that with 16 MiB).  Only pages
        # read are cached: an idle store stays small.
        self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        new_file = self._migrate()
        # Before any write, so every key written from now on is seen by the filters.
        self._known = KnownKeys(path, fresh=new_file or path == ":memory:")
        self._checkpointer: BackgroundCheckpointer | None = None
        if path != ":memory:":
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # the thread does it
            self._checkpointer = BackgroundCheckpointer(path)
        self._counters: dict[str, int] = {}
        self._recent: OrderedDict[str, Reservation] = OrderedDict()
        # This object is the log's only writer, so what it stored is what the log holds.
        self._stored_latest: dict[str, int] = {}
        self._pairs: OrderedDict[str, None] = OrderedDict()  # private convs with both rows
        self._cursor_cache: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._cursor_dirty: dict[tuple[str, str, str], int] = {}
        self._receipt_cache: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._receipt_dirty: dict[tuple[str, str], int] = {}
        self._flush_handle: asyncio.TimerHandle | None = None

    def _migrate(self) -> bool:
        """Create the schema, or bring an older file's up to :data:`SCHEMA_VERSION`.

        Each step runs in one transaction: a crash mid-way leaves the old version.
        Returns True when the schema was just created (the file holds no rows).
        """
        db = self._db
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema version {version}; this imfast knows "
                               f"up to {SCHEMA_VERSION}: upgrade imfast")
        script = _MIGRATE_1_TO_2 if version == 1 else _SCHEMA
        if version and version == SCHEMA_VERSION:
            return False
        if version == 1:
            log.warning("migrating %s from schema 1 to %s", self.path, SCHEMA_VERSION)
        db.executescript(f"BEGIN;{script}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
        return version == 0

    def _latest(self, conv: str) -> int:
        latest = self._stored_latest.get(conv)
        if latest is None:
            known = self._known
            if (known.complete or known.ready()) and conv not in known.convs:
                latest = 0
            else:
                row = self._db.execute("SELECT MAX(seq) FROM messages WHERE conv=?",
                                       (conv,)).fetchone()
                latest = int(row[0] or 0)
            self._stored_latest[conv] = latest
        return latest

    # SequenceStore
    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        return self.reserve_now(conv, dedup_key, msg_id, floor)

    def reserve_now(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        """:meth:`reserve` as a plain call (:class:`~imfast.backends.base.SyncFastPath`)."""
        seen = self._recent.get(dedup_key)
        if seen is not None:
            return Reservation(seen.seq, seen.msg_id, True)
        known = self._known
        if not (known.complete or known.ready()) or dedup_key in known.dedup:
            row = self._db.execute(
                "SELECT seq, msg_id FROM messages WHERE dedup_key=?", (dedup_key,)
            ).fetchone()
            if row is not None:
                return Reservation(int(row[0]), str(row[1]), True)
        current = self._counters.get(conv)
        if current is None:
            current = self._latest(conv)
        seq = max(current, floor) + 1
        self._counters[conv] = seq
        reservation = Reservation(seq, msg_id, False)
        self._recent[dedup_key] = reservation
        if len(self._recent) > _DEDUP_CACHE:
            self._recent.popitem(last=False)
        return reservation

    async def release(self, conv: str, dedup_key: str) -> None:
        self._recent.pop(dedup_key, None)
        # Re-read the counter from the log: the seq was never stored nor shown
        # to anyone, so it can be handed out again and the log has no gap.
        self._counters.pop(conv, None)

    async def repair(self, conv: str, floor: int) -> None:
        self._counters[conv] = max(self._counters.get(conv, 0), floor, self._latest(conv))

    # MessageLog
    async def append(self, messages: list[StoredMessage]) -> None:
        rows = []
        pairs = self._pairs
        new_convs: list[str] = []  # private conversations not known to be recorded
        dedup_keys: list[str] = []
        for m in messages:
            conv = m.conv
            dedup_key = f"{m.sender}:{m.cmid}" if m.cmid else None
            if dedup_key is not None:
                dedup_keys.append(dedup_key)
            rows.append((conv, m.seq, m.msg_id, m.sender, m.sender_device, m.cmid, m.body,
                         m.ts, m.kind, dedup_key))
            if conv not in pairs:
                new_convs.append(conv)
        convs: set[tuple[str, str]] = set()
        for conv in new_convs:
            pair = conv_members_private(conv)
            if pair is not None:
                convs.update((user, conv) for user in pair)
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(f"INSERT INTO messages ({_COLUMNS}, dedup_key) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            if convs:
                db.executemany("INSERT OR IGNORE INTO private_convs VALUES (?,?)", sorted(convs))
        except sqlite3.IntegrityError as exc:
            db.execute("ROLLBACK")
            raise ValueError(f"sequence number already exists: {exc}") from None
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if self._checkpointer is not None:
            self._checkpointer.committed()
        for _, conv in convs:
            pairs[conv] = None
        while len(pairs) > _PAIR_CACHE:
            pairs.popitem(last=False)
        known = self._known
        known.dedup.add_all(dedup_keys)
        latest = self._stored_latest
        for m in messages:
            before = latest.get(m.conv, 0)
            if m.seq > before:
                latest[m.conv] = m.seq
                if not before:  # maybe its first entry in the file
                    known.convs.add(m.conv)

    async def fetch(self, conv: str, after: int, limit: int) -> list[StoredMessage]:
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE conv=? AND seq>? ORDER BY seq LIMIT ?",
            (conv, after, limit),
        )
        return [_row(r) for r in cur]

    async def fetch_before(self, conv: str, before: int, limit: int) -> list[StoredMessage]:
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE conv=? AND seq<? ORDER BY seq DESC LIMIT ?",
            (conv, before, limit),
        )
        return [_row(r) for r in reversed(cur.fetchall())]

    async def get(self, conv: str, seq: int) -> StoredMessage | None:
        r = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE conv=? AND seq=?", (conv, seq)
        ).fetchone()
        return _row(r) if r else None

    async def latest_seq(self, conv: str) -> int:
        return self._latest(conv)

    async def find_by_cmid(self, sender: str, cmid: str) -> StoredMessage | None:
        r = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE dedup_key=?", (f"{sender}:{cmid}",)
        ).fetchone()
        return _row(r) if r else None

    async def private_conversations(self, user: str) -> dict[str, int]:
        cur = self._db.execute(
            "SELECT pc.conv, (SELECT MAX(seq) FROM messages m WHERE m.conv=pc.conv) "
            "FROM private_convs pc WHERE pc.user=?",
            (user,),
        )
        return {conv: int(seq or 0) for conv, seq in cur}

    # CursorStore
    async def cursors(self, user: str, device: str) -> dict[str, int]:
        cur = self._db.execute(
            "SELECT conv, seq FROM cursors WHERE user=? AND device=?", (user, device)
        )
        found = {conv: int(seq) for conv, seq in cur}
        for (u, d, conv), seq in self._cursor_dirty.items():  # moved, not yet written
            if u == user and d == device and seq > found.get(conv, 0):
                found[conv] = seq
        return found

    async def advance(self, user: str, device: str, conv: str, seq: int) -> int:
        return self.advance_now(user, device, conv, seq)

    def advance_now(self, user: str, device: str, conv: str, seq: int) -> int:
        """:meth:`advance` as a plain call (:class:`~imfast.backends.base.SyncFastPath`)."""
        return self._move_forward(
            (user, device, conv), seq, self._cursor_dirty, self._cursor_cache, _CURSOR_CACHE,
            self._known.cursors, "SELECT seq FROM cursors WHERE user=? AND device=? AND conv=?")[0]

    def _move_forward(self, key: tuple[str, ...], seq: int, dirty: dict[Any, int],
                      cache: OrderedDict[Any, int], cache_max: int, known: KeyFilters,
                      select: str) -> tuple[int, bool]:
        """Move ``key``'s value (a cursor, a receipt) up to ``seq``, never back.

        Known from ``dirty`` (moved, not yet written), else ``cache``, else
        absent by the ``known`` filter, else one ``select``; a move is queued
        in ``dirty`` for the next flush.  Returns (the value now, whether it moved).
        """
        current = dirty.get(key)
        if current is None:
            current = cache.get(key)
        if current is None:
            store_known = self._known
            if (store_known.complete or store_known.ready()) and key not in known:
                current = 0
            else:
                row = self._db.execute(select, key).fetchone()
                current = int(row[0]) if row else 0
        moved = seq > current
        if moved:
            if not current:  # its row is written for the first time: the filter learns it
                known.add(key)
            current = seq
            dirty[key] = seq
            if self._flush_handle is None:
                self._schedule_flush()
        cache[key] = current
        cache.move_to_end(key)
        if len(cache) > cache_max:
            cache.popitem(last=False)
        return current, moved

    def _schedule_flush(self) -> None:
        self._flush_handle = asyncio.get_running_loop().call_later(_FLUSH_DELAY,
                                                                   self._flush_moved)

    def _take_moved(self) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], int]]:
        """The cursors and receipts moved since the last write (the caller writes them)."""
        cursors, receipts = self._cursor_dirty, self._receipt_dirty
        self._cursor_dirty, self._receipt_dirty = {}, {}
        return cursors, receipts

    def _write_moved(self, cursors: dict[tuple[str, str, str], int],
                     receipts: dict[tuple[str, str], int]) -> None:
        """Write moved cursors and receipts inside the caller's transaction (never backwards)."""
        if cursors:
            self._db.executemany(
                "INSERT INTO cursors VALUES (?,?,?,?) ON CONFLICT(user, device, conv) "
                "DO UPDATE SET seq=excluded.seq WHERE excluded.seq > cursors.seq",
                [(*key, seq) for key, seq in cursors.items()],
            )
        if receipts:
            self._db.executemany(
                "INSERT INTO read_receipts VALUES (?,?,?) ON CONFLICT(conv, user) "
                "DO UPDATE SET seq=excluded.seq WHERE excluded.seq > read_receipts.seq",
                [(*key, seq) for key, seq in receipts.items()],
            )

    def _requeue_moved(self, cursors: dict[tuple[str, str, str], int],
                       receipts: dict[tuple[str, str], int]) -> None:
        """Unwritten cursors and receipts go back in the queue (newer moves win)."""
        for key, seq in cursors.items():
            if seq > self._cursor_dirty.get(key, 0):
                self._cursor_dirty[key] = seq
        for rkey, seq in receipts.items():
            if seq > self._receipt_dirty.get(rkey, 0):
                self._receipt_dirty[rkey] = seq

    def _flush_moved(self) -> None:
        """Write the cursors and receipts moved since the last flush, in one transaction."""
        self._flush_handle = None
        cursors, receipts = self._take_moved()
        if not cursors and not receipts:
            return
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                self._write_moved(cursors, receipts)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            if self._checkpointer is not None:
                self._checkpointer.committed()
        except Exception:  # kept queued; the next append or move retries
            log.exception("writing delivery cursors / read receipts failed; will retry")
            self._requeue_moved(cursors, receipts)

    # GroupStore
    async def create(self, group: str, owner: str, name: str) -> bool:
        try:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO groups_ VALUES (?,?,?,?)",
                             (group, name, owner, int(time.time())))
            self._db.execute("INSERT OR REPLACE INTO group_members VALUES (?,?,?)",
                             (group, owner, "owner"))
            self._db.execute("COMMIT")
        except sqlite3.IntegrityError:
            self._db.execute("ROLLBACK")
            return False
        return True

    async def info(self, group: str) -> tuple[str, str] | None:
        r = self._db.execute("SELECT name, owner FROM groups_ WHERE grp=?", (group,)).fetchone()
        return (str(r[0]), str(r[1])) if r else None

    async def members(self, group: str) -> dict[str, str]:
        cur = self._db.execute("SELECT user, role FROM group_members WHERE grp=?", (group,))
        return {u: r for u, r in cur}

    async def set_member(self, group: str, user: str, role: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO group_members VALUES (?,?,?)", (group, user, role))

    async def remove_member(self, group: str, user: str) -> bool:
        cur = self._db.execute("DELETE FROM group_members WHERE grp=? AND user=?", (group, user))
        return cur.rowcount > 0

    async def groups_of(self, user: str) -> list[str]:
        cur = self._db.execute("SELECT grp FROM group_members WHERE user=? ORDER BY grp", (user,))
        return [g for (g,) in cur]

    # ReceiptStore
    async def mark_read(self, conv: str, user: str, seq: int) -> bool:
        """Moves ``user``'s receipt in ``conv`` forward only; written with the cursors."""
        return self._move_forward(
            (conv, user), seq, self._receipt_dirty, self._receipt_cache, _RECEIPT_CACHE,
            self._known.receipts, "SELECT seq FROM read_receipts WHERE conv=? AND user=?")[1]

    async def read_up_to(self, conv: str) -> dict[str, int]:
        cur = self._db.execute("SELECT user, seq FROM read_receipts WHERE conv=?", (conv,))
        found = {u: int(s) for u, s in cur}
        for (c, user), seq in self._receipt_dirty.items():  # moved, not yet written
            if c == conv and seq > found.get(user, 0):
                found[user] = seq
        return found

    async def close(self) -> None:
        self._known.close()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_moved()
        if self._checkpointer is not None:
            self._checkpointer.close(self._db)
        self._db.close()
