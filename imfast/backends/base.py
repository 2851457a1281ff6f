"""Backend interfaces: what each storage role promises, not how.

Every implementation (memory, SQLite, and the distributed ones) passes the
same contract suite in ``tests/contract/``.  All methods are coroutines so a
networked backend fits the same shape; embedded ones simply do not await.

Vocabulary: a *conversation* (``conv``) is a private chat ``p:<a>:<b>`` or a
group ``g:<id>``; every entry in it - chat message, recall, membership event
- has a *sequence number* (``seq``) that starts at 1 and grows by exactly 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "EVERYONE",
    "KIND_EVENT",
    "KIND_MESSAGE",
    "KIND_RECALL",
    "CursorStore",
    "GroupStore",
    "MessageLog",
    "ReceiptStore",
    "Registry",
    "Reservation",
    "SequenceStore",
    "Store",
    "StoredMessage",
    "SyncFastPath",
    "own_run_end",
    "sync_twin",
    "until_fewer_than",
    "variant_of",
]

#: The user id :meth:`GroupStore.bar` takes for "every user": not a valid id (see
#: imfast.protocol.ids), so no real user can be confused with it.
EVERYONE = "*"

KIND_MESSAGE = "msg"  # a chat message written by a user
KIND_EVENT = "event"  # a system event (group membership); body is JSON
KIND_RECALL = "recall"  # the sender recalled an earlier seq; body is that seq


class StoredMessage(NamedTuple):
    """One entry of a conversation log, immutable once stored.

    A named tuple, not a frozen dataclass: one is made per message, and a
    frozen dataclass takes twice as long to build (0.9 vs 1.9 us here).
    """

    conv: str
    seq: int
    msg_id: str
    sender: str
    sender_device: str
    cmid: str
    body: str
    ts: int  # milliseconds since the epoch, server clock
    kind: str = KIND_MESSAGE


class Reservation(NamedTuple):
    """Result of :meth:`SequenceStore.reserve` (immutable).

    A named tuple, not a frozen dataclass: one is made per message, and a
    frozen dataclass costs twice as much to build.
    """

    seq: int
    msg_id: str
    duplicate: bool  # True: the dedup key was seen before; seq/msg_id are the original's


@runtime_checkable
class SequenceStore(Protocol):
    """Assigns per-conversation sequence numbers together with deduplication.

    ``reserve`` is one atomic step: if ``dedup_key`` was reserved before (within
    the dedup TTL) it returns that reservation with ``duplicate=True`` and does
    not advance the counter; otherwise it returns the next seq of ``conv`` -
    strictly greater than every seq ever returned for ``conv``, also after a
    restart (``floor`` is the highest seq known durable, which the store must
    never go below).
    """

    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation: ...

    async def release(self, conv: str, dedup_key: str) -> None:
        """Undo a reservation whose message could not be stored.

        The dedup key is forgotten so a retry can succeed; stores that can
        (embedded ones) also hand the seq out again so the log has no gap.
        """
        ...

    async def repair(self, conv: str, floor: int) -> None:
        """Make sure the next seq of ``conv`` is above ``floor`` (the highest seq stored).

        Called after the log refused an append with "sequence number already
        exists" - the counter fell behind the log (e.g. Redis lost data).
        """
        ...


@runtime_checkable
class MessageLog(Protocol):
    """The durable conversation log.  ``append`` returning means durable."""

    async def append(self, messages: list[StoredMessage]) -> None:
        """Store a batch atomically; a (conv, seq) already present raises ``ValueError``."""
        ...

    async def fetch(self, conv: str, after: int, limit: int) -> list[StoredMessage]:
        """Entries with seq > ``after``, ascending, at most ``limit``."""
        ...

    async def fetch_before(self, conv: str, before: int, limit: int) -> list[StoredMessage]:
        """Entries with seq < ``before``, the newest ``limit`` of them, ascending."""
        ...

    async def get(self, conv: str, seq: int) -> StoredMessage | None: ...

    async def latest_seq(self, conv: str) -> int:
        """Highest stored seq of ``conv`` (0 when empty)."""
        ...

    async def find_by_cmid(self, sender: str, cmid: str) -> StoredMessage | None:
        """The message ``sender`` sent with client message id ``cmid``, if stored."""
        ...

    async def private_conversations(self, user: str) -> dict[str, int]:
        """Private conversations ``user`` is in -> their latest seq."""
        ...


@runtime_checkable
class CursorStore(Protocol):
    """Per-device delivery cursors: the highest seq a device acknowledged."""

    async def cursors(self, user: str, device: str) -> dict[str, int]: ...

    async def advance(self, user: str, device: str, conv: str, seq: int) -> int:
        """Move the cursor forward to ``seq`` (never back); returns the cursor now."""
        ...


@runtime_checkable
class GroupStore(Protocol):
    """Groups and their members with roles ``owner``, ``admin``, ``member``."""

    async def create(self, group: str, owner: str, name: str, open: bool = True) -> bool:
        """Create a group owned by ``owner``; False if the id is taken.  Not ``open``:
        invite-only (:data:`EVERYONE` barred), in the same write."""
        ...

    async def info(self, group: str) -> tuple[str, str] | None:
        """(name, owner) or None if there is no such group."""
        ...

    async def members(self, group: str) -> dict[str, str]:
        """user -> role."""
        ...

    async def set_member(self, group: str, user: str, role: str) -> None: ...

    async def remove_member(self, group: str, user: str) -> bool:
        """False if ``user`` was not a member."""
        ...

    async def groups_of(self, user: str) -> list[str]: ...

    async def bar(self, group: str, user: str) -> None:
        """``user`` may not join ``group`` by itself (``group_join``) until :meth:`unbar`
        (a member removed by an owner or admin); :data:`EVERYONE` bars every user (an
        invite-only group: only an invitation, which adds the member, gets one in)."""
        ...

    async def unbar(self, group: str, user: str) -> None:
        """Lift ``user``'s bar from ``group`` (an invitation); nothing if there is none."""
        ...

    async def barred(self, group: str, user: str) -> bool:
        """True if ``user``, or :data:`EVERYONE`, is barred from joining ``group``."""
        ...


@runtime_checkable
class ReceiptStore(Protocol):
    """Read receipts: per (conv, user) the highest seq read; only moves forward."""

    async def mark_read(self, conv: str, user: str, seq: int) -> bool:
        """True if the receipt moved forward."""
        ...

    async def read_up_to(self, conv: str) -> dict[str, int]:
        """user -> highest seq read in ``conv``."""
        ...


@runtime_checkable
class Registry(Protocol):
    """Where each online device is connected: (user, device) -> gateway address."""

    async def register(self, user: str, device: str, gateway: str) -> None: ...

    async def unregister(self, user: str, device: str, gateway: str) -> None:
        """Remove the entry only if it still points at ``gateway``."""
        ...

    async def lookup(self, user: str) -> dict[str, str]:
        """device -> gateway for every online device of ``user``."""
        ...


@runtime_checkable
class SyncFastPath(Protocol):
    """Optional: synchronous twins of ``reserve``, ``advance`` and ``mark_read`` (embedded stores).

    A store whose ``reserve``, ``advance`` and ``mark_read`` never wait (memory, SQLite) may
    offer them as plain calls too, so the router can take a send or an ack in
    the call that decoded its frame instead of in a task of its own.  Each
    promises exactly what its coroutine twin promises, and the two share one
    state: calling either is the same step.
    """

    def reserve_now(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        """:meth:`SequenceStore.reserve`, synchronously."""
        ...

    def advance_now(self, user: str, device: str, conv: str, seq: int) -> int:
        """:meth:`CursorStore.advance`, synchronously."""
        ...

    def mark_read_now(self, conv: str, user: str, seq: int) -> bool:
        """:meth:`ReceiptStore.mark_read`, synchronously."""
        ...

    def advance_blind_now(self, user: str, device: str, conv: str, seq: int) -> int:
        """:meth:`advance_now` for a caller that needs no exact answer (a cast ack).

        The cursor moves exactly as :meth:`advance_now` moves it (up to ``seq``,
        never back), but a store may skip reading a cursor it does not hold in
        memory.  Returns a lower bound of the cursor now, at least ``seq``; every
        later read of the cursor returns its exact value.
        """
        ...

    def advance_own_now(self, user: str, device: str, conv: str, seqs: list[int]) -> int:
        """Move the device's cursor through its own entries ``seqs`` (ascending) just above it.

        A device that had everything before its own entry has everything up to
        it: the cursor steps onto each own entry directly above it, and stops at
        the first gap (an entry the device never got).  Returns the cursor now.
        Part of the same cursor state as ``advance``.
        """
        ...


def own_run_end(cursor: int, seqs: list[int]) -> int:
    """The cursor after stepping onto each of a device's own entries (ascending) right above it.

    Stops at the first gap: an entry above the cursor that is not the device's
    own and that it has not acknowledged.
    """
    for seq in seqs:
        if seq == cursor + 1:
            cursor = seq
        elif seq > cursor:
            break
    return cursor


async def until_fewer_than(batch: int, delete: Callable[[], Awaitable[int]]) -> int:
    """Run ``delete`` (one batched clean-up step) until it deletes fewer than
    ``batch`` rows, letting other work run in between; returns the rows deleted."""
    total = 0
    while True:
        deleted = await delete()
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(0)


def sync_twin(store: Any, name: str) -> Any:
    """``store.<name>_now`` (:class:`SyncFastPath`) if it is the step ``store.<name>`` runs.

    The twin counts only where the class that defines ``<name>_now`` also
    defines the ``<name>`` in use, and the instance has not replaced it: a
    subclass or wrapper that overrides ``reserve`` (a test double, a store
    adding a check) is never bypassed by an inherited twin, and a delegating
    wrapper (``CompositeStore``) offers none.  (``isinstance(store,
    SyncFastPath)`` cannot tell: it only looks for the names.)  None: use the
    coroutine.
    """
    cls = type(store)
    twin = f"{name}_now"
    owner = next((c for c in cls.__mro__ if twin in vars(c)), None)
    if owner is None or name in getattr(store, "__dict__", {}):
        return None
    if vars(owner).get(name) is not getattr(cls, name, None):
        return None
    return getattr(store, twin)


def variant_of(store: Any, fast_path: Any, name: str) -> Any:
    """``store.<name>``, a variant of the sync twin ``fast_path``, if one class defines both.

    A subclass that replaces the twin (a test double counting moves) is never
    bypassed by a variant it inherited.  None: use ``fast_path``.
    """
    if fast_path is None:
        return None
    cls = type(store)
    owner = next((c for c in cls.__mro__ if name in vars(c)), None)
    twin_owner = next((c for c in cls.__mro__ if fast_path.__name__ in vars(c)), None)
    return getattr(store, name) if owner is not None and owner is twin_owner else None


class Store(MessageLog, SequenceStore, CursorStore, GroupStore, ReceiptStore, Protocol):
    """Everything the embedded node keeps, in one object."""

    async def close(self) -> None: ...
