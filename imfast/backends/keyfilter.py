"""Approximate key sets: "certainly absent" or "maybe present", in ~2 bytes a key.

The embedded store asks SQLite, for every new message, whether its dedup key
was stored before; for every first acknowledgement of a conversation, whether
a cursor row exists.  Nearly always the answer is no, and each question costs
an indexed read (~10 % of the store's CPU per message).  A filter answers
those "no"s from memory.

Guarantee: no false negatives.  A key that was :meth:`KeyFilter.add`-ed is
always reported as maybe present, however many keys follow (past its
capacity the filter only grows less precise: more "maybe" for absent keys,
which the caller then checks in the database).  It is a Bloom filter with
three bit positions per key derived from ``hash(key)`` - Python's per-process
hash, so a filter lives in memory only and is rebuilt at start-up.

Not thread-safe: setting a bit is a read-modify-write, so one thread owns
each filter (a scan thread builds its own, then hands it over whole).

:class:`KeyFilter` is part of the Cython core (``imfast._core``: the
extension when built, else its pure-Python twin): the store asks it for
every new message.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from imfast._core import KeyFilter

__all__ = ["KeyFilter", "KeyFilters"]

class KeyFilters:
    """A growing key set made of :class:`KeyFilter` s: a full one is kept, a larger one added.

    ``add`` goes to the newest filter; ``in`` asks all of them.  Each filter
    stays within its capacity, so the false "maybe" rate stays near 0.5 %
    per filter however many keys arrive (and filters double in size, so
    there are few).
    """

    __slots__ = ("_filters", "_newest")

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._newest = KeyFilter(capacity)
        self._filters: list[KeyFilter] = [self._newest]

    def _room(self) -> KeyFilter:
        """The newest filter, a new twice-as-large one once it is full."""
        newest = self._newest
        if newest.count >= newest.capacity:
            newest = self._newest = KeyFilter(newest.capacity * 2)
            self._filters.append(newest)
        return newest

    def add(self, key: Hashable) -> None:
        self._room().add_all((key,))

    def add_all(self, keys: Sequence[Hashable]) -> None:
        """``add`` each of ``keys``, filling the newest filter up to its capacity first."""
        start = 0
        while start < len(keys):
            newest = self._room()
            end = start + newest.capacity - newest.count
            newest.add_all(keys[start:end])
            start = end

    def __contains__(self, key: Hashable) -> bool:
        for f in self._filters:
            if key in f:
                return True
        return False

    def absorb(self, other: KeyFilters) -> None:
        """Take ``other``'s filters as well (built on another thread, handed over whole)."""
        self._filters = [*other._filters, *self._filters]

    @property
    def count(self) -> int:
        return sum(f.count for f in self._filters)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._filters)
