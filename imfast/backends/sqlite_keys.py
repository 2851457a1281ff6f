"""Which keys the SQLite store's tables hold, as in-memory filters (see keyfilter).

The store's hot path asks four questions whose answer is nearly always "no":
was this dedup key stored, does this conversation have entries, does this
device have a cursor row in this conversation, does this user have a read
receipt in it.  :class:`KnownKeys` answers "certainly not" from memory once
it knows every key of the database:

* keys already in the file are read by a scan on a thread of its own (its
  own read-only connection, so it never blocks the writer);
* keys written from now on are added by the store as it writes them.

Guarantee: ``complete`` is True only once both halves are in, and from then
on ``x not in known.<table>`` means the table has no such key.  Until then the
store reads the database as before.

Retention deletes entries, not their keys from a filter: :meth:`KnownKeys.rebuild_dedup`
replaces the dedup filter by one of the keys the table holds now (plus those not in it
yet), so the filter's memory follows the table's size, not every message ever stored.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from imfast.backends.keyfilter import KeyFilters

__all__ = ["KnownKeys"]

log = logging.getLogger("imfast.store")

_BATCH = 10_000  # rows fetched at a time by the scan (and how often it checks for close)


class _Tables(NamedTuple):
    dedup: KeyFilters  # messages.dedup_key
    convs: KeyFilters  # messages.conv and seq_floors.conv
    cursors: KeyFilters  # (user, device, conv) of cursors
    receipts: KeyFilters  # (conv, user) of read_receipts


_Scan = tuple[str, str, Callable[[Any], Any]]

_DEDUP_SCAN: _Scan = ("SELECT COUNT(*) FROM messages WHERE dedup_key IS NOT NULL",
                      "SELECT dedup_key FROM messages WHERE dedup_key IS NOT NULL",
                      lambda r: r[0])
# (count query, key query, how a row becomes the key the store asks about)
_SCANS: tuple[_Scan, ...] = (
    _DEDUP_SCAN,
    # A conversation whose entries retention deleted still has a seq (its floor).
    ("SELECT COUNT(*) FROM (SELECT conv FROM messages UNION SELECT conv FROM seq_floors)",
     "SELECT conv FROM messages UNION SELECT conv FROM seq_floors", lambda r: r[0]),
    ("SELECT COUNT(*) FROM cursors", "SELECT user, device, conv FROM cursors", tuple),
    ("SELECT COUNT(*) FROM read_receipts", "SELECT conv, user FROM read_receipts", tuple),
)


class KnownKeys:
    """The four filters, complete at once for a new database, else after a scan."""

    def __init__(self, path: str, fresh: bool) -> None:
        self.live = _Tables(KeyFilters(), KeyFilters(), KeyFilters(), KeyFilters())
        self.dedup, self.convs, self.cursors, self.receipts = self.live
        self.complete = fresh
        self._scanned: _Tables | None = None
        #: While a dedup rebuild runs: the keys added since it began (see rebuild_dedup).
        self._dedup_since: KeyFilters | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        if not fresh:
            self._thread = threading.Thread(target=self._scan, args=(path,),
                                            name="sqlite-key-scan", daemon=True)
            self._thread.start()

    def ready(self) -> bool:
        """True once complete; adopts the scan's filters the first time it can (owner thread)."""
        if self.complete:
            return True
        scanned = self._scanned
        if scanned is None:
            return False
        for live, old in zip(self.live, scanned, strict=True):
            live.absorb(old)
        self.complete = True
        return True

    def add_dedup(self, keys: Sequence[str]) -> None:
        """Dedup keys just written (owner thread): into the filter, and into the one a
        rebuild under way will adopt."""
        self.dedup.add_all(keys)
        since = self._dedup_since
        if since is not None:
            since.add_all(keys)

    async def rebuild_dedup(self, path: str, not_in_table: Iterable[str]) -> int | None:
        """Replace the dedup filter by one of the table's keys now; returns its key count,
        None if it was not replaced (scan not complete yet, one under way, a failure).

        ``not_in_table``: every key written but not committed to the table yet (the
        store's hot entries).  The new filter holds those, every key the scan's
        snapshot of the table holds, and every key :meth:`add_dedup` gets from the
        call on - so no key the table holds, or will hold, is ever missing from it.
        Called on the owner thread; the scan runs on a thread of its own.
        """
        if not self.complete or self._dedup_since is not None or self._closing:
            return None
        since = self._dedup_since = KeyFilters()
        since.add_all(list(not_in_table))
        try:
            built = await asyncio.to_thread(self._read, path, (_DEDUP_SCAN,))
        finally:
            self._dedup_since = None
        if built is None:
            return None
        [fresh] = built
        fresh.absorb(since)  # nothing awaited since the scan: no key added in between
        self.dedup = fresh
        self.live = self.live._replace(dedup=fresh)
        return fresh.count

    def _scan(self, path: str) -> None:
        built = self._read(path, _SCANS)
        if built is not None:
            self._scanned = _Tables(*built)
            log.info("store key scan done: %s dedup keys, %s conversations, %s cursors, "
                     "%s receipts", *(f.count for f in built))

    def _read(self, path: str, scans: Sequence[_Scan]) -> list[KeyFilters] | None:
        """One filter per scan, all from one read snapshot; None if closed or failed."""
        try:
            db = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True,
                                 check_same_thread=False)
        except sqlite3.Error:
            log.exception("key scan could not open %s; the store reads the file instead", path)
            return None
        try:
            db.execute("BEGIN")  # one snapshot for every table scanned
            built = []
            for count_sql, keys_sql, key_of in scans:
                (count,) = db.execute(count_sql).fetchone()
                found = KeyFilters(capacity=int(count) + (1 << 16))
                cur = db.execute(keys_sql)
                while rows := cur.fetchmany(_BATCH):
                    if self._closing:
                        return None
                    found.add_all([key_of(row) for row in rows])
                built.append(found)
            return built
        except sqlite3.Error:
            log.exception("key scan failed; the store keeps reading the file instead")
            return None
        finally:
            db.close()

    def close(self) -> None:
        """Stop a scan still running (it holds only a read snapshot)."""
        self._closing = True
        if self._thread is not None:
            self._thread.join(timeout=30)
