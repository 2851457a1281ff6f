"""In-memory backends: fast, complete, and gone when the process exits.

Used by tests and by ``imfast serve --data-dir :memory:``.  Same contract as
every other backend (``tests/contract/``).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict

from imfast.backends.base import EVERYONE, Reservation, StoredMessage, own_run_end
from imfast.protocol.ids import conv_members_private

__all__ = ["MemoryRegistry", "MemoryStore"]


class MemoryStore:
    """All of :class:`~imfast.backends.base.Store` in dictionaries."""

    def __init__(self) -> None:
        self._logs: dict[str, list[StoredMessage]] = defaultdict(list)
        self._counters: dict[str, int] = {}
        self._dedup: dict[str, Reservation] = {}
        self._by_dedup: dict[str, StoredMessage] = {}
        self._private: dict[str, set[str]] = defaultdict(set)
        self._cursors: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        self._groups: dict[str, tuple[str, str]] = {}
        self._members: dict[str, dict[str, str]] = defaultdict(dict)
        self._bars: dict[str, set[str]] = defaultdict(set)  # group -> users barred
        self._groups_of: dict[str, set[str]] = defaultdict(set)
        self._receipts: dict[str, dict[str, int]] = defaultdict(dict)
        self._floors: dict[str, int] = {}  # conv -> highest seq retention deleted

    # SequenceStore
    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        return self.reserve_now(conv, dedup_key, msg_id, floor)

    def reserve_now(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        """:meth:`reserve` as a plain call (:class:`~imfast.backends.base.SyncFastPath`)."""
        seen = self._dedup.get(dedup_key)
        if seen is not None:
            return Reservation(seen.seq, seen.msg_id, True)
        seq = max(self._counters.get(conv, 0), self._latest(conv), floor) + 1
        self._counters[conv] = seq
        reservation = Reservation(seq, msg_id, False)
        self._dedup[dedup_key] = reservation
        return reservation

    async def release(self, conv: str, dedup_key: str) -> None:
        self._dedup.pop(dedup_key, None)
        self._counters[conv] = self._latest(conv)

    async def repair(self, conv: str, floor: int) -> None:
        self._counters[conv] = max(self._counters.get(conv, 0), floor)

    # MessageLog
    async def append(self, messages: list[StoredMessage]) -> None:
        for m in messages:
            log = self._logs[m.conv]
            if log and log[-1].seq >= m.seq and any(x.seq == m.seq for x in log):
                raise ValueError(f"sequence number already exists: {m.conv} seq {m.seq}")
        for m in messages:
            log = self._logs[m.conv]
            if not log or log[-1].seq < m.seq:
                log.append(m)
            else:
                bisect.insort(log, m, key=lambda x: x.seq)
            if m.cmid:
                self._by_dedup[f"{m.sender}:{m.cmid}"] = m
            pair = conv_members_private(m.conv)
            if pair is not None:
                self._private[pair[0]].add(m.conv)
                self._private[pair[1]].add(m.conv)

    async def fetch(self, conv: str, after: int, limit: int) -> list[StoredMessage]:
        log = self._logs.get(conv, [])
        start = bisect.bisect_right(log, after, key=lambda x: x.seq)
        return log[start : start + limit]

    async def fetch_before(self, conv: str, before: int, limit: int) -> list[StoredMessage]:
        log = self._logs.get(conv, [])
        end = bisect.bisect_left(log, before, key=lambda x: x.seq)
        return log[max(0, end - limit) : end]

    async def get(self, conv: str, seq: int) -> StoredMessage | None:
        log = self._logs.get(conv, [])
        i = bisect.bisect_left(log, seq, key=lambda x: x.seq)
        if i < len(log) and log[i].seq == seq:
            return log[i]
        return None

    async def latest_seq(self, conv: str) -> int:
        return self._latest(conv)

    def _latest(self, conv: str) -> int:
        log = self._logs.get(conv)
        return log[-1].seq if log else self._floors.get(conv, 0)

    async def purge_messages(self, older_than_seconds: float, batch: int = 10000) -> int:
        """Delete entries older than ``older_than_seconds`` (by ``ts``); returns how
        many.  As the SQLite and MySQL stores: each conversation keeps its highest
        seq (a floor), cursors and receipts; a resend of a deleted entry's cmid may
        be stored as a new message.
        Per conversation it stops at the first entry not old enough."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if older_than_seconds <= 0:
            raise ValueError(f"older_than_seconds must be positive, got {older_than_seconds}")
        cutoff_ms = int((time.time() - older_than_seconds) * 1000)
        total = 0
        emptied = []
        for conv, log in self._logs.items():
            old = 0
            while old < len(log) and log[old].ts < cutoff_ms:
                old += 1
            if not old:
                continue
            self._floors[conv] = max(self._floors.get(conv, 0), log[old - 1].seq)
            for m in log[:old]:
                if m.cmid:
                    self._by_dedup.pop(f"{m.sender}:{m.cmid}", None)
                    self._dedup.pop(f"{m.sender}:{m.cmid}", None)
                else:  # reserved under its msg_id (events, recalls: see Router)
                    self._dedup.pop(m.msg_id, None)
            del log[:old]
            if not log:
                emptied.append(conv)  # its seq lives on in the floor
            total += old
        for conv in emptied:
            del self._logs[conv]
        return total

    async def find_by_cmid(self, sender: str, cmid: str) -> StoredMessage | None:
        return self._by_dedup.get(f"{sender}:{cmid}")

    async def private_conversations(self, user: str) -> dict[str, int]:
        return {c: self._latest(c) for c in self._private.get(user, ())}

    # CursorStore
    async def cursors(self, user: str, device: str) -> dict[str, int]:
        return dict(self._cursors.get((user, device), {}))

    async def advance(self, user: str, device: str, conv: str, seq: int) -> int:
        return self.advance_now(user, device, conv, seq)

    def advance_now(self, user: str, device: str, conv: str, seq: int) -> int:
        """:meth:`advance` as a plain call (:class:`~imfast.backends.base.SyncFastPath`)."""
        cur = self._cursors[(user, device)]
        if seq > cur.get(conv, 0):
            cur[conv] = seq
        return cur.get(conv, 0)

    def advance_blind_now(self, user: str, device: str, conv: str, seq: int) -> int:
        """:class:`~imfast.backends.base.SyncFastPath`: every cursor is in memory, so
        this is :meth:`advance_now` (the exact cursor is a valid lower bound)."""
        return self.advance_now(user, device, conv, seq)

    def advance_own_now(self, user: str, device: str, conv: str, seqs: list[int]) -> int:
        """:class:`~imfast.backends.base.SyncFastPath`: through the device's own entries."""
        cur = self._cursors[(user, device)]
        cursor = own_run_end(cur.get(conv, 0), seqs)
        if cursor:
            cur[conv] = cursor
        return cursor

    # GroupStore
    async def create(self, group: str, owner: str, name: str, open: bool = True) -> bool:
        if group in self._groups:
            return False
        self._groups[group] = (name, owner)
        if not open:
            self._bars[group].add(EVERYONE)
        await self.set_member(group, owner, "owner")
        return True

    async def info(self, group: str) -> tuple[str, str] | None:
        return self._groups.get(group)

    async def members(self, group: str) -> dict[str, str]:
        return dict(self._members.get(group, {}))

    async def set_member(self, group: str, user: str, role: str) -> None:
        self._members[group][user] = role
        self._groups_of[user].add(group)

    async def remove_member(self, group: str, user: str) -> bool:
        members = self._members.get(group, {})
        if user not in members:
            return False
        del members[user]
        self._groups_of[user].discard(group)
        return True

    async def groups_of(self, user: str) -> list[str]:
        return sorted(self._groups_of.get(user, ()))

    async def bar(self, group: str, user: str) -> None:
        self._bars[group].add(user)

    async def unbar(self, group: str, user: str) -> None:
        self._bars[group].discard(user)

    async def barred(self, group: str, user: str) -> bool:
        bars = self._bars.get(group, ())
        return user in bars or EVERYONE in bars

    # ReceiptStore
    async def mark_read(self, conv: str, user: str, seq: int) -> bool:
        return self.mark_read_now(conv, user, seq)

    def mark_read_now(self, conv: str, user: str, seq: int) -> bool:
        """:meth:`mark_read` as a plain call (:class:`~imfast.backends.base.SyncFastPath`)."""
        receipts = self._receipts[conv]
        if seq <= receipts.get(user, 0):
            return False
        receipts[user] = seq
        return True

    async def read_up_to(self, conv: str) -> dict[str, int]:
        return dict(self._receipts.get(conv, {}))

    async def close(self) -> None:
        return None


class MemoryRegistry:
    """(user, device) -> gateway in a dictionary."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, str]] = defaultdict(dict)

    async def register(self, user: str, device: str, gateway: str) -> None:
        self._entries[user][device] = gateway

    async def unregister(self, user: str, device: str, gateway: str) -> None:
        devices = self._entries.get(user)
        if devices is not None and devices.get(device) == gateway:
            del devices[device]
            if not devices:
                del self._entries[user]

    async def lookup(self, user: str) -> dict[str, str]:
        return dict(self._entries.get(user, {}))

    def cached_lookup(self, user: str) -> dict[str, str]:
        """Same as :meth:`lookup`, synchronously (everything is in memory)."""
        devices = self._entries.get(user)
        return dict(devices) if devices else {}

    def drop_gateway(self, gateway: str) -> list[str]:
        """Forget every entry pointing at ``gateway`` (it died); returns the users left
        with no device at all (offline now)."""
        offline = []
        for user in list(self._entries):
            devices = self._entries[user]
            for device in [d for d, g in devices.items() if g == gateway]:
                del devices[device]
            if not devices:
                del self._entries[user]
                offline.append(user)
        return offline
