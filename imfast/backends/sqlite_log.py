"""The SQLite store's entry log: appends as one sequential write, indexes in bulk later.

An entry appended to the ``messages`` table costs a page of each of its two
indexes ((conv, seq) and the dedup key) plus the table's tail, each written
to the WAL at commit and again by the checkpoint: at 10K users that is most
of the store's CPU, all of it on the event loop.  Here an append is instead

1. **one ``write()``** of the batch's records to the current *segment* file
   (``<db>-log/<n>.seg``; records are ``length, crc32, JSON row``), and
2. an update of the in-memory **hot index** (entries per conversation, by
   dedup key), which answers reads of entries not yet in the table.

Every ``move_every`` seconds the segment is closed and handed to the **mover
thread**, which inserts its rows into ``messages`` (and ``private_convs``)
with its own connection, in transactions of ``chunk`` rows, then deletes the
file; the loop then drops those entries from the hot index.  Many entries of
one conversation share an index page within a move, and none of that work
runs on the loop (the sqlite3 module releases the GIL while SQLite works).

Guarantees:

* an entry is durable when :meth:`EntryLog.write` returns: the write has
  reached the OS (survives a process crash), and with ``fsync`` also the disk
  (survives a power cut) - the same promise as SQLite's WAL at NORMAL/FULL;
* a batch is written whole or not at all (a short write is cut back off);
* entries are readable from the moment they are written: from the hot index
  until the move commits, from the table after (the loop drops an entry from
  the hot index only after its rows are committed);
* after a crash, :func:`recover` inserts every complete record still in a
  segment (``INSERT OR IGNORE``: a move cut short may have committed part of
  it) before the store opens; a torn tail (a power cut mid-write) is cut off
  with a warning - it was never acknowledged;
* a move that fails is retried (its rows stay hot and its file stays on disk):
  nothing accepted is lost.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from imfast.protocol.ids import conv_members_private

__all__ = ["ROW_COLUMNS", "EntryLog", "LogMover", "Row", "Segment", "Write", "in_transaction", "pairs_of",
           "read_segment", "recover"]

log = logging.getLogger("imfast.store")

# One row of the messages table as a segment record holds it (dedup_key is derived).
ROW_COLUMNS = "conv, seq, msg_id, sender, sender_device, cmid, body, ts, kind, dedup_key"
_INSERT_IGNORE = f"INSERT OR IGNORE INTO messages ({ROW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
_PAIRS = "INSERT OR IGNORE INTO private_convs VALUES (?,?)"
_SUFFIX = ".seg"
_HEAD = 8  # 4-byte length + 4-byte CRC32, little-endian

Row = tuple[Any, ...]  # (conv, seq, msg_id, sender, sender_device, cmid, body, ts, kind, dedup_key)
_T = TypeVar("_T")


def in_transaction(db: sqlite3.Connection, statements: Callable[[sqlite3.Connection], _T],
                   begin: str | None = "BEGIN",
                   committed: Callable[[], None] | None = None) -> _T:
    """``statements(db)`` in one transaction: committed whole, or rolled back and raised.

    ``begin`` None: the caller has begun it.  ``committed`` is called after COMMIT.
    """
    if begin is not None:
        db.execute(begin)
    try:
        result = statements(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    if committed is not None:
        committed()
    return result


def encode(rows: Iterable[Row]) -> bytes:
    """The records of ``rows``, as one segment write."""
    parts = []
    for row in rows:
        payload = orjson.dumps(row)
        parts.append(len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(4, "little")
                     + payload)
    return b"".join(parts)


def read_segment(path: Path) -> tuple[list[Row], int, int]:
    """(rows of every complete, intact record; bytes they span; bytes after them)."""
    data = path.read_bytes()
    rows: list[Row] = []
    pos, end = 0, len(data)
    while end - pos >= _HEAD:
        size = int.from_bytes(data[pos:pos + 4], "little")
        crc = int.from_bytes(data[pos + 4:pos + 8], "little")
        payload = data[pos + _HEAD:pos + _HEAD + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            break
        try:
            rows.append(tuple(orjson.loads(payload)))
        except orjson.JSONDecodeError:
            break
        pos += _HEAD + size
    return rows, pos, end - pos


def _segment_paths(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == _SUFFIX)


def pairs_of(convs: Iterable[str]) -> list[tuple[str, str]]:
    """The private_convs rows (user, conv) of the private conversations among ``convs``."""
    out: list[tuple[str, str]] = []
    for conv in convs:
        members = conv_members_private(conv)
        if members is not None:
            out.extend((user, conv) for user in members)
    return out


def recover(db: sqlite3.Connection, directory: Path) -> int:
    """Insert what segments left by a crash hold; delete them.  Returns the rows found."""
    found = 0
    for path in _segment_paths(directory):
        rows, _, torn = read_segment(path)
        if torn:
            log.warning("entry log %s ends in %d bytes of an interrupted write (a power cut "
                        "mid-append; never acknowledged): cut off", path, torn)
        if rows:
            def insert(db: sqlite3.Connection, rows: list[Row] = rows) -> None:
                db.executemany(_INSERT_IGNORE, rows)
                db.executemany(_PAIRS, pairs_of({row[0] for row in rows}))

            in_transaction(db, insert)
        found += len(rows)
        path.unlink()
    if found:
        log.warning("entry log: %d entries from %s recovered into the database", found,
                    directory)
    return found


class Segment:
    """One segment: its file and the rows written to it (the mover inserts these).

    ``new_pairs``: the private_convs rows (user, conv) its entries may lack.
    """

    __slots__ = ("fd", "new_pairs", "number", "path", "rows", "size")

    def __init__(self, number: int, path: Path | None) -> None:
        self.number = number
        self.path = path
        self.rows: list[Row] = []
        self.new_pairs: set[tuple[str, str]] = set()
        self.fd = -1
        self.size = 0


class Write:
    """Other rows the store hands to the mover: ``apply(db)`` runs in one transaction.

    ``payload`` is what the store reads until the write is done (moved cursors).
    """

    __slots__ = ("apply", "payload")

    def __init__(self, apply: Callable[[sqlite3.Connection], None], payload: Any) -> None:
        self.apply = apply
        self.payload = payload


class EntryLog:
    """Writes batches of rows to the current segment; rolls segments on request.

    ``directory`` None keeps segments in memory only (a ``:memory:`` store:
    nothing to survive anyway).  Owned by the event loop's thread.
    """

    def __init__(self, directory: Path | None, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        numbers = [int(p.stem) for p in _segment_paths(directory)] if directory else []
        self._next = max(numbers, default=0) + 1
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.current: Segment | None = None

    def write(self, rows: list[Row], new_pairs: Iterable[tuple[str, str]] = ()) -> None:
        """Append ``rows`` whole to the current segment (opened on first use).

        ``new_pairs``: private_convs rows (user, conv) of ``rows`` that the mover
        should write (it inserts those of the whole segment).
        """
        seg = self.current
        if seg is None:
            seg = self.current = self._open()
        if seg.fd >= 0:
            data = encode(rows)
            try:
                written = os.write(seg.fd, data)
                if written != len(data):
                    raise OSError(f"short write to {seg.path} ({written} of {len(data)} bytes)")
                if self.fsync:
                    os.fdatasync(seg.fd)
            except BaseException:
                try:
                    os.ftruncate(seg.fd, seg.size)  # nothing of this batch stays
                except OSError:
                    log.exception("could not cut a failed write back off %s", seg.path)
                raise
            seg.size += len(data)
        seg.rows.extend(rows)
        seg.new_pairs.update(new_pairs)

    def roll(self) -> Segment | None:
        """Close the current segment and return it (None if nothing was written)."""
        seg, self.current = self.current, None
        if seg is not None and seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
        return seg

    def _open(self) -> Segment:
        number = self._next
        self._next += 1
        if self.directory is None:
            return Segment(number, None)
        path = self.directory / f"{number:012d}{_SUFFIX}"
        seg = Segment(number, path)
        seg.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        return seg


class LogMover:
    """A thread that inserts closed segments (and other writes) into the database, in order.

    ``done(item)`` is called on the mover's thread after an item is committed
    (a segment's file deleted too); the store hands it to its loop.  Without a
    ``path`` (``:memory:``) :meth:`submit` runs inline on ``inline_db``.
    """

    def __init__(self, path: str | None,
                 done: Callable[[Segment | Write], None], committed: Callable[[], None] | None = None,
                 chunk: int = 4096, inline_db: sqlite3.Connection | None = None,
                 retry_after: float = 1.0, pragmas: Iterable[str] = ()) -> None:
        self._done = done
        self._committed = committed
        self.chunk = chunk
        self.retry_after = retry_after
        self._inline_db = inline_db
        self.inline = path is None
        self._queue: queue.SimpleQueue[Segment | Write | None] = queue.SimpleQueue()
        self.failures = 0
        self._closing = False
        self._pragmas = tuple(pragmas)
        self._thread: threading.Thread | None = None
        if path is not None:
            self._thread = threading.Thread(target=self._run, args=(path,),
                                            name="sqlite-log-mover", daemon=True)
            self._thread.start()

    def submit(self, item: Segment | Write) -> None:
        if self._thread is None:
            assert self._inline_db is not None
            self._do(self._inline_db, item)
            self._done(item)
        else:
            self._queue.put(item)

    def close(self, timeout: float = 60.0) -> bool:
        """Finish the submitted segments, then stop.  True if the thread ended in time."""
        if self._thread is None:
            return True
        self._closing = True  # a move that keeps failing is left on disk, for recover()
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self, path: str) -> None:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        for pragma in self._pragmas:  # the writer's durability and page cache
            db.execute(f"PRAGMA {pragma}")
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                while not self._try(db, item):
                    if self._closing:
                        return
                    time.sleep(self.retry_after)
                try:
                    self._done(item)
                except Exception:  # never let the thread die: later items must still move
                    log.exception("entry log mover: handing a finished item back failed")
        finally:
            db.close()

    def _try(self, db: sqlite3.Connection, item: Segment | Write) -> bool:
        try:
            self._do(db, item)
            return True
        except sqlite3.Error:
            self.failures += 1
            if isinstance(item, Segment):
                log.exception("moving entry log segment %s into the database failed; its %d "
                              "entries stay readable and on disk; retrying", item.path,
                              len(item.rows))
            else:
                log.exception("writing delivery cursors / read receipts failed; retrying")
            return False

    def _do(self, db: sqlite3.Connection, item: Segment | Write) -> None:
        if isinstance(item, Segment):
            self._move(db, item)
        else:
            in_transaction(db, item.apply, committed=self._committed)

    def _move(self, db: sqlite3.Connection, seg: Segment) -> None:
        rows = seg.rows
        for start in range(0, len(rows), self.chunk):
            def insert(db: sqlite3.Connection, part: list[Row] = rows[start:start + self.chunk],
                       first: bool = not start) -> None:
                # OR IGNORE: a retry after a failed COMMIT may find part of it stored.
                db.executemany(_INSERT_IGNORE, part)
                if first:
                    db.executemany(_PAIRS, sorted(seg.new_pairs))

            in_transaction(db, insert, committed=self._committed)
        if seg.path is not None:
            seg.path.unlink(missing_ok=True)

