"""The harness's servers really work with the client libraries the product uses.

Each test is a real round-trip through redis-py (RESP2), asyncmy, aetcd and
aiokafka against servers started by tests/harness. Runtime is dominated by the
Kafka consumer-group join (half the consumer's session timeout on tansu).
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aetcd
import asyncmy
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from tests.harness.services import (
    EtcdServer,
    KafkaBroker,
    MariaDBServer,
    RedisServer,
    ServiceError,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------ Redis


async def test_redis_set_get_and_lua(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    try:
        key = f"harness:{uuid.uuid4().hex}"
        assert await client.set(key, "hello", ex=60)
        assert await client.get(key) == b"hello"
        # Atomic check-and-increment, as a rate limiter or seq allocator would do.
        script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCRBY', KEYS[1], 2)"
        assert await client.eval(script, 1, f"{key}:n", 40) == 42
    finally:
        await client.aclose()


async def _redis_ping(url: str) -> bool:
    client = aioredis.Redis.from_url(url, protocol=2)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


def _port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_redis_restart_keeps_port_and_kill_refuses() -> None:
    # Own instance: faults must not disturb the session-wide redis_server.
    with RedisServer(appendonly=True) as server:
        port, url = server.port, server.url
        client = aioredis.Redis.from_url(url, protocol=2)
        try:
            await client.set("survives", "restart")
        finally:
            await client.aclose()

        server.restart()
        assert server.port == port and server.url == url
        client = aioredis.Redis.from_url(url, protocol=2)
        try:
            # Same data dir + appendonly: the write made before the restart is back.
            assert await client.get("survives") == b"restart"
        finally:
            await client.aclose()

        server.kill()
        assert not server.running
        assert _port_refuses(port)

        server.start()
        assert server.port == port
        assert await _redis_ping(url)


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    # Two servers cannot share a port: the second must fail fast, with its log.
    with RedisServer() as first:
        second = RedisServer(tmp_path)
        second.port = first.port
        with pytest.raises(ServiceError, match=r"(?s)exited with status.*log .*redis\.log"):
            second.start()
        assert not second.running


# ---------------------------------------------------------------------- MariaDB


def _asyncmy_kwargs(dsn: str) -> dict[str, object]:
    parts = urlsplit(dsn)
    assert parts.scheme == "mysql"
    return {
        "host": parts.hostname,
        "port": parts.port,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": parts.path.lstrip("/") or None,
    }


async def test_mariadb_app_user_round_trip(mariadb_server: MariaDBServer) -> None:
    assert mariadb_server.url == f"mysql://root@127.0.0.1:{mariadb_server.port}/"
    dsn = mariadb_server.create_app_database()
    assert dsn == (
        f"mysql://im_service:{MariaDBServer.APP_PASSWORD}@127.0.0.1:{mariadb_server.port}/im_chat"
    )
    conn = await asyncmy.connect(**_asyncmy_kwargs(dsn))
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                "CREATE TABLE IF NOT EXISTS harness_msg ("
                " id BIGINT AUTO_INCREMENT PRIMARY KEY, body VARCHAR(255) NOT NULL)"
            )
            # utf8mb4 end to end: emoji need 4-byte UTF-8.
            await cur.execute("INSERT INTO harness_msg (body) VALUES (%s)", ("héllo 👋",))
            new_id = cur.lastrowid
            await conn.commit()
            await cur.execute("SELECT body FROM harness_msg WHERE id = %s", (new_id,))
            assert await cur.fetchone() == ("héllo 👋",)
            await cur.execute("SELECT DATABASE(), CURRENT_USER()")
            assert await cur.fetchone() == ("im_chat", "im_service@%")
            # The database is shared with the product's schema tests: leave no trace.
            await cur.execute("DROP TABLE harness_msg")
    finally:
        await conn.ensure_closed()


# ------------------------------------------------------------------------- etcd


async def test_etcd_lease_put_get_prefix_revoke(etcd_server: EtcdServer) -> None:
    url = urlsplit(etcd_server.url)
    assert etcd_server.url == f"http://127.0.0.1:{etcd_server.port}"
    assert etcd_server.peer_port != etcd_server.port
    prefix = f"/imfast/harness/{uuid.uuid4().hex}/".encode()
    async with aetcd.Client(host=url.hostname or "", port=url.port or 0, timeout=5) as client:
        lease = await client.lease(ttl=30)
        await client.put(prefix + b"gw-1", b"10.0.0.1:9000", lease=lease)
        await client.put(prefix + b"gw-2", b"10.0.0.2:9000")

        got = await client.get(prefix + b"gw-1")
        assert got is not None and got.value == b"10.0.0.1:9000" and got.lease == lease.id
        listed = await client.get_prefix(prefix)
        assert sorted(kv.key for kv in listed) == [prefix + b"gw-1", prefix + b"gw-2"]

        await lease.revoke()
        assert await client.get(prefix + b"gw-1") is None  # leased key went with the lease
        assert await client.get(prefix + b"gw-2") is not None


# ------------------------------------------------------------------------ Kafka


async def _ensure_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(topic, 1, 1)])
        for _name, code, *_rest in response.topic_errors:
            assert code in (0, TopicAlreadyExistsError.errno), f"create {topic}: error {code}"
    finally:
        await admin.close()


async def test_kafka_on_s3_storage_keeps_records_and_offsets_across_a_kill() -> None:
    """KafkaBroker(storage="s3"): a SIGKILLed broker comes back with its data."""
    with KafkaBroker(storage="s3") as broker:
        assert broker.objects is not None and broker.objects.running
        bootstrap = broker.bootstrap_servers
        await _ensure_topic(bootstrap, "t")
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            for i in range(4):
                await producer.send_and_wait("t", f"v{i}".encode(), key=b"k", partition=0)
        finally:
            await producer.stop()

        def consumer() -> AIOKafkaConsumer:
            return AIOKafkaConsumer("t", bootstrap_servers=bootstrap, group_id="g",
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    session_timeout_ms=3000, heartbeat_interval_ms=500)

        first = consumer()
        await first.start()
        try:
            got: list[bytes] = []
            for _ in range(30):
                batches = await first.getmany(timeout_ms=1000, max_records=2 - len(got))
                got += [r.value for recs in batches.values() for r in recs if r.value]
                if len(got) == 2:
                    break
            assert got == [b"v0", b"v1"]
            await first.commit({TopicPartition("t", 0): 2})
        finally:
            await first.stop()
        broker.kill()
        assert broker.objects.running  # the "disk" outlives the broker
        broker.start()
        second = consumer()
        await second.start()
        try:
            rest: list[bytes] = []
            for _ in range(30):
                batches = await second.getmany(timeout_ms=1000)
                rest += [r.value for recs in batches.values() for r in recs if r.value]
                if len(rest) >= 2:
                    break
            assert rest == [b"v2", b"v3"]  # resumed from the committed offset
        finally:
            await second.stop()
    assert not broker.objects.running


async def test_kafka_produce_consume_commit(kafka_broker: KafkaBroker) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    assert bootstrap == f"127.0.0.1:{kafka_broker.port}"
    await _ensure_topic(bootstrap, "group_msg")

    marker = uuid.uuid4().hex.encode()
    # tansu has no idempotent producer (aiokafka >= 0.11 enables it by default).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks=1)
    await producer.start()
    try:
        sent = await producer.send_and_wait("group_msg", marker, key=b"room-1")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        "group_msg",
        bootstrap_servers=bootstrap,
        # A group of its own: the session's broker also holds the cluster tests'
        # gateway-group, whose state after their pods stopped mid-rebalance tansu may
        # take a long while to settle.
        group_id=f"harness-{marker.decode()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # tansu holds a group join for half the session timeout (aiokafka's
        # default 10 s -> a 5 s join); 3 s keeps the join ~1.5 s.
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        # getmany's timeout covers the group join; poll until our record shows up.
        for _ in range(30):
            batches = await consumer.getmany(timeout_ms=1000)
            values += [rec.value for recs in batches.values() for rec in recs if rec.value]
            if marker in values:
                break
        assert marker in values
        await consumer.commit()
        tp = TopicPartition("group_msg", sent.partition)
        assert await consumer.committed(tp) == sent.offset + 1
    finally:
        await consumer.stop()
