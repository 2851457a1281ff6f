"""EtcdRegistry's write queue while etcd does not answer: one unwritten op per key.

No etcd here: the registry is marked started without its tasks, so nothing is
ever written and every call returns after ``write_timeout`` with its op still
queued - as during an outage.  The real server is in
tests/integration/test_etcd_registry.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aetcd
import pytest

from imfast.backends import etcd as etcd_module
from imfast.backends.etcd import EtcdRegistry


@pytest.fixture
def registry(caplog: pytest.LogCaptureFixture) -> EtcdRegistry:
    caplog.set_level(logging.ERROR, logger="imfast")  # the "still queued" warnings
    reg = EtcdRegistry(["http://127.0.0.1:1"], write_timeout=0.001)
    reg._started = True  # no writer task: an outage that never ends
    return reg


def _kinds(reg: EtcdRegistry) -> list[tuple[str, str, str]]:
    return [(op.kind, op.key, op.gateway) for op in reg._queue]


async def test_a_device_coming_and_going_during_an_outage_keeps_one_op(
        registry: EtcdRegistry) -> None:
    for _ in range(100):
        await registry.register("alice", "phone", "gw-a")
        await registry.unregister("alice", "phone", "gw-a")
    await registry.register("bob", "web", "gw-a")
    key_a = etcd_module.registry_key("alice", "phone")
    key_b = etcd_module.registry_key("bob", "web")
    # The newest call decides: alice's last was an unregister (compare-and-delete).
    assert _kinds(registry) == [(etcd_module._DELETE_IF, key_a, "gw-a"),
                                (etcd_module._PUT, key_b, "gw-a")]
    assert registry.pending == 2 and registry.ops_folded == 199
    await registry.register("alice", "phone", "gw-a")
    assert _kinds(registry)[0] == (etcd_module._PUT, key_a, "gw-a")


async def test_an_op_in_a_transaction_is_never_changed_and_a_failed_one_gives_way(
        registry: EtcdRegistry) -> None:
    await registry.register("alice", "phone", "gw-a")
    [taken] = registry._take_batch()  # in flight: _write reads its answer by its kind
    await registry.unregister("alice", "phone", "gw-a")
    key = etcd_module.registry_key("alice", "phone")
    assert taken.kind == etcd_module._PUT
    assert _kinds(registry) == [(etcd_module._PUT, key, "gw-a"),
                                (etcd_module._DELETE_IF, key, "gw-a")]
    # Its transaction failed: the newer op decides what the key ends as; the failed one
    # leaves the queue, its caller answered when the newer op is.
    registry._release([taken])
    [newer] = registry._queue
    assert (newer.kind, newer.key) == (etcd_module._DELETE_IF, key)
    assert not taken.future.done()
    newer.future.set_result(None)
    await asyncio.sleep(0)
    assert taken.future.done() and taken.future.result() is None
    assert registry.ops_folded == 0


async def test_a_failed_op_with_nothing_after_it_takes_the_newest_call(
        registry: EtcdRegistry) -> None:
    await registry.register("alice", "phone", "gw-a")
    batch = registry._take_batch()
    registry._release(batch)  # e.g. etcd went away while it was being written
    await registry.unregister("alice", "phone", "gw-a")
    key = etcd_module.registry_key("alice", "phone")
    assert _kinds(registry) == [(etcd_module._DELETE_IF, key, "gw-a")]
    assert registry.ops_folded == 1


async def test_ops_naming_another_gateway_are_not_folded(registry: EtcdRegistry) -> None:
    await registry.register("alice", "phone", "gw-a")
    await registry.unregister("alice", "phone", "gw-b")  # a stale gateway's delete
    key = etcd_module.registry_key("alice", "phone")
    assert _kinds(registry) == [(etcd_module._PUT, key, "gw-a"),
                                (etcd_module._DELETE_IF, key, "gw-b")]
    assert registry.ops_folded == 0


async def test_a_rejected_transaction_fails_its_callers_and_the_writer_goes_on(
        registry: EtcdRegistry) -> None:
    """A transaction etcd refuses (not retried) fails its own call only: a newer op of
    the same key, queued while it was in flight, is written next by the same writer."""
    registry.write_timeout = 5.0
    gate = asyncio.Event()
    written: list[list[str]] = []

    async def write(batch: list[Any]) -> None:
        written.append([op.kind for op in batch])
        if len(written) == 1:
            await gate.wait()
            raise aetcd.InvalidArgumentError("refused")
        for op in batch:
            registry._queue.popleft()
            op.future.set_result(None)

    registry._write = write  # type: ignore[method-assign]
    writer = asyncio.get_running_loop().create_task(registry._writer_loop())
    try:
        first = asyncio.ensure_future(registry.register("alice", "phone", "gw-a"))
        while not written:
            await asyncio.sleep(0.001)  # its transaction is in flight
        second = asyncio.ensure_future(registry.unregister("alice", "phone", "gw-a"))
        await asyncio.sleep(0.001)
        gate.set()
        with pytest.raises(aetcd.InvalidArgumentError):
            await first
        await asyncio.wait_for(second, 2)
        assert written == [[etcd_module._PUT], [etcd_module._DELETE_IF]]
        assert registry.pending == 0 and not writer.done()
    finally:
        writer.cancel()
