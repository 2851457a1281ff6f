"""Network faults between components, through our TCP fault proxy (tc netem is not available).

The deployment is the one of test_cluster_faults.py, except that four kinds
of links go through :class:`tests.harness.faultproxy.FaultProxy` (``pass``
until a test switches it): gateway -> im-service calls (``SERVICE_ADDR``),
im-service/gateway -> gateway pushes (each gateway advertises a proxy in
front of its push port), im-service -> Redis and im-service -> MariaDB.
Each test streams the usual workload, switches a mode mid-traffic, switches
back, and checks with the set checker.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults.workload import assert_clean, run_workload
from tests.harness.faultproxy import FaultProxy, ProxyThread
from tests.harness.services import ServiceSet
from tests.helpers.cluster import Cluster, running

pytestmark = pytest.mark.integration


@dataclass
class Proxied:
    cluster: Cluster
    services: Any
    internal: list[FaultProxy]  # the service link and both push links
    redis: FaultProxy
    mysql: FaultProxy  # im-service -> MariaDB (the offline worker connects directly)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    services = ServiceSet("redis", "mariadb", "etcd", "kafka").start()
    dsn = services.mariadb.create_app_database()
    with ProxyThread() as proxies:
        redis_proxy = proxies.start(FaultProxy((services.redis.host, services.redis.port)))
        cluster = Cluster({"redis": services.redis, "etcd": services.etcd,
                           "kafka": services.kafka, "mysql_dsn": dsn},
                          Path(tmp_path_factory.mktemp("netfaults")), gateways=2)
        cluster.service.env["REDIS_URL"] = f"redis://{redis_proxy.addr}/0"
        mysql_proxy = proxies.start(FaultProxy((services.mariadb.host, services.mariadb.port)))
        cluster.service.env["MYSQL_DSN"] = dsn.replace(
            f"@{services.mariadb.host}:{services.mariadb.port}/", f"@{mysql_proxy.addr}/")
        # Short enough that the scenario sees connections dropped and replaced.
        cluster.service.env["DB_READ_TIMEOUT"] = "1"
        cluster.service.env["DB_WRITE_TIMEOUT"] = "2"
        service_proxy = proxies.start(FaultProxy(("127.0.0.1", cluster.service_port)))
        internal = [service_proxy]
        for gw in cluster.gateways:
            push = proxies.start(FaultProxy(("127.0.0.1", int(gw.env["PUSH_PORT"]))))
            gw.env["SERVICE_ADDR"] = service_proxy.addr
            gw.env["GATEWAY_ADVERTISE_ADDR"] = push.addr
            internal.append(push)
        with running(cluster, services):
            yield Proxied(cluster, services, internal, redis_proxy, mysql_proxy)


async def test_internal_link_delayed_200ms_then_back(proxied: Proxied) -> None:
    async def fault() -> None:
        for p in proxied.internal:
            p.delay(200)
        await asyncio.sleep(2.0)
        for p in proxied.internal:
            p.pass_through()

    run = await run_workload(proxied.cluster, "nd", fault)
    print(f"nd: streamed in {run.seconds:.1f} s")
    assert_clean(run.figures)


async def test_internal_link_reset_mid_traffic(proxied: Proxied) -> None:
    async def fault() -> None:
        for p in proxied.internal:
            p.reset()
        await asyncio.sleep(1.0)
        for p in proxied.internal:
            p.pass_through()

    before = sum(p.accepted for p in proxied.internal)
    losses = [gateway_stats(gw)["push_losses_reported"] for gw in proxied.cluster.gateways]
    run = await run_workload(proxied.cluster, "nr", fault)
    print(f"nr: streamed in {run.seconds:.1f} s; "
          f"{sum(p.accepted for p in proxied.internal) - before} link (re)connections")
    assert_clean(run.figures)
    # Each gateway saw its push link break (no goodbye) and took it as pushes
    # possibly lost: its sessions check the store before trusting a push.
    after = [gateway_stats(gw)["push_losses_reported"] for gw in proxied.cluster.gateways]
    assert all(a > b for a, b in zip(after, losses, strict=True)), (losses, after)


def gateway_stats(gateway: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.http_port}/stats",
                                timeout=5) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


async def test_redis_blackholed_for_3s_then_back(proxied: Proxied) -> None:
    async def fault() -> None:
        proxied.redis.blackhole()
        await asyncio.sleep(3.0)
        proxied.redis.pass_through()

    swallowed = proxied.redis.swallowed
    run = await run_workload(proxied.cluster, "nb", fault)
    print(f"nb: streamed in {run.seconds:.1f} s; "
          f"{proxied.redis.swallowed - swallowed} bytes to/from Redis swallowed")
    assert proxied.redis.swallowed > swallowed  # the fault did hit traffic
    assert_clean(run.figures)


async def test_mysql_blackholed_for_3s_then_back(proxied: Proxied) -> None:
    """im-service's MariaDB link swallows everything for 3 s (a partition, no RST).

    Appends in flight and new ones get no reply: after DB_WRITE_TIMEOUT (2 s
    here) their connections are dropped and the senders are answered
    ``unavailable``; they resend the same cmid, and once the link passes
    again new connections serve.  Nothing acknowledged may be lost or doubled.
    """
    async def fault() -> None:
        proxied.mysql.blackhole()
        await asyncio.sleep(3.0)
        proxied.mysql.pass_through()

    swallowed = proxied.mysql.swallowed
    accepted = proxied.mysql.accepted
    run = await run_workload(proxied.cluster, "mb", fault)
    print(f"mb: streamed in {run.seconds:.1f} s; "
          f"{proxied.mysql.swallowed - swallowed} bytes to/from MariaDB swallowed; "
          f"{proxied.mysql.accepted - accepted} new MariaDB connections; sends answered "
          f"with an error {run.refused}, unanswered in 3 s {run.timeouts} (then resent)")
    assert proxied.mysql.swallowed > swallowed  # the fault did hit traffic
    assert_clean(run.figures)
