"""The router's cache of group members, bounded in memory and safe against stale reads."""

from __future__ import annotations

#: Members the router keeps in memory, counted over all cached groups (~100 bytes
#: each).  A group not cached is read from the store at its next message, so this
#: bounds memory, not behaviour: beyond it, the groups cached longest ago go first.
MEMBERS_CACHED_MAX = 1_000_000


class MembersCache(dict[str, dict[str, str]]):
    """group -> members (user -> role).

    A plain dict for lookups (the per-message path calls ``get``); insert with
    :meth:`put` and remove with :meth:`forget`, which keep the member count.
    :meth:`reading` / :meth:`put` make a read that raced a membership change
    cache nothing: the change's :meth:`forget` ran before the read's answer
    arrived, so that answer may predate the change.
    """

    __slots__ = ("_changes", "limit", "size")

    def __init__(self, limit: int = MEMBERS_CACHED_MAX) -> None:
        super().__init__()
        self.limit = limit
        self.size = 0  # members in all cached groups
        self._changes = 0  # forget() calls so far

    def reading(self) -> int:
        """A token to hand to :meth:`put` with what a store read started now returns."""
        return self._changes

    def put(self, group: str, members: dict[str, str], token: int) -> None:
        """Cache ``members`` of ``group``, read since :meth:`reading` gave ``token``;
        not cached if any group changed meanwhile."""
        if token != self._changes:
            return
        self.forget_quietly(group)
        self[group] = members
        self.size += len(members)
        while self.size > self.limit and len(self) > 1:
            oldest = next(iter(self))
            self.size -= len(dict.pop(self, oldest))

    def forget(self, group: str) -> None:
        """``group``'s membership changed: drop it, and any read under way."""
        self._changes += 1
        self.forget_quietly(group)

    def forget_quietly(self, group: str) -> None:
        members = dict.pop(self, group, None)
        if members is not None:
            self.size -= len(members)
