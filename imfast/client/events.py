"""What the SDK hands the application: typed events and request results.

Conversation *entries* (:class:`Message`, :class:`GroupEvent`, :class:`Recall`)
are stored by the server, carry a ``seq`` and are delivered exactly once per
client (see :class:`imfast.client.Client`).  The other events are droppable
signals (:class:`Receipt`, :class:`Typing`, :class:`Presence`) or the SDK's
own connection news (:class:`Connected`, :class:`Disconnected`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Connected",
    "Conversations",
    "Disconnected",
    "Entry",
    "Event",
    "GroupEvent",
    "Message",
    "Presence",
    "Recall",
    "Receipt",
    "Sent",
    "SyncPage",
    "Typing",
    "parse_entry",
]


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored conversation entry: ``seq`` starts at 1 and grows by 1 per conversation."""

    conv: str
    seq: int
    msg_id: str
    sender: str
    sender_device: str
    ts: int


@dataclass(frozen=True, slots=True)
class Message(Entry):
    """A chat message (``kind`` ``msg``)."""

    body: str
    cmid: str = ""


@dataclass(frozen=True, slots=True)
class GroupEvent(Entry):
    """A group change: ``event`` is created/joined/invited/removed/left/role:<role>."""

    event: str
    group: str
    by: str
    users: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Recall(Entry):
    """``sender`` recalled their message ``recalled_seq`` of this conversation."""

    recalled_seq: int


@dataclass(frozen=True, slots=True)
class Receipt:
    """``user`` has read ``conv`` up to ``seq`` (droppable: may be skipped)."""

    conv: str
    user: str
    seq: int


@dataclass(frozen=True, slots=True)
class Typing:
    """``user`` is typing in ``conv`` (droppable)."""

    conv: str
    user: str


@dataclass(frozen=True, slots=True)
class Presence:
    """Whether ``user`` is online; ``last_seen`` (epoch s) when known and offline."""

    user: str
    online: bool
    last_seen: float | None = None


@dataclass(frozen=True, slots=True)
class Connected:
    """A connection is authenticated and resumed: what was missed has been delivered."""

    user: str
    device: str
    server: str
    resumed_conversations: int
    reconnected: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended; ``reconnect_in`` is None when the client stops for good."""

    code: int
    reason: str
    reconnect_in: float | None


Event = (Message | GroupEvent | Recall | Receipt | Typing | Presence | Connected
         | Disconnected)


@dataclass(frozen=True, slots=True)
class Sent:
    """The server stored the message (``duplicate``: it had already, under this cmid)."""

    cmid: str
    msg_id: str
    conv: str
    seq: int
    ts: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class SyncPage:
    """Entries of ``conv`` after ``after`` up to ``last``; ``more``: ask again from ``last``."""

    conv: str
    after: int
    last: int
    more: bool
    entries: list[Entry] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Conversations:
    """Every conversation of the user: ``latest`` seq, and this device's acked ``cursors``."""

    latest: dict[str, int]
    cursors: dict[str, int]


def parse_entry(frame: dict[str, Any]) -> Entry:
    """A ``msg`` frame (or a ``history`` item) as its typed entry."""
    common = (frame["conv"], int(frame["seq"]), str(frame.get("msg_id", "")),
              str(frame.get("from", "")), str(frame.get("from_device", "")),
              int(frame.get("ts", 0)))
    kind = frame.get("kind", "msg")
    if kind == "event":
        ev = frame.get("event") or {}
        return GroupEvent(*common, event=str(ev.get("event", "")), group=str(ev.get("group", "")),
                          by=str(ev.get("by", "")), users=tuple(ev.get("users") or ()))
    if kind == "recall":
        return Recall(*common, recalled_seq=int(frame.get("recalled_seq", 0)))
    return Message(*common, body=str(frame.get("body", "")), cmid=str(frame.get("cmid") or ""))
