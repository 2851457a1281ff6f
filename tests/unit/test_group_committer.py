"""GroupCommitter tells senders once their batch is stored and its pushes have left."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from imfast.backends.base import StoredMessage
from imfast.backends.memory import MemoryStore
from imfast.service import router as router_module
from imfast.service.router import GroupCommitter


def _entry(seq: int) -> StoredMessage:
    return StoredMessage("p:alice:bob", seq, f"m{seq}", "alice", "phone", f"c{seq}", "x", 0)


async def test_senders_are_told_once_the_pushes_of_their_batch_have_left() -> None:
    routed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    committed: list[int] = []
    committer = GroupCommitter(MemoryStore(), lambda ms: committed.extend(m.seq for m in ms),
                               routed=lambda: routed)
    told: list[tuple[int, Any, Any]] = []
    for seq in (1, 2, 3):
        committer.submit_with(_entry(seq), lambda orig, exc, seq=seq: told.append((seq, orig,
                                                                                     exc)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert committed == [1, 2, 3]  # stored and routed ...
    assert told == []  # ... but the pushes have not left yet
    routed.set_result(None)
    await asyncio.sleep(0)
    assert told == [(1, None, None), (2, None, None), (3, None, None)]  # each told once


async def test_senders_are_told_anyway_when_the_pushes_hang(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(router_module, "_ROUTED_WAIT", 0.05)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    committer = GroupCommitter(MemoryStore(), lambda ms: None, routed=lambda: never)
    told: list[Any] = []
    committer.submit_with(_entry(1), lambda orig, exc: told.append(exc))
    with caplog.at_level(logging.WARNING, logger="imfast.service"):
        await asyncio.sleep(0.2)
    assert told == [None]  # stored: acknowledged, not failed
    assert "pushes for a committed batch did not finish" in caplog.text
    never.set_result(None)  # a late finish does not tell it twice
    await asyncio.sleep(0)
    assert told == [None]


class NowStore(MemoryStore):
    """A store that appends in the calling thread, and says when it would have to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.behind = False
        self.now_calls = 0

    def append_now(self, messages: list[StoredMessage]) -> bool:
        self.now_calls += 1
        if self.behind:
            return False
        for m in messages:
            self._logs[m.conv].append(m)
        return True


async def test_a_store_that_appends_now_is_committed_in_one_callback_in_order() -> None:
    store = NowStore()
    committed: list[list[int]] = []
    committer = GroupCommitter(store, lambda ms: committed.append([m.seq for m in ms]))
    told: list[int] = []
    for seq in (1, 2, 3):
        committer.submit_with(_entry(seq), lambda orig, exc, seq=seq: told.append(seq))
    await asyncio.sleep(0)  # the end of the iteration the sends were read in
    assert committed == [[1, 2, 3]] and store.now_calls == 1  # one batch, no task
    assert committer._task is None
    await asyncio.sleep(0)
    assert told == [1, 2, 3]


async def test_a_batch_the_store_cannot_take_now_goes_to_the_task_in_order() -> None:
    store = NowStore()
    store.behind = True  # e.g. SQLite's mover is behind: append() would wait
    committed: list[int] = []
    committer = GroupCommitter(store, lambda ms: committed.extend(m.seq for m in ms))
    told: list[tuple[int, Any]] = []
    for seq in (1, 2):
        committer.submit_with(_entry(seq), lambda orig, exc, seq=seq: told.append((seq, exc)))
    await asyncio.sleep(0)
    committer.submit_with(_entry(3), lambda orig, exc: told.append((3, exc)))  # joins the task
    for _ in range(5):
        await asyncio.sleep(0)
    assert committed == [1, 2, 3]  # stored by the awaiting append, in order
    assert [m.seq for m in store._logs["p:alice:bob"]] == [1, 2, 3]
    assert told == [(1, None), (2, None), (3, None)]
