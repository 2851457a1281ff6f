"""A Store made of a SequenceStore and everything else from another backend.

The distributed im-service uses ``CompositeStore(RedisSequenceStore, MySQLStore)``:
Redis does dedup + sequence in one atomic step, MySQL keeps the log, cursors,
groups and receipts.  Each method goes to exactly one of the two.
"""

from __future__ import annotations

from typing import Any

from imfast.backends.base import Reservation

__all__ = ["CompositeStore"]


class CompositeStore:
    """Delegates reserve/release/repair to ``sequences`` and the rest to ``log``."""

    def __init__(self, sequences: Any, log: Any) -> None:
        self.sequences = sequences
        self.log = log

    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        return await self.sequences.reserve(conv, dedup_key, msg_id, floor)  # type: ignore[no-any-return]

    async def release(self, conv: str, dedup_key: str) -> None:
        await self.sequences.release(conv, dedup_key)

    async def repair(self, conv: str, floor: int) -> None:
        await self.sequences.repair(conv, floor)

    def __getattr__(self, name: str) -> Any:
        # Everything that is not sequencing belongs to the log backend.
        return getattr(self.log, name)

    async def close(self) -> None:
        await self.sequences.close()
        await self.log.close()
