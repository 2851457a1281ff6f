"""KafkaBus._stop_consumer's timeline, with a stand-in consumer whose stop takes
as long as a broker makes it (the real-broker case is in
tests/integration/test_kafka_bus.py; this pins the order of events, which a
real broker shows only under load)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from imfast.backends.kafka import KafkaBus


class SlowStoppingConsumer:
    """Stops after ``stop_takes`` seconds, as a consumer waiting for its rejoin's answer."""

    def __init__(self, stop_takes: float, rebalance_timeout_ms: int) -> None:
        self.stop_takes = stop_takes
        self._rebalance_timeout_ms = rebalance_timeout_ms
        self._coordinator = SimpleNamespace(coordinator_id=1, member_id="m-1", generation=3)
        self.stopped = False

    async def stop(self) -> None:
        await asyncio.sleep(self.stop_takes)
        self.stopped = True


def _bus_recording_leaves() -> tuple[KafkaBus, list[str]]:
    bus = KafkaBus(["127.0.0.1:1"], client_id="t")
    leaves: list[str] = []

    async def leave(group: str, coordinator_id: int, member_id: str) -> None:
        leaves.append(member_id)

    bus._leave_group = leave  # type: ignore[method-assign]
    return bus, leaves


async def test_a_stop_held_by_a_pending_rejoin_waits_for_it_without_leaving() -> None:
    """tansu answers a rejoin pending at the stop only when its rebalance ends;
    aiokafka then syncs and leaves by itself.  A stop cut short before then left
    a member the group waited for (CI); a LeaveGroup of ours sent meanwhile
    raced the answer and, landing with it, left the group stuck in a rebalance."""
    bus, leaves = _bus_recording_leaves()
    consumer = SlowStoppingConsumer(stop_takes=0.4, rebalance_timeout_ms=500)
    await bus._stop_consumer(consumer, "g", stop_timeout=0.1)  # type: ignore[arg-type]
    assert consumer.stopped
    assert leaves == []  # aiokafka's own leave (generation 3) is the one that goes


async def test_a_stop_that_never_finishes_leaves_as_the_current_member_and_is_abandoned(
        ) -> None:
    bus, leaves = _bus_recording_leaves()
    consumer: Any = SlowStoppingConsumer(stop_takes=60, rebalance_timeout_ms=100)

    async def rejoin_as_a_new_member() -> None:
        await asyncio.sleep(0.15)
        consumer._coordinator.member_id = "m-2"

    rejoin = asyncio.create_task(rejoin_as_a_new_member())
    await bus._stop_consumer(consumer, "g", stop_timeout=0.1)
    await rejoin
    assert not consumer.stopped  # cut short, not waited out
    assert leaves == ["m-2"]  # once, at the end, as the member it is by then


async def test_a_consumer_with_no_membership_sends_no_leave() -> None:
    bus, leaves = _bus_recording_leaves()
    consumer: Any = SlowStoppingConsumer(stop_takes=0, rebalance_timeout_ms=100)
    consumer._coordinator.member_id = ""
    await bus._stop_consumer(consumer, "g", stop_timeout=0.1)
    assert consumer.stopped and leaves == []


async def test_a_generation_0_member_is_made_to_leave_even_when_it_stops_at_once() -> None:
    """aiokafka leaves only for generation > 0; tansu's first generation is 0."""
    bus, leaves = _bus_recording_leaves()
    consumer: Any = SlowStoppingConsumer(stop_takes=0, rebalance_timeout_ms=100)
    consumer._coordinator.generation = 0
    await bus._stop_consumer(consumer, "g", stop_timeout=0.1)
    assert consumer.stopped and leaves == ["m-1"]
