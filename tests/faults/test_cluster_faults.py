"""Faults while traffic flows, on a real distributed deployment.

Each scenario runs the same workload — four senders each sending a stream
of private messages to a recipient, through two gateways — injects one fault
in the middle, then checks with :func:`tests.faults.checker.check` that every
acknowledged message reached its recipient exactly once (after the client's
dedup by seq), in seq order, and is in the store.  The figures are printed
(``pytest -s`` shows them) and asserted: lost = 0, order violations = 0,
acknowledged = sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from imfast.auth import mint_token
from imfast.config import Settings
from tests.faults.checker import ChatClient, Figures, check
from tests.harness.services import ServiceSet
from tests.helpers.cluster import JWT_SECRET, Cluster

pytestmark = pytest.mark.integration

SETTINGS = Settings(jwt_secret=JWT_SECRET)
PER_SENDER = 30


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Any]]:
    """Private services (these tests break them) and a two-gateway cluster."""
    services = ServiceSet("redis", "mariadb", "etcd", "kafka").start()
    dsn = services.mariadb.create_app_database()
    cluster = Cluster({"redis": services.redis, "etcd": services.etcd,
                       "kafka": services.kafka, "mysql_dsn": dsn},
                      Path(tmp_path_factory.mktemp("faults")), gateways=2)
    try:
        cluster.start()
        yield cluster, services
    except Exception:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        services.stop()


async def run_workload(cluster: Cluster, tag: str,
                       fault: Callable[[], Awaitable[None]]) -> Figures:
    urls = [cluster.url(0), cluster.url(1)]
    senders = [ChatClient(urls, mint_token(SETTINGS, f"{tag}s{i}"), f"{tag}s{i}")
               for i in range(4)]
    recipients = {f"{tag}r{i}": ChatClient(urls, mint_token(SETTINGS, f"{tag}r{i}"),
                                           f"{tag}r{i}") for i in range(4)}
    for c in [*senders, *recipients.values()]:
        await c.connect()
    acks: dict[str, list[dict[str, Any]]] = {u: [] for u in recipients}

    async def stream(i: int) -> None:
        to = f"{tag}r{i}"
        for n in range(PER_SENDER):
            acks[to].append(await senders[i].send(to, f"{tag}-{i}-{n}", f"{i}:{n}"))
            await asyncio.sleep(0.02)

    async def inject() -> None:
        await asyncio.sleep(0.3)
        await fault()

    await asyncio.gather(*(stream(i) for i in range(4)), inject())
    figures = await check(acks, recipients, sent=4 * PER_SENDER)
    print("\n" + figures.line(tag))
    for c in [*senders, *recipients.values()]:
        await c.close()
    # The bodies arrived as sent, once each.
    for i, (user, frames) in enumerate(sorted(acks.items())):
        seen = recipients[user].bodies
        assert sorted(seen[(a["conv"], a["seq"])] for a in frames) == \
            sorted(f"{i}:{n}" for n in range(PER_SENDER))
    return figures


def assert_clean(f: Figures) -> None:
    assert f.acknowledged == f.sent, f
    assert f.lost == 0 and f.order_violations == 0, f
    assert f.delivered == f.acknowledged and f.stored == f.acknowledged, f


async def test_sigkill_a_gateway(deployment: tuple[Cluster, Any]) -> None:
    cluster, _ = deployment

    async def fault() -> None:
        cluster.gateways[1].kill()

    try:
        assert_clean(await run_workload(cluster, "gk", fault))
    finally:
        cluster.gateways[1].start()
        cluster.gateways[1].wait_healthy()


async def test_sigkill_im_service_then_restart(deployment: tuple[Cluster, Any]) -> None:
    cluster, _ = deployment

    async def fault() -> None:
        cluster.service.kill()
        await asyncio.sleep(1.0)
        cluster.service.start()

    assert_clean(await run_workload(cluster, "sk", fault))


async def test_redis_flushed_sequences_never_reused(deployment: tuple[Cluster, Any]) -> None:
    cluster, services = deployment

    async def fault() -> None:
        redis.Redis.from_url(services.redis.url).flushall()

    figures = await run_workload(cluster, "rf", fault)
    assert_clean(figures)


async def test_mysql_stopped_and_restarted(deployment: tuple[Cluster, Any]) -> None:
    cluster, services = deployment

    async def fault() -> None:
        services.mariadb.kill()
        await asyncio.sleep(1.5)
        await asyncio.to_thread(services.mariadb.restart)

    assert_clean(await run_workload(cluster, "my", fault))


async def test_etcd_restarted(deployment: tuple[Cluster, Any]) -> None:
    cluster, services = deployment

    async def fault() -> None:
        await asyncio.to_thread(services.etcd.restart)

    assert_clean(await run_workload(cluster, "et", fault))


async def test_offline_worker_killed_records_still_stored(deployment: tuple[Cluster, Any]) -> None:
    cluster, services = deployment
    sender = ChatClient([cluster.url(0)], mint_token(SETTINGS, "ow-sender"), "ow-sender")
    await sender.connect()
    cluster.worker.kill()
    for n in range(5):
        await sender.send("ow-away", f"ow-{n}", str(n))
    cluster.worker.start()
    cluster.worker.wait_healthy()

    def rows() -> int:
        out = services.mariadb.execute(
            "SELECT COUNT(*) FROM im_chat.offline_messages WHERE user_id='ow-away'")
        return int(out.split()[-1])

    end = time.monotonic() + 30
    while rows() < 5 and time.monotonic() < end:
        await asyncio.sleep(0.2)
    assert rows() == 5  # each offline_msg record stored once, none lost while it was down
    await sender.close()


async def test_resend_after_redis_lost_the_dedup_key_is_still_one_message(
        deployment: tuple[Cluster, Any]) -> None:
    cluster, services = deployment
    alice = ChatClient([cluster.url(0)], mint_token(SETTINGS, "dk-alice"), "dk-alice")
    bob = ChatClient([cluster.url(1)], mint_token(SETTINGS, "dk-bob"), "dk-bob")
    await alice.connect()
    await bob.connect()
    first = await alice.send("dk-bob", "dk-1", "only once")
    redis.Redis.from_url(services.redis.url).flushall()  # dedup memory gone
    for _ in range(2):  # the client's retries after, say, a lost ack
        again = await alice.send("dk-bob", "dk-1", "only once")
        assert (again["msg_id"], again["seq"], again.get("duplicate")) == \
            (first["msg_id"], first["seq"], True)
    later = await alice.send("dk-bob", "dk-2", "next one")
    assert later["seq"] > first["seq"]
    stored = await bob.sync_all(first["conv"])
    assert [e["body"] for e in stored].count("only once") == 1
    await alice.close()
    await bob.close()
