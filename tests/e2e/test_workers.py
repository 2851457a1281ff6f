"""``imfast serve --workers N``: several gateway processes behind one port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from imfast.auth import mint_token
from imfast.config import Settings
from tests.conformance.raw import http_exchange, upgrade_request
from tests.harness.services import free_port
from tests.helpers.node import Client

SECRET = "workers-test-secret-0123456789abcdef01234"


class Served:
    """``imfast serve --workers N`` (``workers=0``: one process) on a free port."""

    def __init__(self, tmp: Path, workers: int, **extra_env: str) -> None:
        self.port = free_port()
        self.log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - as long as the server runs
        env = {**os.environ, "JWT_SECRET": SECRET, "LOG_FORMAT": "text",
               "RATE_MSGS_PER_SEC": "10000", "RATE_BURST": "10000", **extra_env}
        self.workers = workers
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imfast", "serve", "--host", "127.0.0.1", "--port",
             str(self.port), "--data-dir", str(tmp / "data")]
            + (["--workers", str(workers)] if workers else []),
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.tmp = tmp
        try:
            self.wait_for(lambda s: s.get("workers", 0) == workers)
        except BaseException:
            self.stop()  # a node that never came up must not outlive the test
            raise

    def stop(self) -> None:
        """SIGINT (a graceful stop of the node and its workers); SIGKILL all if it hangs."""
        if self.proc.poll() is not None:
            return
        workers = self.worker_pids()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            for pid in [self.proc.pid, *workers]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(5)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def wait_for(self, predicate, timeout: float = 20.0) -> dict:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < end:
            assert self.proc.poll() is None, (self.tmp / "serve.log").read_text()
            try:
                last = self.stats()
                if ("workers" in last or not self.workers) and predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not reached; last /stats: {last}")

    def client(self, user: str) -> Client:
        token = mint_token(Settings(jwt_secret=SECRET), user)
        c = Client(f"ws://127.0.0.1:{self.port}/ws", token, timeout=10)
        c.welcome()
        return c

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True, check=False).stdout
        return [int(p) for p in out.split()]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path, workers=2)
    yield s
    s.stop()


def test_chat_and_groups_across_worker_processes(served: Served) -> None:
    users = [f"w{i}" for i in range(8)]
    clients = {u: served.client(u) for u in users}
    stats = served.wait_for(lambda s: s["active_connections"] == 8)
    assert stats["workers"] == 2
    assert isinstance(stats["store_segments_waiting"], int)  # the main process's store
    assert len(served.worker_pids()) == 2
    # Every user messages the next one: with 8 connections over 2 processes, some
    # pairs are on different workers.
    for i, u in enumerate(users):
        clients[u].send(type="send", cmid=f"c{i}", to=users[(i + 1) % 8], body=f"from {u}")
    for i, u in enumerate(users):
        m = clients[u].recv_until("msg")[-1]
        assert m["body"] == f"from {users[i - 1]}"
    clients["w0"].send(type="group_create", group="all", members=users[1:], id=1)
    clients["w0"].recv_until("group", id=1)
    clients["w3"].send(type="send", cmid="g", group="all", body="to everyone")
    for u in users:
        if u != "w3":
            assert clients[u].recv_until("msg", kind="msg")[-1]["body"] == "to everyone"
    # An invite-only group made through a worker (the flag crosses the link).
    clients["w1"].send(type="group_create", group="closed", open=False, id=2)
    clients["w1"].recv_until("group", id=2)
    clients["w2"].send(type="group_join", group="closed", id=3)
    assert clients["w2"].recv_until("error")[-1]["code"] == "forbidden"


def test_acks_reads_and_typing_with_no_id_are_casts_answered_only_when_they_fail(
        served: Served) -> None:
    """Over the link they get no reply (casts), yet take effect; a failure is still
    the error frame the client would have got from the request."""
    alice, bob, eve = served.client("alice"), served.client("bob"), served.client("eve")
    alice.send(type="send", cmid="c1", to="bob", body="hi", id=1)
    sent = alice.recv_until("sent", id=1)[-1]
    conv, seq = sent["conv"], sent["seq"]
    assert bob.recv_until("msg")[-1]["seq"] == seq
    bob.send(type="ack", conv=conv, seq=seq)  # a cast: no `acked`
    bob.send(type="typing", conv=conv)
    assert alice.recv_until("typing")[-1]["user"] == "bob"
    bob.send(type="read", conv=conv, seq=seq)
    receipt = alice.recv_until("receipt")[-1]
    assert (receipt["user"], receipt["seq"]) == ("bob", seq)
    bob.send(type="sync", id=2)
    synced = bob.recv_until("conversations", id=2)
    assert not [f for f in synced if f["type"] in ("acked", "error")]  # casts: silent
    assert synced[-1]["cursors"][conv] == seq  # the ack moved the cursor
    # Alice's own message moved her cursor too: the main process's router moves it,
    # batched within a second (her worker sends no ack for it).
    deadline = time.monotonic() + 5
    while True:
        alice.send(type="sync", id=3)
        if alice.recv_until("conversations", id=3)[-1]["cursors"].get(conv) == seq:
            break
        assert time.monotonic() < deadline, "own message's cursor never moved"
        time.sleep(0.3)
    # Eve is not in the conversation: her casts fail, and she hears why.
    eve.send(type="read", conv=conv, seq=seq)
    error = eve.recv_until("error")[-1]
    assert error["code"] == "not_found" and error.get("field") == "conv"
    eve.send(type="typing", conv=conv)
    assert eve.recv_until("error")[-1]["code"] == "not_found"
    eve.send(type="ack", conv=conv, seq=seq)  # nothing pushed to her: a call, answered
    assert eve.recv_until("error")[-1]["code"] == "not_found"


def test_gateway_processes_yield_the_cpu_to_the_router(served: Served, tmp_path: Path) -> None:
    router = os.getpriority(os.PRIO_PROCESS, served.proc.pid)
    workers = served.worker_pids()
    assert len(workers) == 2
    assert [os.getpriority(os.PRIO_PROCESS, p) for p in workers] == [min(19, router + 10)] * 2
    (tmp_path / "equal").mkdir()
    equal = Served(tmp_path / "equal", workers=2, GATEWAY_WORKER_NICE="0")
    try:
        assert [os.getpriority(os.PRIO_PROCESS, p) for p in equal.worker_pids()] == [
            os.getpriority(os.PRIO_PROCESS, equal.proc.pid)] * 2
    finally:
        equal.stop()


def test_a_killed_worker_is_restarted_and_its_clients_resume(served: Served) -> None:
    clients = {u: served.client(u) for u in ["alice", "bob", *(f"k{i}" for i in range(10))]}
    served.wait_for(lambda s: s["active_connections"] == 12)
    victim = served.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    served.wait_for(lambda s: s["workers"] == 2 and victim not in served.worker_pids())
    router = os.getpriority(os.PRIO_PROCESS, served.proc.pid)
    assert all(os.getpriority(os.PRIO_PROCESS, p) == min(19, router + 10)  # restarted: too
               for p in served.worker_pids())
    # Whoever was on the dead worker reconnects and gets what was sent meanwhile.
    dead = set()
    for u, c in clients.items():
        try:
            c.send(type="ping", id="alive?")
            c.recv_until("pong")
        except Exception:  # noqa: BLE001 - it was on the killed worker
            c.close()
            dead.add(u)
    assert dead and len(dead) < 12  # the kernel spread 12 connections over both workers
    alice = served.client("alice")
    # Those on the dead worker are offline now, with a last_seen; the others online.
    alice.send(type="presence", users=sorted(clients), id="who")
    states = alice.recv_until("presence", id="who")[-1]["users"]
    for u, state in states.items():
        if u == "alice":
            continue
        if u in dead:
            assert state["online"] is False and state["last_seen"] > 0, (u, state)
        else:
            assert state["online"] is True, (u, state)
    alice.send(type="send", cmid="after-kill", to="bob", body="still here")
    alice.recv_until("sent")
    bob2 = Client(f"ws://127.0.0.1:{served.port}/ws",
                  mint_token(Settings(jwt_secret=SECRET), "bob"), timeout=10)
    assert "still here" in [f.get("body") for f in bob2.recv_until("resumed")]


def test_sigterm_drains_every_worker(served: Served) -> None:
    clients = [served.client(f"d{i}") for i in range(4)]
    served.wait_for(lambda s: s["active_connections"] == 4)
    served.proc.send_signal(signal.SIGTERM)
    for c in clients:
        frames = c.recv_until("reconnect")
        assert frames[-1]["reason"] == "draining"
    assert served.proc.wait(20) == 0


def test_connect_rate_per_address_is_enforced_by_each_worker(tmp_path: Path) -> None:
    served = Served(tmp_path, workers=2, CONNECT_RATE_PER_IP="0.01", CONNECT_BURST_PER_IP="2",
                    CONNECT_LIMIT_EXEMPT="")
    try:
        statuses = []
        for _ in range(8):
            status, _ = http_exchange(served.port, upgrade_request(
                f"/ws?token={mint_token(Settings(jwt_secret=SECRET), 'r')}"))
            statuses.append(status)
        # Per process: each worker lets the address through twice (its burst), so the
        # node takes 2 to 4 of them depending on how the kernel spread them.
        assert set(statuses) == {101, 429}
        assert 2 <= statuses.count(101) <= 4, statuses
        refused = served.wait_for(lambda s: s["refused"].get("connect_rate", 0) ==
                                  statuses.count(429))["refused"]
        assert refused["connect_rate"] == statuses.count(429)
    finally:
        served.stop()



def _metrics(port: int) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """family name -> {(sample name, labels): value} of a node's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


def test_a_workers_node_reports_every_stat_and_metric_one_process_does(tmp_path: Path) -> None:
    """/stats and /metrics of ``--workers 2`` hold what one process reports, node-wide:
    the gateway counters (retransmits too), the send->sent histogram, the router's
    commit histogram and counters - not only the fields someone remembered to add up."""
    (tmp_path / "single").mkdir()
    single = Served(tmp_path / "single", workers=0)
    try:
        one_stats, one_metrics = single.stats(), _metrics(single.port)
    finally:
        single.stop()

    served = Served(tmp_path, workers=2, ACK_TIMEOUT="1")
    try:
        users = [f"m{i}" for i in range(6)]
        clients = {u: served.client(u) for u in users}
        served.wait_for(lambda s: s["active_connections"] == 6)
        for i, u in enumerate(users):  # nobody acknowledges: each push is sent again
            clients[u].send(type="send", cmid=f"m{i}", to=users[(i + 1) % 6], body="x", id=i)
            clients[u].recv_until("sent", id=i)
        for u in users:
            clients[u].recv_until("msg")
        stats = served.wait_for(lambda s: s["messages_accepted"] == 6
                                and s["messages_delivered"] >= 12)  # each pushed twice
        assert set(stats) == set(one_stats) | {"workers"}
        assert (stats["role"], stats["workers"], stats["capacity"]) == ("embedded", 2, 100_000)
        assert stats["active_connections"] == 6 and stats["commit_batches"] >= 1
        assert stats["backends"] == {"store": "SQLiteStore"}
        metrics = _metrics(served.port)
        assert set(metrics) == set(one_metrics)
        counts = {name: samples.get((name + "_count", ()), samples.get((name + "_total", ())))
                  for name, samples in metrics.items()}
        assert counts["im_gateway_retransmits"] >= 6  # every worker's, summed
        assert counts["im_gateway_send_ack_duration_seconds"] == 6
        assert counts["im_service_store_commit_duration_seconds"] >= 1  # the main process's
        assert counts["im_gateway_connections_opened"] == 6
        assert metrics["im_gateway_capacity_connections"] == {
            ("im_gateway_capacity_connections", ()): 100_000}  # the node's, not a sum
    finally:
        served.stop()


def test_admin_drain_on_any_worker_drains_the_whole_node(tmp_path: Path) -> None:
    """/admin/drain reaches one worker (whichever the kernel picks); every worker drains:
    all clients are moved off and the node answers draining."""
    served = Served(tmp_path, workers=2, ADMIN_TOKEN="drain-me")
    try:
        clients = [served.client(f"a{i}") for i in range(10)]  # over both workers
        served.wait_for(lambda s: s["active_connections"] == 10)
        status, _ = http_exchange(served.port, b"GET /admin/drain HTTP/1.1\r\nHost: x\r\n"
                                               b"X-Admin-Token: drain-me\r\n\r\n")
        assert status == 200
        for c in clients:
            assert c.recv_until("reconnect")[-1]["reason"] == "draining"
        stats = served.wait_for(lambda s: s["draining"] and s["active_connections"] == 0)
        assert stats["workers"] == 2
        assert served.proc.poll() is None  # drained, still running (like one gateway)
    finally:
        served.stop()


def test_presence_sees_users_on_every_worker(served: Served) -> None:
    """A presence request answers for the whole node, not just the worker it reached."""
    users = [f"p{i}" for i in range(10)]  # spread over both workers by the kernel
    clients = {u: served.client(u) for u in users}
    served.wait_for(lambda s: s["active_connections"] == 10)
    for i, u in enumerate(users):
        clients[u].send(type="presence", users=[*users, "nobody"], id=i)
        states = clients[u].recv_until("presence", id=i)[-1]["users"]
        assert {v for v, s in states.items() if s["online"]} == set(users), u
        assert states["nobody"] == {"online": False, "last_seen": None}
    # Those who leave are offline with a last_seen, whichever worker they were on.
    left = users[:4]
    for u in left:
        clients.pop(u).close()
    served.wait_for(lambda s: s["active_connections"] == 6)
    rid = 100
    for u, c in clients.items():
        deadline = time.monotonic() + 5  # the unregistrations travel to the main process
        while True:
            rid += 1
            c.send(type="presence", users=left, id=rid)
            states = c.recv_until("presence", id=rid)[-1]["users"]
            if not any(states[v]["online"] for v in left) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for v in left:
            assert states[v]["online"] is False and states[v]["last_seen"] > 0, (u, v, states)
