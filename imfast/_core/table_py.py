"""Connection table and timing wheel, pure-Python twins of ``imfast._core._table``.

:class:`ConnectionTable` guarantees:

* every session added is counted in ``len(table)`` until it is removed;
* ``bind(session, user, device)`` makes it findable by user and by
  (user, device); a second session for the same (user, device) replaces the
  first, which ``bind`` returns so the caller can close it;
* lookups never return a removed session; no per-connection dict is kept:
  a user maps to one session, or a tuple of them when several devices are on.

:class:`TimerWheel` holds (item, deadline) pairs in one-second buckets and
hands back, from :meth:`TimerWheel.expired`, every item whose bucket has
passed; it never fires an item early, and late by at most one resolution.
Items are not cancelled: the owner re-checks its own deadline when it comes
back (cheaper than cancelling on every heartbeat).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

__all__ = ["ConnectionTable", "TimerWheel"]


class ConnectionTable:
    """Sessions by user and device; ``session.user``/``session.device`` are read."""

    __slots__ = ("_bound", "_by_user", "_count")

    def __init__(self) -> None:
        self._by_user: dict[str, Any] = {}
        self._count = 0
        self._bound = 0

    def __len__(self) -> int:
        return self._count

    @property
    def authenticated(self) -> int:
        """Sessions bound to a user."""
        return self._bound

    @property
    def users(self) -> int:
        """Distinct users with at least one bound session."""
        return len(self._by_user)

    def add(self, session: Any) -> None:
        """Count a new (not yet authenticated) session."""
        self._count += 1

    def bind(self, session: Any, user: str, device: str) -> Any:
        """Attach ``session`` to (user, device); return the session it replaces, or None."""
        session.user = user
        session.device = device
        current = self._by_user.get(user)
        replaced = None
        if current is None:
            self._by_user[user] = session
        elif type(current) is tuple:
            kept = []
            for other in current:
                if other.device == device:
                    replaced = other
                else:
                    kept.append(other)
            kept.append(session)
            self._by_user[user] = tuple(kept)
        elif current.device == device:
            replaced = current
            self._by_user[user] = session
        else:
            self._by_user[user] = (current, session)
        if replaced is None:
            self._bound += 1
        else:
            replaced.bound = False
        session.bound = True
        return replaced

    def remove(self, session: Any) -> None:
        """Forget ``session`` (idempotent for the bound part; counts once)."""
        self._count -= 1
        if not getattr(session, "bound", False):
            return
        session.bound = False
        self._bound -= 1
        user = session.user
        current = self._by_user.get(user)
        if current is session:
            del self._by_user[user]
        elif type(current) is tuple:
            kept = tuple(s for s in current if s is not session)
            if len(kept) == 1:
                self._by_user[user] = kept[0]
            elif kept:
                self._by_user[user] = kept
            else:
                del self._by_user[user]

    def sessions_of(self, user: str) -> tuple[Any, ...]:
        """All live sessions of ``user`` (possibly empty)."""
        current = self._by_user.get(user)
        if current is None:
            return ()
        if type(current) is tuple:
            return current
        return (current,)

    def session_of(self, user: str, device: str) -> Any:
        """The session of (user, device), or None."""
        for s in self.sessions_of(user):
            if s.device == device:
                return s
        return None

    def iter_sessions(self) -> Iterator[Any]:
        """Every bound session (a snapshot: safe to close sessions while iterating)."""
        snapshot = list(self._by_user.values())
        for entry in snapshot:
            if type(entry) is tuple:
                yield from entry
            else:
                yield entry


class TimerWheel:
    """Deadlines bucketed by ``resolution`` seconds; see module docstring."""

    __slots__ = ("_buckets", "_next_tick", "_resolution")

    def __init__(self, resolution: float = 1.0, now: float = 0.0) -> None:
        self._resolution = resolution
        self._buckets: dict[int, list[Any]] = {}
        self._next_tick = int(now // resolution)

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def schedule(self, item: Any, deadline: float) -> None:
        """Hand ``item`` back from :meth:`expired` once ``deadline`` has passed."""
        tick = max(math.ceil(deadline / self._resolution), self._next_tick)
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = [item]
        else:
            bucket.append(item)

    def expired(self, now: float) -> list[Any]:
        """Items whose deadline is <= now, in deadline-bucket order."""
        current = int(now // self._resolution)
        due: list[Any] = []
        if not self._buckets:
            self._next_tick = current + 1
            return due
        tick = self._next_tick
        while tick <= current:
            bucket = self._buckets.pop(tick, None)
            if bucket is not None:
                due.extend(bucket)
            tick += 1
        self._next_tick = current + 1
        return due
