"""MySQL / MariaDB backend: the distributed im-service's durable store.

Implements :class:`~imfast.backends.base.MessageLog`, ``CursorStore``,
``GroupStore`` and ``ReceiptStore`` (sequencing is Redis's job, see
:mod:`imfast.backends.composite`), plus the offline queue the offline-worker
fills.  The semantics are those of :mod:`imfast.backends.sqlite`; the tables
are the ones the operators' runbooks query (database ``im_chat``,
``offline_messages``, ``sequence_snapshots``, ``read_receipts``).

Guarantees beyond the contract:

* ``append`` is one transaction: the messages, the private-conversation
  index and ``sequence_snapshots`` (each conversation's highest seq, raised
  with ``GREATEST`` so it never goes back) commit together or not at all, and
  returning means committed.  ``latest_seq`` is the larger of the log's and
  the snapshot's, so the durable floor survives deleted messages.
* A duplicate ``(conv, seq)`` logs "sequence number already exists conv=...
  seq=..." and raises ``ValueError("sequence number already exists: ...")``.
* Connection trouble raises :class:`~imfast.backends.errors.BackendUnavailable`
  (``"mysql"``): refused, lost, and MySQL error 1040, which is also logged as
  "database error: too many connections".  Reads are retried once on a lost
  connection (a pooled connection may have died with a server restart);
  writes only where nothing can have been applied: before a transaction's
  COMMIT was sent, or when the request never left this process.
* At most ``pool_size`` connections (``DB_MAX_OPEN_CONNS``) are open; a
  caller waits up to ``acquire_timeout`` seconds for a free one.
* A query waits at most ``read_timeout`` seconds (``DB_READ_TIMEOUT``) for its
  reply, a write statement or transaction at most ``write_timeout`` seconds
  (``DB_WRITE_TIMEOUT``); then its connection is closed (a reply may still be
  on its way, so it is out of step) and the pool opens a new one.  A read is
  retried once on another connection; a write or transaction is not (it
  took its whole budget already) and raises BackendUnavailable (the sender
  is told ``unavailable`` and resends the same cmid, which the log's
  (sender, cmid) lookup resolves).  Without this, a
  connection whose server vanished without a FIN or RST (a partition, a
  dead host) would hold its caller - and the group committer's one batch in
  flight - until TCP gives up, minutes later.
* The schema is created and upgraded at :meth:`MySQLStore.open` by numbered
  migrations recorded in ``schema_migrations``; opening twice, or several
  instances at once (``GET_LOCK``), is safe.  ``mysql_schema.sql`` next to
  this file is the same schema for a DBA to read or apply by hand.

All text columns are ``utf8mb4`` with binary collation: ids compare exactly
(``Alice`` is not ``alice``), as in SQLite.  Connections use autocommit; the
multi-statement writes run in explicit transactions.  Sessions use UTC and
strict SQL mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from imfast.backends.base import EVERYONE, StoredMessage, until_fewer_than
from imfast.backends.errors import BackendUnavailable
from imfast.protocol.ids import conv_members_private

try:
    import asyncmy
    from asyncmy.errors import IntegrityError, InterfaceError, MySQLError, OperationalError
except ImportError as _exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the MySQL backend needs asyncmy: pip install 'imfast[mysql]' (or asyncmy>=0.2.9)"
    ) from _exc

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TABLES",
    "MySQLDSN",
    "MySQLStore",
    "parse_dsn",
    "schema_sql",
]

log = logging.getLogger("imfast.mysql")

_T = TypeVar("_T")
_Row = tuple[Any, ...]

# ------------------------------------------------------------------ schema

_TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"


def _add_index_if_missing(table: str, index: str, columns: str) -> tuple[str, ...]:
    """``ALTER TABLE ... ADD INDEX`` only if ``index`` is not there yet, in statements
    both MariaDB and MySQL 8 take (MySQL has no ``ADD INDEX IF NOT EXISTS``); the
    names are constants of this module, never input."""
    choose = ("SET @imfast_ddl = IF((SELECT COUNT(*) FROM information_schema.statistics "
              f"WHERE table_schema = DATABASE() AND table_name = '{table}' "
              f"AND index_name = '{index}') = 0, "
              f"'ALTER TABLE {table} ADD INDEX {index} ({columns})', 'DO 0')")
    return (
        choose,
        "PREPARE imfast_ddl FROM @imfast_ddl",
        "EXECUTE imfast_ddl",
        "DEALLOCATE PREPARE imfast_ddl",
    )


#: (version, description, statements).  Never edit a released migration:
#: append a new one.  Each statement must be safe to run again (IF NOT
#: EXISTS), because DDL commits implicitly and a crash can stop a migration
#: half-way; it is recorded in ``schema_migrations`` only when complete.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "initial schema", (
        # The conversation log.  dedup_key is "<sender>:<cmid>" (NULL without
        # a cmid), binary so that trailing spaces in a cmid are significant.
        f"""CREATE TABLE IF NOT EXISTS messages (
    conv          VARCHAR(130)   NOT NULL,
    seq           BIGINT         NOT NULL,
    msg_id        VARCHAR(64)    NOT NULL,
    sender        VARCHAR(64)    NOT NULL,
    sender_device VARCHAR(64)    NOT NULL,
    cmid          VARCHAR(128)   NOT NULL,
    body          MEDIUMTEXT     NOT NULL,
    ts            BIGINT         NOT NULL COMMENT 'ms since the epoch, server clock',
    kind          VARCHAR(16)    NOT NULL,
    dedup_key     VARBINARY(772) NULL,
    PRIMARY KEY (conv, seq),
    UNIQUE KEY messages_dedup (dedup_key)
) {_TABLE_OPTIONS}""",
        f"""CREATE TABLE IF NOT EXISTS private_convs (
    user_id         VARCHAR(64)  NOT NULL,
    conversation_id VARCHAR(130) NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
) {_TABLE_OPTIONS}""",
        f"""CREATE TABLE IF NOT EXISTS device_cursors (
    user_id         VARCHAR(64)  NOT NULL,
    device_id       VARCHAR(64)  NOT NULL,
    conversation_id VARCHAR(130) NOT NULL,
    seq             BIGINT       NOT NULL,
    updated_at      TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
                                 ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (user_id, device_id, conversation_id)
) {_TABLE_OPTIONS}""",
        f"""CREATE TABLE IF NOT EXISTS chat_groups (
    group_id   VARCHAR(64)  NOT NULL,
    name       VARCHAR(512) NOT NULL,
    owner      VARCHAR(64)  NOT NULL,
    created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (group_id)
) {_TABLE_OPTIONS}""",
        f"""CREATE TABLE IF NOT EXISTS group_members (
    group_id VARCHAR(64) NOT NULL,
    user_id  VARCHAR(64) NOT NULL,
    role     VARCHAR(16) NOT NULL,
    PRIMARY KEY (group_id, user_id),
    KEY group_members_user (user_id, group_id)
) {_TABLE_OPTIONS}""",
        f"""CREATE TABLE IF NOT EXISTS read_receipts (
    conversation_id VARCHAR(130) NOT NULL,
    user_id         VARCHAR(64)  NOT NULL,
    seq             BIGINT       NOT NULL,
    updated_at      TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
                                 ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (conversation_id, user_id)
) {_TABLE_OPTIONS}""",
        # Undelivered messages of users with no online device; rows older than
        # 7 days are purged (purge_offline, or the runbook's DELETE ... LIMIT).
        f"""CREATE TABLE IF NOT EXISTS offline_messages (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    user_id         VARCHAR(64)     NOT NULL,
    conversation_id VARCHAR(130)    NOT NULL,
    seq             BIGINT          NOT NULL,
    msg_id          VARCHAR(64)     NOT NULL,
    created_at      TIMESTAMP(3)    NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY offline_user_conv_seq (user_id, conversation_id, seq),
    KEY offline_created_at (created_at)
) {_TABLE_OPTIONS}""",
        # Each conversation's highest stored seq, written with the messages:
        # the floor a restarted (or emptied) Redis counter must stay above.
        f"""CREATE TABLE IF NOT EXISTS sequence_snapshots (
    conversation_id VARCHAR(130) NOT NULL,
    seq             BIGINT       NOT NULL,
    updated_at      TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
                                 ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (conversation_id)
) {_TABLE_OPTIONS}""",
    )),
    (2, "messages_ts index for MESSAGE_RETENTION_DAYS", (
        # purge_messages deletes the oldest entries by their ts.
        *_add_index_if_missing("messages", "messages_ts", "ts"),
    )),
    (3, "group_bars: who may not join a group by itself", (
        f"""CREATE TABLE IF NOT EXISTS group_bars (
    group_id VARCHAR(64) NOT NULL,
    user_id  VARCHAR(64) NOT NULL COMMENT '* bars every user: an invite-only group',
    PRIMARY KEY (group_id, user_id)
) {_TABLE_OPTIONS}""",
    )),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]

_MIGRATIONS_TABLE = f"""CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INT          NOT NULL,
    applied_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (version)
) {_TABLE_OPTIONS}"""

#: The tables holding data (not ``schema_migrations``).
TABLES = (
    "messages",
    "private_convs",
    "device_cursors",
    "chat_groups",
    "group_members",
    "read_receipts",
    "offline_messages",
    "sequence_snapshots",
    "group_bars",
)


def schema_sql() -> str:
    """The whole schema as one SQL script (the content of ``mysql_schema.sql``)."""
    parts = [
        f"-- imfast MySQL/MariaDB schema, version {SCHEMA_VERSION}.",
        "-- Generated from imfast/backends/mysql.py (MIGRATIONS); MySQLStore.open()",
        "-- applies it by itself. To apply it by hand: mysql im_chat < mysql_schema.sql",
        "",
        _MIGRATIONS_TABLE + ";",
    ]
    for version, description, statements in MIGRATIONS:
        parts += ["", f"-- migration {version}: {description}"]
        parts += [s + ";" for s in statements]
        parts.append(f"INSERT IGNORE INTO schema_migrations (version) VALUES ({version});")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ DSN


@dataclass(frozen=True, slots=True)
class MySQLDSN:
    """The parts of ``mysql://user:pass@host:port/db``."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def redacted(self) -> str:
        """The DSN with the password masked, for logs and error messages."""
        secret = ":***" if self.password else ""
        return f"mysql://{self.user}{secret}@{self.host}:{self.port}/{self.database}"


def parse_dsn(dsn: str) -> MySQLDSN:
    """Parse ``mysql://user:pass@host:port/db`` (port 3306, database ``im_chat`` by default).

    User and password may be percent-encoded.  Raises ``ValueError`` naming
    the problem (with the password masked).
    """
    parts = urlsplit(dsn)
    shown = dsn.replace(f":{parts.password}@", ":***@") if parts.password else dsn
    if parts.scheme not in ("mysql", "mariadb"):
        raise ValueError(f"MYSQL_DSN must look like mysql://user:pass@host:3306/im_chat, got {shown!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"MYSQL_DSN takes no ?options or #fragment: {shown!r}")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ValueError(f"MYSQL_DSN has a bad port: {shown!r}") from None
    if not parts.hostname or not parts.username:
        raise ValueError(f"MYSQL_DSN needs a user and a host: {shown!r}")
    database = parts.path.lstrip("/") or "im_chat"
    if "/" in database:
        raise ValueError(f"MYSQL_DSN has a bad database name: {shown!r}")
    return MySQLDSN(parts.hostname, port, unquote(parts.username),
                    unquote(parts.password or ""), unquote(database))


# ------------------------------------------------------------------ errors

_TOO_MANY_CONNECTIONS = frozenset({1040, 1203})  # server-wide; per-user max_user_connections
_REFUSED = frozenset({2002, 2003, 2005})  # socket, TCP, unknown host
# Connection gone: closed here (0), server shutdown / killed / timed out,
# "gone away" (2006) and "lost during query" (2013, 2055).
_LOST = frozenset({0, 1053, 1927, 2006, 2013, 2055, 4031})
# The request never left this process: safe to retry even a write.
_NOT_SENT = frozenset({0, 2006})
_DEADLOCK = frozenset({1205, 1213})  # lock wait timeout, deadlock: the statement was undone
_DUPLICATE_KEY = 1062
_DUPLICATE_ENTRY = re.compile(r"Duplicate entry '(.*)' for key '(?:[^'.]*\.)?([^']*)'", re.DOTALL)
_DEADLOCK_RETRIES = 3


class _NoReply(OperationalError):
    """No reply within DB_READ_TIMEOUT / DB_WRITE_TIMEOUT; the connection was closed."""


def _errno(exc: BaseException) -> int | None:
    """MySQL error number of ``exc``; 0 for a connection closed on our side; None if not MySQL."""
    if isinstance(exc, MySQLError):
        code = exc.args[0] if exc.args else 0
        return code if isinstance(code, int) else 0
    if isinstance(exc, OSError):  # a socket error that escaped the driver
        return 2013
    return None


def _is_lost(exc: BaseException) -> bool:
    code = _errno(exc)
    if isinstance(exc, InterfaceError):
        return True
    return code in _LOST


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MySQLError) and len(exc.args) >= 2:
        return f"({exc.args[0]}) {exc.args[1]}"
    return str(exc) or type(exc).__name__


def _message_row(r: _Row) -> StoredMessage:
    return StoredMessage(str(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]),
                         str(r[6]), int(r[7]), str(r[8]))


_COLUMNS = "conv, seq, msg_id, sender, sender_device, cmid, body, ts, kind"
_NO_LIMIT = 18446744073709551615  # MySQL's way to say "all rows"


def _limit(limit: int) -> int:
    # SQLite reads a negative LIMIT as "no limit"; MySQL refuses it.
    return _NO_LIMIT if limit < 0 else limit


# ------------------------------------------------------------------ store


class MySQLStore:
    """Message log, cursors, groups, receipts and the offline queue in MySQL/MariaDB.

    Create with :meth:`open`; share one instance per process (it holds the
    connection pool) and :meth:`close` it at shutdown.
    """

    def __init__(self, pool: Any, dsn: MySQLDSN, pool_size: int, acquire_timeout: float,
                 read_timeout: float | None = None, write_timeout: float | None = None) -> None:
        self._pool = pool
        self.dsn = dsn
        self._pool_size = pool_size
        self._acquire_timeout = acquire_timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._closed = False
        #: Connections dropped because a reply did not come within its timeout.
        self.timeouts = 0

    @classmethod
    async def open(
        cls,
        dsn: str,
        pool_size: int,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float | None = 5.0,
        write_timeout: float | None = 10.0,
        acquire_timeout: float = 10.0,
    ) -> MySQLStore:
        """Connect a pool of at most ``pool_size`` connections and migrate the schema.

        ``dsn`` is ``mysql://user:pass@host:port/db`` (``MYSQL_DSN``);
        ``pool_size`` is ``DB_MAX_OPEN_CONNS``.  ``read_timeout`` bounds the
        wait for one query's reply (``DB_READ_TIMEOUT``), ``write_timeout``
        one write statement or transaction (``DB_WRITE_TIMEOUT``); None: no
        bound.  Raises :class:`BackendUnavailable` if the server cannot be
        reached, ``ValueError`` for a malformed DSN.
        """
        if pool_size < 1:
            raise ValueError(f"DB_MAX_OPEN_CONNS must be at least 1, got {pool_size}")
        parsed = parse_dsn(dsn)
        try:
            pool = await asyncmy.create_pool(
                minsize=1,
                maxsize=pool_size,
                host=parsed.host,
                port=parsed.port,
                user=parsed.user,
                password=parsed.password,
                database=parsed.database,
                charset="utf8mb4",
                autocommit=True,
                connect_timeout=connect_timeout,
                # Also bounds what the per-operation timeouts do not cover: the
                # handshake of a new connection, the migrations.
                read_timeout=max(read_timeout or 0, write_timeout or 0) or None,
                # Strict mode: a too-long value is an error, never truncated.
                # UTC: the TIMESTAMPs we read back do not depend on the host.
                init_command="SET SESSION sql_mode='TRADITIONAL', time_zone='+00:00'",
            )
        except (MySQLError, OSError) as exc:
            unavailable = _unavailable_error("open", exc, parsed, pool_size)
            if unavailable is None:
                raise
            raise unavailable from exc
        store = cls(pool, parsed, pool_size, acquire_timeout, read_timeout, write_timeout)
        try:
            await store._migrate()
        except BaseException:
            await store.close()
            raise
        log.info("mysql store open host=%s port=%s database=%s pool_size=%s schema_version=%s",
                 parsed.host, parsed.port, parsed.database, pool_size, SCHEMA_VERSION)
        return store

    @property
    def pool_size(self) -> int:
        """The most connections this store opens (``DB_MAX_OPEN_CONNS``)."""
        return self._pool_size

    def pool_stats(self) -> dict[str, int]:
        """``{"max": ..., "open": ..., "idle": ...}`` connections, for metrics."""
        return {"max": self._pool_size, "open": int(self._pool.size),
                "idle": int(self._pool.freesize)}

    async def close(self) -> None:
        """Close every connection (waits for those in use to come back)."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        await self._pool.wait_closed()

    # ------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def _connection(self, op: str, timeout: float | None = None) -> AsyncIterator[Any]:
        """A pooled connection; BackendUnavailable if none frees up in time.

        With ``timeout``, the block using the connection must finish within
        that many seconds; otherwise the connection is closed and the block
        fails with a lost-connection error (2013).
        """
        try:
            async with asyncio.timeout(self._acquire_timeout):
                conn = await self._pool.acquire()
        except TimeoutError:
            log.error("database unavailable: no free connection op=%s pool_size=%s "
                      "waited_seconds=%s", op, self._pool_size, self._acquire_timeout)
            raise BackendUnavailable(
                "mysql", f"no free connection within {self._acquire_timeout:g} s "
                f"(pool of DB_MAX_OPEN_CONNS={self._pool_size} busy)") from None
        try:
            if timeout is None:
                yield conn
                return
            try:
                async with asyncio.timeout(timeout):
                    yield conn
            except TimeoutError:
                # A late reply would answer the next query on it: never reuse it.
                conn.close()
                self.timeouts += 1
                log.warning("database connection dropped: no reply within %g s op=%s host=%s "
                            "port=%s", timeout, op, self.dsn.host, self.dsn.port)
                raise _NoReply(
                    2013, f"Lost connection to MySQL server: no reply within {timeout:g} s "
                    "(DB_READ_TIMEOUT / DB_WRITE_TIMEOUT)") from None
        finally:
            # A connection that died or still holds a transaction is dropped here.
            self._pool.release(conn)

    def _fail(self, op: str, exc: BaseException) -> BaseException:
        """BackendUnavailable (caused by ``exc``) if ``exc`` means MySQL is out of reach, else ``exc``."""
        unavailable = _unavailable_error(op, exc, self.dsn, self._pool_size)
        if unavailable is None:
            return exc
        unavailable.__cause__ = exc
        return unavailable

    async def _read(self, op: str, sql: str, args: Sequence[Any] = ()) -> list[_Row]:
        """Run one SELECT; retried once on a lost connection."""
        for attempt in (1, 2):
            try:
                async with self._connection(op, self._read_timeout) as conn, \
                        conn.cursor() as cur:
                    await cur.execute(sql, args)
                    return list(await cur.fetchall())
            except BackendUnavailable:  # a ConnectionError, hence an OSError: already final
                raise
            except (MySQLError, OSError) as exc:
                if attempt == 1 and _is_lost(exc):
                    log.warning("database connection lost, retrying op=%s: %s", op, _describe(exc))
                    continue
                raise self._fail(op, exc)  # _fail set the cause
        raise AssertionError("unreachable")

    async def _write(self, op: str, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one autocommitted statement; returns the affected rows.

        Retried on a deadlock or lock wait timeout (the server undid the
        statement), and once if the statement never left this process; a lost
        reply leaves the outcome unknown, so that is BackendUnavailable.
        """
        lost_retries, deadlock_retries = 1, _DEADLOCK_RETRIES
        while True:
            try:
                async with self._connection(op, self._write_timeout) as conn, \
                        conn.cursor() as cur:
                    return int(await cur.execute(sql, args))
            except BackendUnavailable:  # a ConnectionError, hence an OSError: already final
                raise
            except (MySQLError, OSError) as exc:
                code = _errno(exc)
                if code in _DEADLOCK and deadlock_retries > 0:
                    # Concurrent upserts of one row can deadlock; the server
                    # undid this statement, so running it again is safe.
                    deadlock_retries -= 1
                    log.warning("database statement retried op=%s: %s", op, _describe(exc))
                    await asyncio.sleep(0.005 * (_DEADLOCK_RETRIES - deadlock_retries))
                    continue
                if lost_retries > 0 and _is_lost(exc) and code in _NOT_SENT:
                    lost_retries -= 1
                    log.warning("database connection lost, retrying op=%s: %s", op, _describe(exc))
                    continue
                raise self._fail(op, exc)  # _fail set the cause

    async def _transaction(self, op: str, body: Callable[[Any], Awaitable[_T]]) -> _T:
        """Run ``body(cursor)`` in BEGIN ... COMMIT.

        Retried from the start on a deadlock or lock wait timeout, and once on
        a connection lost before COMMIT was sent (the server rolled it back).
        A connection lost during COMMIT leaves the outcome unknown:
        BackendUnavailable.  Other errors (IntegrityError...) roll back and
        propagate unchanged.
        """
        lost_retries, deadlock_retries = 1, _DEADLOCK_RETRIES
        while True:
            committing = False
            try:
                async with self._connection(op, self._write_timeout) as conn:
                    await conn.begin()
                    try:
                        async with conn.cursor() as cur:
                            result = await body(cur)
                        committing = True
                        await conn.commit()
                        return result
                    except BaseException:
                        if not committing:
                            with contextlib.suppress(Exception):
                                await conn.rollback()
                        raise
            except BackendUnavailable:  # a ConnectionError, hence an OSError: already final
                raise
            except (MySQLError, OSError) as exc:
                code = _errno(exc)
                if code in _DEADLOCK and deadlock_retries > 0:
                    deadlock_retries -= 1
                    log.warning("database transaction retried op=%s: %s", op, _describe(exc))
                    await asyncio.sleep(0.005 * (_DEADLOCK_RETRIES - deadlock_retries))
                    continue
                if _is_lost(exc):
                    if committing:
                        log.error("database connection lost during commit, outcome unknown "
                                  "op=%s: %s", op, _describe(exc))
                        raise BackendUnavailable(
                            "mysql", f"connection lost during commit of {op}; outcome unknown: "
                            f"{_describe(exc)}") from exc
                    # Not after a timeout: that took the whole budget already, and
                    # the caller (a sender's resend) retries sooner than a second one.
                    if lost_retries > 0 and not isinstance(exc, _NoReply):
                        lost_retries -= 1
                        log.warning("database connection lost, retrying op=%s: %s",
                                    op, _describe(exc))
                        continue
                if isinstance(exc, IntegrityError):
                    raise
                raise self._fail(op, exc)  # _fail set the cause

    async def _migrate(self) -> None:
        """Apply the migrations not yet recorded in ``schema_migrations``."""
        lock = f"imfast.schema.{self.dsn.database}"[:64]
        op = "migrate"
        try:
            async with self._connection(op) as conn, conn.cursor() as cur:
                # Polled rather than waited for on the server: a reply must come
                # within the connections' read timeout.
                end = asyncio.get_running_loop().time() + 60
                while True:
                    await cur.execute("SELECT GET_LOCK(%s, 0)", (lock,))
                    got = await cur.fetchone()
                    if got and got[0] == 1:
                        break
                    if asyncio.get_running_loop().time() > end:
                        raise BackendUnavailable("mysql", "schema migration lock busy for 60 s")
                    await asyncio.sleep(0.1)
                try:
                    # Looked up first: CREATE ... IF NOT EXISTS on an existing
                    # table leaves a note the driver logs as a warning.
                    await cur.execute(
                        "SELECT COUNT(*) FROM information_schema.tables "
                        "WHERE table_schema=DATABASE() AND table_name='schema_migrations'")
                    exists = await cur.fetchone()
                    if not exists or not exists[0]:
                        await cur.execute(_MIGRATIONS_TABLE)
                    await cur.execute("SELECT version FROM schema_migrations")
                    applied = {int(v) for (v,) in await cur.fetchall()}
                    for version, description, statements in MIGRATIONS:
                        if version in applied:
                            continue
                        for statement in statements:
                            await cur.execute(statement)
                        await cur.execute(
                            "INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                        log.info("schema migration applied version=%s database=%s: %s",
                                 version, self.dsn.database, description)
                    newer = sorted(v for v in applied if v > SCHEMA_VERSION)
                    if newer:
                        log.warning("schema is newer than this release database=%s "
                                    "versions=%s known=%s", self.dsn.database,
                                    ",".join(map(str, newer)), SCHEMA_VERSION)
                finally:
                    with contextlib.suppress(MySQLError, OSError):
                        await cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
        except BackendUnavailable:  # a ConnectionError, hence an OSError: already final
            raise
        except (MySQLError, OSError) as exc:
            raise self._fail(op, exc)  # _fail set the cause

    async def truncate_all(self) -> None:
        """Delete every row of every imfast table (the schema stays).

        For tests and throw-away environments only: this is the whole chat history.
        """
        async def body(cur: Any) -> None:
            for table in TABLES:
                await cur.execute(f"DELETE FROM {table}")  # fixed names, not input

        await self._transaction("truncate_all", body)

    # ------------------------------------------------------------ MessageLog

    async def append(self, messages: list[StoredMessage]) -> None:
        """Store a batch atomically, with its private index and sequence snapshots.

        A (conv, seq) already present (or twice in the batch) stores nothing
        and raises ``ValueError("sequence number already exists: ...")``.
        """
        if not messages:
            return
        seen: set[tuple[str, int]] = set()
        for m in messages:
            if (m.conv, m.seq) in seen:
                self._log_duplicate(m.conv, str(m.seq), "twice in one batch")
                raise ValueError(f"sequence number already exists: conv={m.conv} seq={m.seq} "
                                 "(twice in one batch)")
            seen.add((m.conv, m.seq))
        # Sorted, so concurrent batches lock rows in the same order (no deadlock).
        ordered = sorted(messages, key=lambda m: (m.conv, m.seq))
        rows = [
            (m.conv, m.seq, m.msg_id, m.sender, m.sender_device, m.cmid, m.body, m.ts, m.kind,
             f"{m.sender}:{m.cmid}".encode() if m.cmid else None)
            for m in ordered
        ]
        private: set[tuple[str, str]] = set()
        highest: dict[str, int] = {}
        for m in ordered:
            highest[m.conv] = max(highest.get(m.conv, 0), m.seq)
            pair = conv_members_private(m.conv)
            if pair is not None:
                private.add((pair[0], m.conv))
                private.add((pair[1], m.conv))

        async def body(cur: Any) -> None:
            await cur.executemany(
                f"INSERT INTO messages ({_COLUMNS}, dedup_key) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", rows)
            if private:
                await cur.executemany(
                    "INSERT INTO private_convs (user_id, conversation_id) VALUES (%s,%s) "
                    "ON DUPLICATE KEY UPDATE user_id=user_id", sorted(private))
            await cur.executemany(
                "INSERT INTO sequence_snapshots (conversation_id, seq) VALUES (%s,%s) "
                "ON DUPLICATE KEY UPDATE seq=GREATEST(seq, VALUES(seq))", sorted(highest.items()))

        try:
            await self._transaction("append", body)
        except IntegrityError as exc:
            if _errno(exc) != _DUPLICATE_KEY:
                raise
            raise self._duplicate_error(exc) from None

    def _log_duplicate(self, conv: str, seq: str, detail: str) -> None:
        log.error("sequence number already exists conv=%s seq=%s: %s", conv, seq, detail)

    def _duplicate_error(self, exc: BaseException) -> ValueError:
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        found = _DUPLICATE_ENTRY.search(text)
        if found and found.group(2) == "PRIMARY" and "-" in found.group(1):
            conv, seq = found.group(1).rsplit("-", 1)
            self._log_duplicate(conv, seq, "refused the whole batch")
            return ValueError(f"sequence number already exists: conv={conv} seq={seq}")
        if found and found.group(2) == "messages_dedup":
            # The same <sender>:<cmid> under a new seq: the sequencer lost its
            # dedup record (e.g. Redis data loss) and the client resent.
            key = found.group(1)
            log.error("sequence number already exists conv=? seq=? dedup_key=%s: "
                      "message already stored under another seq", key)
            return ValueError(f"sequence number already exists: dedup_key={key} "
                              "is stored under another seq")
        self._log_duplicate("?", "?", text)
        return ValueError(f"sequence number already exists: {text}")

    async def fetch(self, conv: str, after: int, limit: int) -> list[StoredMessage]:
        rows = await self._read(
            "fetch", f"SELECT {_COLUMNS} FROM messages WHERE conv=%s AND seq>%s "
            "ORDER BY seq LIMIT %s", (conv, after, _limit(limit)))
        return [_message_row(r) for r in rows]

    async def fetch_before(self, conv: str, before: int, limit: int) -> list[StoredMessage]:
        rows = await self._read(
            "fetch_before", f"SELECT {_COLUMNS} FROM messages WHERE conv=%s AND seq<%s "
            "ORDER BY seq DESC LIMIT %s", (conv, before, _limit(limit)))
        return [_message_row(r) for r in reversed(rows)]

    async def get(self, conv: str, seq: int) -> StoredMessage | None:
        rows = await self._read(
            "get", f"SELECT {_COLUMNS} FROM messages WHERE conv=%s AND seq=%s", (conv, seq))
        return _message_row(rows[0]) if rows else None

    async def latest_seq(self, conv: str) -> int:
        """Highest seq of ``conv``: the log's, or the snapshot's if higher (0 when neither)."""
        rows = await self._read(
            "latest_seq",
            "SELECT GREATEST("
            "COALESCE((SELECT MAX(seq) FROM messages WHERE conv=%s), 0), "
            "COALESCE((SELECT seq FROM sequence_snapshots WHERE conversation_id=%s), 0))",
            (conv, conv))
        return int(rows[0][0])

    async def find_by_cmid(self, sender: str, cmid: str) -> StoredMessage | None:
        rows = await self._read(
            "find_by_cmid", f"SELECT {_COLUMNS} FROM messages WHERE dedup_key=%s",
            (f"{sender}:{cmid}".encode(),))
        return _message_row(rows[0]) if rows else None

    async def private_conversations(self, user: str) -> dict[str, int]:
        rows = await self._read(
            "private_conversations",
            "SELECT pc.conversation_id, GREATEST("
            "COALESCE((SELECT MAX(m.seq) FROM messages m WHERE m.conv=pc.conversation_id), 0), "
            "COALESCE(s.seq, 0)) "
            "FROM private_convs pc LEFT JOIN sequence_snapshots s "
            "ON s.conversation_id=pc.conversation_id WHERE pc.user_id=%s",
            (user,))
        return {str(conv): int(seq) for conv, seq in rows}

    # ------------------------------------------------------------ CursorStore

    async def cursors(self, user: str, device: str) -> dict[str, int]:
        rows = await self._read(
            "cursors", "SELECT conversation_id, seq FROM device_cursors "
            "WHERE user_id=%s AND device_id=%s", (user, device))
        return {str(conv): int(seq) for conv, seq in rows}

    async def advance(self, user: str, device: str, conv: str, seq: int) -> int:
        """Move the cursor forward to ``seq`` (never back); returns the cursor now."""
        changed = await self._write(
            "advance", "INSERT INTO device_cursors (user_id, device_id, conversation_id, seq) "
            "VALUES (%s,%s,%s,%s) ON DUPLICATE KEY UPDATE seq=GREATEST(seq, VALUES(seq))",
            (user, device, conv, seq))
        if changed:  # 1: inserted, 2: moved forward - the cursor is seq
            return seq
        rows = await self._read(
            "advance", "SELECT seq FROM device_cursors "
            "WHERE user_id=%s AND device_id=%s AND conversation_id=%s", (user, device, conv))
        return int(rows[0][0]) if rows else seq

    async def advance_many(self, moves: list[tuple[str, str, str, int]]) -> list[int]:
        """Many cursor moves in one transaction; returns each cursor now, in order.

        Also drops the offline rows each move covers (what ``clear_offline``
        does per move).  Three statements for the whole batch instead of up to
        three round trips per ack; keys are sorted so concurrent batches from
        several im-service replicas take row locks in the same order.
        """
        best: dict[tuple[str, str, str], int] = {}
        for user, device, conv, seq in moves:
            key = (user, device, conv)
            if seq > best.get(key, -1):
                best[key] = seq
        keys = sorted(best)

        async def body(cur: Any) -> dict[tuple[str, str, str], int]:
            rows = ",".join(["(%s,%s,%s,%s)"] * len(keys))
            await cur.execute(
                "INSERT INTO device_cursors (user_id, device_id, conversation_id, seq) "
                f"VALUES {rows} ON DUPLICATE KEY UPDATE seq=GREATEST(seq, VALUES(seq))",
                [v for key in keys for v in (*key, best[key])])
            triples = ",".join(["(%s,%s,%s)"] * len(keys))
            await cur.execute(
                "SELECT user_id, device_id, conversation_id, seq FROM device_cursors "
                f"WHERE (user_id, device_id, conversation_id) IN ({triples})",
                [v for key in keys for v in key])
            now = {(str(u), str(d), str(c)): int(q) for u, d, c, q in await cur.fetchall()}
            covered: dict[tuple[str, str], int] = {}
            for (user, _device, conv), seq in now.items():
                covered[(user, conv)] = max(covered.get((user, conv), 0), seq)
            if covered:
                conds = " OR ".join(["(user_id=%s AND conversation_id=%s AND seq<=%s)"]
                                    * len(covered))
                await cur.execute(f"DELETE FROM offline_messages WHERE {conds}",
                                  [v for (u, c), q in sorted(covered.items()) for v in (u, c, q)])
            return now

        now = await self._transaction("advance", body)
        return [now.get((user, device, conv), seq) for user, device, conv, seq in moves]

    # ------------------------------------------------------------ GroupStore

    async def create(self, group: str, owner: str, name: str, open: bool = True) -> bool:
        """Create a group owned by ``owner``; False if the id is taken."""
        async def body(cur: Any) -> None:
            await cur.execute("INSERT INTO chat_groups (group_id, name, owner) VALUES (%s,%s,%s)",
                              (group, name, owner))
            await cur.execute("INSERT INTO group_members (group_id, user_id, role) "
                              "VALUES (%s,%s,'owner') ON DUPLICATE KEY UPDATE role='owner'",
                              (group, owner))
            if not open:
                await cur.execute("INSERT IGNORE INTO group_bars (group_id, user_id) "
                                  "VALUES (%s,%s)", (group, EVERYONE))

        try:
            await self._transaction("create_group", body)
        except IntegrityError as exc:
            if _errno(exc) == _DUPLICATE_KEY:
                return False
            raise
        return True

    async def info(self, group: str) -> tuple[str, str] | None:
        rows = await self._read(
            "group_info", "SELECT name, owner FROM chat_groups WHERE group_id=%s", (group,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def members(self, group: str) -> dict[str, str]:
        rows = await self._read(
            "group_members", "SELECT user_id, role FROM group_members WHERE group_id=%s", (group,))
        return {str(u): str(r) for u, r in rows}

    async def set_member(self, group: str, user: str, role: str) -> None:
        await self._write(
            "set_member", "INSERT INTO group_members (group_id, user_id, role) VALUES (%s,%s,%s) "
            "ON DUPLICATE KEY UPDATE role=VALUES(role)", (group, user, role))

    async def remove_member(self, group: str, user: str) -> bool:
        """False if ``user`` was not a member."""
        removed = await self._write(
            "remove_member", "DELETE FROM group_members WHERE group_id=%s AND user_id=%s",
            (group, user))
        return removed > 0

    async def groups_of(self, user: str) -> list[str]:
        rows = await self._read(
            "groups_of", "SELECT group_id FROM group_members WHERE user_id=%s ORDER BY group_id",
            (user,))
        return [str(g) for (g,) in rows]

    async def bar(self, group: str, user: str) -> None:
        await self._write("bar", "INSERT IGNORE INTO group_bars (group_id, user_id) "
                                 "VALUES (%s,%s)", (group, user))

    async def unbar(self, group: str, user: str) -> None:
        await self._write("unbar", "DELETE FROM group_bars WHERE group_id=%s AND user_id=%s",
                          (group, user))

    async def barred(self, group: str, user: str) -> bool:
        rows = await self._read(
            "barred", "SELECT 1 FROM group_bars WHERE group_id=%s AND user_id IN (%s,%s) LIMIT 1",
            (group, user, EVERYONE))
        return bool(rows)

    # ------------------------------------------------------------ ReceiptStore

    async def mark_read(self, conv: str, user: str, seq: int) -> bool:
        """True if the receipt moved forward."""
        changed = await self._write(
            "mark_read", "INSERT INTO read_receipts (conversation_id, user_id, seq) "
            "VALUES (%s,%s,%s) ON DUPLICATE KEY UPDATE seq=GREATEST(seq, VALUES(seq))",
            (conv, user, seq))
        return changed > 0  # 1: inserted, 2: moved forward, 0: not moved

    async def read_up_to(self, conv: str) -> dict[str, int]:
        rows = await self._read(
            "read_up_to", "SELECT user_id, seq FROM read_receipts WHERE conversation_id=%s",
            (conv,))
        return {str(u): int(s) for u, s in rows}

    # ------------------------------------------------------------ offline queue

    async def add_offline(self, rows: list[tuple[str, str, int, str]]) -> None:
        """Queue ``(user_id, conversation_id, seq, msg_id)`` rows for users who are offline.

        Idempotent: a row whose (user_id, conversation_id, seq) is queued
        already is left as it is, so a redelivered Kafka record adds nothing.
        """
        if not rows:
            return
        ordered = sorted(set(rows))

        async def body(cur: Any) -> None:
            # ON DUPLICATE KEY with a no-op rather than INSERT IGNORE: the same
            # idempotence, but a too-long value stays an error instead of
            # being truncated with a warning.
            await cur.executemany(
                "INSERT INTO offline_messages (user_id, conversation_id, seq, msg_id) "
                "VALUES (%s,%s,%s,%s) ON DUPLICATE KEY UPDATE id=id", ordered)

        await self._transaction("add_offline", body)

    async def offline_count(self, user_id: str | None = None) -> int:
        """Rows queued for ``user_id``, or for everyone."""
        if user_id is None:
            rows = await self._read("offline_count", "SELECT COUNT(*) FROM offline_messages")
        else:
            rows = await self._read(
                "offline_count", "SELECT COUNT(*) FROM offline_messages WHERE user_id=%s",
                (user_id,))
        return int(rows[0][0])

    async def clear_offline(self, user_id: str, conversation_id: str, up_to_seq: int) -> int:
        """Drop ``user_id``'s rows of a conversation up to ``up_to_seq``; returns how many."""
        return await self._write(
            "clear_offline", "DELETE FROM offline_messages "
            "WHERE user_id=%s AND conversation_id=%s AND seq<=%s",
            (user_id, conversation_id, up_to_seq))

    async def purge_offline(self, older_than_seconds: float = 7 * 24 * 3600,
                            batch: int = 10000) -> int:
        """Delete rows older than ``older_than_seconds``, ``batch`` rows per statement.

        The runbook's ``DELETE ... WHERE created_at < ... LIMIT 10000`` in a
        loop until none is left: short statements hold locks briefly.  The
        cut-off is fixed at the start.  Returns the rows deleted.
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        micros = max(0, int(older_than_seconds * 1_000_000))
        cutoff = (await self._read(
            "purge_offline", "SELECT NOW(3) - INTERVAL %s MICROSECOND", (micros,)))[0][0]
        total = await until_fewer_than(batch, lambda: self._write(
            "purge_offline", "DELETE FROM offline_messages WHERE created_at < %s "
            "ORDER BY created_at LIMIT %s", (cutoff, batch)))
        if total:
            log.info("offline messages purged rows=%s older_than_seconds=%s", total,
                     older_than_seconds)
        return total

    async def purge_messages(self, older_than_seconds: float, batch: int = 10000) -> int:
        """Delete conversation entries older than ``older_than_seconds`` (by their
        ``ts``), oldest first, ``batch`` rows per transaction; returns how many.

        Each transaction first raises ``sequence_snapshots`` to the highest seq it
        deletes of each conversation, so ``latest_seq`` (and a Redis counter
        started from it) never goes back: a seq is never handed out twice.
        Cursors, receipts and the snapshots are kept; a device whose cursor is
        below what is left resumes from the oldest entry still stored.  The
        cut-off (this process's clock, as ``ts``) is fixed at the start.
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if older_than_seconds <= 0:
            raise ValueError(f"older_than_seconds must be positive, got {older_than_seconds}")
        cutoff_ms = int((time.time() - older_than_seconds) * 1000)

        async def one_batch(cur: Any) -> int:
            # The same order and limit in both statements, the rows locked between
            # them: the DELETE removes exactly the rows the snapshots were raised for.
            await cur.execute("SELECT conv, seq FROM messages WHERE ts < %s "
                              "ORDER BY ts, conv, seq LIMIT %s FOR UPDATE", (cutoff_ms, batch))
            rows = await cur.fetchall()
            if not rows:
                return 0
            highest: dict[str, int] = {}
            for conv, seq in rows:
                highest[conv] = max(highest.get(conv, 0), int(seq))
            await cur.executemany(
                "INSERT INTO sequence_snapshots (conversation_id, seq) VALUES (%s,%s) "
                "ON DUPLICATE KEY UPDATE seq=GREATEST(seq, VALUES(seq))",
                sorted(highest.items()))
            return int(await cur.execute(
                "DELETE FROM messages WHERE ts < %s ORDER BY ts, conv, seq LIMIT %s",
                (cutoff_ms, batch)))

        total = await until_fewer_than(
            batch, lambda: self._transaction("purge_messages", one_batch))
        if total:
            log.info("messages purged rows=%s older_than_seconds=%s", total,
                     older_than_seconds)
        return total


def _unavailable_error(op: str, exc: BaseException, dsn: MySQLDSN,
                       pool_size: int) -> BackendUnavailable | None:
    """Log ``exc`` and turn it into BackendUnavailable if it means "cannot reach MySQL"."""
    code = _errno(exc)
    if code in _TOO_MANY_CONNECTIONS:
        log.error("database error: too many connections errno=%s host=%s port=%s op=%s "
                  "pool_size=%s: %s", code, dsn.host, dsn.port, op, pool_size, _describe(exc))
        return BackendUnavailable("mysql", f"too many connections: {_describe(exc)}")
    if code in _REFUSED or _is_lost(exc):
        log.error("database unavailable host=%s port=%s op=%s errno=%s: %s",
                  dsn.host, dsn.port, op, code, _describe(exc))
        return BackendUnavailable("mysql", f"{op} failed: {_describe(exc)}")
    return None
