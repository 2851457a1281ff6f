"""EtcdRegistry against a real etcd: key layout, lease, watch cache, batching, outages."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aetcd
import pytest

from imfast.backends.errors import BackendUnavailable
from imfast.backends.etcd import EtcdRegistry
from tests.harness.services import EtcdServer, free_port

pytestmark = pytest.mark.integration


def _raw(url: str) -> aetcd.Client:
    host, port = url.rsplit("//", 1)[-1].rsplit(":", 1)
    return aetcd.Client(host=host, port=int(port), timeout=3)


async def _eventually(check: Callable[[], Any], timeout: float = 10.0) -> float:
    """Poll ``check`` until it is truthy (a watch answers in ~10 ms; the timeout
    only tells "slow on a loaded machine" from "never"); returns the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


@pytest.fixture
def user() -> str:
    """A user id of its own per test, so tests sharing the etcd server stay independent."""
    return f"u{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def registries(etcd_server: EtcdServer) -> AsyncIterator[Callable[..., Any]]:
    started: list[EtcdRegistry] = []

    async def make(**kwargs: Any) -> EtcdRegistry:
        reg = EtcdRegistry([etcd_server.url], **kwargs)
        await reg.start()
        started.append(reg)
        return reg

    yield make
    for reg in started:
        await reg.close()


async def test_key_layout_value_and_lease(etcd_server: EtcdServer, registries: Any, user: str) -> None:
    reg = await registries(owner="gw-a:9093")
    await reg.register(user, "phone", "10.0.0.1:9093")
    async with _raw(etcd_server.url) as raw:
        got = await raw.get_prefix(f"/registry/users/{user}".encode())
        kvs = {kv.key: (kv.value, kv.lease) for kv in got}
    assert kvs == {f"/registry/users/{user}/phone".encode(): (b"10.0.0.1:9093", reg.lease_id)}
    assert await reg.lookup(user) == {"phone": "10.0.0.1:9093"}
    assert reg.cached_lookup(user) == {"phone": "10.0.0.1:9093"}


async def test_close_revokes_the_lease_and_the_entries_vanish(
    etcd_server: EtcdServer, registries: Any, user: str
) -> None:
    gw = await registries()
    observer = await registries()
    await gw.register(user, "phone", "gw1")
    await gw.register(user, "web", "gw1")
    await _eventually(lambda: len(observer.cached_lookup(user)) == 2)
    await gw.close()
    async with _raw(etcd_server.url) as raw:
        assert not await raw.get_prefix(f"/registry/users/{user}/".encode())
    await _eventually(lambda: observer.cached_lookup(user) == {})


async def test_second_instance_sees_registrations_through_its_watch(
    registries: Any, user: str
) -> None:
    a = await registries(owner="a")
    b = await registries(owner="b")
    assert b.watch_live
    await a.register(user, "phone", "gw-a")
    await _eventually(lambda: b.cached_lookup(user) == {"phone": "gw-a"})
    await b.register(user, "web", "gw-b")
    await _eventually(lambda: a.cached_lookup(user) == {"phone": "gw-a", "web": "gw-b"})
    await a.unregister(user, "phone", "gw-a")
    await _eventually(lambda: b.cached_lookup(user) == {"web": "gw-b"})
    assert await b.lookup(user) == {"web": "gw-b"}


async def test_unregister_with_a_stale_gateway_leaves_the_key(
    etcd_server: EtcdServer, registries: Any, user: str
) -> None:
    old = await registries(owner="old")
    new = await registries(owner="new")
    await old.register(user, "phone", "gw-old")
    await new.register(user, "phone", "gw-new")  # the device reconnected elsewhere
    await old.unregister(user, "phone", "gw-old")  # the old gateway cleans up late
    async with _raw(etcd_server.url) as raw:
        got = await raw.get(f"/registry/users/{user}/phone".encode())
    assert got is not None and got.value == b"gw-new" and got.lease == new.lease_id
    assert await old.lookup(user) == {"phone": "gw-new"}


async def test_concurrent_registers_are_batched_into_few_transactions(
    etcd_server: EtcdServer, registries: Any, user: str
) -> None:
    reg = await registries()
    before = reg.txn_count
    await asyncio.gather(*(reg.register(user, f"d{i}", "gw1") for i in range(100)))
    txns = reg.txn_count - before
    assert 1 <= txns <= 3, txns
    async with _raw(etcd_server.url) as raw:
        got = await raw.get_prefix(f"/registry/users/{user}/".encode())
    assert len(got) == 100
    assert len(reg.cached_lookup(user)) == 100
    # Unregisters batch too, and a key may appear only once per etcd txn.
    before = reg.txn_count
    await asyncio.gather(
        *(reg.unregister(user, f"d{i}", "gw1") for i in range(50)),
        reg.register(user, "d0", "gw2"),
    )
    assert reg.txn_count - before <= 3
    assert len(reg.cached_lookup(user)) == 51
    assert reg.cached_lookup(user)["d0"] == "gw2"


async def test_lost_lease_is_replaced_and_entries_are_registered_again(
    etcd_server: EtcdServer, registries: Any, user: str
) -> None:
    reg = await registries(lease_ttl=3)  # keepalive every second
    other = await registries()
    await reg.register(user, "phone", "gw1")
    await reg.register(user, "web", "gw1")
    await other.register(user, "tablet", "gw-other")
    await reg.register(user, "tablet", "gw1")
    await other.register(user, "tablet", "gw-other")  # taken over: must not come back as gw1
    old_lease = reg.lease_id
    assert old_lease is not None
    async with _raw(etcd_server.url) as raw:
        await raw.revoke_lease(old_lease)  # as if it had expired during a partition
        await _eventually(lambda: reg.lease_id != old_lease)
        await _eventually(lambda: reg.cached_lookup(user).get("phone") == "gw1")
        got = {kv.key.decode().rsplit("/", 1)[1]: (kv.value, kv.lease)
               for kv in await raw.get_prefix(f"/registry/users/{user}/".encode())}
    assert got == {
        "phone": (b"gw1", reg.lease_id),
        "web": (b"gw1", reg.lease_id),
        "tablet": (b"gw-other", other.lease_id),
    }
    assert reg.lease_grants == 2


async def test_write_under_a_revoked_lease_gets_a_new_lease(
    etcd_server: EtcdServer, registries: Any, user: str
) -> None:
    reg = await registries(lease_ttl=30)  # keepalive would notice only after 10 s
    await reg.register(user, "phone", "gw1")
    old_lease = reg.lease_id
    async with _raw(etcd_server.url) as raw:
        await raw.revoke_lease(old_lease)
        await reg.register(user, "web", "gw1")  # refused (lease not found) -> new lease, retry
        got = {kv.key.decode().rsplit("/", 1)[1]: kv.lease
               for kv in await raw.get_prefix(f"/registry/users/{user}/".encode())}
    assert reg.lease_id != old_lease
    assert got == {"phone": reg.lease_id, "web": reg.lease_id}


async def test_etcd_restart_cache_answers_and_queued_registrations_land() -> None:
    with EtcdServer() as server:
        a = EtcdRegistry([server.url], owner="a", write_timeout=0.3)
        b = EtcdRegistry([server.url], owner="b")
        await a.start()
        await b.start()
        try:
            await a.register("alice", "phone", "gw-a")
            await _eventually(lambda: b.cached_lookup("alice") == {"phone": "gw-a"})

            server.kill()
            await _eventually(lambda: not b.watch_live and not a.watch_live)
            # Outage: lookups answer from the cache, registrations queue up.
            assert b.cached_lookup("alice") == {"phone": "gw-a"}
            assert await b.lookup("alice") == {"phone": "gw-a"}
            t0 = time.monotonic()
            await a.register("bob", "web", "gw-a")  # returns after write_timeout, still queued
            assert time.monotonic() - t0 < 10  # not held until etcd is back
            assert a.pending >= 1

            server.restart()
            await _eventually(lambda: b.cached_lookup("bob") == {"web": "gw-a"}, timeout=20)
            await _eventually(lambda: a.watch_live and b.watch_live and a.pending == 0, timeout=20)
            assert await b.lookup("alice") == {"phone": "gw-a"}
            async with _raw(server.url) as raw:
                got = await raw.get(b"/registry/users/bob/web")
            assert got is not None and got.value == b"gw-a"
            # The watch works again after the recovery.
            await b.register("carol", "phone", "gw-b")
            await _eventually(lambda: a.cached_lookup("carol") == {"phone": "gw-b"})
        finally:
            await a.close()
            await b.close()


async def test_start_fails_clearly_when_etcd_is_unreachable() -> None:
    reg = EtcdRegistry([f"http://127.0.0.1:{free_port()}"], rpc_timeout=0.5)
    with pytest.raises(BackendUnavailable, match="etcd unavailable"):
        await reg.start()


async def test_refresh_reads_a_registration_the_watch_has_not_delivered(
        registries: Any, user: str) -> None:
    """im-service refreshes a user before its resume plan (a lagging watch loses nothing)."""
    gateway = await registries(owner="gw-a:9093")
    service = await registries(owner="im-service")
    service._on_event = lambda event: None  # type: ignore[method-assign] # a watch that lags
    await gateway.register(user, "phone", "10.0.0.1:9093")
    await asyncio.sleep(0.2)
    assert service.cached_lookup(user) == {}  # the watch told it nothing
    await service.refresh(user)
    assert service.cached_lookup(user) == {"phone": "10.0.0.1:9093"}
    # revision-guarded: a refresh never brings back a registration the cache saw deleted
    service._apply(f"/registry/users/{user}/phone", None, 10**12)
    await service.refresh(user)
    assert service.cached_lookup(user) == {}


async def test_a_device_that_came_and_went_during_an_outage_leaves_the_new_owner_alone(
        ) -> None:
    """During an outage, a device connects to gateway a and leaves again, many times,
    while its registration in etcd names gateway b: a's queue holds one op for it (the
    newest call's, a compare-and-delete; an op that was in flight when etcd went away
    gives way to it), so b's registration survives the recovery - a put then a delete
    would have erased it - and a's queue does not grow."""
    with EtcdServer() as server:
        a = EtcdRegistry([server.url], owner="a", write_timeout=0.05)
        b = EtcdRegistry([server.url], owner="b")
        await a.start()
        await b.start()
        try:
            await b.register("dave", "phone", "gw-b")
            await _eventually(lambda: a.cached_lookup("dave") == {"phone": "gw-b"})
            server.kill()
            await _eventually(lambda: not a.watch_live)
            for _ in range(20):
                await a.register("dave", "phone", "gw-a")
                await a.unregister("dave", "phone", "gw-a")
            # One op at most in flight (its attempt fails within rpc_timeout, then gives
            # way to the newer one) and one waiting: then only the newest.
            assert a.pending <= 2 and a.ops_folded >= 38
            await _eventually(lambda: a.pending == 1)
            server.restart()
            await _eventually(lambda: a.watch_live and a.pending == 0, timeout=20)
            async with _raw(server.url) as raw:
                got = await raw.get(b"/registry/users/dave/phone")
            assert got is not None and got.value == b"gw-b"
            assert a.cached_lookup("dave") == {"phone": "gw-b"}
        finally:
            await a.close()
            await b.close()
