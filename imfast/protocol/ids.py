"""Identifiers: users, devices, groups and conversations.

A conversation id names what a sequence number counts in:

* private: ``p:<a>:<b>`` with the two user ids sorted, so both sides name it
  the same way (Redis key ``seq:private:<a>:<b>``);
* group: ``g:<group_id>`` (Redis key ``seq:group:<group_id>``).

User, device and group ids are 1-64 characters from ``[A-Za-z0-9_.@-]``: no
``:`` or ``/``, so they embed safely in conversation ids, etcd keys and Redis
keys.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "ID_PATTERN",
    "conv_members_private",
    "group_conv",
    "is_valid_id",
    "parse_conv",
    "private_conv",
    "seq_key",
]

ID_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def is_valid_id(value: object) -> bool:
    """True if ``value`` is a usable user/device/group id."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def private_conv(a: str, b: str) -> str:
    """The conversation id of the private chat between users ``a`` and ``b``."""
    lo, hi = (a, b) if a <= b else (b, a)
    return f"p:{lo}:{hi}"


def group_conv(group_id: str) -> str:
    """The conversation id of a group."""
    return f"g:{group_id}"


def parse_conv(conv: object) -> tuple[str, tuple[str, ...]] | None:
    """``("p", (a, b))`` or ``("g", (group,))`` for a valid id, else None."""
    if not isinstance(conv, str):
        return None
    return _parse_conv_str(conv)


# Every send, push and ack parses a conversation id; active ones repeat, so the
# parse (two regex matches) is remembered for the busiest 64K.
@lru_cache(maxsize=65536)
def _parse_conv_str(conv: str) -> tuple[str, tuple[str, ...]] | None:
    parts = conv.split(":")
    if len(parts) == 3 and parts[0] == "p":
        a, b = parts[1], parts[2]
        if is_valid_id(a) and is_valid_id(b) and a <= b:
            return "p", (a, b)
        return None
    if len(parts) == 2 and parts[0] == "g" and is_valid_id(parts[1]):
        return "g", (parts[1],)
    return None


@lru_cache(maxsize=65536)  # asked for every stored and routed entry
def conv_members_private(conv: str) -> tuple[str, str] | None:
    """The two users of a private conversation id, or None if it is not one."""
    parsed = parse_conv(conv)
    if parsed is None or parsed[0] != "p":
        return None
    a, b = parsed[1]
    return a, b


def seq_key(conv: str) -> str:
    """The Redis key of a conversation's sequence counter (CONTRACT.md)."""
    kind, rest = conv.split(":", 1)
    return f"seq:{'private' if kind == 'p' else 'group'}:{rest}"
