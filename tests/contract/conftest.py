"""Every Store implementation runs the same contract suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imfast.backends.memory import MemoryRegistry, MemoryStore
from imfast.backends.sqlite import SQLiteStore


@pytest.fixture(params=["memory", "sqlite", "redis", "mysql"])
async def store(request: Any, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "memory":
        s: Any = MemoryStore()
    elif request.param == "redis":
        from imfast.backends.composite import CompositeStore
        from imfast.backends.redis import RedisSequenceStore

        redis_url = request.getfixturevalue("redis_server").url
        log = MemoryStore()
        sequences = RedisSequenceStore(redis_url, dedup_ttl=3600, floor_source=log.latest_seq)
        await sequences.client.flushdb()
        s = CompositeStore(sequences, log)
    elif request.param == "mysql":
        from imfast.backends.composite import CompositeStore
        from imfast.backends.mysql import MySQLStore

        mysql = await MySQLStore.open(request.getfixturevalue("mariadb_app_dsn"), 5)
        await mysql.truncate_all()  # every test starts from empty tables
        sequences = MemoryStore()
        memory_reserve = sequences.reserve

        async def reserve(conv: str, dedup_key: str, msg_id: str, floor: int) -> Any:
            # As RedisSequenceStore(floor_source=...) does: never count below the log.
            return await memory_reserve(conv, dedup_key, msg_id,
                                        max(floor, await mysql.latest_seq(conv)))

        sequences.reserve = reserve  # type: ignore[method-assign]
        s = CompositeStore(sequences, mysql)
    else:
        s = SQLiteStore(str(tmp_path / "contract.db"))
    yield s
    await s.close()


@pytest.fixture(params=["memory", "etcd"])
async def registry(request: Any) -> AsyncIterator[Any]:
    if request.param == "etcd":
        import aetcd

        from imfast.backends.etcd import EtcdRegistry

        url = request.getfixturevalue("etcd_server").url
        host, port = url.rsplit("//", 1)[-1].rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as raw:
            await raw.delete_prefix(b"/registry/users/")
        reg = EtcdRegistry([url], lease_ttl=10, owner="contract")
        await reg.start()
        yield reg
        await reg.close()
        return
    yield MemoryRegistry()
