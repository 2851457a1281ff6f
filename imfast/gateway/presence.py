"""When users were last seen online, as one process knows it, in bounded memory."""

from __future__ import annotations

#: Departures remembered per process, at most: about twice the sockets a node holds,
#: so a long-running gateway does not keep a time for every user it ever served.
LAST_SEEN_MAX = 200_000


class LastSeen:
    """user -> epoch seconds at which their last device left.

    Holds at most ``limit`` users; beyond, the one gone longest is forgotten first,
    and presence reports ``last_seen`` null for it, as for a user never seen.
    """

    __slots__ = ("_times", "limit")

    def __init__(self, limit: int = LAST_SEEN_MAX) -> None:
        self.limit = limit
        self._times: dict[str, float] = {}  # insertion order = departure order

    def note(self, user: str, when: float) -> None:
        """``user``'s last device left at ``when``."""
        times = self._times
        times.pop(user, None)  # re-inserted at the end: the latest departure
        times[user] = when
        if len(times) > self.limit:
            del times[next(iter(times))]

    def get(self, user: str) -> float | None:
        return self._times.get(user)

    def __len__(self) -> int:
        return len(self._times)
