"""Message routing: dedup, sequencing, durability, then delivery.

:class:`Router` is the im-service's brain; the embedded node calls it in
process, the distributed gateway over the internal link.  Guarantees:

* **Durable before acknowledged**: :meth:`Router.send` returns (and the
  gateway acknowledges the sender) only after the store's ``append``
  returned.  A failed append answers ``unavailable`` and undoes the
  reservation, so the client may retry the same ``cmid``.
* **Once**: the same (sender, cmid) always yields the same ``msg_id`` and
  ``seq``; a retry never creates a second message, also while the first is
  still being written.
* **Order**: a conversation's reservations are made one at a time, each
  entry queued for the store before the next seq is asked for; appends run
  one batch at a time in that order, and deliveries are handed to the
  :class:`Pusher` after each batch commits, so every conversation's pushes
  leave this process in seq order.
* **Membership**: sends to a group, reads and acks are checked against the
  current membership; a removed member neither sends nor receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NamedTuple, Protocol

import orjson

from imfast.backends.base import (
    KIND_EVENT,
    KIND_MESSAGE,
    KIND_RECALL,
    Store,
    StoredMessage,
    sync_twin,
    variant_of,
)
from imfast.config import Settings
from imfast.protocol.codes import ImfastError
from imfast.protocol.ids import conv_members_private, group_conv, parse_conv, private_conv
from imfast.service.cursors import CursorBatcher
from imfast.service.members import MembersCache

__all__ = ["OWN_CURSOR_DELAY", "GroupCommitter", "MsgIdGenerator", "Pusher", "Router", "SendResult",
           "settle"]

log = logging.getLogger("imfast.service")

_ROLE_RANK = {"owner": 3, "admin": 2, "member": 1}
_ABANDONED_AFTER = 30.0  # seconds after which a reserved, never stored entry is given up
_TURN_WAIT = 1.0  # seconds a send waits for its conversation's previous reservation
_COMMITTED_MEMORY = 200_000  # conversations whose latest stored seq the router remembers
#: Seconds within which a sender's cursor moves past its own entries (batched, like the
#: gateway's own-message acks it replaces).
OWN_CURSOR_DELAY = 1.0
_OWN_SLICE = 256  # devices whose own entries are moved per loop iteration


class Pusher(Protocol):
    """Where the router hands deliveries (the gateways)."""

    def deliver(self, users: Iterable[str], message: StoredMessage,
                skip: tuple[str, str] | None) -> None:
        """Push a stored message to every online device of ``users`` except ``skip``."""

    def event(self, users: Iterable[str], payload: dict[str, Any],
              skip: tuple[str, str] | None) -> None:
        """Push a droppable event (typing, receipt, presence) to online devices."""


class SendResult(NamedTuple):
    """What the sender is acknowledged with (immutable; a named tuple: one per message)."""

    msg_id: str
    conv: str
    seq: int
    ts: int
    duplicate: bool


def _reserved_at(msg_id: str) -> float:
    """When ``msg_id`` was made (seconds since the epoch; MsgIdGenerator's first 11 hex
    digits are its milliseconds), or now if it is not one of ours."""
    try:
        return int(msg_id[:11], 16) / 1000.0
    except ValueError:
        return time.time()


class MsgIdGenerator:
    """Unique, roughly time-ordered message ids: ms time, process tag, counter."""

    __slots__ = ("_counter", "_tag")

    def __init__(self) -> None:
        self._tag = os.urandom(3).hex()
        self._counter = itertools.count()

    def __call__(self, ts_ms: int) -> str:
        return f"{ts_ms:011x}{self._tag}{next(self._counter) & 0xFFFFFF:06x}"


#: Told once what became of a submitted entry: (None, None) stored; (original, None)
#: already stored under its cmid; (None, error) not stored.
Stored = Callable[[StoredMessage | None, BaseException | None], None]

#: What a send's submitter is told, exactly once: (result, None) or (None, error).
SendReply = Callable[["SendResult | None", BaseException | None], None]


def settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    """A :data:`Stored` or :data:`SendReply` callback that resolves ``fut`` once.

    Used by GroupCommitter.submit (value: the original message or None) and
    Router.submit_entry (value: the SendResult).
    """
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _already_exists(exc: BaseException) -> bool:
    """The store refused a batch because one of its (conv, seq) is stored already."""
    return isinstance(exc, ValueError) and "already exists" in str(exc)


def _tell(done: Stored, original: StoredMessage | None, exc: BaseException | None) -> None:
    """Run one submitter's callback; its failure is logged, never the batch's."""
    try:
        done(original, exc)
    except Exception:
        log.exception("a stored-entry callback failed")


#: How long a committed batch's senders wait for its pushes to leave before they are
#: answered anyway (the entries are stored: recipients get them on their next sync).
_ROUTED_WAIT = 10.0


class GroupCommitter:
    """Appends submitted messages in batches, one batch in flight at a time.

    ``submit`` returns a future that resolves once the message is durable (or
    fails with the store's error); ``submit_with`` calls a :data:`Stored`
    callback instead (no future: the router's per-message path).  Either is
    told exactly once.  ``on_commit`` runs for every committed batch, in
    order, before its submitters are told.
    """

    def __init__(self, store: Store, on_commit: Any, max_batch: int = 512,
                 routed: Any = None) -> None:
        from imfast.gateway.metrics import Histogram

        self._routed = routed  # () -> awaitable done when the pushes so far have left

        self.commit_time = Histogram()  # one store append (a whole batch)
        self._store = store
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._pending: list[tuple[StoredMessage, Stored]] = []
        self._task: asyncio.Task[None] | None = None
        #: A store that can append in the calling thread without waiting (SQLite's entry
        #: log): batches are committed by a plain callback, not a task (see _run_now).
        self._append_now = getattr(store, "append_now", None)
        self._now_scheduled = False
        self.batches = 0

    def submit(self, message: StoredMessage) -> asyncio.Future[Any]:
        """A future resolving to None once stored, or to the already stored original."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit_with(message, partial(settle, fut))
        return fut

    def submit_with(self, message: StoredMessage, done: Stored) -> None:
        """Queue ``message``; ``done`` is called once it is stored or refused (see Stored)."""
        self._pending.append((message, done))
        if self._task is None and not self._now_scheduled:
            if self._append_now is not None:
                # At the end of this loop iteration, like _run's first yield: every
                # send read in this iteration joins the batch.
                self._now_scheduled = True
                asyncio.get_running_loop().call_soon(self._run_now)
            else:
                self._task = asyncio.get_running_loop().create_task(self._run())

    def _run_now(self) -> None:
        """:meth:`_run` as one callback (the store appends without waiting).

        The same batches, order and answers, with no task and no extra loop
        iterations.  A batch the store cannot take now (its mover is behind, or
        an entry already exists and needs the repair) goes back to the front of
        the queue and :meth:`_run` takes over.
        """
        self._now_scheduled = False
        append_now = self._append_now
        assert append_now is not None
        while self._pending and self._task is None:
            batch, messages = self._take_batch()
            started = time.monotonic()
            try:
                stored = append_now(messages)
            except Exception as exc:  # noqa: BLE001 - every submitter learns the failure
                if not _already_exists(exc):
                    self._failed(batch, exc)
                    continue
                stored = False
            if not stored:
                self._pending[:0] = batch
                self._task = asyncio.get_running_loop().create_task(self._run())
                return
            self._committed(batch, messages, started)

    async def _run(self) -> None:
        try:
            # Yield once so every send arriving in this loop iteration joins the batch.
            await asyncio.sleep(0)
            while self._pending:
                batch, messages = self._take_batch()
                started = time.monotonic()
                try:
                    await self._store.append(messages)
                except Exception as exc:  # noqa: BLE001 - every future learns the failure
                    if _already_exists(exc):
                        await self._repair({m.conv for m in messages})
                        await self._one_by_one(batch)
                    else:
                        self._failed(batch, exc)
                    continue
                self._committed(batch, messages, started)
        finally:
            self._task = None
            if self._pending:  # raced in after the loop ended
                self._task = asyncio.get_running_loop().create_task(self._run())

    def _take_batch(self) -> tuple[list[tuple[StoredMessage, Stored]], list[StoredMessage]]:
        """The next batch off the queue (at most ``max_batch``), and its messages."""
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        return batch, [m for m, _ in batch]

    def _committed(self, batch: list[tuple[StoredMessage, Stored]],
                   messages: list[StoredMessage], started: float) -> None:
        """A batch is durable: count it, route it (``on_commit``), tell its submitters."""
        self.commit_time.observe(time.monotonic() - started)
        self.batches += 1
        try:
            self._on_commit(messages)
        finally:
            self._resolve(batch)

    @staticmethod
    def _failed(batch: list[tuple[StoredMessage, Stored]], exc: BaseException) -> None:
        for _, done in batch:
            _tell(done, None, exc)

    def _resolve(self, batch: list[tuple[StoredMessage, Stored]]) -> None:
        """Tell the senders: once the batch's pushes have left (``routed`` awaitable).

        Waiting for the pushes means an acknowledged message was also handed to
        the gateways' sockets: if this process dies before that, the sender gets
        no ack, retries, and the retry (a duplicate) routes it again.  The wait
        runs beside the next commits, never in front of them.
        """
        waiter = self._routed() if self._routed is not None else None
        if waiter is None or waiter.done():
            for _, done in batch:
                try:  # inline _tell: this runs for every message
                    done(None, None)
                except Exception:
                    log.exception("a stored-entry callback failed")
            return
        # Callbacks, not a task per batch: a timer bounds the wait, the first to fire tells.
        told = False

        def tell(timed_out: bool) -> None:
            nonlocal told
            if told:
                return
            told = True
            if timed_out:  # stored anyway: clients sync; ack regardless
                log.warning("route failed: pushes for a committed batch did not finish")
            else:
                timer.cancel()
            for _, done in batch:
                _tell(done, None, None)

        timer = asyncio.get_running_loop().call_later(_ROUTED_WAIT, tell, True)
        waiter.add_done_callback(lambda _: tell(False))

    async def _one_by_one(self, batch: list[tuple[StoredMessage, Stored]]) -> None:
        """After a refused batch, store its entries singly so one bad entry fails alone.

        An entry refused because its (sender, cmid) is already in the log - the
        dedup memory lost it, e.g. Redis was flushed - resolves to the stored
        original instead: the client is answered as for any duplicate.
        """
        committed = []
        for message, done in batch:
            try:
                await self._store.append([message])
            except ValueError as exc:
                original = (await self._store.find_by_cmid(message.sender, message.cmid)
                            if message.cmid else None)
                if original is not None and original.msg_id != message.msg_id:
                    _tell(done, original, None)
                else:
                    _tell(done, None, exc)
                continue
            except Exception as exc:  # noqa: BLE001
                _tell(done, None, exc)
                continue
            committed.append((message, done))
        if committed:
            self.batches += 1
            try:
                self._on_commit([m for m, _ in committed])
            finally:
                self._resolve(committed)

    async def _repair(self, convs: set[str]) -> None:
        """The counter fell behind the log (e.g. Redis lost data): move it past the log."""
        for conv in sorted(convs):
            try:
                floor = await self._store.latest_seq(conv)
                await self._store.repair(conv, floor)
                log.error("sequence number already exists conv=%s: counter repaired to %s",
                          conv, floor)
            except Exception:
                log.exception("sequence repair failed conv=%s", conv)


def _check_group_sender(user: str, members: dict[str, str]) -> None:
    """Refuse a group send by ``user`` unless it is one of ``members``."""
    if user not in members:
        raise ImfastError("not a member of this group", field="group", code="forbidden")


class Router:
    """Implements every client operation that touches shared state."""

    def __init__(self, settings: Settings, store: Store, pusher: Pusher) -> None:
        self.settings = settings
        self.store = store
        self.pusher = pusher
        self._ids = MsgIdGenerator()
        self._committer = GroupCommitter(store, self._route_committed,
                                         routed=getattr(pusher, "routed_all", None))
        #: dedup key -> None while its entry is being stored; a retry of it that wants
        #: to wait puts a future there (see submit_entry), set once the first attempt ends.
        self._inflight: dict[str, asyncio.Future[None] | None] = {}
        self._conv_turns: dict[str, asyncio.Future[None]] = {}  # see submit_entry
        #: conv -> highest seq this process stored: an ack at or below it needs no read.
        self._committed: dict[str, int] = {}
        self._cursor_batcher = (CursorBatcher(store) if callable(
            getattr(store, "advance_many", None)) else None)
        # Synchronous twins of an embedded store (send_now / ack_now); None: use the coroutines.
        self._reserve_now = sync_twin(store, "reserve")
        self._advance_now = (sync_twin(store, "advance") if self._cursor_batcher is None
                             and getattr(store, "clear_offline", None) is None else None)
        self._mark_read_now = sync_twin(store, "mark_read")
        #: An ack nobody waits to hear the cursor of: moved without a read where it can be.
        self._advance_blind_now = variant_of(store, self._advance_now, "advance_blind_now")
        #: Moves a sender's cursor past its own entries (see moves_own_cursors).
        self._advance_own_now = (getattr(store, "advance_own_now", None)
                                 if self._advance_now is not None else None)
        #: (sender, device) -> conv -> its own entries stored since the last move (ascending).
        self._own_entries: dict[tuple[str, str], dict[str, list[int]]] = {}
        #: Earlier batches being moved a slice per loop iteration, oldest first.
        self._own_moving: list[dict[tuple[str, str], dict[str, list[int]]]] = []
        self._own_timer: asyncio.TimerHandle | None = None
        self._members_cache = MembersCache()
        #: conv -> its committed entries waiting to be routed behind a members read, in
        #: commit order (see _route_late).
        self._late: dict[str, list[StoredMessage]] = {}
        self.sent_total = 0
        self.duplicates_total = 0
        #: (metric name, help, Histogram) exposed by whoever serves /metrics for this router.
        self.histograms = [("im_service_store_commit_duration_seconds",
                            "One group commit of entries to the durable store",
                            self._committer.commit_time)]

    def store_gauges(self) -> list[tuple[str, str, str, int]]:
        """The store's live gauges, for /stats and /metrics: (stats key, metric name,
        help, value); none for a store without an entry log (memory, MySQL)."""
        gauges = getattr(self.store, "gauges", None)
        return [] if gauges is None else list(gauges())

    # ---------------------------------------------------------------- helpers
    async def group_members(self, group: str) -> dict[str, str]:
        """user -> role, cached until membership changes."""
        cache = self._members_cache
        members = cache.get(group)
        if members is None:
            cache.reading(group)
            try:
                members = await self.store.members(group)
            except BaseException:
                cache.read_failed(group)
                raise
            cache.put(group, members)
        return members

    async def conversation_users(self, user: str, conv: str) -> list[str]:
        """Members of ``conv`` if ``user`` is one of them, else ``forbidden``."""
        users = self._members_now(user, conv)
        if users is not None:
            return users
        parsed = parse_conv(conv)  # a group whose members are not cached (a bad id raised)
        assert parsed is not None
        members = await self.group_members(parsed[1][0])
        if user not in members:
            raise ImfastError("not a member of this group", field="conv", code="forbidden")
        return list(members)

    def _members_now(self, user: str, conv: str) -> list[str] | None:
        """:meth:`conversation_users` in this call, raising the same errors; None only for
        a group whose members are not cached (they need a read)."""
        parsed = parse_conv(conv)
        if parsed is None:
            raise ImfastError("bad conversation id", field="conv", code="bad_request")
        kind, ids = parsed
        if kind == "p":
            if user not in ids:
                raise ImfastError("no such conversation", field="conv", code="not_found")
            return list(dict.fromkeys(ids))
        if not self.settings.feature_enabled("groups"):
            raise ImfastError("groups are switched off", code="feature_disabled")
        members = self._members_cache.get(ids[0])
        if members is None:
            return None
        if user not in members:
            raise ImfastError("not a member of this group", field="conv", code="forbidden")
        return list(members)

    @property
    def moves_own_cursors(self) -> bool:
        """True: this router moves a sending device's cursor past its own entries.

        Batched, within :data:`OWN_CURSOR_DELAY` of the commit (and by
        :meth:`move_own_cursors` at shutdown); an entry is passed only if the
        device had every entry before it - the cursor stood right below it - as
        the gateway's own-message ack would move it, and a gateway in front of
        this router sends no such ack.  False (a store without
        ``advance_own_now``, e.g. im-service's): the gateway acks its own
        messages itself.
        """
        return self._advance_own_now is not None

    def move_own_cursors(self) -> None:
        """Move the cursors past every own entry stored so far, now (see above)."""
        if self._own_timer is not None:
            self._own_timer.cancel()
            self._own_timer = None
        self._own_moving.append(self._own_entries)
        self._own_entries = {}
        self._move_own_slice(everything=True)

    def _own_batch_due(self) -> None:
        """The batch's time: moved :data:`_OWN_SLICE` devices per loop iteration."""
        self._own_timer = None
        self._own_moving.append(self._own_entries)
        self._own_entries = {}
        if len(self._own_moving) == 1:  # else the slices under way take it
            self._move_own_slice()

    def _move_own_slice(self, everything: bool = False) -> None:
        # In slices: one batch holds every device that sent in the last second, and
        # moving them at once would hold every other message up for that long.
        moving = self._own_moving
        left = None if everything else _OWN_SLICE
        while moving and (left is None or left > 0):
            batch = moving[0]
            while batch and (left is None or left > 0):
                (user, device), convs = batch.popitem()  # devices in any order, each's in turn
                self._move_own(user, device, convs)
                if left is not None:
                    left -= 1
            if not batch:
                moving.pop(0)  # a device's older entries are always moved before its newer
        if moving:
            asyncio.get_running_loop().call_soon(self._move_own_slice)

    def _move_own(self, user: str, device: str, convs: dict[str, list[int]]) -> None:
        advance_own = self._advance_own_now
        assert advance_own is not None  # entries are only kept for a store that has it
        for conv, seqs in convs.items():
            try:
                advance_own(user, device, conv, seqs)
            except Exception:  # a cursor left behind costs a re-push on resume, never a loss
                log.exception("moving %s/%s's cursor past its own entries in %s failed",
                              user, device, conv)

    def _route_committed(self, messages: list[StoredMessage]) -> None:
        """Runs right after a batch is durable, in commit order."""
        committed = self._committed
        if len(committed) > _COMMITTED_MEMORY:
            committed.clear()  # only a shortcut: acks beyond it read the store
        for m in messages:
            if m.seq > committed.get(m.conv, 0):
                committed[m.conv] = m.seq
        if self._advance_own_now is not None:
            # Batched: a busy conversation costs one cursor lookup a second, not one per
            # message.  Commit order keeps each list ascending.
            own = self._own_entries
            for m in messages:
                if m.sender_device:
                    key = (m.sender, m.sender_device)
                    convs = own.get(key)
                    if convs is None:
                        own[key] = {m.conv: [m.seq]}
                    else:
                        seqs = convs.get(m.conv)
                        if seqs is None:
                            convs[m.conv] = [m.seq]
                        else:
                            seqs.append(m.seq)
            if own and self._own_timer is None:
                self._own_timer = asyncio.get_running_loop().call_later(
                    OWN_CURSOR_DELAY, self._own_batch_due)
        if self.settings.route_all_offline:
            return  # emergency switch: clients get everything by sync instead
        for m in messages:
            pair = conv_members_private(m.conv)
            if pair is not None:
                users: Iterable[str] = dict.fromkeys(pair)
            else:
                late = self._late.get(m.conv)
                if late is not None:
                    late.append(m)  # behind an earlier entry's members read: in order
                    continue
                members = self._members_cache.get(m.conv[2:])
                if members is None:
                    # Membership changed while this entry was being stored: look it up,
                    # then push.  Later entries of the conversation wait behind it: a
                    # session that has pushed nothing there takes its first entry as
                    # the next after the device's cursor, so no entry may overtake.
                    self._late[m.conv] = [m]
                    asyncio.get_running_loop().create_task(self._route_late(m.conv))
                    continue
                users = list(members)
                if m.kind == KIND_EVENT:
                    # Removed members learn of their removal too.
                    extra = orjson.loads(m.body).get("users", [])
                    users = list(dict.fromkeys([*users, *extra]))
            try:
                self.pusher.deliver(users, m, (m.sender, m.sender_device))
            except Exception:
                log.exception("route failed: push to gateway failed conv=%s seq=%s", m.conv, m.seq)

    async def _route_late(self, conv: str) -> None:
        """Route ``conv``'s waiting entries in commit order, each with the members as
        they are when it goes (entries committed meanwhile join the queue).  A members
        read that fails is tried again (the entries are stored: they must go out, and
        nothing may overtake them)."""
        late = self._late[conv]
        backoff = 0.1
        try:
            while late:
                m = late[0]
                try:
                    users = list(await self.group_members(conv[2:]))
                except Exception as exc:  # noqa: BLE001 - the store is unreachable: wait
                    log.warning("route delayed: group members unreadable conv=%s entries=%d: "
                                "%s; trying again in %.1fs", conv, len(late), exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if m.kind == KIND_EVENT:
                    users = list(dict.fromkeys([*users,
                                                *orjson.loads(m.body).get("users", [])]))
                late.pop(0)
                try:
                    self.pusher.deliver(users, m, (m.sender, m.sender_device))
                except Exception:
                    log.exception("route failed: push to gateway failed conv=%s seq=%s",
                                  conv, m.seq)
        finally:
            del self._late[conv]

    async def submit_entry(self, conv: str, sender: str, device: str, cmid: str, body: str,
                           kind: str) -> SendResult | asyncio.Future[SendResult]:
        """Reserve a seq for one entry and queue it for storage.

        Returns the :class:`SendResult` at once for a duplicate of an entry
        already stored; otherwise a future that resolves to it once the entry
        is durable and routed, or fails with ``unavailable`` if the store
        refused it (the reservation is then undone).
        Callers may submit the next entry before this one is durable:
        reservations keep their order, and commits follow it.
        """
        dedup_key = f"{sender}:{cmid}" if cmid else ""
        if dedup_key and dedup_key in self._inflight:
            # A retry while the first attempt is being stored: wait for it to end. It
            # then either is stored (this one is its duplicate) or failed and was
            # undone (this one may proceed).
            waiter = self._inflight[dedup_key]
            if waiter is None:
                waiter = self._inflight[dedup_key] = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)
        ts = int(time.time() * 1000)
        msg_id = self._ids(ts)
        # One reservation per conversation at a time, each submitted to the committer
        # before the next is asked for: a networked counter (a Redis pool) may answer
        # concurrent calls out of order, and an entry routed after a higher seq of its
        # conversation would look like a duplicate to the gateway and never be pushed.
        # A turn is waited for at most _TURN_WAIT: behind a reservation stuck on a slow
        # store, senders are answered `unavailable` at once (they retry the same cmid)
        # instead of queueing - a queue that grows faster than a dead link times out.
        previous = self._conv_turns.get(conv)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._conv_turns[conv] = turn

        def release(_: object = None) -> None:
            if not turn.done():
                turn.set_result(None)
            if self._conv_turns.get(conv) is turn:
                del self._conv_turns[conv]

        try:
            if previous is not None and not previous.done():
                try:
                    await asyncio.wait_for(asyncio.shield(previous), _TURN_WAIT)
                except TimeoutError:
                    raise ImfastError("the sequence store is slow for this conversation; "
                                      "retry the same cmid", code="unavailable") from None
            try:
                res = await self.store.reserve(conv, dedup_key or msg_id, msg_id, 0)
            except Exception:
                if dedup_key:
                    # The reply may be what was lost: the store may hold a reservation
                    # nobody will ever write, and every retry of this cmid would be told
                    # "still being stored". Forget it (the log's unique cmid key still
                    # catches a real duplicate); the seq becomes a gap.
                    self._forget_reservation(conv, dedup_key)
                raise
            if not res.duplicate:
                outcome: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
                self._queue(conv, res.seq, msg_id, sender, device, cmid, body, ts, kind,
                            dedup_key, partial(settle, outcome))
        finally:
            if previous is not None and not previous.done():
                # Gave up waiting (or was cancelled): whoever waits for us now waits
                # for the stuck one, so no reservation overtakes it.
                previous.add_done_callback(release)
            else:
                release()
        if res.duplicate:
            self.duplicates_total += 1
            log.info("duplicate message detected dedup_key=%s user_id=%s msg_id=%s seq=%s",
                     dedup_key, sender, res.msg_id, res.seq)
            original = await self.store.get(conv, res.seq)
            if original is None or original.msg_id != res.msg_id:
                if _reserved_at(res.msg_id) < time.time() - _ABANDONED_AFTER:
                    # Reserved long ago and never stored: an attempt that died between
                    # reserving and storing. Forget it; the client's next retry stores.
                    log.warning("abandoned reservation dedup_key=%s seq=%s: released",
                                dedup_key, res.seq)
                    self._forget_reservation(conv, dedup_key or res.msg_id)
                # Reserved but not (yet) stored: the client retries later.
                raise ImfastError("message is still being stored; retry", code="unavailable")
            # Route it again: if the first attempt died between storing and pushing (a
            # crashed im-service), this retry is what gets it to online devices now.
            # Sessions drop seqs they already have, so a second push is harmless.
            self._route_committed([original])
            return SendResult(original.msg_id, conv, original.seq, original.ts, True)
        return outcome

    def _queue(self, conv: str, seq: int, msg_id: str, sender: str, device: str, cmid: str,
               body: str, ts: int, kind: str, dedup_key: str, reply: SendReply) -> None:
        """Submit a reserved entry to the committer; ``reply`` learns its outcome once.

        While it is being stored its dedup key is in ``_inflight``: a retry of
        the same cmid waits for this attempt instead of racing it.
        """
        if dedup_key:
            self._inflight[dedup_key] = None
        self._committer.submit_with(
            StoredMessage(conv, seq, msg_id, sender, device, cmid, body, ts, kind),
            partial(self._stored, conv, seq, msg_id, ts, sender, dedup_key, reply))

    def _stored(self, conv: str, seq: int, msg_id: str, ts: int, sender: str, dedup_key: str,
                reply: SendReply, original: StoredMessage | None,
                exc: BaseException | None) -> None:
        """The committer's answer for one entry (see GroupCommitter's Stored)."""
        waiter = self._inflight.pop(dedup_key, None) if dedup_key else None
        try:
            if exc is None and original is not None:
                # Already stored under this cmid (the dedup memory had lost it): answer
                # with the original, route it again, forget the wasted reservation.
                self.duplicates_total += 1
                log.info("duplicate message detected dedup_key=%s user_id=%s msg_id=%s seq=%s "
                         "(found in the log)", dedup_key, sender, original.msg_id, original.seq)
                asyncio.get_running_loop().create_task(self.store.release(conv, dedup_key))
                self._route_committed([original])
                reply(SendResult(original.msg_id, original.conv, original.seq, original.ts,
                                 True), None)
            elif exc is None:
                self.sent_total += 1
                reply(SendResult(msg_id, conv, seq, ts, False), None)
            else:
                log.error("route failed: could not store message user_id=%s conv=%s: %s",
                          sender, conv, exc)
                # Released before any waiting retry runs (tasks start in creation order).
                asyncio.get_running_loop().create_task(
                    self.store.release(conv, dedup_key or msg_id))
                reply(None, ImfastError("message store unavailable; retry the same cmid",
                                        code="unavailable"))
        finally:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _forget_reservation(self, conv: str, dedup_key: str) -> None:
        """Release ``dedup_key`` in the background, retrying while the store is away."""
        async def release() -> None:
            for delay in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
                await asyncio.sleep(delay)
                try:
                    await self.store.release(conv, dedup_key)
                    return
                except Exception as exc:  # noqa: BLE001 - the store is still away: try again
                    log.info("releasing reservation dedup_key=%s failed (%s); retrying",
                             dedup_key, exc)
            log.error("could not release reservation dedup_key=%s; it expires with its TTL",
                      dedup_key)

        asyncio.get_running_loop().create_task(release())

    async def _append_entry(self, conv: str, sender: str, device: str, cmid: str, body: str,
                            kind: str) -> SendResult:
        """Submit one entry and wait until it is durable."""
        pending = await self.submit_entry(conv, sender, device, cmid, body, kind)
        if isinstance(pending, SendResult):
            return pending
        return await pending

    # ------------------------------------------------------------- operations
    async def submit_send(self, user: str, device: str, cmid: str, to: str | None,
                          group: str | None, body: str
                          ) -> SendResult | asyncio.Future[SendResult]:
        """Check and reserve a chat message; see :meth:`submit_entry`."""
        if to is not None:
            conv = private_conv(user, to)
        else:
            assert group is not None
            if not self.settings.feature_enabled("groups"):
                raise ImfastError("groups are switched off", code="feature_disabled")
            _check_group_sender(user, await self.group_members(group))
            conv = group_conv(group)
        return await self.submit_entry(conv, user, device, cmid, body, KIND_MESSAGE)

    def send_now(self, user: str, device: str, cmid: str, to: str, body: str,
                 reply: SendReply) -> bool:
        """:meth:`submit_send` of a private message in this call, when nothing has to wait.

        Only with a store offering ``reserve_now`` (embedded).  Returns False,
        having changed nothing, when the send needs the coroutine: a retry of
        a cmid still being stored, a reservation of this conversation under
        way, or a duplicate (answered from the log).  Otherwise the entry is
        reserved and queued exactly as :meth:`submit_entry` does it - same
        order, dedup and durability - and ``reply`` is called once, later: with
        the :class:`SendResult` once the entry is durable and routed, or with
        ``unavailable`` if the store refused it.  A failing reservation raises,
        as :meth:`submit_send` does.
        """
        return self._take_send_now(private_conv(user, to), user, device, cmid, body, reply)

    def send_group_now(self, user: str, device: str, cmid: str, group: str, body: str,
                       reply: SendReply) -> bool:
        """:meth:`send_now` for a group message, when the group's members are cached.

        Raises what :meth:`submit_send` raises for a sender who is not a member;
        anything that needs a read (members not cached) or an answer from the
        coroutine (groups switched off) returns False, having changed nothing.
        """
        if not self.settings.feature_enabled("groups"):
            return False
        members = self._members_cache.get(group)
        if members is None:
            return False
        _check_group_sender(user, members)
        return self._take_send_now(group_conv(group), user, device, cmid, body, reply)

    def _take_send_now(self, conv: str, user: str, device: str, cmid: str, body: str,
                       reply: SendReply) -> bool:
        """The reservation and queueing shared by :meth:`send_now` and :meth:`send_group_now`."""
        reserve_now = self._reserve_now
        if reserve_now is None:
            return False
        dedup_key = f"{user}:{cmid}" if cmid else ""
        if (dedup_key and dedup_key in self._inflight) or conv in self._conv_turns:
            return False
        ts = int(time.time() * 1000)
        msg_id = self._ids(ts)
        try:
            res = reserve_now(conv, dedup_key or msg_id, msg_id, 0)
        except Exception:
            if dedup_key:
                self._forget_reservation(conv, dedup_key)  # as submit_entry does
            raise
        if res.duplicate:
            return False  # a duplicate reservation changed nothing: submit_entry answers it
        self._queue(conv, res.seq, msg_id, user, device, cmid, body, ts, KIND_MESSAGE,
                    dedup_key, reply)
        return True

    async def send(self, user: str, device: str, cmid: str, to: str | None,
                   group: str | None, body: str) -> SendResult:
        """Store a chat message and route it; returns once durable."""
        pending = await self.submit_send(user, device, cmid, to, group, body)
        if isinstance(pending, SendResult):
            return pending
        return await pending

    async def ack(self, user: str, device: str, conv: str, seq: int) -> int:
        """Advance the device's delivery cursor; returns the cursor now."""
        await self.conversation_users(user, conv)
        await self._check_seq_exists(conv, seq)
        if self._cursor_batcher is not None:
            return await self._cursor_batcher.advance(user, device, conv, seq)
        cursor = await self.store.advance(user, device, conv, seq)
        clear_offline = getattr(self.store, "clear_offline", None)
        if clear_offline is not None:
            await clear_offline(user, conv, cursor)
        return cursor

    def ack_now(self, user: str, device: str, conv: str, seq: int,
                exact: bool = True) -> int | None:
        """:meth:`ack` in this call when it needs no read; None: use :meth:`ack`.

        Taken only with a store offering ``advance_now`` (embedded), for a
        member of ``conv`` (a private one, or a group whose members are cached)
        acknowledging a seq this process stored; the cursor moves exactly as
        :meth:`ack` moves it.  Anything else (an error to report, a read) is
        left to :meth:`ack`.  ``exact`` False (nobody is told the cursor): the
        store may move it without reading it, and the answer is only a lower
        bound of the cursor (at least ``seq``).
        """
        advance_now = self._advance_now
        if advance_now is None or seq > self._committed.get(conv, 0):
            return None
        parsed = parse_conv(conv)
        if parsed is None:
            return None
        kind, ids = parsed
        if kind == "p":
            if user not in ids:
                return None
        else:
            members = self._members_cache.get(ids[0])
            if members is None or user not in members or \
                    not self.settings.feature_enabled("groups"):
                return None
        if not exact and self._advance_blind_now is not None:
            advance_now = self._advance_blind_now
        cursor: int = advance_now(user, device, conv, seq)
        return cursor

    async def _check_seq_exists(self, conv: str, seq: int) -> None:
        """``bad_request`` if ``seq`` is beyond ``conv``'s latest entry."""
        if seq <= self._committed.get(conv, 0):
            return  # this process stored it: no read
        latest = await self.store.latest_seq(conv)
        if seq > latest:
            raise ImfastError(f"seq {seq} is beyond the latest ({latest})", field="seq",
                              code="bad_request")

    async def conversations(self, user: str) -> dict[str, int]:
        """Every conversation of ``user`` -> latest seq (for resume)."""
        convs = await self.store.private_conversations(user)
        if self.settings.feature_enabled("groups"):
            for g in await self.store.groups_of(user):
                conv = group_conv(g)
                convs[conv] = await self.store.latest_seq(conv)
        return convs

    async def resume_plan(self, user: str, device: str) -> list[tuple[str, int, int]]:
        """(conv, cursor, latest) for every conversation with unacknowledged entries.

        The pusher first learns the device's registration (``before_resume``):
        an entry stored after the plan is read is then pushed to the device,
        and one stored before is in the plan.
        """
        before_resume = getattr(self.pusher, "before_resume", None)
        if before_resume is not None:
            await before_resume(user)
        for batch in (*self._own_moving, self._own_entries):  # oldest first
            own = batch.pop((user, device), None)
            if own is not None:  # a device back within the batch: not handed its own entries
                self._move_own(user, device, own)
        cursors = await self.store.cursors(user, device)
        plan = []
        for conv, latest in (await self.conversations(user)).items():
            cursor = cursors.get(conv, 0)
            if latest > cursor:
                plan.append((conv, cursor, latest))
        plan.sort()
        return plan

    async def cursors(self, user: str, device: str) -> dict[str, int]:
        """conv -> the device's acknowledged seq."""
        return await self.store.cursors(user, device)

    async def cursor(self, user: str, device: str, conv: str) -> int:
        return (await self.store.cursors(user, device)).get(conv, 0)

    async def fetch(self, user: str, conv: str, after: int, limit: int) -> list[StoredMessage]:
        """Entries after ``after`` (for sync), membership checked, page capped."""
        await self.conversation_users(user, conv)
        return await self.store.fetch(conv, after, min(limit, self.settings.sync_page_max))

    async def history(self, user: str, conv: str, before: int | None, after: int | None,
                      limit: int) -> list[StoredMessage]:
        """A page of a conversation before or after a seq (newest page by default)."""
        if not self.settings.feature_enabled("history"):
            raise ImfastError("history is switched off", code="feature_disabled")
        await self.conversation_users(user, conv)
        limit = min(limit, self.settings.sync_page_max)
        if after is not None:
            return await self.store.fetch(conv, after, limit)
        return await self.store.fetch_before(conv, before if before is not None else 2**62, limit)

    async def read(self, user: str, device: str, conv: str, seq: int) -> bool:
        """Record a read receipt (forward only) and tell the other members."""
        if not self.settings.feature_enabled("receipts"):
            raise ImfastError("read receipts are switched off", code="feature_disabled")
        users = await self.conversation_users(user, conv)
        await self._check_seq_exists(conv, seq)
        moved = await self.store.mark_read(conv, user, seq)
        if moved:
            self._tell_receipt(users, user, device, conv, seq)
        return moved

    def read_now(self, user: str, device: str, conv: str, seq: int) -> bool:
        """:meth:`read` in this call when it needs no read, raising the same errors;
        False: not taken (use :meth:`read`)."""
        mark_read_now = self._mark_read_now
        if mark_read_now is None or seq > self._committed.get(conv, 0) or \
                not self.settings.feature_enabled("receipts"):
            return False
        users = self._members_now(user, conv)
        if users is None:
            return False
        if mark_read_now(conv, user, seq):
            self._tell_receipt(users, user, device, conv, seq)
        return True

    def _tell_receipt(self, users: list[str], user: str, device: str, conv: str,
                      seq: int) -> None:
        self.pusher.event(users, {"type": "receipt", "conv": conv, "user": user, "seq": seq},
                          (user, device))

    def typing_now(self, user: str, device: str, conv: str) -> bool:
        """:meth:`typing` in this call when it needs no read, raising the same errors;
        False: not taken (use :meth:`typing`)."""
        if not self.settings.feature_enabled("typing"):
            return False
        users = self._members_now(user, conv)
        if users is None:
            return False
        self._tell_typing(users, user, conv)
        return True

    async def receipts(self, user: str, conv: str) -> dict[str, int]:
        await self.conversation_users(user, conv)
        return await self.store.read_up_to(conv)

    async def typing(self, user: str, device: str, conv: str) -> None:
        """Tell the other members (droppable; never stored)."""
        if not self.settings.feature_enabled("typing"):
            raise ImfastError("typing indicators are switched off", code="feature_disabled")
        self._tell_typing(await self.conversation_users(user, conv), user, conv)

    def _tell_typing(self, users: list[str], user: str, conv: str) -> None:
        self.pusher.event([u for u in users if u != user],
                          {"type": "typing", "conv": conv, "user": user}, None)

    async def presence(self, user: str, online: bool) -> int:
        """Tell ``user``'s contacts (private-chat partners) that it came online or left.

        A droppable event; returns how many contacts were told (at most 500).
        """
        if not self.settings.feature_enabled("presence"):
            return 0
        contacts = []
        for conv in await self.store.private_conversations(user):
            pair = conv_members_private(conv)
            if pair is not None:
                other = pair[1] if pair[0] == user else pair[0]
                if other != user:
                    contacts.append(other)
        contacts = contacts[:500]
        if contacts:
            state = {"online": online, "last_seen": None if online else time.time()}
            self.pusher.event(contacts, {"type": "presence", "users": {user: state}}, None)
        return len(contacts)

    async def recall(self, user: str, device: str, conv: str, seq: int) -> SendResult:
        """Recall one's own message within the window: a ``recall`` entry follows it."""
        if not self.settings.feature_enabled("recall"):
            raise ImfastError("recall is switched off", code="feature_disabled")
        await self.conversation_users(user, conv)
        original = await self.store.get(conv, seq)
        if original is None or original.kind != KIND_MESSAGE or original.sender != user:
            raise ImfastError("no such message of yours", field="seq", code="not_found")
        if time.time() * 1000 - original.ts > self.settings.recall_window * 1000:
            raise ImfastError("too late to recall", code="recall_window_passed")
        return await self._append_entry(conv, user, device, f"recall:{original.msg_id}",
                                        str(seq), KIND_RECALL)

    # ------------------------------------------------------------------ groups
    async def _group_event(self, group: str, actor: str, device: str, event: str,
                           users: list[str], cmid: str = "") -> SendResult:
        body = orjson.dumps({"event": event, "group": group, "by": actor, "users": users}).decode()
        await self.group_members(group)  # warm the cache the commit-time routing reads
        return await self._append_entry(group_conv(group), actor, device, cmid, body, KIND_EVENT)

    def _check_groups_enabled(self) -> None:
        if not self.settings.feature_enabled("groups"):
            raise ImfastError("groups are switched off", code="feature_disabled")

    async def _role(self, group: str, user: str) -> str:
        role = (await self.group_members(group)).get(user)
        if role is None:
            raise ImfastError("not a member of this group", field="group", code="forbidden")
        return role

    async def group_create(self, user: str, device: str, group: str, name: str,
                           members: list[str], open: bool = True) -> dict[str, str]:
        """Create a group owned by ``user`` with initial ``members``.

        ``open``: anyone who knows the id may join it (``group_join``), but for a
        member an owner or admin removed; not ``open``: only an invitation gets
        anyone in.
        """
        self._check_groups_enabled()
        members = [m for m in dict.fromkeys(members) if m != user]
        if len(members) + 1 > self.settings.max_group_members:
            raise ImfastError(f"a group has at most {self.settings.max_group_members} members",
                              field="members", code="bad_request")
        if not await self.store.create(group, user, name or group, open):
            raise ImfastError("group id already taken", field="group", code="forbidden")
        for m in members:
            await self.store.set_member(group, m, "member")
        self._members_cache.forget(group)
        await self._group_event(group, user, device, "created", [user, *members])
        return await self.group_members(group)

    async def group_join(self, user: str, device: str, group: str) -> dict[str, str]:
        """Join an existing open group; ``forbidden`` for an invite-only one, or for a
        user an owner or admin removed (until invited again)."""
        self._check_groups_enabled()
        if await self.store.info(group) is None:
            raise ImfastError("no such group", field="group", code="not_found")
        members = await self.group_members(group)
        if user not in members:
            if await self.store.barred(group, user):
                raise ImfastError("joining this group needs an invitation from an owner or "
                                  "admin", field="group", code="forbidden")
            if len(members) >= self.settings.max_group_members:
                raise ImfastError("group is full", field="group", code="forbidden")
            await self.store.set_member(group, user, "member")
            self._members_cache.forget(group)
            await self._group_event(group, user, device, "joined", [user])
        return await self.group_members(group)

    async def group_invite(self, user: str, device: str, group: str,
                           users: list[str]) -> dict[str, str]:
        """Add users (owner/admin only)."""
        self._check_groups_enabled()
        if _ROLE_RANK[await self._role(group, user)] < _ROLE_RANK["admin"]:
            raise ImfastError("only owners and admins may invite", code="forbidden")
        members = await self.group_members(group)
        new = [u for u in dict.fromkeys(users) if u not in members]
        if len(members) + len(new) > self.settings.max_group_members:
            raise ImfastError("group would be too large", field="users", code="bad_request")
        for u in new:
            await self.store.unbar(group, u)  # removed earlier: may come and go again
            await self.store.set_member(group, u, "member")
        if new:
            self._members_cache.forget(group)
            await self._group_event(group, user, device, "invited", new)
        return await self.group_members(group)

    async def group_remove(self, user: str, device: str, group: str,
                           users: list[str]) -> dict[str, str]:
        """Remove members (owner/admin; nobody removes someone of equal or higher rank)."""
        self._check_groups_enabled()
        rank = _ROLE_RANK[await self._role(group, user)]
        if rank < _ROLE_RANK["admin"]:
            raise ImfastError("only owners and admins may remove members", code="forbidden")
        members = await self.group_members(group)
        gone = []
        for u in dict.fromkeys(users):
            role = members.get(u)
            if role is None:
                continue
            if _ROLE_RANK[role] >= rank:
                raise ImfastError(f"cannot remove {u} ({role})", field="users", code="forbidden")
            gone.append(u)
        for u in gone:  # before they leave: a removed member cannot rejoin by itself
            await self.store.bar(group, u)
        try:
            return await self._remove(user, device, group, gone, "removed")
        except Exception:
            # Not removed (the store failed): members must not be left barred, or one
            # who later leaves by itself could never come back.  The caller retries.
            for u in gone:
                with contextlib.suppress(Exception):
                    await self.store.unbar(group, u)
            raise

    async def group_leave(self, user: str, device: str, group: str) -> dict[str, str]:
        self._check_groups_enabled()
        role = await self._role(group, user)
        if role == "owner" and len(await self.group_members(group)) > 1:
            raise ImfastError("the owner must hand over ownership before leaving",
                              code="forbidden")
        return await self._remove(user, device, group, [user], "left")

    async def _remove(self, actor: str, device: str, group: str, users: list[str],
                      event: str) -> dict[str, str]:
        if users:
            # The event is stored while the leavers are still members, so they see it.
            await self._group_event(group, actor, device, event, users)
            for u in users:
                await self.store.remove_member(group, u)
            self._members_cache.forget(group)
        return await self.group_members(group)

    async def group_role(self, user: str, device: str, group: str, target: str,
                         role: str) -> dict[str, str]:
        """The owner sets a member's role (admin/member)."""
        self._check_groups_enabled()
        if await self._role(group, user) != "owner":
            raise ImfastError("only the owner may change roles", code="forbidden")
        members = await self.group_members(group)
        if target not in members or target == user:
            raise ImfastError("not a member", field="user", code="not_found")
        await self.store.set_member(group, target, role)
        self._members_cache.forget(group)
        await self._group_event(group, user, device, f"role:{role}", [target])
        return await self.group_members(group)

    async def group_list_members(self, user: str, group: str) -> dict[str, str]:
        self._check_groups_enabled()
        await self._role(group, user)
        return await self.group_members(group)

    async def groups_of(self, user: str) -> list[str]:
        self._check_groups_enabled()
        return await self.store.groups_of(user)
