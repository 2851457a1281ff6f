"""Delivery-cursor moves batched per loop iteration, for stores that take them in bulk.

Every delivered entry is acknowledged by the device, so acks arrive about
as often as messages.  A networked store (MySQL) would spend a transaction
and up to three round trips on each; :class:`CursorBatcher` gathers the
moves of one loop iteration and hands them to ``store.advance_many`` at
once, one batch in flight at a time.

Guarantees: ``advance`` resolves to the cursor after the move, only once
the batch holding it is committed; a failed batch fails every move in it
(the client's ack gets an error and the entries are simply redelivered).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["CursorBatcher"]

_Key = tuple[str, str, str]


class CursorBatcher:
    """Batches ``advance`` calls into ``store.advance_many``; see module docstring."""

    def __init__(self, store: Any, max_batch: int = 500) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[_Key, int, asyncio.Future[int]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    def advance(self, user: str, device: str, conv: str, seq: int) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._pending.append(((user, device, conv), seq, fut))
        if self._task is None:
            self._task = loop.create_task(self._run())
        return fut

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # every ack of this loop iteration joins the batch
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    cursors = await self._store.advance_many(
                        [(*key, seq) for key, seq, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every waiter learns it
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.batches += 1
                for (_, _, fut), cursor in zip(batch, cursors):
                    if not fut.done():
                        fut.set_result(cursor)
        finally:
            self._task = None
            if self._pending:  # raced in after the loop ended
                self._task = asyncio.get_running_loop().create_task(self._run())
