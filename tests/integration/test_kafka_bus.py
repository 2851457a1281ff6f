"""KafkaBus against a real Kafka-compatible broker (tansu).

Each test uses a broker of its own (tansu starts in ~0.05 s and keeps state in
memory), so consumer-group offsets left by other tests cannot leak in.  Group
joins on tansu take half the session timeout, hence session_timeout_ms=3000.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from imfast.backends.errors import BackendUnavailable
from imfast.backends.kafka import (
    GROUP_GATEWAYS,
    GROUP_OFFLINE,
    TOPIC_GROUP,
    TOPIC_OFFLINE,
    KafkaBus,
)
from tests.harness.services import KafkaBroker

pytestmark = pytest.mark.integration

FAST_GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "retry_backoff": 0.1}


@pytest.fixture
def broker() -> Iterator[KafkaBroker]:
    with KafkaBroker() as b:
        yield b


async def _until(check: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def _consumer(bus: KafkaBus, handler: Callable[[list[tuple[bytes, bytes]]], Awaitable[None]],
              topic: str = TOPIC_GROUP, group: str = GROUP_GATEWAYS) -> asyncio.Task[None]:
    return asyncio.create_task(bus.consume(topic, group, handler, **FAST_GROUP))


async def test_round_trip_commit_only_after_the_handler_and_redelivery(broker: KafkaBroker) -> None:
    bus = KafkaBus([broker.bootstrap_servers], client_id="test-gw")
    await bus.start()
    try:
        assert sorted(await bus.ensure_topics(partitions=3)) == [TOPIC_GROUP, TOPIC_OFFLINE]
        assert await bus.ensure_topics(partitions=5) == []  # idempotent: existing ones stay
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        try:
            assert {TOPIC_GROUP, TOPIC_OFFLINE} <= set(await admin.list_topics())
            described = await admin.describe_topics([TOPIC_GROUP, TOPIC_OFFLINE])
            assert [len(t["partitions"]) for t in described] == [3, 3]  # as asked
        finally:
            await admin.close()

        sent = [(b"g1", b"m%d" % i) for i in range(5)]  # one key -> one partition, in order
        await bus.publish_many(TOPIC_GROUP, sent)

        calls: list[list[tuple[bytes, bytes]]] = []
        handled: list[tuple[bytes, bytes]] = []

        async def flaky(batch: list[tuple[bytes, bytes]]) -> None:
            calls.append(list(batch))
            if len(calls) == 1:
                raise RuntimeError("push to gateways failed")
            handled.extend(batch)

        task = _consumer(bus, flaky)
        await _until(lambda: len(handled) >= 5, timeout=15)
        assert calls[1] == calls[0]  # the failed batch came again, unchanged
        assert handled == sent and bus.handler_failures == 1
        await _until(lambda: bus.batches_committed >= 1, timeout=2)
        lag = bus.consumer_lag()
        assert lag and all(isinstance(v, int) and v == 0 for v in lag.values())
        assert {t for t, _ in lag} == {TOPIC_GROUP}
        await _stop(task)

        # A new member of the same group gets nothing old: everything was committed.
        later: list[tuple[bytes, bytes]] = []
        release = asyncio.Event()

        async def blocking(batch: list[tuple[bytes, bytes]]) -> None:
            later.extend(batch)
            await release.wait()

        task = _consumer(bus, blocking)
        await bus.publish(TOPIC_GROUP, b"g1", b"marker")
        await _until(lambda: later, timeout=15)
        assert later == [(b"g1", b"marker")]
        # While the handler is busy, new records show up as lag.
        await bus.publish_many(TOPIC_GROUP, [(b"g1", b"x%d" % i) for i in range(3)])
        await _until(lambda: sum(bus.consumer_lag().values()) >= 3, timeout=5)
        release.set()
        await _until(lambda: len(later) == 4 and sum(bus.consumer_lag().values()) == 0, timeout=5)
        await _stop(task)
    finally:
        await bus.close()


async def test_consumer_keeps_retrying_until_the_broker_is_up() -> None:
    broker = KafkaBroker()  # port fixed now, server started later
    bus = KafkaBus([broker.bootstrap_servers], client_id="offline-worker")
    got: list[tuple[bytes, bytes]] = []

    async def handler(batch: list[tuple[bytes, bytes]]) -> None:
        got.extend(batch)

    task = _consumer(bus, handler, TOPIC_OFFLINE, GROUP_OFFLINE)
    try:
        await asyncio.sleep(0.5)  # a few failed connection attempts
        assert not task.done()
        broker.start()
        await bus.start()
        await bus.ensure_topics([TOPIC_OFFLINE], partitions=1)
        await bus.publish(TOPIC_OFFLINE, b"bob", b"hello")
        await _until(lambda: got == [(b"bob", b"hello")], timeout=15)
    finally:
        await _stop(task)
        await bus.close()
        broker.close()


async def test_publish_raises_backend_unavailable_when_the_broker_is_down(
    broker: KafkaBroker,
) -> None:
    bus = KafkaBus([broker.bootstrap_servers], client_id="test-svc", request_timeout_ms=1000)
    await bus.start()
    try:
        await bus.ensure_topics([TOPIC_GROUP], partitions=1)
        await bus.publish(TOPIC_GROUP, b"k", b"before")
        broker.kill()
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match="kafka unavailable") as info:
            await bus.publish(TOPIC_GROUP, b"k", b"after")
        took = time.monotonic() - t0
        assert info.value.backend == "kafka"
        assert 0.5 < took < 10, took  # request_timeout_ms (1 s), not aiokafka's 40 s
    finally:
        await bus.close()


async def test_start_fails_clearly_without_a_broker() -> None:
    broker = KafkaBroker()  # never started: nothing listens on its port
    try:
        bus = KafkaBus([broker.bootstrap_servers], client_id="x", request_timeout_ms=1000)
        with pytest.raises(BackendUnavailable, match="kafka unavailable"):
            await bus.start()
    finally:
        broker.close()


# A gateway process: consumes group_msg; once told of a rebalance, it stops as a
# gateway does on SIGINT (its consume task cancelled, the bus closed) and exits.
LEAVING_MEMBER = """
import asyncio, logging, sys
from imfast.backends.kafka import GROUP_GATEWAYS, TOPIC_GROUP, KafkaBus

async def main():
    rebalancing = asyncio.Event()
    loop = asyncio.get_running_loop()

    class Watch(logging.Handler):
        def emit(self, record):
            if "because it is rebalancing" in record.getMessage():
                loop.call_soon_threadsafe(rebalancing.set)

    logging.getLogger("aiokafka").addHandler(Watch())
    bus = KafkaBus([sys.argv[1]], client_id="gw-leaving")
    await bus.start()

    async def handler(batch):
        pass

    task = loop.create_task(bus.consume(TOPIC_GROUP, GROUP_GATEWAYS, handler,
                                        session_timeout_ms=3000, heartbeat_interval_ms=500))
    while not any(c.assignment() for c in bus._consumers):
        await asyncio.sleep(0.05)
    print("joined", flush=True)
    await rebalancing.wait()
    task.cancel()
    await bus.close()
    print("closed", flush=True)

asyncio.run(main())
"""


async def test_a_consumer_stopped_mid_rebalance_leaves_so_the_group_goes_on(
        broker: KafkaBroker) -> None:
    """A member whose process exits while it waits to rejoin a rebalance (a pod
    stopped just as another gateway joined) must leave the group: otherwise the
    group waits for it (tansu: for good) and the other members get nothing."""
    staying = KafkaBus([broker.bootstrap_servers], client_id="gw-staying")
    await staying.start()
    got: list[tuple[bytes, bytes]] = []

    async def handler(batch: list[tuple[bytes, bytes]]) -> None:
        got.extend(batch)

    leaving = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LEAVING_MEMBER, broker.bootstrap_servers,
        stdout=asyncio.subprocess.PIPE)
    second: asyncio.Task[None] | None = None
    try:
        await staying.ensure_topics([TOPIC_GROUP], partitions=2)
        assert leaving.stdout is not None
        line = await asyncio.wait_for(leaving.stdout.readline(), 30)
        assert line == b"joined\n"
        second = _consumer(staying, handler)  # its join starts a rebalance
        assert await asyncio.wait_for(leaving.stdout.readline(), 30) == b"closed\n"
        assert await asyncio.wait_for(leaving.wait(), 10) == 0
        await staying.publish_many(TOPIC_GROUP, [(b"a", b"one"), (b"b", b"two")])
        await _until(lambda: sorted(got) == [(b"a", b"one"), (b"b", b"two")], timeout=40)
        assert {tp.partition for c in staying._consumers for tp in c.assignment()} == {0, 1}
    finally:
        if leaving.returncode is None:
            leaving.kill()
            await leaving.wait()
        if second is not None:
            await _stop(second)
        await staying.close()
