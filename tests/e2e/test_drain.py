"""Draining: the pod annotation, the admin endpoint and SIGTERM move clients off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websocket

from imfast.auth import mint_token
from imfast.config import Settings
from tests.harness.services import free_port
from tests.helpers.node import Client, NodeThread, expect_close, wait_for


def connected(node: NodeThread, n: int) -> list[Client]:
    clients = []
    for i in range(n):
        c = Client(node.url, node.token(f"u{i}"))
        c.welcome()
        clients.append(c)
    return clients


def assert_moved_off(node: NodeThread, clients: list[Client]) -> None:
    for c in clients:
        code, frames = expect_close(c)
        assert code == 4001
        assert frames[-1] == {"type": "reconnect", "reason": "draining", "retry_after_ms": 100}
    status, health = node.http("/health")
    assert status == 503 and health["status"] == "draining"
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        Client(node.url, node.token("late"))
    assert refused.value.status_code == 503
    wait_for(lambda: node.http("/stats")[1]["active_connections"] == 0)
    assert node.http("/stats")[1]["draining"] is True


def test_pod_annotation_drains(make_node, tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    annotations.write_text('kubernetes.io/config.seen="x"\n')
    node = make_node(drain_annotations_file=str(annotations))
    clients = connected(node, 3)
    time.sleep(1.2)
    assert node.http("/health")[0] == 200  # no drain annotation yet
    annotations.write_text('kubernetes.io/config.seen="x"\ndrain="true"\n')
    assert_moved_off(node, clients)


def test_removing_the_annotation_ends_its_drain(make_node, tmp_path: Path) -> None:
    """The alert's advice works: a pod annotated drain=true and then un-annotated takes
    connections again (a drain the admin endpoint or SIGTERM asked for stays)."""
    annotations = tmp_path / "annotations"
    annotations.write_text('drain="true"\n')
    node = make_node(drain_annotations_file=str(annotations), admin_token="t")
    wait_for(lambda: node.http("/health")[0] == 503)
    annotations.write_text('kubernetes.io/config.seen="x"\n')  # kubectl annotate ... drain-
    wait_for(lambda: node.http("/health")[0] == 200)
    assert node.http("/stats")[1]["draining"] is False
    clients = connected(node, 2)  # taken again
    clients[0].send(type="send", cmid="back", to="u1", body="back in service")
    assert clients[1].recv_until("msg")[-1]["body"] == "back in service"
    # Annotated again, then the admin endpoint: removing the annotation ends nothing.
    annotations.write_text('drain="true"\n')
    wait_for(lambda: node.http("/health")[0] == 503)
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{node.port}/admin/drain", headers={"X-Admin-Token": "t"}))
    annotations.write_text("")
    time.sleep(2.5)  # two of the gateway's once-a-second checks
    status, health = node.http("/health")
    assert status == 503 and health["reason"] == "admin"


def test_admin_endpoint_drains_only_with_the_token(make_node) -> None:
    node = make_node(admin_token="s3cret")
    clients = connected(node, 2)
    url = f"http://127.0.0.1:{node.port}/admin/drain"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(urllib.request.Request(url, headers={"X-Admin-Token": "nope"}))
    assert denied.value.code == 403
    with urllib.request.urlopen(urllib.request.Request(
            url, headers={"X-Admin-Token": "s3cret"})) as r:
        assert json.loads(r.read())["status"] == "draining"
    assert_moved_off(node, clients)


def test_nothing_is_lost_when_clients_move_to_another_node(make_node, tmp_path: Path) -> None:
    # Two nodes on one store would be the distributed mode; here the drained client
    # reconnects to the same data after a restart and resumes from its cursor.
    node = make_node(admin_token="t")
    bob = Client(node.url, node.token("bob"))
    bob.welcome()
    alice = Client(node.url, node.token("alice"))
    alice.welcome()
    for i in range(5):
        alice.send(type="send", cmid=f"m{i}", to="bob", body=str(i))
    alice.recv_until("sent", cmid="m4")
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{node.port}/admin/drain", headers={"X-Admin-Token": "t"}))
    _, frames = expect_close(bob)
    got = [f["body"] for f in frames if f.get("type") == "msg"]
    node.restart()
    bob2 = Client(node.url, node.token("bob"))
    resumed = [f["body"] for f in bob2.recv_until("resumed") if f["type"] == "msg"]
    # Unacknowledged entries come again (same seqs); together nothing is missing.
    assert sorted(set(got) | set(resumed)) == ["0", "1", "2", "3", "4"]


def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    port = free_port()
    secret = "sigterm-test-secret-0123456789abcdef0123"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imfast", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(tmp_path / "d")],
        env={**os.environ, "JWT_SECRET": secret}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        end = time.monotonic() + 15
        while True:
            try:
                c = Client(url, mint_token(Settings(jwt_secret=secret), "x"))
                break
            except OSError:
                assert time.monotonic() < end
                time.sleep(0.1)
        c.welcome()
        proc.send_signal(signal.SIGTERM)
        code, frames = expect_close(c)
        assert code == 4001 and frames[-1]["type"] == "reconnect"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
