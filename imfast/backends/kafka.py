"""Kafka bus: group messages and the offline hand-off, at least once.

Names (CONTRACT.md; the runbooks use them with ``kafka-consumer-groups.sh``):
topic ``group_msg`` consumed by group ``gateway-group``; topic ``offline_msg``
consumed by ``offline-worker``.

Guarantees:

* ``publish`` returns once the broker acknowledged the record (``acks="all"``);
  records published within ``linger_ms`` (2 ms) share one produce request.
  Idempotent producing is off because some Kafka-compatible brokers (tansu)
  lack it, so a producer retry can duplicate a record: consumers must
  tolerate duplicates (conversation entries carry their seq).
* Broker unreachable: ``publish`` raises
  :class:`~imfast.backends.errors.BackendUnavailable` (``"kafka"``) after
  ``request_timeout_ms`` (plus a small margin).
* ``consume`` commits a batch's offsets only after the handler returned for
  it.  A handler exception is logged and the SAME batch is handed to the
  handler again after a backoff (doubling, capped), until it succeeds or the
  partitions move to another consumer - which then starts from the last
  commit.  A crash between handling and committing redelivers the batch.
* ``consume`` keeps (re)connecting while the broker is down; it ends only when
  cancelled or when the bus is closed.
* A commit that does not complete within ``request_timeout_ms`` (aiokafka
  retries some errors forever, e.g. a partition the broker no longer knows
  after it came back without its data) restarts the consumer: it rejoins the
  group and resumes from the committed offsets - or, on a broker that lost
  them, from the earliest record - so the batch is redelivered, never skipped.
* A consumer that stops leaves its group, even in the middle of a rebalance
  (a member that vanished while the group waits for it to rejoin would hold
  every other member's join until the broker gives up on it; on tansu,
  indefinitely): :meth:`close` returns only after every consumer, including
  those of cancelled :meth:`consume` calls, has left - within the consumer's
  rebalance timeout plus a few seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import ConnectionGroup
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.protocol.group import LeaveGroupRequest

from imfast.backends.errors import BackendUnavailable

__all__ = [
    "GROUP_GATEWAYS",
    "GROUP_OFFLINE",
    "TOPIC_GROUP",
    "TOPIC_OFFLINE",
    "KafkaBus",
]

log = logging.getLogger("imfast.backends.kafka")

TOPIC_GROUP = "group_msg"
TOPIC_OFFLINE = "offline_msg"
GROUP_GATEWAYS = "gateway-group"
GROUP_OFFLINE = "offline-worker"

Batch = list[tuple[bytes, bytes]]
Handler = Callable[[Batch], Awaitable[None]]


def _membership(coordinator: Any) -> tuple[int, str, int] | None:
    """(coordinator node, member id, generation) of a consumer in a group, if any."""
    if coordinator is None or coordinator.coordinator_id is None or not coordinator.member_id:
        return None
    return coordinator.coordinator_id, coordinator.member_id, coordinator.generation


def _unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the broker cannot be reached/served us in time"."""
    if isinstance(exc, (KafkaConnectionError, KafkaTimeoutError, UnknownTopicOrPartitionError,
                        TimeoutError, OSError)):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


class KafkaBus:
    """Producer shared by all publishes, plus one consumer per :meth:`consume` call."""

    def __init__(
        self,
        brokers: list[str],
        *,
        client_id: str,
        request_timeout_ms: int = 5000,
        linger_ms: int = 2,
        fetch_max_wait_ms: int = 500,
    ) -> None:
        if not brokers:
            raise ValueError("at least one Kafka broker is required")
        self.brokers = list(brokers)
        self.client_id = client_id
        self.request_timeout_ms = request_timeout_ms
        self.linger_ms = linger_ms
        # How long the broker may hold a fetch with nothing new.  Kafka answers as
        # soon as a record arrives, so for it this only sets how often an idle
        # consumer polls; some compatible brokers (tansu) always wait it out, so it
        # bounds the delay a group message spends in the topic.
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self._producer: AIOKafkaProducer | None = None
        self._consumers: dict[AIOKafkaConsumer, str] = {}  # -> group
        # (topic, partition) -> next offset not yet handled+committed, per consumer
        self._positions: dict[AIOKafkaConsumer, dict[TopicPartition, int]] = {}
        self._closing = False
        # Consumers being stopped by their cancelled consume() call: close() waits for them.
        self._stopping: set[asyncio.Future[None]] = set()
        #: Batches whose offsets were committed / handler failures seen.
        self.batches_committed = 0
        self.handler_failures = 0

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the producer (connects to the cluster)."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self.brokers,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=False,  # tansu has no idempotent producer
            linger_ms=self.linger_ms,
            request_timeout_ms=self.request_timeout_ms,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise BackendUnavailable("kafka", f"{','.join(self.brokers)}: {exc!r}") from exc
        self._producer = producer

    async def close(self) -> None:
        """Stop every consumer started by :meth:`consume` and the producer."""
        self._closing = True
        for consumer, group in list(self._consumers.items()):
            await self._stop_consumer(consumer, group)  # before the producer: see there
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    # ------------------------------------------------------------- producing

    def _require_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("KafkaBus is not started (call start())")
        return self._producer

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Publish one record; returns when the broker acknowledged it."""
        await self.publish_many(topic, [(key, value)])

    async def publish_many(self, topic: str, items: list[tuple[bytes, bytes]]) -> None:
        """Publish records (in order per key); returns when all were acknowledged."""
        producer = self._require_producer()
        try:
            async with asyncio.timeout(self.request_timeout_ms / 1000 + 0.5):
                futures = [await producer.send(topic, value, key=key) for key, value in items]
                # shield: a timeout here must not cancel aiokafka's own futures
                await asyncio.gather(*(asyncio.shield(f) for f in futures))
        except (KafkaError, TimeoutError, OSError) as exc:
            if _unavailable(exc):
                raise BackendUnavailable(
                    "kafka", f"publish to {topic} failed: {exc!r}") from exc
            raise

    # ------------------------------------------------------------- consuming

    async def consume(
        self,
        topic: str,
        group: str,
        handler: Handler,
        *,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 1000,
        max_records: int = 500,
        poll_timeout_ms: int = 500,
        retry_backoff: float = 0.5,
        max_retry_backoff: float = 10.0,
    ) -> None:
        """Hand batches of ``(key, value)`` to ``handler``; commit after it returns.

        Runs until cancelled or :meth:`close`; reconnects while the broker is down.
        """
        delay = retry_backoff
        while not self._closing:
            consumer = AIOKafkaConsumer(
                topic,
                bootstrap_servers=self.brokers,
                client_id=self.client_id,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.fetch_max_wait_ms,
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=heartbeat_interval_ms,
                request_timeout_ms=max(self.request_timeout_ms, session_timeout_ms + 1000),
            )
            try:
                await consumer.start()
            except KafkaError as exc:
                log.warning("kafka consumer start failed topic=%s group=%s: %r; retrying in %.1fs",
                            topic, group, exc, delay)
                await self._stop_consumer(consumer, group)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_retry_backoff)
                continue
            delay = retry_backoff
            self._consumers[consumer] = group
            self._positions[consumer] = {}
            try:
                await self._consume_loop(consumer, handler, max_records, poll_timeout_ms,
                                         retry_backoff, max_retry_backoff)
            except ConsumerStoppedError:
                if self._closing:
                    return
                log.warning("kafka consumer stopped topic=%s group=%s; restarting", topic, group)
            except Exception as exc:  # noqa: BLE001 - keep consuming whatever happened
                log.warning("kafka consumer failed topic=%s group=%s: %r; restarting in %.1fs",
                            topic, group, exc, delay)
                await asyncio.sleep(delay)
            finally:
                self._consumers.pop(consumer, None)
                self._positions.pop(consumer, None)
                # Shielded and tracked: a second cancellation (the loop shutting down)
                # must not cut the LeaveGroup short, and close() waits for it.
                stopping = asyncio.ensure_future(self._stop_consumer(consumer, group))
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)
                await asyncio.shield(stopping)

    async def _stop_consumer(self, consumer: AIOKafkaConsumer, group: str,
                             stop_timeout: float = 2.0) -> None:
        """Stop a consumer and make sure its group membership ends.

        aiokafka sends LeaveGroup only for a generation > 0, and only once its
        pending group request is answered.  tansu numbers the first generation
        0, so a member stopped at generation 0 is made to leave here.  A stop
        that waits for a rejoin of a rebalance is given the consumer's
        rebalance timeout (its session timeout) on top of ``stop_timeout``: the
        broker answers the rejoin by then, and aiokafka syncs and leaves on its
        own.  A LeaveGroup of ours meanwhile would race that answer: on tansu,
        a leave landing just as the join completes left the group stuck in a
        rebalance for good (seen in CI).  Only a stop still pending after both
        waits sends LeaveGroup, as whatever member the consumer is by then,
        and is then cut short.  Without a leave, the group would wait for the
        member (on tansu indefinitely, when it vanished mid-rebalance) before
        the next member could join.
        """
        coordinator = getattr(consumer, "_coordinator", None)
        member = _membership(coordinator)
        stop = asyncio.ensure_future(consumer.stop())
        done, _ = await asyncio.wait({stop}, timeout=stop_timeout)
        if not done:
            more = getattr(consumer, "_rebalance_timeout_ms", 10000) / 1000 + stop_timeout
            log.warning("kafka consumer of group %s in a rebalance after %.0fs; waiting %.0fs more",
                        group, stop_timeout, more)
            done, _ = await asyncio.wait({stop}, timeout=more)
            if not done:
                now = _membership(coordinator) or member
                if now is not None:
                    await self._leave_group(group, now[0], now[1])
                stop.cancel()
                log.warning("kafka consumer of group %s did not stop; left the group, abandoned",
                            group)
        elif member is not None and member[2] <= 0:
            await self._leave_group(group, member[0], member[1])
        try:
            await stop
        except asyncio.CancelledError:
            if not stop.cancelled():
                raise
        except Exception:
            log.debug("kafka consumer stop failed", exc_info=True)

    async def _leave_group(self, group: str, coordinator_id: int, member_id: str) -> None:
        producer = self._producer
        if producer is None:
            return
        try:
            await asyncio.wait_for(
                producer.client.send(coordinator_id, LeaveGroupRequest(group, member_id),
                                     group=ConnectionGroup.COORDINATION),
                self.request_timeout_ms / 1000,  # a leave cut short keeps the member in
            )
        except Exception as exc:  # noqa: BLE001 - the stop goes on; the broker may expire it
            log.warning("kafka LeaveGroup failed group=%s: %r", group, exc)

    async def _consume_loop(
        self,
        consumer: AIOKafkaConsumer,
        handler: Handler,
        max_records: int,
        poll_timeout_ms: int,
        retry_backoff: float,
        max_retry_backoff: float,
    ) -> None:
        positions = self._positions[consumer]
        while True:
            records = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=max_records)
            assigned = consumer.assignment()
            for tp in list(positions):
                if tp not in assigned:
                    del positions[tp]
            if not records:
                for tp in assigned:
                    if tp not in positions:
                        try:
                            positions[tp] = await consumer.position(tp)
                        except IllegalStateError:
                            pass  # revoked meanwhile
                continue
            for tp, recs in records.items():
                positions.setdefault(tp, recs[0].offset)
            await self._handle_until_done(consumer, handler, records,
                                          retry_backoff, max_retry_backoff)

    async def _handle_until_done(
        self,
        consumer: AIOKafkaConsumer,
        handler: Handler,
        records: dict[TopicPartition, list[Any]],
        retry_backoff: float,
        max_retry_backoff: float,
    ) -> None:
        delay = retry_backoff
        while records:
            batch = [(r.key, r.value) for recs in records.values() for r in recs]
            try:
                await handler(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.handler_failures += 1
                if self._closing:
                    return  # not committed: redelivered to whoever consumes next
                log.exception("kafka handler failed topics=%s records=%d; retrying the same "
                              "batch in %.1fs", sorted({tp.topic for tp in records}),
                              len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_retry_backoff)
                # Partitions moved to another consumer start from the last commit there.
                owned = consumer.assignment()
                records = {tp: recs for tp, recs in records.items() if tp in owned}
                continue
            offsets = {tp: recs[-1].offset + 1 for tp, recs in records.items()}
            try:
                async with asyncio.timeout(self.request_timeout_ms / 1000):
                    await consumer.commit(offsets)
            except CommitFailedError as exc:
                # Rebalanced meanwhile: the new owner gets these records again.
                log.warning("kafka commit failed (records will be redelivered): %r", exc)
                return
            except (KafkaError, TimeoutError) as exc:
                # Stuck or failing: start over from the last commit (consume() restarts us).
                raise KafkaError(f"commit did not complete: {exc!r}; restarting the consumer "
                                 "(records will be redelivered)") from exc
            self.batches_committed += 1
            positions = self._positions.get(consumer)
            if positions is not None:
                positions.update(offsets)
            return

    def consumer_lag(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> records not yet handled and committed, for metrics.

        Uses the high watermark of the latest fetch (no I/O); partitions with
        no fetch yet are left out.
        """
        lag: dict[tuple[str, int], int] = {}
        for consumer, positions in self._positions.items():
            for tp, position in positions.items():
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                key = (tp.topic, tp.partition)
                lag[key] = max(lag.get(key, 0), max(0, highwater - position))
        return lag

    # ---------------------------------------------------------------- admin

    async def ensure_topics(
        self,
        names: Iterable[str] = (TOPIC_GROUP, TOPIC_OFFLINE),
        partitions: int = 6,
        replication_factor: int = 1,
    ) -> list[str]:
        """Create the topics that do not exist yet; returns the names created."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.brokers,
            client_id=self.client_id,
            request_timeout_ms=self.request_timeout_ms,
        )
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            wanted = [n for n in dict.fromkeys(names) if n not in existing]
            if not wanted:
                return []
            try:
                response = await admin.create_topics(
                    [NewTopic(n, partitions, replication_factor) for n in wanted]
                )
            except TopicAlreadyExistsError:
                return []
            created = []
            for topic_error in response.topic_errors:
                name, code = topic_error[0], topic_error[1]
                if code == 0:
                    created.append(name)
                elif code != TopicAlreadyExistsError.errno:
                    raise for_code(code)(f"create topic {name}: {topic_error[2:]}")
            if created:
                log.info("kafka topics created %s partitions=%d", created, partitions)
            return created
        except KafkaError as exc:
            if _unavailable(exc):
                raise BackendUnavailable("kafka", f"ensure_topics failed: {exc!r}") from exc
            raise
        finally:
            await admin.close()
