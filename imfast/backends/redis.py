"""Redis SequenceStore: dedup + per-conversation sequence numbers in one Lua step.

Keys (CONTRACT.md; operators use them verbatim in the runbooks):

* ``dedup:<dedup_key>`` -> ``"<conv>|<seq>|<msg_id>"``, with a TTL of
  ``dedup_ttl`` seconds; written only when new;
* ``seq:private:<a>:<b>`` / ``seq:group:<g>`` (:func:`imfast.protocol.ids.seq_key`)
  -> the last sequence number handed out (``GET`` shows it).

Guarantees:

* ``reserve`` is one script (``EVALSHA``, loaded again after a Redis restart):
  the dedup check, the counter bump and the dedup record happen atomically, so
  two im-service instances never hand out the same seq.
* A sequence number is never reused after Redis lost data (restart without
  persistence, ``FLUSHALL``, an operator's ``DEL seq:...``): when the counter
  key is missing the script answers "need floor" instead of counting from 1;
  the store asks ``floor_source(conv)`` (the highest seq durable in MySQL) and
  runs the script again, which sets the counter to ``max(floor, current)``
  before ``INCR``.
* ``release`` forgets the dedup key only; the seq is not handed back (another
  instance may already have counted past it), so a distributed log can have
  gaps, which clients tolerate.
* A retried call whose first attempt did run (reply lost on the wire) finds
  its own dedup record - same ``msg_id`` - and gets its seq back as a fresh,
  non-duplicate reservation, not as a duplicate of itself.
* Connection trouble raises :class:`~imfast.backends.errors.BackendUnavailable`
  (``"redis"``) after ``socket_timeout`` at most.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from imfast.backends.base import Reservation
from imfast.backends.errors import BackendUnavailable
from imfast.protocol.ids import seq_key

__all__ = ["REPAIR_SCRIPT", "RESERVE_SCRIPT", "RedisSequenceStore", "dedup_key_name"]

#: KEYS: dedup key, counter key.
#: ARGV: msg_id, conv, dedup ttl (s), floor, "1" if floor is known durable.
#: Returns {1, record} when the dedup key exists, {-1} when the counter is
#: missing and no durable floor was given, else {0, record} for a new seq.
RESERVE_SCRIPT = """
local seen = redis.call('GET', KEYS[1])
if seen then
  return {1, seen}
end
local floor = tonumber(ARGV[4])
local current = redis.call('GET', KEYS[2])
if not current then
  if ARGV[5] ~= '1' then
    return {-1}
  end
  redis.call('SET', KEYS[2], floor)
elseif tonumber(current) < floor then
  redis.call('SET', KEYS[2], floor)
end
local seq = redis.call('INCR', KEYS[2])
local record = ARGV[2] .. '|' .. seq .. '|' .. ARGV[1]
redis.call('SET', KEYS[1], record, 'EX', tonumber(ARGV[3]), 'NX')
return {0, record}
"""

#: KEYS: counter key.  ARGV: floor.  Raises the counter to at least floor.
REPAIR_SCRIPT = """
local current = redis.call('GET', KEYS[1])
local floor = tonumber(ARGV[1])
if (not current) or tonumber(current) < floor then
  redis.call('SET', KEYS[1], floor)
  return floor
end
return tonumber(current)
"""

_NEED_FLOOR = -1
_DUPLICATE = 1


def dedup_key_name(dedup_key: str) -> str:
    """The Redis key that records ``dedup_key`` (``dedup:<dedup_key>``)."""
    return f"dedup:{dedup_key}"


class _Script:
    """A Lua script run by SHA, sent in full only when Redis does not know it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted (or SCRIPT FLUSH): EVAL runs it and caches it again.
            return await client.eval(self.text, len(keys), *keys, *args)


_RESERVE = _Script(RESERVE_SCRIPT)
_REPAIR = _Script(REPAIR_SCRIPT)


class RedisSequenceStore:
    """:class:`~imfast.backends.base.SequenceStore` on Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        dedup_ttl: int,
        floor_source: Callable[[str], Awaitable[int]],
        socket_timeout: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        if dedup_ttl <= 0:
            raise ValueError("dedup_ttl must be positive")
        self.url = url
        self.dedup_ttl = int(dedup_ttl)
        self._floor_source = floor_source
        # A blocking pool: a burst of concurrent reserves waits for a free
        # connection (up to socket_timeout) instead of failing at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            protocol=2,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
            # One quick retry of a dropped connection; the scripts are safe to
            # run twice (see the module docstring), and a dead Redis must fail
            # fast, not after the library's default multi-second backoff.
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
        )
        self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        #: Times ``reserve`` had to ask ``floor_source`` (counter key missing).
        self.floor_lookups = 0

    @property
    def client(self) -> aioredis.Redis:
        """The underlying ``redis.asyncio`` client."""
        return self._client

    @staticmethod
    def dedup_key_name(dedup_key: str) -> str:
        """The Redis key that records ``dedup_key`` (``dedup:<dedup_key>``)."""
        return dedup_key_name(dedup_key)

    async def start(self) -> None:
        """Check the connection and load the scripts (optional: calls connect lazily)."""
        try:
            await self._client.ping()
            await self._client.script_load(RESERVE_SCRIPT)
            await self._client.script_load(REPAIR_SCRIPT)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc) or type(exc).__name__) from exc

    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        keys = [dedup_key_name(dedup_key), seq_key(conv)]
        result = await self._run(_RESERVE, keys, [msg_id, conv, self.dedup_ttl, int(floor), "0"])
        if int(result[0]) == _NEED_FLOOR:
            self.floor_lookups += 1
            durable = await self._floor_source(conv)
            result = await self._run(
                _RESERVE, keys, [msg_id, conv, self.dedup_ttl, max(int(floor), int(durable)), "1"]
            )
        status, record = int(result[0]), str(result[1])
        _conv, seq, original_id = record.split("|", 2)
        duplicate = status == _DUPLICATE and original_id != msg_id
        return Reservation(int(seq), original_id, duplicate)

    async def release(self, conv: str, dedup_key: str) -> None:
        try:
            await self._client.delete(dedup_key_name(dedup_key))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc) or type(exc).__name__) from exc

    async def repair(self, conv: str, floor: int) -> None:
        await self._run(_REPAIR, [seq_key(conv)], [int(floor)])

    async def current(self, conv: str) -> int:
        """The last seq handed out for ``conv`` (0 if the counter key is missing)."""
        try:
            value = await self._client.get(seq_key(conv))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc) or type(exc).__name__) from exc
        return int(value) if value is not None else 0

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(self._client, keys, args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc) or type(exc).__name__) from exc
