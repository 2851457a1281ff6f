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
messages.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from pathlib import Path

from imfast.backends.base import Reservation, StoredMessage
from imfast.protocol.ids import conv_members_private

__all__ = ["SQLiteStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_DEDUP_CACHE = 100_000  # recent reservations kept in memory; older ones are read from the log

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    cmid TEXT NOT NULL,
    body TEXT NOT NULL,
    ts INTEGER NOT NULL,
    kind TEXT NOT NULL,
    dedup_key TEXT,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
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
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=OFF")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._counters: dict[str, int] = {}
        self._recent: OrderedDict[str, Reservation] = OrderedDict()

    def _latest(self, conv: str) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM messages WHERE conv=?", (conv,)).fetchone()
        return int(row[0] or 0)

    # SequenceStore
    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        seen = self._recent.get(dedup_key)
        if seen is not None:
            return Reservation(seen.seq, seen.msg_id, True)
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
        rows = [
            (m.conv, m.seq, m.msg_id, m.sender, m.sender_device, m.cmid, m.body, m.ts, m.kind,
             f"{m.sender}:{m.cmid}" if m.cmid else None)
            for m in messages
        ]
        convs: set[tuple[str, str]] = set()
        for m in messages:
            pair = conv_members_private(m.conv)
            if pair is not None:
                convs.add((pair[0], m.conv))
                convs.add((pair[1], m.conv))
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
        return {conv: int(seq) for conv, seq in cur}

    async def advance(self, user: str, device: str, conv: str, seq: int) -> int:
        self._db.execute(
            "INSERT INTO cursors VALUES (?,?,?,?) ON CONFLICT(user, device, conv) "
            "DO UPDATE SET seq=excluded.seq WHERE excluded.seq > cursors.seq",
            (user, device, conv, seq),
        )
        row = self._db.execute(
            "SELECT seq FROM cursors WHERE user=? AND device=? AND conv=?", (user, device, conv)
        ).fetchone()
        return int(row[0])

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
        cur = self._db.execute(
            "INSERT INTO read_receipts VALUES (?,?,?) ON CONFLICT(conv, user) "
            "DO UPDATE SET seq=excluded.seq WHERE excluded.seq > read_receipts.seq",
            (conv, user, seq),
        )
        return cur.rowcount > 0

    async def read_up_to(self, conv: str) -> dict[str, int]:
        cur = self._db.execute("SELECT user, seq FROM read_receipts WHERE conv=?", (conv,))
        return {u: int(s) for u, s in cur}

    async def close(self) -> None:
        self._db.close()
