"""Write coalescing, pure-Python twin of ``imfast._core._fanout``.

:class:`WriteCoalescer` guarantees:

* frames queued for a session in one loop iteration reach its transport in
  queue order, in **one** ``write()`` call, at the end of that iteration;
* a broadcast frames its payload once and shares those bytes between all
  targets;
* nothing is written to a session whose ``closed`` flag is set by flush time
  (the frames are dropped; chat messages stay in the store and are synced on
  reconnect, so dropping bytes for a dead socket loses nothing).

Sessions provide ``out`` (None or a list, owned by the coalescer), ``closed``
and ``raw`` (the asyncio transport).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from imfast._core.codec_py import ws_text_frame

__all__ = ["WriteCoalescer"]


class WriteCoalescer:
    """Batches frames per session and flushes them once per loop iteration."""

    __slots__ = ("_dirty", "_loop", "_scheduled", "frames", "writes")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Any] = []
        self._scheduled = False
        self.writes = 0  # write() calls made (for metrics and benchmarks)
        self.frames = 0  # frames written

    def push(self, session: Any, payload: bytes) -> None:
        """Queue one message (JSON bytes) for ``session``."""
        self.push_framed(session, ws_text_frame(payload))

    def push_framed(self, session: Any, frame: bytes) -> None:
        """Queue an already framed message for ``session``."""
        out = session.out
        if out is None:
            session.out = [frame]
            self._dirty.append(session)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.flush)
        else:
            out.append(frame)

    def broadcast(self, sessions: Iterable[Any], payload: bytes) -> int:
        """Queue ``payload`` for every session, framing it once; returns the count."""
        frame = ws_text_frame(payload)
        n = 0
        for session in sessions:
            self.push_framed(session, frame)
            n += 1
        return n

    def flush(self) -> None:
        """Write every session's queued frames now, one write per session."""
        self._scheduled = False
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        writes = 0
        frames = 0
        for session in dirty:
            out = session.out
            session.out = None
            if session.closed:
                continue
            if len(out) == 1:
                session.raw.write(out[0])
            else:
                session.raw.write(b"".join(out))
            writes += 1
            frames += len(out)
        self.writes += writes
        self.frames += frames
