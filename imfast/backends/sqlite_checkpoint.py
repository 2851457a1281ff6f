"""WAL checkpoints for the SQLite store, on a thread of their own.

SQLite's automatic checkpoint runs inside whichever ``COMMIT`` crosses the
threshold, so every thousand pages one commit on the event loop would copy
the WAL into the database file and wait for two ``fsync`` calls.  Here the
writer connection never checkpoints; this thread does, with its own
connection, in PASSIVE mode (it never blocks the writer, and the sqlite3
module releases the GIL while SQLite works).

Guarantee: while the thread is alive the WAL is checkpointed at least every
``interval`` seconds once commits happened; ``close`` stops it and leaves
the WAL fully checkpointed and truncated.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

__all__ = ["BackgroundCheckpointer"]

log = logging.getLogger("imfast.store")


class BackgroundCheckpointer:
    """Checkpoints ``path``'s WAL when told that commits happened."""

    def __init__(self, path: str, interval: float = 1.0,
                 restart_bytes: int = 8 * 1024 * 1024) -> None:
        self.path = path
        self.interval = interval
        self.restart_bytes = restart_bytes
        self._wal = path + "-wal"
        self.checkpoints = 0
        self._wake = threading.Event()
        self._stopping = False
        self._last_nudge = 0.0
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called after each commit; cheap (a clock read) unless a checkpoint is due."""
        now = time.monotonic()
        if now - self._last_nudge >= self.interval:
            self._last_nudge = now
            self._wake.set()

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    # PASSIVE copies beside the writer; under steady writes it never
                    # quite reaches the end, so the WAL would only grow.  A RESTART
                    # right after it copies the few frames left - holding the writer
                    # back only that long - and lets the next commit start the WAL
                    # from its beginning.
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    if os.path.getsize(self._wal) > self.restart_bytes:
                        db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error:
                    log.exception("WAL checkpoint failed; retrying after the next commit")
        finally:
            db.close()

    def close(self, writer: sqlite3.Connection) -> None:
        """Stop the thread, then checkpoint and truncate the WAL on ``writer``."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        try:
            writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            log.exception("final WAL checkpoint failed; SQLite replays the WAL on next open")
