"""The router's cache of group members, bounded in memory and safe against stale reads."""

from __future__ import annotations

#: Members the router keeps in memory, counted over all cached groups (~100 bytes
#: each), plus one per group: a group with no members (one that does not exist,
#: asked about by any client) costs memory too.  A group not cached is read from
#: the store at its next message, so this bounds memory, not behaviour: beyond
#: it, the groups cached longest ago go first.
MEMBERS_CACHED_MAX = 1_000_000


def _weight(members: dict[str, str]) -> int:
    return len(members) + 1


class MembersCache(dict[str, dict[str, str]]):
    """group -> members (user -> role).

    A plain dict for lookups (the per-message path calls ``get``); insert with
    :meth:`put` and remove with :meth:`forget`, which keep the member count.
    A store read is bracketed by :meth:`reading` and :meth:`put` (or
    :meth:`read_failed`): if the group's membership changed (:meth:`forget`)
    while a read of it was under way, that read's answer may predate the change
    and is not cached.  Only reads of the changed group are affected, and the
    bookkeeping lasts only while reads are under way.
    """

    __slots__ = ("_reads", "limit", "size")

    def __init__(self, limit: int = MEMBERS_CACHED_MAX) -> None:
        super().__init__()
        self.limit = limit
        self.size = 0  # members in all cached groups, plus one per group
        #: group -> [reads under way, changed since the oldest of them started]
        self._reads: dict[str, list[int]] = {}

    def reading(self, group: str) -> None:
        """A store read of ``group``'s members starts now."""
        reads = self._reads.get(group)
        if reads is None:
            self._reads[group] = [1, 0]
        else:
            reads[0] += 1

    def put(self, group: str, members: dict[str, str]) -> None:
        """A read started by :meth:`reading` answered ``members``: cache them, unless
        the group changed while a read of it was under way."""
        if self._read_done(group):
            return
        self._drop(group)
        self[group] = members
        self.size += _weight(members)
        while self.size > self.limit and len(self) > 1:
            oldest = next(iter(self))
            self.size -= _weight(dict.pop(self, oldest))

    def read_failed(self, group: str) -> None:
        """A read started by :meth:`reading` raised."""
        self._read_done(group)

    def forget(self, group: str) -> None:
        """``group``'s membership changed: drop it, and any read of it under way."""
        reads = self._reads.get(group)
        if reads is not None:
            reads[1] = 1
        self._drop(group)

    def _drop(self, group: str) -> None:
        members = dict.pop(self, group, None)
        if members is not None:
            self.size -= _weight(members)

    def _read_done(self, group: str) -> bool:
        """One read of ``group`` ended; True if the group changed while reads were on."""
        reads = self._reads.get(group)
        if reads is None:  # pragma: no cover - a put without reading(): cache it
            return False
        reads[0] -= 1
        changed = bool(reads[1])
        if reads[0] <= 0:
            del self._reads[group]
        return changed
