"""MySQLStore's own promises on a real MariaDB (the contract suite covers the rest).

The runbook's SQL is run through the ``mariadb`` CLI as root, the way an
operator runs it; tests that kill or reconfigure a server use a private
``MariaDBServer`` instead of the shared one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncmy
import pytest

from imfast.backends.base import StoredMessage
from imfast.backends.errors import BackendUnavailable
from imfast.backends.mysql import (
    MIGRATIONS,
    SCHEMA_VERSION,
    TABLES,
    MySQLDSN,
    MySQLStore,
    parse_dsn,
    schema_sql,
)
from imfast.config import load_settings
from tests.harness.faultproxy import FaultProxy
from tests.harness.services import MariaDBServer

pytestmark = pytest.mark.integration

DAY = 24 * 3600


def msg(conv: str, seq: int, cmid: str = "", sender: str = "a", body: str = "b") -> StoredMessage:
    return StoredMessage(conv, seq, f"id-{conv}-{seq}", sender, "d1", cmid, body, 1000 + seq)


def sql(server: MariaDBServer, query: str) -> list[list[str]]:
    """Run ``query`` as the runbooks do: ``mysql -u root im_chat -e "..."``."""
    out = server.execute(query, database="im_chat")
    return [line.split("\t") for line in out.splitlines()]


@pytest.fixture
async def store(mariadb_app_dsn: str) -> AsyncIterator[MySQLStore]:
    s = await MySQLStore.open(mariadb_app_dsn, 5)
    await s.truncate_all()
    yield s
    await s.close()


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[MariaDBServer]:
    """A server of this module's own, for tests that kill or reconfigure it."""
    with MariaDBServer() as server:
        server.create_app_database()
        yield server


async def root_connection(server: MariaDBServer) -> Any:
    return await asyncmy.connect(host=server.host, port=server.port, user="root",
                                 database="im_chat", autocommit=False)


# ------------------------------------------------------------------ schema


def test_dsn() -> None:
    assert parse_dsn("mysql://im_service:p%40ss@mysql:3307/im_chat") == MySQLDSN(
        "mysql", 3307, "im_service", "p@ss", "im_chat")
    assert parse_dsn("mysql://u@db/") == MySQLDSN("db", 3306, "u", "", "im_chat")
    for bad in ("postgres://u:secret@h/db", "mysql://u:secret@h/db?ssl=1", "mysql://h/db"):
        with pytest.raises(ValueError, match="MYSQL_DSN") as error:
            parse_dsn(bad)
        assert "secret" not in str(error.value)



async def test_migrations_are_idempotent(mariadb_server: MariaDBServer,
                                         mariadb_app_dsn: str) -> None:
    first = await MySQLStore.open(mariadb_app_dsn, 2)
    await first.truncate_all()
    await first.append([msg("p:a:b", 1)])
    # Opening again, also several instances at once, changes nothing.
    again = await asyncio.gather(*(MySQLStore.open(mariadb_app_dsn, 2) for _ in range(3)))
    assert await again[0].latest_seq("p:a:b") == 1
    for s in (first, *again):
        await s.close()
    assert sql(mariadb_server, "SELECT version FROM schema_migrations") == [
        [str(v)] for v, _, _ in MIGRATIONS]
    tables = sql(mariadb_server, "SELECT table_name FROM information_schema.tables "
                                 "WHERE table_schema='im_chat' ORDER BY table_name")
    assert sorted(t for (t,) in tables) == sorted([*TABLES, "schema_migrations"])


async def test_the_index_migration_adds_a_missing_index_and_leaves_one_that_exists(
        mariadb_server: MariaDBServer, mariadb_app_dsn: str) -> None:
    """Migration 2 in statements MySQL 8 takes too (no ADD INDEX IF NOT EXISTS there):
    run again after a crash that left the index but no record, and on a schema
    whose index went missing, it ends with exactly the one index."""
    store = await MySQLStore.open(mariadb_app_dsn, 2)
    await store.close()
    index_count = ("SELECT COUNT(*) FROM information_schema.statistics WHERE "
                   "table_schema='im_chat' AND table_name='messages' AND index_name='messages_ts'")
    for drop_index in (False, True):
        if drop_index:
            sql(mariadb_server, "ALTER TABLE messages DROP INDEX messages_ts")
            assert sql(mariadb_server, index_count) == [["0"]]
        sql(mariadb_server, "DELETE FROM schema_migrations WHERE version=2")
        store = await MySQLStore.open(mariadb_app_dsn, 2)
        await store.close()
        assert sql(mariadb_server, index_count) == [["1"]]
        assert ["2"] in sql(mariadb_server, "SELECT version FROM schema_migrations")


def test_schema_file_is_the_migrations_and_applies_by_hand(
        mariadb_server: MariaDBServer) -> None:
    path = Path(__file__).parents[2] / "imfast" / "backends" / "mysql_schema.sql"
    assert path.read_text() == schema_sql(), "regenerate mysql_schema.sql from schema_sql()"
    mariadb_server.execute("DROP DATABASE IF EXISTS im_chat_by_hand; "
                           "CREATE DATABASE im_chat_by_hand")
    try:
        mariadb_server.execute(path.read_text(), database="im_chat_by_hand")
        mariadb_server.execute(path.read_text(), database="im_chat_by_hand")  # twice is fine
        out = mariadb_server.execute("SELECT version FROM schema_migrations",
                                     database="im_chat_by_hand")
        assert out.split() == [str(v) for v, _, _ in MIGRATIONS]  # every one recorded
        assert MIGRATIONS[-1][0] == SCHEMA_VERSION
    finally:
        mariadb_server.execute("DROP DATABASE im_chat_by_hand")


# ------------------------------------------------------------------ runbook


async def test_runbook_queries_run_as_written(mariadb_server: MariaDBServer,
                                              store: MySQLStore) -> None:
    await store.append([msg("p:a:b", 1), msg("p:a:b", 2), msg("g:team", 1)])
    await store.add_offline([("b", "p:a:b", 1, "id-1"), ("b", "p:a:b", 2, "id-2"),
                             ("c", "g:team", 1, "id-3")])
    # Database Down > Verification / Message delivery failures > step 4.
    assert sql(mariadb_server, "SELECT COUNT(*) FROM offline_messages "
                               "WHERE created_at > DATE_SUB(NOW(), INTERVAL 1 HOUR)") == [["3"]]
    # Sequence Number Collision.
    rows = sql(mariadb_server, "SELECT * FROM sequence_snapshots WHERE conversation_id='p:a:b'")
    assert len(rows) == 1 and rows[0][:2] == ["p:a:b", "2"]
    # Disk full: the manual TTL clean-up removes only rows older than 7 days.
    sql(mariadb_server, "UPDATE offline_messages SET created_at = NOW() - INTERVAL 8 DAY "
                        "WHERE user_id='b'")
    sql(mariadb_server, "DELETE FROM offline_messages WHERE created_at < "
                        "DATE_SUB(NOW(), INTERVAL 7 DAY) LIMIT 10000")
    assert await store.offline_count() == 1 and await store.offline_count("c") == 1
    # Read receipts are queryable by conversation.
    await store.mark_read("p:a:b", "b", 2)
    assert sql(mariadb_server, "SELECT user_id, seq FROM read_receipts "
                               "WHERE conversation_id='p:a:b'") == [["b", "2"]]


# ------------------------------------------------------------------ sequences


async def test_sequence_snapshot_never_goes_back(mariadb_server: MariaDBServer,
                                                 store: MySQLStore) -> None:
    await store.append([msg("p:a:b", 10)])
    await store.append([msg("p:a:b", 7), msg("p:a:b", 8)])  # lower seqs, later
    snapshot = "SELECT seq FROM sequence_snapshots WHERE conversation_id='p:a:b'"
    assert sql(mariadb_server, snapshot) == [["10"]]
    # A refused batch changes neither the log nor the snapshot.
    with pytest.raises(ValueError, match="^sequence number already exists"):
        await store.append([msg("p:a:b", 11), msg("p:a:b", 10)])
    assert sql(mariadb_server, snapshot) == [["10"]]
    assert await store.get("p:a:b", 11) is None
    await store.append([msg("p:a:b", 11), msg("g:x", 3)])
    assert sql(mariadb_server, snapshot) == [["11"]]
    assert sql(mariadb_server, "SELECT seq FROM sequence_snapshots "
                               "WHERE conversation_id='g:x'") == [["3"]]


async def test_latest_seq_honours_the_snapshot_after_messages_are_deleted(
        mariadb_server: MariaDBServer, store: MySQLStore) -> None:
    await store.append([msg("p:a:b", i) for i in range(1, 4)])
    sql(mariadb_server, "DELETE FROM messages WHERE conv='p:a:b'")
    assert await store.fetch("p:a:b", 0, 10) == []
    assert await store.latest_seq("p:a:b") == 3
    assert await store.private_conversations("a") == {"p:a:b": 3}
    assert await store.latest_seq("p:a:c") == 0


async def test_duplicate_seq_is_logged_and_refused(store: MySQLStore,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    await store.append([msg("p:a:b", 1, cmid="c1")])
    caplog.set_level(logging.ERROR, logger="imfast.mysql")
    with pytest.raises(ValueError, match="^sequence number already exists: conv=p:a:b seq=1"):
        await store.append([msg("p:a:b", 1, cmid="c2")])
    assert "sequence number already exists conv=p:a:b seq=1" in caplog.text
    # The same <sender>:<cmid> under another seq is refused too, nothing stored.
    with pytest.raises(ValueError, match="^sequence number already exists"):
        await store.append([msg("p:a:b", 2, cmid="c1")])
    with pytest.raises(ValueError, match="^sequence number already exists"):
        await store.append([msg("p:a:b", 3), msg("p:a:b", 3)])
    assert await store.latest_seq("p:a:b") == 1


async def test_text_is_exact(store: MySQLStore) -> None:
    body = "héllo 👋 " + "x" * (64 * 1024)
    await store.append([msg("p:Alice:bob", 1, cmid="c1", sender="Alice", body=body),
                        msg("p:alice:bob", 1, cmid="c1", sender="alice"),
                        msg("p:alice:bob", 2, cmid="c1 ", sender="alice")])
    got = await store.get("p:Alice:bob", 1)
    assert got is not None and got.body == body
    # Ids are case-sensitive and a trailing space in a cmid counts, as in SQLite.
    found = await store.find_by_cmid("alice", "c1 ")
    assert found is not None and found.seq == 2
    assert (await store.find_by_cmid("Alice", "c1")).conv == "p:Alice:bob"  # type: ignore[union-attr]
    assert await store.find_by_cmid("ALICE", "c1") is None
    assert await store.create("G", "x", "upper") and await store.create("g", "y", "lower")
    assert await store.info("G") == ("upper", "x")


# ------------------------------------------------------------------ offline queue


async def test_add_offline_is_idempotent(store: MySQLStore) -> None:
    rows = [("b", "p:a:b", seq, f"m{seq}") for seq in range(1, 6)]
    await store.add_offline(rows)
    await store.add_offline(rows + rows[:2])  # Kafka redelivers, even within a batch
    await store.add_offline([])
    await store.add_offline([("c", "p:a:c", 1, "m1")])
    assert await store.offline_count() == 6
    assert await store.offline_count("b") == 5
    assert await store.offline_count("nobody") == 0
    assert await store.clear_offline("b", "p:a:b", 3) == 3
    assert await store.clear_offline("b", "p:a:b", 3) == 0
    assert await store.offline_count("b") == 2 and await store.offline_count("c") == 1


async def test_purge_offline_removes_only_old_rows(mariadb_server: MariaDBServer,
                                                   store: MySQLStore) -> None:
    await store.add_offline([("u", "p:u:v", seq, f"m{seq}") for seq in range(1, 31)])
    sql(mariadb_server, "UPDATE offline_messages SET created_at = NOW(3) - INTERVAL 8 DAY "
                        "WHERE seq <= 25")
    sql(mariadb_server, "UPDATE offline_messages SET created_at = NOW(3) - INTERVAL 6 DAY "
                        "WHERE seq = 26")
    deletes = "SHOW GLOBAL STATUS LIKE 'Com_delete'"
    before = int(sql(mariadb_server, deletes)[0][1])
    assert await store.purge_offline(batch=10) == 25
    assert int(sql(mariadb_server, deletes)[0][1]) - before == 3  # batches of 10, 10, 5
    assert await store.purge_offline(batch=10) == 0
    left = sql(mariadb_server, "SELECT seq FROM offline_messages ORDER BY seq")
    assert [int(s) for (s,) in left] == [26, 27, 28, 29, 30]
    assert await store.purge_offline(older_than_seconds=5 * DAY) == 1
    assert await store.offline_count() == 4


# ------------------------------------------------------------------ connections


async def test_pool_size_is_honoured(mariadb_server: MariaDBServer, mariadb_app_dsn: str) -> None:
    settings = load_settings({"MYSQL_DSN": mariadb_app_dsn, "DB_MAX_OPEN_CONNS": "3"})
    store = await MySQLStore.open(settings.mysql_dsn, settings.db_max_open_conns)
    await store.truncate_all()
    root = await root_connection(mariadb_server)
    try:
        # Hold the receipt row's lock so every mark_read waits inside MySQL,
        # each on a connection of its own.
        async with root.cursor() as cur:
            await cur.execute("INSERT INTO read_receipts (conversation_id, user_id, seq) "
                              "VALUES ('p:a:b', 'u', 0)")
        writes = [asyncio.create_task(store.mark_read("p:a:b", "u", i)) for i in range(1, 13)]
        deadline = time.monotonic() + 10
        while True:
            async with root.cursor() as cur:
                await cur.execute("SELECT COUNT(*) FROM information_schema.processlist "
                                  "WHERE user='im_service'")
                (open_conns,) = await cur.fetchone()
            if open_conns >= 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # time for a fourth connection, were there one
        async with root.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM information_schema.processlist "
                              "WHERE user='im_service'")
            (open_conns,) = await cur.fetchone()
        assert open_conns == 3 == store.pool_size
        assert store.pool_stats() == {"max": 3, "open": 3, "idle": 0}
        assert not any(t.done() for t in writes)
        await root.commit()
        assert sum(await asyncio.gather(*writes)) >= 1
        assert await store.read_up_to("p:a:b") == {"u": 12}
    finally:
        root.close()
        await store.close()


async def test_a_busy_pool_fails_fast_instead_of_hanging(
        mariadb_server: MariaDBServer, mariadb_app_dsn: str,
        caplog: pytest.LogCaptureFixture) -> None:
    store = await MySQLStore.open(mariadb_app_dsn, 1, acquire_timeout=0.5)
    await store.truncate_all()
    root = await root_connection(mariadb_server)
    caplog.set_level(logging.WARNING, logger="imfast.mysql")
    try:
        async with root.cursor() as cur:
            await cur.execute("INSERT INTO read_receipts (conversation_id, user_id, seq) "
                              "VALUES ('p:a:b', 'u', 0)")
        blocked = asyncio.create_task(store.mark_read("p:a:b", "u", 5))
        await asyncio.sleep(0.1)  # it holds the only connection, waiting on the row lock
        began = time.monotonic()
        with pytest.raises(BackendUnavailable, match="DB_MAX_OPEN_CONNS=1"):
            await store.latest_seq("p:a:b")
        # acquire_timeout (0.5 s), once: not retried (a count, not a clock, says so:
        # a loaded machine stretches the wait), and nowhere near a hang.
        assert 0.45 <= time.monotonic() - began < 10
        assert caplog.text.count("no free connection") == 1 and "retrying" not in caplog.text
        await root.commit()
        assert await blocked
        assert await store.read_up_to("p:a:b") == {"u": 5}
    finally:
        root.close()
        await store.close()


async def test_lost_connections_are_replaced(private_mariadb: MariaDBServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    store = await MySQLStore.open(private_mariadb.create_app_database(), 3)
    caplog.set_level(logging.WARNING, logger="imfast.mysql")
    try:
        await store.truncate_all()
        await store.append([msg("p:a:b", 1)])
        # Runbook, Too Many Connections: "Kill idle connections".
        ids = private_mariadb.execute(
            "SELECT id FROM information_schema.processlist WHERE user='im_service'").split()
        assert ids
        private_mariadb.execute("".join(f"KILL {i};" for i in ids))
        assert await store.latest_seq("p:a:b") == 1  # a read is retried
        private_mariadb.execute("".join(
            f"KILL {i};" for i in private_mariadb.execute(
                "SELECT id FROM information_schema.processlist WHERE user='im_service'").split()))
        await store.append([msg("p:a:b", 2)])  # a transaction lost before COMMIT is retried
        assert [m.seq for m in await store.fetch("p:a:b", 0, 10)] == [1, 2]
        # The loop did not run while the CLI killed them: both calls first got
        # a dead pooled connection, and the retry is what made them succeed.
        assert "database connection lost, retrying op=latest_seq" in caplog.text
        assert "database connection lost, retrying op=append" in caplog.text
    finally:
        await store.close()


async def test_too_many_connections(private_mariadb: MariaDBServer,
                                    caplog: pytest.LogCaptureFixture) -> None:
    dsn = private_mariadb.create_app_database()
    store = await MySQLStore.open(dsn, 20)  # DB_MAX_OPEN_CONNS above the server's limit
    await store.truncate_all()
    root = await root_connection(private_mariadb)
    private_mariadb.execute("SET GLOBAL max_connections = 10")  # MariaDB's minimum
    caplog.set_level(logging.ERROR, logger="imfast.mysql")
    writes: list[asyncio.Task[bool]] = []
    try:
        async with root.cursor() as cur:
            await cur.execute("INSERT INTO read_receipts (conversation_id, user_id, seq) "
                              "VALUES ('p:a:b', 'u', 0)")
        # Every write waits on the row lock with a connection of its own: root
        # and 9 of the store's fill the server, the 11th connection is refused.
        writes = [asyncio.create_task(store.mark_read("p:a:b", "u", i)) for i in range(1, 16)]
        done, _ = await asyncio.wait(writes, timeout=10, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t.exception() for t in done]
        assert failed and all(isinstance(e, BackendUnavailable) for e in failed)
        assert all(e.backend == "mysql" and "too many connections" in str(e)  # type: ignore[union-attr]
                   for e in failed)
        assert "database error: too many connections errno=1040" in caplog.text
        await root.commit()
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        assert True in outcomes  # the writes that had a connection went through
        assert all(o is False or o is True or isinstance(o, BackendUnavailable) for o in outcomes)
    finally:
        private_mariadb.execute("SET GLOBAL max_connections = 151")
        root.close()
        await asyncio.gather(*writes, return_exceptions=True)
        await store.close()
    store = await MySQLStore.open(dsn, 2)  # and the server serves again
    assert (await store.read_up_to("p:a:b"))["u"] >= 1
    await store.close()


async def test_backend_unavailable_when_the_server_is_down(
        private_mariadb: MariaDBServer, caplog: pytest.LogCaptureFixture) -> None:
    dsn = private_mariadb.create_app_database()
    store = await MySQLStore.open(dsn, 2)
    caplog.set_level(logging.WARNING, logger="imfast.mysql")
    try:
        await store.truncate_all()
        await store.append([msg("p:a:b", 1)])
        private_mariadb.kill()
        began = time.monotonic()
        with pytest.raises(BackendUnavailable) as read_error:
            await store.latest_seq("p:a:b")
        assert read_error.value.backend == "mysql"
        assert isinstance(read_error.value, ConnectionError)
        with pytest.raises(BackendUnavailable):
            await store.append([msg("p:a:b", 2)])
        with pytest.raises(BackendUnavailable):
            await store.mark_read("p:a:b", "a", 1)
        with pytest.raises(BackendUnavailable):
            await MySQLStore.open(dsn, 2)
        assert time.monotonic() - began < 5  # refused at once, no hanging
        assert "database unavailable" in caplog.text
        # The same store recovers once the server is back.
        private_mariadb.start()
        assert await store.latest_seq("p:a:b") == 1
        await store.append([msg("p:a:b", 2)])
        assert await store.latest_seq("p:a:b") == 2
    finally:
        private_mariadb.start()
        await store.close()


async def test_advance_many_moves_cursors_forward_only_and_clears_offline_rows(
        store: MySQLStore) -> None:
    conv, other = "p:a:b", "p:a:c"
    await store.add_offline([("b", conv, s, f"m{s}") for s in (1, 2, 3)]
                            + [("c", other, 1, "x1")])
    assert await store.advance("b", "phone", conv, 5) == 5
    moves = [("b", "phone", conv, 2),    # behind the stored 5: stays 5
             ("b", "laptop", conv, 2),   # new
             ("b", "laptop", conv, 1),   # an older move in the same batch: 2 wins
             ("c", "phone", other, 1)]
    assert await store.advance_many(moves) == [5, 2, 2, 1]
    assert await store.cursors("b", "phone") == {conv: 5}
    assert await store.cursors("b", "laptop") == {conv: 2}
    # b's rows up to its furthest cursor (5) and c's row up to 1 are gone
    assert await store.offline_count("b") == 0
    assert await store.offline_count("c") == 0


async def test_router_acks_go_through_one_batch_per_loop_iteration(store: MySQLStore) -> None:
    from imfast.backends.composite import CompositeStore
    from imfast.backends.memory import MemoryStore
    from imfast.service.router import Router

    class _Pusher:
        def deliver(self, *args: Any) -> None:
            pass

        def event(self, *args: Any) -> None:
            pass

    router = Router(load_settings({}), CompositeStore(MemoryStore(), store), _Pusher())
    for i in range(3):
        await router.send("a", "d", f"c{i}", "b", None, "hi")
    cursors = await asyncio.gather(*(router.ack("b", f"dev{i}", "p:a:b", 1 + i % 3)
                                     for i in range(9)))
    assert cursors == [1 + i % 3 for i in range(9)]
    assert router._cursor_batcher is not None and router._cursor_batcher.batches == 1
    assert await store.cursors("b", "dev2") == {"p:a:b": 3}


async def test_a_silent_connection_is_dropped_after_the_timeout(
        private_mariadb: MariaDBServer, caplog: pytest.LogCaptureFixture) -> None:
    """A server that stops answering (a partition: no FIN, no RST) holds no one for long.

    Through a fault proxy in ``blackhole`` mode, a read gives up after
    DB_READ_TIMEOUT (one retry on another connection) and a write after
    DB_WRITE_TIMEOUT, both as BackendUnavailable, and the connections are
    dropped; once the link passes again, new connections serve.
    """
    dsn = parse_dsn(private_mariadb.create_app_database())
    async with FaultProxy((private_mariadb.host, private_mariadb.port)) as proxy:
        host, port = proxy.addr.split(":")
        store = await MySQLStore.open(
            f"mysql://{dsn.user}:{dsn.password}@{host}:{port}/{dsn.database}", 3,
            read_timeout=0.3, write_timeout=0.6, acquire_timeout=1.0)
        caplog.set_level(logging.WARNING, logger="imfast.mysql")
        try:
            await store.truncate_all()
            await store.append([msg("p:a:b", 1)])
            proxy.blackhole()
            began = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await store.latest_seq("p:a:b")
            read_took = time.monotonic() - began
            began = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await store.append([msg("p:a:b", 2)])
            write_took = time.monotonic() - began
            # Lower bounds are the timeouts; the upper ones are generous (a new
            # connection's handshake into the blackhole waits for the pool too).
            assert 0.3 <= read_took < 5 and 0.6 <= write_took < 5, (read_took, write_took)
            assert store.timeouts >= 1  # then new connections time out in their handshake
            assert "database connection dropped: no reply within" in caplog.text
            proxy.pass_through()
            assert await store.latest_seq("p:a:b") == 1  # the dead connections are gone
            await store.append([msg("p:a:b", 2)])
            assert [m.seq for m in await store.fetch("p:a:b", 0, 10)] == [1, 2]
        finally:
            proxy.pass_through()
            await store.close()


async def test_purge_messages_removes_old_entries_and_keeps_every_seq_floor(
        mariadb_server: MariaDBServer, store: MySQLStore) -> None:
    now = int(time.time() * 1000)

    def aged(conv: str, seq: int, days: float) -> StoredMessage:
        return StoredMessage(conv, seq, f"id-{conv}-{seq}", "a", "d1", f"{conv}-{seq}", "b",
                             now - int(days * DAY * 1000))

    await store.append([aged("p:a:b", s, 40) for s in range(1, 6)]
                       + [aged("p:a:b", 6, 1), aged("p:a:b", 7, 0)]
                       + [aged("g:old", s, 31) for s in range(1, 4)])
    # A conversation whose snapshot row is missing: the purge itself must keep its floor.
    sql(mariadb_server, "DELETE FROM sequence_snapshots WHERE conversation_id='g:old'")
    deletes = "SHOW GLOBAL STATUS LIKE 'Com_delete'"
    before = int(sql(mariadb_server, deletes)[0][1])
    assert await store.purge_messages(30 * DAY, batch=3) == 8
    assert int(sql(mariadb_server, deletes)[0][1]) - before == 3  # batches of 3, 3, 2
    assert [m.seq for m in await store.fetch("p:a:b", 0, 10)] == [6, 7]
    assert await store.fetch("g:old", 0, 10) == []
    # No seq is ever handed out twice: the floors survive the purge.
    assert await store.latest_seq("g:old") == 3
    assert await store.latest_seq("p:a:b") == 7
    assert await store.purge_messages(30 * DAY) == 0
    for bad in ({"older_than_seconds": 0}, {"older_than_seconds": DAY, "batch": 0}):
        with pytest.raises(ValueError):
            await store.purge_messages(**bad)  # type: ignore[arg-type]


async def test_offline_worker_applies_message_retention_only_when_set(
        store: MySQLStore, mariadb_app_dsn: str) -> None:
    from imfast.offline.worker import OfflineWorker

    old = StoredMessage("p:a:b", 1, "id-old", "a", "d1", "old", "b",
                        int((time.time() - 40 * DAY) * 1000))
    await store.append([old, msg("p:a:b", 2, cmid="new")._replace(ts=int(time.time() * 1000))])
    for days, left in ((0.0, [1, 2]), (30.0, [2])):
        worker = OfflineWorker(load_settings({
            "MYSQL_DSN": mariadb_app_dsn, "KAFKA_BROKERS": "unused:9092",
            "MESSAGE_RETENTION_DAYS": str(days)}))
        worker.mysql = store
        await worker.purge_once()
        assert [m.seq for m in await store.fetch("p:a:b", 0, 10)] == left
        assert worker.messages_purged == (1 if days else 0)
