"""Distributed mode end to end: im-service, offline-worker and two gateways as
separate processes on real Redis, MariaDB, etcd and a Kafka-compatible broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imfast.auth import mint_token
from imfast.config import Settings
from tests.helpers.cluster import JWT_SECRET, Cluster
from tests.helpers.node import Client

pytestmark = pytest.mark.integration

SETTINGS = Settings(jwt_secret=JWT_SECRET)


def token(user: str, device: str = "default") -> str:
    return mint_token(SETTINGS, user, device)


def connect(cluster: Cluster, gateway: int, user: str, device: str = "default") -> Client:
    # A bound on "never": group messages wait for the gateways' Kafka group joins.
    c = Client(cluster.url(gateway), token(user, device), timeout=60)
    c.welcome()
    return c


@pytest.fixture(scope="module")
def cluster(redis_server: Any, etcd_server: Any, kafka_broker: Any, mariadb_app_dsn: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    services = {"redis": redis_server, "etcd": etcd_server, "kafka": kafka_broker,
                "mysql_dsn": mariadb_app_dsn}
    # Two im-service replicas: gateways send each conversation through one of them.
    c = Cluster(services, Path(tmp_path_factory.mktemp("cluster")), gateways=2, replicas=2)
    try:
        c.start()
    except Exception:
        print(c.logs())
        c.stop()
        raise
    yield c
    c.stop()


def until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s")


def test_private_message_between_users_on_different_gateways(cluster: Cluster) -> None:
    alice = connect(cluster, 0, "alice")
    bob = connect(cluster, 1, "bob")
    alice.send(type="send", cmid="x1", to="bob", body="across gateways")
    ack = alice.recv_until("sent")[-1]
    assert ack["conv"] == "p:alice:bob" and ack["seq"] >= 1
    msg = bob.recv_until("msg")[-1]
    assert (msg["from"], msg["body"], msg["seq"]) == ("alice", "across gateways", ack["seq"])
    bob.send(type="send", cmid="y1", to="alice", body="and back")
    assert alice.recv_until("msg")[-1]["body"] == "and back"
    # A retried cmid through the other gateway's path is still one message.
    alice.send(type="send", cmid="x1", to="bob", body="across gateways")
    again = alice.recv_until("sent")[-1]
    assert again["duplicate"] is True and again["seq"] == ack["seq"]


def test_both_sides_sending_at_once_through_two_replicas_get_everything_live(
        cluster: Cluster) -> None:
    """Pairs on different gateways send bursts to each other at the same moment: every
    entry reaches the other side live, in seq order, once (each conversation's entries
    go through one im-service replica, which numbers and pushes them in order)."""
    pairs = [(connect(cluster, 0, f"ra{i}"), connect(cluster, 1, f"rb{i}")) for i in range(6)]
    burst = 15
    for k in range(burst):
        for i, (a, b) in enumerate(pairs):
            a.send(type="send", cmid=f"a{i}-{k}", to=f"rb{i}", body=f"a{k}")
            b.send(type="send", cmid=f"b{i}-{k}", to=f"ra{i}", body=f"b{k}")
    for i, (a, b) in enumerate(pairs):
        for me, other_prefix in ((a, "b"), (b, "a")):
            got: list[dict[str, Any]] = []
            sent = 0
            while len(got) < burst or sent < burst:
                frame = me.recv()
                if frame["type"] == "msg":
                    got.append(frame)
                elif frame["type"] == "sent":
                    sent += 1
            assert [m["body"] for m in got] == [f"{other_prefix}{k}" for k in range(burst)]
            seqs = [m["seq"] for m in got]
            assert seqs == sorted(seqs) and len(set(seqs)) == burst
    for a, b in pairs:
        a.close()
        b.close()


def test_casts_to_im_service_take_effect_and_report_their_failures(cluster: Cluster) -> None:
    """An ack, read or typing with no id goes to im-service as a cast: no reply, yet
    it takes effect; a failure comes back as the error frame."""
    carol = connect(cluster, 0, "carol")
    dave = connect(cluster, 1, "dave")
    mallory = connect(cluster, 1, "mallory")
    carol.send(type="send", cmid="k1", to="dave", body="hello", id=1)
    sent = carol.recv_until("sent", id=1)[-1]
    conv, seq = sent["conv"], sent["seq"]
    assert dave.recv_until("msg")[-1]["seq"] == seq
    dave.send(type="ack", conv=conv, seq=seq)
    dave.send(type="read", conv=conv, seq=seq)
    receipt = carol.recv_until("receipt")[-1]
    assert (receipt["user"], receipt["seq"]) == ("dave", seq)
    # The ack took effect, silently.  It may reach MySQL after the receipt reached
    # Carol (acks are written in batches, and with two replicas the sync may be read by
    # the other one), so the sync is repeated until it shows.
    deadline = time.monotonic() + 10
    request = 2
    while True:
        dave.send(type="sync", id=request)
        frames = dave.recv_until("conversations", id=request)
        assert not [f for f in frames if f["type"] in ("acked", "error")]
        if frames[-1]["cursors"].get(conv) == seq:
            break
        assert time.monotonic() < deadline, "the ack cast never moved the cursor"
        request += 1
        time.sleep(0.2)
    mallory.send(type="read", conv=conv, seq=seq)  # not hers: the cast fails
    error = mallory.recv_until("error")[-1]
    assert error["code"] == "not_found" and error.get("field") == "conv"
    # im-service's router does not move a sender's cursor past its own entry (its store
    # has no advance_own_now): Carol's gateway acks her own message itself, batched.
    deadline = time.monotonic() + 10
    while True:
        request += 1
        carol.send(type="sync", id=request)
        if carol.recv_until("conversations", id=request)[-1]["cursors"].get(conv) == seq:
            break
        assert time.monotonic() < deadline, "the own message's cursor never moved"
        time.sleep(0.3)


def group_across_gateways(cluster: Cluster, prefix: str, group: str
                          ) -> tuple[Client, Client, Client]:
    """``group`` of <prefix>owner and <prefix>near on gateway 0, <prefix>far on gateway 1,
    each member past the `created` event."""
    owner = connect(cluster, 0, f"{prefix}owner")
    near = connect(cluster, 0, f"{prefix}near")
    far = connect(cluster, 1, f"{prefix}far")
    owner.send(type="group_create", group=group, members=[f"{prefix}near", f"{prefix}far"],
               id=1)
    owner.recv_until("group", id=1)
    for c in (near, far):
        assert c.recv_until("msg")[-1]["event"]["event"] == "created"
    return owner, near, far


def test_group_message_fans_out_to_members_on_both_gateways(cluster: Cluster) -> None:
    owner, near, far = group_across_gateways(cluster, "g", "ops")
    owner.send(type="send", cmid="g1", group="ops", body="hello ops")
    seq = owner.recv_until("sent")[-1]["seq"]
    for c in (near, far):
        m = c.recv_until("msg", kind="msg")[-1]
        assert (m["conv"], m["seq"], m["body"]) == ("g:ops", seq, "hello ops")


def test_unreadable_kafka_records_are_skipped_not_stalling_their_partition(
        cluster: Cluster, kafka_broker: Any) -> None:
    """Records imfast cannot use (not JSON, or JSON of the wrong shape) are logged and
    skipped: the real entry behind them on the same partition still fans out."""
    import asyncio

    from imfast.backends.kafka import KafkaBus
    from imfast.service.pusher import TOPIC_GROUP, TOPIC_OFFLINE

    owner, near, far = group_across_gateways(cluster, "k", "kbad")
    entry = ["g:kbad", 99, "m", "kowner", "default", "c", "x", 0, "msg"]
    junk = [b"free text", b'{"e": 5, "u": ["knear"]}', b'["not", "a", "record"]',
            b'{"e": %s, "u": 7}' % str(entry).replace("'", '"').encode(),
            b'{"e": %s, "u": [1, 2]}' % str(entry).replace("'", '"').encode()]

    async def publish() -> None:
        bus = KafkaBus([kafka_broker.bootstrap_servers], client_id="test-junk")
        await bus.start()
        try:  # keyed like the group's entries: the same partition, before the next one
            await bus.publish_many(TOPIC_GROUP, [(b"g:kbad", j) for j in junk])
            await bus.publish_many(TOPIC_OFFLINE, [(b"knear", j) for j in junk])
        finally:
            await bus.close()

    asyncio.run(publish())
    owner.send(type="send", cmid="k1", group="kbad", body="after the junk")
    seq = owner.recv_until("sent")[-1]["seq"]
    for c in (near, far):
        m = c.recv_until("msg", kind="msg")[-1]
        assert (m["seq"], m["body"]) == (seq, "after the junk")

    def logged(phrase: str) -> int:
        return sum(p.log_path.read_text(errors="replace").count(phrase) for p in cluster.procs)

    # Each record is consumed by one gateway (one consumer group); all are logged.
    until(lambda: logged("skipping unreadable group_msg record") == len(junk),
          what="each junk group_msg record logged")
    until(lambda: logged("skipping unreadable offline_msg record") == len(junk),
          what="each junk offline_msg record logged")


def test_offline_user_goes_through_offline_msg_to_mysql_and_gets_it_on_reconnect(
        cluster: Cluster, mariadb_server: Any) -> None:
    sender = connect(cluster, 0, "osender")
    sender.send(type="send", cmid="o1", to="zed", body="while you were away")
    seq = sender.recv_until("sent")[-1]["seq"]

    def rows() -> int:
        out = mariadb_server.execute(
            "SELECT COUNT(*) FROM im_chat.offline_messages WHERE user_id='zed'")
        return int(out.split()[-1])

    until(lambda: rows() == 1, what="offline_messages row for zed")
    zed = Client(cluster.url(1), token("zed"), timeout=60)
    msgs = [f for f in zed.recv_until("resumed") if f["type"] == "msg"]
    assert [(m["body"], m["seq"]) for m in msgs] == [("while you were away", seq)]
    zed.send(type="ack", conv="p:osender:zed", seq=seq, id=1)
    zed.recv_until("acked")
    until(lambda: rows() == 0, what="offline row cleared after ack")


async def test_backing_services_hold_the_contract_names(cluster: Cluster, redis_server: Any,
                                                        etcd_server: Any, kafka_broker: Any,
                                                        mariadb_server: Any) -> None:
    import aetcd
    import redis.asyncio as aredis
    from aiokafka.admin import AIOKafkaAdminClient

    alice = connect(cluster, 0, "kalice", "phone")
    alice.send(type="send", cmid="k1", to="kbob", body="names")
    alice.recv_until("sent")
    # etcd: /registry/users/<user>/<device> -> gateway address
    host, port = etcd_server.url.removeprefix("http://").split(":")
    async with aetcd.Client(host=host, port=int(port)) as etcd:
        got = await etcd.get(b"/registry/users/kalice/phone")
        assert got is not None
        assert got.value.decode() == cluster.gateways[0].env["GATEWAY_ADVERTISE_ADDR"]
    # Redis: seq:private:<a>:<b> and dedup:<sender>:<cmid>
    r = aredis.from_url(redis_server.url, protocol=2, decode_responses=True)
    assert await r.get("seq:private:kalice:kbob") == "1"
    assert await r.exists("dedup:kalice:k1") == 1
    await r.aclose()
    # Kafka: the topics and the gateways' consumer group
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
        assert {"group_msg", "offline_msg"} <= topics
        groups = {g[0] for g in await admin.list_consumer_groups()}
        assert "gateway-group" in groups and "offline-worker" in groups
    finally:
        await admin.close()
    # MySQL: database im_chat and the runbook's tables
    tables = set(mariadb_server.execute("SHOW TABLES FROM im_chat").split())
    assert {"offline_messages", "sequence_snapshots"} <= tables
    snap = mariadb_server.execute(
        "SELECT seq FROM im_chat.sequence_snapshots WHERE conversation_id='p:kalice:kbob'")
    assert snap.split()[-1] == "1"


def test_health_stats_metrics_on_every_role(cluster: Cluster) -> None:
    import json
    import urllib.request

    for p in cluster.procs:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.http_port}/health") as r:
            assert json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{p.http_port}/metrics") as r:
            text = r.read().decode()
        assert "im_backend_errors_total" in text
        expected = {
            "gateway": ["im_gateway_active_connections", "im_gateway_messages_delivered_total",
                        "im_gateway_message_delivery_duration_seconds_bucket",
                        "im_gateway_errors_total", "im_gateway_capacity_connections",
                        "im_gateway_draining", "im_kafka_consumer_lag",
                        'im_kafka_handler_failures_total{group="gateway-group"} 0.0'],
            "service": ["im_service_messages_routed_total",
                        "im_service_seq_counter_initialisations_total",
                        'im_mysql_pool_connections{state="max"} 5.0'],
            "offline-worker": ["im_offline_messages_stored_total", "im_kafka_consumer_lag",
                               'im_kafka_handler_failures_total{group="offline-worker"} 0.0',
                               'im_mysql_pool_connections{state="max"}'],
        }[p.role]
        for name in expected:
            assert name in text, (p.role, name)
    def stats() -> dict:
        with urllib.request.urlopen(
                f"http://127.0.0.1:{cluster.gateways[0].http_port}/stats") as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    assert "active_connections" in stats()
    until(lambda: stats()["service_link_connected"], what="gateway linked to im-service")


def test_gateway_with_two_worker_processes(cluster: Cluster) -> None:
    import json
    import urllib.request

    proc = cluster._proc("gateway", {"PUSH_PORT": str(cluster.free_pair()),
                                     "POD_NAME": "gw-multi", "GATEWAY_WORKERS": "2",
                                     "ADMIN_TOKEN": "multi-drain"})
    proc.start()
    try:
        proc.wait_healthy()
        url = f"ws://127.0.0.1:{proc.http_port}/ws"
        clients = {u: Client(url, token(u), timeout=60) for u in ("m1", "m2", "m3", "m4")}
        for c in clients.values():
            c.recv_until("resumed")
        for i, u in enumerate(clients):
            clients[u].send(type="send", cmid="x", to=f"m{(i + 1) % 4 + 1}", body=f"hi from {u}")
        for c in clients.values():
            assert c.recv_until("msg")[-1]["body"].startswith("hi from")
        remote = connect(cluster, 0, "m-remote")
        remote.send(type="send", cmid="r", to="m1", body="from gw0")
        assert clients["m1"].recv_until("msg")[-1]["body"] == "from gw0"

        def stats() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/stats") as r:
                return json.loads(r.read())  # type: ignore[no-any-return]

        def both_workers() -> dict | None:
            s = stats()
            return s if s.get("workers") == 2 and s["active_connections"] == 4 else None

        s = until(both_workers, what="aggregated /stats of both workers")
        assert s["authenticated_connections"] == 4
        # What one gateway process reports, the pod reports too (runbooks jq these).
        assert s["role"] == "gateway"

        def linked() -> dict | None:  # once every worker's link to im-service is up
            s = stats()
            return s if s["service_link_connected"] is True else None

        s = until(linked, what="every worker linked to im-service")
        assert isinstance(s["kafka_consumer_lag"], int)
        assert len(s["advertise_addr"]) == 2  # each worker's push address

        def all_sends_counted() -> str | None:  # workers report once a second
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/metrics") as r:
                text = r.read().decode()
            sends = [line for line in text.splitlines()
                     if line.startswith("im_gateway_send_ack_duration_seconds_count")]
            return text if sends and float(sends[0].split()[-1]) == 4 else None

        text = until(all_sends_counted, what="both workers' sends in the pod's histogram")
        for name in ("im_backend_errors_total", "im_kafka_consumer_lag",
                     "im_gateway_retransmits_total"):
            assert name in text, name
        # /admin/drain reaches one of the two processes; the pod drains whole.
        request = urllib.request.Request(f"http://127.0.0.1:{proc.http_port}/admin/drain",
                                         headers={"X-Admin-Token": "multi-drain"})
        with urllib.request.urlopen(request) as r:
            assert json.loads(r.read())["status"] == "draining"
        for c in clients.values():
            assert c.recv_until("reconnect")[-1]["reason"] == "draining"
        until(lambda: stats()["draining"] and stats()["active_connections"] == 0,
              timeout=40, what="both workers drained")
    finally:
        proc.stop()
