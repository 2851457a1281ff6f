"""Presence's last_seen times: kept per user, in bounded memory."""

from __future__ import annotations

from imfast.gateway.presence import LastSeen


def test_a_later_departure_replaces_the_earlier_one() -> None:
    seen = LastSeen()
    seen.note("bob", 10.0)
    seen.note("bob", 20.0)
    assert seen.get("bob") == 20.0 and seen.get("carol") is None and len(seen) == 1


def test_beyond_the_limit_the_user_gone_longest_is_forgotten_first() -> None:
    seen = LastSeen(limit=2)
    seen.note("alice", 1.0)
    seen.note("bob", 2.0)
    seen.note("alice", 3.0)  # alice left again: now bob is the one gone longest
    seen.note("carol", 4.0)
    assert (seen.get("alice"), seen.get("bob"), seen.get("carol")) == (3.0, None, 4.0)
    assert len(seen) == 2
