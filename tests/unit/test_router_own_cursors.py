"""The embedded router moves a sending device's cursor past its own entries, batched."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from imfast.backends.memory import MemoryStore
from imfast.config import load_settings
from imfast.service import router as router_module
from imfast.service.router import Router
from tests.helpers.pushers import RecordingPusher


class _CountingStore(MemoryStore):
    """Counts the own-entry moves of each loop iteration (a memory store otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[tuple[str, str, str, list[int]]] = []

    def advance_own_now(self, user: str, device: str, conv: str, seqs: list[int]) -> int:
        self.moves.append((user, device, conv, list(seqs)))
        return super().advance_own_now(user, device, conv, seqs)


@pytest.fixture
def quick_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "OWN_CURSOR_DELAY", 0.05)
    monkeypatch.setattr(router_module, "_OWN_SLICE", 4)


async def test_own_entries_move_in_one_batch_then_in_slices(quick_batches: None) -> None:
    store = _CountingStore()
    router = Router(load_settings({}), store, RecordingPusher())
    assert router.moves_own_cursors
    # Ten senders, two messages each: one move per device and conversation, not per entry.
    for i in range(10):
        for n in range(2):
            await router.send(f"u{i}", "phone", f"c{n}", f"peer{i}", None, "hi")
    assert store.moves == []  # nothing before the batch is due
    # A callback that runs once per loop iteration notes how many moves there were.
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    def tick() -> None:
        seen.append(len(store.moves))
        if len(store.moves) < 10 and len(seen) < 100_000:
            loop.call_soon(tick)

    tick()
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(store.moves) == 10:
            break
    assert len(store.moves) == 10
    steps = [b - a for a, b in itertools.pairwise(seen) if b != a]
    assert steps and max(steps) <= 4 and len(steps) >= 3  # 4 devices per loop iteration
    assert all(seqs == [1, 2] for *_, seqs in store.moves)
    for i in range(10):
        assert await store.cursors(f"u{i}", "phone") == {f"p:peer{i}:u{i}"
                                                          if f"peer{i}" < f"u{i}"
                                                          else f"p:u{i}:peer{i}": 2}


async def test_a_device_that_lacked_an_entry_keeps_its_cursor(quick_batches: None) -> None:
    store = MemoryStore()
    router = Router(load_settings({}), store, RecordingPusher())
    await router.send("bob", "phone", "b1", "alice", None, "seq 1, never acked by alice")
    await router.send("alice", "phone", "a1", "bob", None, "seq 2")
    await router.send("alice", "phone", "a2", "bob", None, "seq 3")
    await asyncio.sleep(0.1)
    assert await store.cursors("alice", "phone") == {}
    assert await store.cursors("bob", "phone") == {"p:alice:bob": 1}


async def test_a_resuming_device_and_shutdown_do_not_wait_for_the_batch() -> None:
    store = MemoryStore()
    router = Router(load_settings({}), store, RecordingPusher())
    await router.send("alice", "phone", "a1", "bob", None, "hi")
    await router.send("carol", "phone", "c1", "bob", None, "hi")
    assert await router.resume_plan("alice", "phone") == []  # her own entry: passed
    assert await store.cursors("alice", "phone") == {"p:alice:bob": 1}
    assert await store.cursors("carol", "phone") == {}  # still in the batch
    router.move_own_cursors()  # what the node calls before closing the store
    assert await store.cursors("carol", "phone") == {"p:bob:carol": 1}
