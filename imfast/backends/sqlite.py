"""SQLite backend: the embedded node's durable store, in one file.

Guarantees beyond the contract:

* ``append`` is on disk before it returns: one write of the batch to the
  entry log (:mod:`imfast.backends.sqlite_log`; ``SQLITE_SYNCHRONOUS`` NORMAL
  survives a process crash, FULL also a power cut, as SQLite's WAL), so an
  acknowledged message survives ``kill -9``; the next open moves what a
  crash left in the log into the table before anything reads it;
* entries are readable as soon as ``append`` returns: from the hot index
  until the mover thread has them in the ``messages`` table, then from it;
* sequence counters are rebuilt from the log at start-up, and dedup keys are
  checked against the log itself, so neither can go backwards after a crash.

Reads are synchronous on the event loop: one indexed SQLite statement takes
microseconds, less than handing it to a thread would.  Appends and cursor
writes never touch SQLite on the loop: the mover thread inserts each
second's entries in large transactions (many entries share an index page).
Group changes, the loop's only writes, never wait on the loop for the
mover's lock (a busy write is retried as an awaited sleep).  WAL checkpoints
(the part that waits for ``fsync``) run on a thread of their own
(:mod:`imfast.backends.sqlite_checkpoint`).

Questions whose answer is nearly always "no" - was this dedup key stored,
has this conversation entries, has this device a cursor row here - are
answered from in-memory filters once they know every key of the file
(:mod:`imfast.backends.sqlite_keys`; a scan thread reads the keys already
stored at start-up), so a new message costs no read.

Delivery cursors and read receipts are batched too: ``advance`` and
``mark_read`` answer from memory, and what moved is handed to the mover
thread ``_FLUSH_DELAY`` later and written in one transaction of its own (one
row per key per flush, however often it moved).  A process crash in that window can only
move a cursor or receipt back: a redelivery the client drops by seq, or a
receipt the client sends again - never a lost message.

An ack nobody is told the cursor of (a cast from a gateway process)
may move a cursor that is not in memory without reading it
(``advance_blind_now``): the move is queued as a floor, the upsert never
moves a row back, and the next read of that cursor takes the larger of its
row and its floors.  At 80K users most cursors have left the cache by their
next ack, so this spares the loop a ``SELECT`` per ack.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from imfast.backends.base import (
    EVERYONE,
    Reservation,
    StoredMessage,
    own_run_end,
    until_fewer_than,
)
from imfast.backends.keyfilter import KeyFilters
from imfast.backends.sqlite_checkpoint import BackgroundCheckpointer
from imfast.backends.sqlite_keys import KnownKeys
from imfast.backends.sqlite_log import (
    EntryLog,
    LogMover,
    Row,
    Segment,
    Write,
    in_transaction,
    pairs_of,
    recover,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 4
_DEDUP_CACHE = 100_000  # recent reservations kept in memory; older ones are read from the log
_CURSOR_CACHE = 200_000  # (user, device, conv) cursors kept in memory; older ones are re-read
_SELECT_CURSOR = "SELECT seq FROM cursors WHERE user=? AND device=? AND conv=?"
_CACHE_KIB = 16 * 1024  # SQLite page cache of the writer connection
_PAIR_CACHE = 200_000  # private conversations known to be recorded for both users
_RECEIPT_CACHE = 200_000  # (conv, user) read receipts kept in memory; older ones are re-read
# Conversations whose latest seq is kept in memory; the longest-known of the rest
# are forgotten and re-read (one indexed read) when next used.
_LATEST_CACHE = 1_000_000
# Moved cursors and receipts are written this long after the first move.  Their rows are
# spread over the table (one page per key, each page a WAL frame at commit): written with
# every append, they cost a page per acknowledgement; half a second lets a page take the
# moves of many keys (store CPU per message ~10 % lower at 20K users, bench/store_bench.py).
_FLUSH_DELAY = 0.5
_WRITE_RETRY = 0.05  # the longest wait between tries of a loop write while the mover writes
# The entry log (sqlite_log): a segment takes appends this long (or this many entries)
# before the mover thread inserts it; the longer, the more entries share an index page.
_MOVE_EVERY = 1.0
_MOVE_MAX_ROWS = 50_000
_MAX_BEHIND = 8  # segments waiting for the mover before append waits for it (memory bound)
_BUSY_MS = 5000  # how long other writes wait for the mover's transaction (one chunk)
_PURGE_PAUSE = 0.2  # at least this between two retention batches (see _purge_on_thread)
# The dedup filter is rebuilt from the table once retention deleted half as many entries
# as it holds keys (and at least this many): its memory then follows the table's size.
_DEDUP_REBUILD_MIN = 1 << 16


def _seq_of(m: StoredMessage) -> int:
    return m.seq

log = logging.getLogger("imfast.store")
_T = TypeVar("_T")

# Version 2 keeps the log in insertion (rowid) order with small indexes beside it:
# entries of many conversations then share pages, and a commit writes a few
# pages instead of one per conversation touched (about 30 % less CPU per entry).
# Version 3 adds seq_floors: the highest seq that retention deleted per conversation.
# Version 4 adds group_bars: who may not join a group by itself (GroupStore.bar).
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
CREATE TABLE IF NOT EXISTS seq_floors (
    conv TEXT PRIMARY KEY, seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_bars (
    grp TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (grp, user)
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
# A conversation's highest seq: its last entry, or what retention deleted (seq_floors).
_LATEST_OF = ("max(coalesce((SELECT MAX(seq) FROM messages m WHERE m.conv={0}), 0), "
              "coalesce((SELECT seq FROM seq_floors f WHERE f.conv={0}), 0))")
_SELECT_LATEST = "SELECT " + _LATEST_OF.format("?")


def _row(r: tuple[str, int, str, str, str, str, str, int, str]) -> StoredMessage:
    return StoredMessage(*r)


def _purge_batch(db: sqlite3.Connection, *, cutoff_ms: int, batch: int) -> int:
    """One retention batch, in the caller's transaction: the first ``batch`` rows in
    stored order up to the first not older than ``cutoff_ms``, their floors raised
    first.  Returns how many it deleted (fewer than ``batch``: nothing more to do)."""
    rows = db.execute("SELECT id, conv, seq, ts FROM messages ORDER BY id LIMIT ?",
                      (batch,)).fetchall()
    old = []
    for row in rows:
        if row[3] >= cutoff_ms:
            break
        old.append(row)
    if not old:
        return 0
    highest: dict[str, int] = {}
    for _, conv, seq, _ts in old:
        highest[conv] = max(highest.get(conv, 0), int(seq))
    db.executemany("INSERT INTO seq_floors (conv, seq) VALUES (?, ?) "
                   "ON CONFLICT(conv) DO UPDATE SET seq=max(seq, excluded.seq)",
                   sorted(highest.items()))
    db.execute("DELETE FROM messages WHERE id<=?", (old[-1][0],))  # exactly ``old``
    return len(old)


class SQLiteStore:
    """All of :class:`~imfast.backends.base.Store` in one SQLite database file."""

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # The mover thread writes each second's entries in transactions of thousands of
        # rows: the table's new pages are sequential, and 4 KiB pages take a quarter of
        # the write calls of 1 KiB ones (per message at 10K users: 164 against 182-192
        # us of CPU; docs/performance.md).  Only a new file takes it; an existing one
        # keeps its page size.
        self._db.execute("PRAGMA page_size=4096")
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
        self._db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        new_file = self._migrate()
        # Entries a crash left in the entry log go into the table before anything reads it.
        log_dir = None if path == ":memory:" else Path(path + "-log")
        recovered = recover(self._db, log_dir) if log_dir else 0
        # Before any write, so every key written from now on is seen by the filters.
        self._known = KnownKeys(path, fresh=(new_file and not recovered) or path == ":memory:")
        self._checkpointer: BackgroundCheckpointer | None = None
        if path != ":memory:":
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # the thread does it
            self._checkpointer = BackgroundCheckpointer(path)
        # conv -> the last seq reserved.  Bounded with _stored_latest (_forget_latest).
        self._counters: dict[str, int] = {}
        self._recent: OrderedDict[str, Reservation] = OrderedDict()
        # This object is the log's only writer, so what it stored is what the log holds.
        # Bounded (_LATEST_CACHE): see _forget_latest.
        self._stored_latest: dict[str, int] = {}
        self._pairs: OrderedDict[str, None] = OrderedDict()  # private convs with both rows
        self._cursor_cache: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._cursor_dirty: dict[tuple[str, str, str], int] = {}
        # Cursors moved by advance_blind_now without reading them: their moves (in
        # _cursor_dirty, in the write held by the mover) are floors, not values, until
        # a read resolves them (_resolve_blind) or their write commits (_drop_moved).
        self._cursor_blind: set[tuple[str, str, str]] = set()
        self._receipt_cache: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._receipt_dirty: dict[tuple[str, str], int] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        # Appended entries not yet in the table (see sqlite_log): per conversation in seq
        # order, by dedup key, and the private conversations not yet in private_convs.
        self._hot: dict[str, list[StoredMessage]] = {}
        self._hot_dedup: dict[str, StoredMessage] = {}
        self._hot_pairs: dict[str, set[str]] = {}  # user -> conversations
        self._entry_log = EntryLog(log_dir, fsync=synchronous.upper() == "FULL")
        self._moving: deque[Segment] = deque()  # handed to the mover, oldest first
        self._moved: deque[Segment | Write] = deque()  # done (appended by the mover's thread)
        self._writing: list[Write] = []  # moved cursors and receipts the mover writes (<= 1)
        self._roll_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._caught_up: asyncio.Event | None = None
        self._closed = False
        self._synchronous = synchronous
        self._purging: asyncio.Future[int] | None = None  # a retention round (and rebuild)
        self._purged_since_rebuild = 0  # entries retention deleted since the dedup rebuild
        checkpointer = self._checkpointer
        self._mover = LogMover(None if path == ":memory:" else path,
                               self._on_moved,
                               committed=checkpointer.committed if checkpointer else None,
                               inline_db=self._db,
                               pragmas=(f"synchronous={synchronous}", f"cache_size=-{_CACHE_KIB}",
                                        "wal_autocheckpoint=0"))

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
                row = self._db.execute(_SELECT_LATEST, (conv, conv)).fetchone()
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
            hot = self._hot_dedup.get(dedup_key)
            if hot is not None:
                return Reservation(hot.seq, hot.msg_id, True)
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
        """Store ``messages`` whole (one entry-log write) or raise, storing none.

        ValueError if one's (conv, seq) is already stored.  Waits only when the
        mover is ``_MAX_BEHIND`` segments behind.
        """
        if len(self._moving) >= _MAX_BEHIND:
            await self._wait_for_mover()
        self._append(messages)

    def append_now(self, messages: list[StoredMessage]) -> bool:
        """:meth:`append` in this call; False, storing nothing, when it would wait."""
        if len(self._moving) >= _MAX_BEHIND:
            return False
        self._append(messages)
        return True

    def _append(self, messages: list[StoredMessage]) -> None:
        rows: list[Row] = []
        pairs = self._pairs
        new_convs: set[str] = set()  # private conversations not known to be recorded
        dedup_keys: list[str] = []
        tops: dict[str, int] = {}  # per conversation, the highest seq stored or in this batch
        for m in messages:
            conv = m.conv
            seq = m.seq
            top = tops.get(conv)
            if top is None:
                top = self._latest(conv)
            # Only a seq at or below the top can exist: then look (rare; the batch too).
            if seq <= top and (self._exists(conv, seq)
                               or any(r[0] == conv and r[1] == seq for r in rows)):
                raise ValueError(f"sequence number already exists: {conv} {seq}")
            tops[conv] = max(top, seq)
            dedup_key = f"{m.sender}:{m.cmid}" if m.cmid else None
            if dedup_key is not None:
                dedup_keys.append(dedup_key)
            rows.append((conv, seq, m.msg_id, m.sender, m.sender_device, m.cmid, m.body,
                         m.ts, m.kind, dedup_key))
            if conv not in pairs:
                new_convs.add(conv)
        # Each private conversation's (user, conv) rows, worked out once: the mover
        # writes them, the hot index lists them, and the loop drops them after the move.
        new_pairs = pairs_of(new_convs)
        self._entry_log.write(rows, new_pairs)  # raises with nothing written
        hot = self._hot
        hot_dedup = self._hot_dedup
        for m, dedup_key in zip(messages, (row[9] for row in rows), strict=True):
            entries = hot.get(m.conv)
            if entries is None:
                hot[m.conv] = [m]
            elif entries[-1].seq < m.seq:
                entries.append(m)
            else:
                entries.insert(bisect_left(entries, m.seq, key=_seq_of), m)
            if dedup_key is not None:
                hot_dedup[dedup_key] = m
        hot_pairs = self._hot_pairs
        for user, conv in new_pairs:
            convs = hot_pairs.get(user)
            if convs is None:
                hot_pairs[user] = {conv}
            else:
                convs.add(conv)
        known = self._known
        known.add_dedup(dedup_keys)
        latest = self._stored_latest
        for conv, top in tops.items():
            if not latest.get(conv):  # maybe its first entry in the file
                known.convs.add(conv)
            latest[conv] = top
        current = self._entry_log.current
        if current is not None and len(current.rows) >= _MOVE_MAX_ROWS:
            self._roll()
        elif self._roll_handle is None:
            self._roll_handle = self._owner_loop().call_later(_MOVE_EVERY, self._roll)

    def _owner_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this store runs on (the mover's answers are handed to it)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _exists(self, conv: str, seq: int) -> bool:
        if self._hot_get(conv, seq) is not None:
            return True
        return self._db.execute("SELECT 1 FROM messages WHERE conv=? AND seq=?",
                                (conv, seq)).fetchone() is not None

    def _hot_get(self, conv: str, seq: int) -> StoredMessage | None:
        entries = self._hot.get(conv)
        if entries:
            i = bisect_left(entries, seq, key=_seq_of)
            if i < len(entries) and entries[i].seq == seq:
                return entries[i]
        return None

    # The entry log's segments: rolled on the loop, moved on the mover's thread.
    @property
    def segments_waiting(self) -> int:
        """Entry-log segments written but not yet moved into the table (appends wait at
        ``_MAX_BEHIND``): one or two at a time is normal, a count that keeps rising
        means the mover thread (its disk, or its core) is slower than the appends."""
        return len(self._moving)

    def gauges(self) -> list[tuple[str, str, str, int]]:
        """Live gauges for /stats and /metrics: (stats key, metric name, help, value)."""
        help_text = ("Entry-log segments not yet moved into SQLite by the mover thread "
                     f"(appends wait at {_MAX_BEHIND})")
        return [("store_segments_waiting", "im_store_log_segments_waiting", help_text,
                 self.segments_waiting)]

    def _roll(self) -> None:
        """Hand the current segment to the mover (on a timer, when full, and at close)."""
        if self._roll_handle is not None:
            self._roll_handle.cancel()
            self._roll_handle = None
        seg = self._entry_log.roll()
        if seg is not None and seg.rows:
            self._owner_loop()
            self._moving.append(seg)
            self._mover.submit(seg)

    def _on_moved(self, item: Segment | Write) -> None:
        """The mover committed ``item`` (on the mover's thread, or inline): tell the loop."""
        self._moved.append(item)
        if self._mover.inline:
            self._drop_moved()
            return
        loop = self._loop
        assert loop is not None  # set before anything is submitted
        try:
            loop.call_soon_threadsafe(self._drop_moved)
        except RuntimeError:  # the loop is closed: close() drops them itself
            pass

    def _drop_moved(self) -> None:
        """Drop the entries of moved segments from the hot index (the table has them now)."""
        hot, hot_dedup, hot_pairs, pairs = self._hot, self._hot_dedup, self._hot_pairs, self._pairs
        while self._moved:
            seg = self._moved.popleft()
            if isinstance(seg, Write):  # cursors and receipts: now read from the table
                if seg in self._writing:
                    self._writing.remove(seg)
                if self._cursor_blind:  # committed floors: the table holds the value now
                    self._settle_blind(seg.payload[0])
                if (self._cursor_dirty or self._receipt_dirty) and self._flush_handle is None \
                        and not self._closed:
                    self._schedule_flush()  # what moved meanwhile
                continue
            if self._moving and self._moving[0] is seg:
                self._moving.popleft()
            else:  # segments are moved in order; this would be a bug, not a loss
                log.error("entry log segment %s moved out of order", seg.number)
                try:
                    self._moving.remove(seg)
                except ValueError:
                    pass
            seqs: dict[str, list[int]] = {}
            for row in seg.rows:
                conv = row[0]
                found = seqs.get(conv)
                if found is None:
                    seqs[conv] = [row[1]]
                else:
                    found.append(row[1])
                dedup_key = row[9]
                if dedup_key is not None:
                    m = hot_dedup.get(dedup_key)
                    if m is not None and m.conv == conv and m.seq == row[1]:
                        del hot_dedup[dedup_key]
            for conv, moved in seqs.items():
                entries = hot.get(conv)
                if entries is None:
                    continue
                n = len(moved)
                if n <= len(entries) and entries[n - 1].seq == moved[-1] \
                        and [e.seq for e in entries[:n]] == moved:
                    del entries[:n]  # the usual case: the oldest entries, in order
                else:
                    gone = set(moved)
                    entries[:] = [e for e in entries if e.seq not in gone]
                if not entries:
                    del hot[conv]
            for user, conv in seg.new_pairs:
                pairs[conv] = None
                convs = hot_pairs.get(user)
                if convs is not None:
                    convs.discard(conv)
                    if not convs:
                        del hot_pairs[user]
            while len(pairs) > _PAIR_CACHE:
                pairs.popitem(last=False)
        if len(self._stored_latest) > _LATEST_CACHE:
            self._forget_latest()
        if self._caught_up is not None and len(self._moving) < _MAX_BEHIND:
            self._caught_up.set()

    def _forget_latest(self) -> None:
        """Bring the per-conversation seq memory (``_stored_latest`` and ``_counters``)
        back to 7/8 of :data:`_LATEST_CACHE`, longest-known conversations first.

        Done here, when a moved segment is dropped, not per message: the hot path
        keeps both maps as they were.  Only a conversation the table answers for
        is forgotten: none of its entries still hot (the table lacks those until
        their segment moves) and no reservation or floor ahead of what is stored
        (its counter above its latest).  The next use reads it back (``_latest``);
        the longest-known go first, so a busy one costs one read per round.
        """
        latest, hot, counters = self._stored_latest, self._hot, self._counters
        excess = len(latest) - _LATEST_CACHE * 7 // 8
        forget = []
        for conv, top in latest.items():
            if conv not in hot and counters.get(conv, top) <= top:
                forget.append(conv)
                if len(forget) >= excess:
                    break
        for conv in forget:
            del latest[conv]
            counters.pop(conv, None)

    async def _wait_for_mover(self) -> None:
        log.warning("entry log: %d segments wait for the mover thread (the disk is slower "
                    "than the appends); appends wait for it", len(self._moving))
        while len(self._moving) >= _MAX_BEHIND:
            if self._caught_up is None:
                self._caught_up = asyncio.Event()
            self._caught_up.clear()
            await self._caught_up.wait()

    async def settle(self) -> None:
        """Move every entry appended so far into the table, and wait for it (tests, tools)."""
        self._roll()
        while self._moving:
            await asyncio.sleep(0.005)
            self._drop_moved()

    async def fetch(self, conv: str, after: int, limit: int) -> list[StoredMessage]:
        entries = self._hot.get(conv)
        if not entries:
            return self._cold_after(conv, after, None, limit)
        found: list[StoredMessage] = []
        if after + 1 < entries[0].seq:  # older entries are in the table
            found = self._cold_after(conv, after, entries[0].seq, limit)
        if len(found) < limit:
            i = bisect_right(entries, after, key=_seq_of)
            found.extend(entries[i:i + limit - len(found)])
        return found

    def _cold_after(self, conv: str, after: int, below: int | None,
                    limit: int) -> list[StoredMessage]:
        if below is None:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE conv=? AND seq>? ORDER BY seq LIMIT ?",
                (conv, after, limit))
        else:  # what is also hot is read from the hot index
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE conv=? AND seq>? AND seq<? "
                "ORDER BY seq LIMIT ?", (conv, after, below, limit))
        return [_row(r) for r in cur]

    async def fetch_before(self, conv: str, before: int, limit: int) -> list[StoredMessage]:
        entries = self._hot.get(conv)
        found: list[StoredMessage] = []
        bound = before
        if entries:
            j = bisect_left(entries, before, key=_seq_of)
            found = entries[max(0, j - limit):j]
            bound = min(before, entries[0].seq)
        if len(found) < limit:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE conv=? AND seq<? ORDER BY seq DESC LIMIT ?",
                (conv, bound, limit - len(found)),
            )
            found = [_row(r) for r in reversed(cur.fetchall())] + found
        return found

    async def get(self, conv: str, seq: int) -> StoredMessage | None:
        hot = self._hot_get(conv, seq)
        if hot is not None:
            return hot
        r = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE conv=? AND seq=?", (conv, seq)
        ).fetchone()
        return _row(r) if r else None

    async def latest_seq(self, conv: str) -> int:
        return self._latest(conv)

    async def purge_messages(self, older_than_seconds: float, batch: int = 10000) -> int:
        """Delete entries older than ``older_than_seconds`` (by ``ts``), ``batch`` rows
        per transaction, in the order they were stored; returns how many.

        Each transaction first raises ``seq_floors`` to the highest seq it deletes
        of each conversation, so :meth:`latest_seq` and the counters never go back:
        a seq is never handed out twice.  Cursors, receipts and the floors stay; a
        device whose cursor is below what is left resumes from the oldest entry
        kept.  A resend of a deleted entry's cmid may be stored as a new message
        (duplicates are caught within the retention period).  The rounds run on
        a thread with a connection of their own, so the event loop never waits for
        them.  Entries are taken in stored order and a round stops at the first
        one not old enough: one stored after a newer one (the clock stepped back)
        waits for it.
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if older_than_seconds <= 0:
            raise ValueError(f"older_than_seconds must be positive, got {older_than_seconds}")
        cutoff_ms = int((time.time() - older_than_seconds) * 1000)
        if self.path == ":memory:":  # one connection only: the loop's
            total = await until_fewer_than(batch, lambda: self._write(
                partial(_purge_batch, cutoff_ms=cutoff_ms, batch=batch)))
        else:
            self._purging = asyncio.ensure_future(self._purge_and_rebuild(cutoff_ms, batch))
            try:
                total = await asyncio.shield(self._purging)
            finally:
                if self._purging.done():
                    self._purging = None
        if total:
            log.info("messages purged rows=%s older_than_seconds=%s", total,
                     older_than_seconds)
        return total

    async def _purge_and_rebuild(self, cutoff_ms: int, batch: int) -> int:
        """The batches on a thread, then the dedup filter rebuilt if they deleted enough
        (:data:`_DEDUP_REBUILD_MIN`); returns how many entries were deleted."""
        total = await asyncio.to_thread(self._purge_on_thread, cutoff_ms, batch)
        self._purged_since_rebuild += total
        known = self._known
        if self._purged_since_rebuild >= max(_DEDUP_REBUILD_MIN, known.dedup.count // 2) \
                and not self._closed:
            before = known.dedup.nbytes
            kept = await known.rebuild_dedup(self.path, list(self._hot_dedup))
            if kept is not None:
                self._purged_since_rebuild = 0
                log.info("dedup filter rebuilt after retention keys=%s bytes_before=%s "
                         "bytes_after=%s", kept, before, known.dedup.nbytes)
        return total

    def _purge_on_thread(self, cutoff_ms: int, batch: int) -> int:
        """The batches, each followed by a pause twice as long as it took (at least
        _PURGE_PAUSE): SQLite's busy handler polls, so without the pause the mover
        would seldom catch the lock between two batches and appends would wait."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            for pragma in (f"busy_timeout={_BUSY_MS}", f"synchronous={self._synchronous}",
                           "wal_autocheckpoint=0"):  # the checkpoint thread does it
                db.execute(f"PRAGMA {pragma}")
            total = 0
            while not self._closed:
                started = time.monotonic()
                deleted = in_transaction(
                    db, partial(_purge_batch, cutoff_ms=cutoff_ms, batch=batch),
                    "BEGIN IMMEDIATE", self._committed)
                total += deleted
                if deleted < batch:
                    break
                time.sleep(max(_PURGE_PAUSE, 2 * (time.monotonic() - started)))
            return total
        finally:
            db.close()

    async def find_by_cmid(self, sender: str, cmid: str) -> StoredMessage | None:
        key = f"{sender}:{cmid}"
        hot = self._hot_dedup.get(key)
        if hot is not None:
            return hot
        r = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE dedup_key=?", (key,)
        ).fetchone()
        return _row(r) if r else None

    async def private_conversations(self, user: str) -> dict[str, int]:
        cur = self._db.execute(
            f"SELECT pc.conv, {_LATEST_OF.format('pc.conv')} "
            "FROM private_convs pc WHERE pc.user=?",
            (user,),
        )
        found = {conv: int(seq or 0) for conv, seq in cur}
        hot = self._hot
        for conv in self._hot_pairs.get(user, ()):
            found.setdefault(conv, 0)
        for conv, seq in found.items():
            entries = hot.get(conv)
            if entries and entries[-1].seq > seq:
                found[conv] = entries[-1].seq
        return found

    # CursorStore
    async def cursors(self, user: str, device: str) -> dict[str, int]:
        cur = self._db.execute(
            "SELECT conv, seq FROM cursors WHERE user=? AND device=?", (user, device)
        )
        found = {conv: int(seq) for conv, seq in cur}
        for moved in (*(w.payload[0] for w in self._writing), self._cursor_dirty):
            for (u, d, conv), seq in moved.items():  # moved, not yet written
                if u == user and d == device and seq > found.get(conv, 0):
                    found[conv] = seq
        return found

    async def advance(self, user: str, device: str, conv: str, seq: int) -> int:
        return self.advance_now(user, device, conv, seq)

    def advance_now(self, user: str, device: str, conv: str, seq: int) -> int:
        """:meth:`advance` as a plain call (:class:`~imfast.backends.base.SyncFastPath`)."""
        return self._move_forward(
            (user, device, conv), seq, self._cursor_dirty, self._cursor_cache, _CURSOR_CACHE,
            self._known.cursors, _SELECT_CURSOR, 0)[0]

    def advance_blind_now(self, user: str, device: str, conv: str, seq: int) -> int:
        """:class:`~imfast.backends.base.SyncFastPath`: :meth:`advance_now` without a read.

        A cursor in memory (or known absent) moves exactly as :meth:`advance_now`
        moves it.  One that would need a ``SELECT`` - at 80K users most cursors
        have left the cache by their next ack - is moved blind: ``seq`` is queued
        as a floor, the flush's upsert never moves a row back, and the next read
        of that cursor takes the larger of the row and the floors.
        """
        key = (user, device, conv)
        blind = self._cursor_blind
        dirty = self._cursor_dirty
        if key not in blind:
            known, cache = self._known.cursors, self._cursor_cache
            current = self._in_memory(key, dirty, cache, known, 0)
            if current is not None:
                return self._raise_to(key, current, seq, dirty, cache, _CURSOR_CACHE, known)[0]
            if key not in known:  # the start-up scan still runs: it may be a new row
                known.add(key)
            blind.add(key)
        floor = dirty.get(key, 0)
        if seq > floor:
            dirty[key] = floor = seq
            if self._flush_handle is None:
                self._schedule_flush()
        return floor

    def _resolve_blind(self, key: tuple[str, str, str]) -> int:
        """A blind cursor's value: the larger of its row and its floors (then exact again)."""
        row = self._db.execute(_SELECT_CURSOR, key).fetchone()
        value = int(row[0]) if row else 0
        for write in self._writing:
            value = max(value, write.payload[0].get(key, 0))
        dirty = self._cursor_dirty
        value = max(value, dirty.get(key, 0))
        self._cursor_blind.discard(key)
        # In dirty, the value shadows the smaller floor the mover may still hold.
        dirty[key] = value
        if self._flush_handle is None:
            self._schedule_flush()
        return value

    def _settle_blind(self, written: dict[tuple[str, str, str], int]) -> None:
        """After a cursor write commits: its blind keys with no newer floor are exact in the table."""
        blind, dirty = self._cursor_blind, self._cursor_dirty
        for key in written:
            if key in blind and key not in dirty:
                blind.discard(key)

    def advance_own_now(self, user: str, device: str, conv: str, seqs: list[int]) -> int:
        """:class:`~imfast.backends.base.SyncFastPath`: through the device's own entries."""
        key = (user, device, conv)
        dirty, cache, known = self._cursor_dirty, self._cursor_cache, self._known.cursors
        current = self._current(key, dirty, cache, known, _SELECT_CURSOR, 0)
        return self._raise_to(key, current, own_run_end(current, seqs), dirty, cache,
                              _CURSOR_CACHE, known)[0]

    def _current(self, key: tuple[str, ...], dirty: dict[Any, int],
                 cache: OrderedDict[Any, int], known: KeyFilters, select: str,
                 kind: int) -> int:
        """``key``'s value: from memory (:meth:`_in_memory`), else one ``select``.
        A cursor moved blind is read first (:meth:`_resolve_blind`)."""
        if kind == 0 and key in self._cursor_blind:
            return self._resolve_blind(key)
        current = self._in_memory(key, dirty, cache, known, kind)
        if current is None:
            row = self._db.execute(select, key).fetchone()
            current = int(row[0]) if row else 0
        return current

    def _in_memory(self, key: tuple[str, ...], dirty: dict[Any, int],
                   cache: OrderedDict[Any, int], known: KeyFilters, kind: int) -> int | None:
        """``key``'s value as memory knows it: from ``dirty`` (moved, not yet written),
        else the writes the mover has (``payload[kind]``), else ``cache``, else 0 if
        the ``known`` filter says it was never stored.  None: only the table knows."""
        current = dirty.get(key)
        if current is None:
            for write in reversed(self._writing):
                current = write.payload[kind].get(key)
                if current is not None:
                    break
        if current is None:
            current = cache.get(key)
        if current is None:
            store_known = self._known
            if (store_known.complete or store_known.ready()) and key not in known:
                current = 0
        return current

    def _move_forward(self, key: tuple[str, ...], seq: int, dirty: dict[Any, int],
                      cache: OrderedDict[Any, int], cache_max: int, known: KeyFilters,
                      select: str, kind: int) -> tuple[int, bool]:
        """Move ``key``'s value (a cursor, a receipt) up to ``seq``, never back.

        Its value now comes from :meth:`_current`; a move is queued in ``dirty``
        for the next flush.  Returns (the value now, whether it moved).
        """
        return self._raise_to(key, self._current(key, dirty, cache, known, select, kind), seq,
                              dirty, cache, cache_max, known)

    def _raise_to(self, key: tuple[str, ...], current: int, seq: int, dirty: dict[Any, int],
                  cache: OrderedDict[Any, int], cache_max: int,
                  known: KeyFilters) -> tuple[int, bool]:
        """:meth:`_move_forward` once ``key``'s value ``current`` is known."""
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

    @staticmethod
    def _write_moved(db: sqlite3.Connection, cursors: dict[tuple[str, str, str], int],
                     receipts: dict[tuple[str, str], int]) -> None:
        """Write moved cursors and receipts inside the caller's transaction (never backwards)."""
        if cursors:
            db.executemany(
                "INSERT INTO cursors VALUES (?,?,?,?) ON CONFLICT(user, device, conv) "
                "DO UPDATE SET seq=excluded.seq WHERE excluded.seq > cursors.seq",
                [(*key, seq) for key, seq in cursors.items()],
            )
        if receipts:
            db.executemany(
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

    def _flush_moved(self, wait: bool = False) -> None:
        """Write the cursors and receipts moved since the last flush, in one transaction.

        The mover thread writes them (after the segments before them); until it
        has, reads take them from the write it holds.  With ``wait`` (at close,
        the mover stopped) they are written here.
        """
        self._flush_handle = None
        if self._writing and not wait:
            return  # one write at a time: these follow when the mover has it (_drop_moved)
        cursors, receipts = self._take_moved()
        if not cursors and not receipts:
            return
        if not wait and not self._mover.inline:
            write = Write(partial(self._write_moved, cursors=cursors, receipts=receipts),
                          (cursors, receipts))
            self._owner_loop()
            self._writing.append(write)
            self._mover.submit(write)
            return
        try:
            in_transaction(self._db, partial(self._write_moved, cursors=cursors, receipts=receipts),
                           "BEGIN IMMEDIATE", self._committed)
        except Exception:  # kept queued; the next flush retries
            log.exception("writing delivery cursors / read receipts failed; will retry")
            self._requeue_moved(cursors, receipts)

    # GroupStore
    async def create(self, group: str, owner: str, name: str, open: bool = True) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            try:
                db.execute("INSERT INTO groups_ VALUES (?,?,?,?)",
                           (group, name, owner, int(time.time())))
            except sqlite3.IntegrityError:
                return False
            db.execute("INSERT OR REPLACE INTO group_members VALUES (?,?,?)",
                       (group, owner, "owner"))
            if not open:
                db.execute("INSERT OR IGNORE INTO group_bars VALUES (?,?)", (group, EVERYONE))
            return True

        return await self._write(write)

    async def info(self, group: str) -> tuple[str, str] | None:
        r = self._db.execute("SELECT name, owner FROM groups_ WHERE grp=?", (group,)).fetchone()
        return (str(r[0]), str(r[1])) if r else None

    async def members(self, group: str) -> dict[str, str]:
        cur = self._db.execute("SELECT user, role FROM group_members WHERE grp=?", (group,))
        return {u: r for u, r in cur}

    async def set_member(self, group: str, user: str, role: str) -> None:
        await self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO group_members VALUES (?,?,?)", (group, user, role)))

    async def remove_member(self, group: str, user: str) -> bool:
        return bool(await self._write(lambda db: db.execute(
            "DELETE FROM group_members WHERE grp=? AND user=?", (group, user)).rowcount > 0))

    # Writes on the loop's connection never wait for the mover's lock on the loop.
    def _begin_now(self) -> bool:
        """BEGIN IMMEDIATE without waiting: False if another connection holds the write lock."""
        db = self._db
        db.execute("PRAGMA busy_timeout=0")
        try:
            db.execute("BEGIN IMMEDIATE")
            return True
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return False
            raise
        finally:
            db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")

    async def _write(self, statements: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``statements`` in one transaction; while the lock is taken, wait on the loop."""
        delay = 0.001
        while not self._begin_now():
            await asyncio.sleep(delay)
            delay = min(delay * 2, _WRITE_RETRY)
        return in_transaction(self._db, statements, None, self._committed)

    def _committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.committed()

    async def groups_of(self, user: str) -> list[str]:
        cur = self._db.execute("SELECT grp FROM group_members WHERE user=? ORDER BY grp", (user,))
        return [g for (g,) in cur]

    async def bar(self, group: str, user: str) -> None:
        await self._write(lambda db: db.execute(
            "INSERT OR IGNORE INTO group_bars VALUES (?,?)", (group, user)))

    async def unbar(self, group: str, user: str) -> None:
        await self._write(lambda db: db.execute(
            "DELETE FROM group_bars WHERE grp=? AND user=?", (group, user)))

    async def barred(self, group: str, user: str) -> bool:
        return self._db.execute("SELECT 1 FROM group_bars WHERE grp=? AND user IN (?,?)",
                                (group, user, EVERYONE)).fetchone() is not None

    # ReceiptStore
    async def mark_read(self, conv: str, user: str, seq: int) -> bool:
        """Moves ``user``'s receipt in ``conv`` forward only; written with the cursors."""
        return self.mark_read_now(conv, user, seq)

    def mark_read_now(self, conv: str, user: str, seq: int) -> bool:
        """:meth:`mark_read` as a plain call (:class:`~imfast.backends.base.SyncFastPath`)."""
        return self._move_forward(
            (conv, user), seq, self._receipt_dirty, self._receipt_cache, _RECEIPT_CACHE,
            self._known.receipts, "SELECT seq FROM read_receipts WHERE conv=? AND user=?", 1)[1]

    async def read_up_to(self, conv: str) -> dict[str, int]:
        cur = self._db.execute("SELECT user, seq FROM read_receipts WHERE conv=?", (conv,))
        found = {u: int(s) for u, s in cur}
        for moved in (*(w.payload[1] for w in self._writing), self._receipt_dirty):
            for (c, user), seq in moved.items():  # moved, not yet written
                if c == conv and seq > found.get(user, 0):
                    found[user] = seq
        return found

    async def close(self) -> None:
        """Move the entry log into the table, write cursors and receipts, checkpoint, close."""
        self._closed = True
        self._known.close()
        if self._purging is not None:  # it stops after its current batch
            await asyncio.gather(self._purging, return_exceptions=True)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._roll()
        if not await asyncio.to_thread(self._mover.close):
            log.error("the entry log mover did not finish; %d segments stay on disk and are "
                      "moved when the store next opens", len(self._moving))
        self._drop_moved()
        for write in self._writing:  # the mover gave up on these: written here instead
            self._requeue_moved(*write.payload)
        self._writing.clear()
        self._flush_moved(wait=True)
        if self._checkpointer is not None:
            self._checkpointer.close(self._db)
        self._db.close()
