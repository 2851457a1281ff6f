"""The asyncio SDK (imfast.client) against real nodes: chat, reconnect, resume, stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imfast.auth import mint_token
from imfast.client import (
    Client,
    ConnectError,
    ConnectionClosed,
    Disconnected,
    GroupEvent,
    JsonFileCursorStore,
    Message,
    Recall,
    Receipt,
    ServerError,
    Typing,
)
from imfast.config import Settings
from imfast.protocol.codes import CloseCode
from tests.harness.services import free_port
from tests.helpers.node import NodeThread

FAST = {"backoff": (0.05, 0.5), "ack_interval": 0.05}


class Inbox:
    """Reads a client's events() in the background and keeps them, in order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[Any] = []
        self.error: ConnectionClosed | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.client.events():
                self.events.append(event)
        except ConnectionClosed as exc:
            self.error = exc

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def entries(self) -> list[tuple[str, int]]:
        return [(e.conv, e.seq) for e in self.events
                if isinstance(e, (Message, GroupEvent, Recall))]

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < end, (
                f"timed out; entries: {self.entries()}; last events: {self.events[-8:]}")
            await asyncio.sleep(0.02)


async def online(url: str, token: str, **kw: Any) -> tuple[Client, Inbox]:
    client = Client(url, token, **{**FAST, **kw})
    await client.connect()
    return client, Inbox(client)


async def test_two_sdk_clients_chat(node: NodeThread) -> None:
    alice, a_in = await online(node.url, node.token("alice"))
    bob, b_in = await online(node.url, node.token("bob"))
    try:
        sent = await alice.send(to="bob", body="hi bob")
        assert (sent.conv, sent.seq, sent.duplicate) == ("p:alice:bob", 1, False)
        await b_in.until(lambda: b_in.of(Message))
        msg = b_in.of(Message)[0]
        assert (msg.sender, msg.body, msg.seq, msg.msg_id) == ("alice", "hi bob", 1, sent.msg_id)
        assert (await bob.send(to="alice", body="hi alice")).seq == 2
        await a_in.until(lambda: a_in.of(Message))
        assert [(m.sender, m.body) for m in a_in.of(Message)] == [("bob", "hi alice")]

        await bob.read("p:alice:bob", 2)
        await a_in.until(lambda: a_in.of(Receipt))
        assert a_in.of(Receipt) == [Receipt("p:alice:bob", "bob", 2)]
        await alice.typing("p:alice:bob")
        await b_in.until(lambda: b_in.of(Typing))
        assert b_in.of(Typing) == [Typing("p:alice:bob", "alice")]

        assert await alice.group_create("team", ["bob"]) == {"alice": "owner", "bob": "member"}
        await b_in.until(lambda: b_in.of(GroupEvent))
        created = b_in.of(GroupEvent)[0]
        assert (created.conv, created.event, created.by, created.users) == \
            ("g:team", "created", "alice", ("alice", "bob"))
        in_group = await bob.send(group="team", body="hello team")
        await a_in.until(lambda: any(m.conv == "g:team" for m in a_in.of(Message)))
        recall_seq = await bob.recall("g:team", in_group.seq)
        await a_in.until(lambda: a_in.of(Recall))
        assert (a_in.of(Recall)[0].recalled_seq, a_in.of(Recall)[0].seq) == \
            (in_group.seq, recall_seq)

        history = await alice.history("p:alice:bob")
        assert [(m.seq, m.body) for m in history] == [(1, "hi bob"), (2, "hi alice")]
        page = await alice.sync("p:alice:bob", after=0)
        assert [e.seq for e in page.entries] == [1, 2] and page.more is False
        assert (await alice.conversations()).latest == {"p:alice:bob": 2, "g:team": recall_seq}
        assert await bob.groups() == ["team"]
        with pytest.raises(ServerError) as err:
            await bob.group_members("elsewhere")
        assert err.value.code in ("not_found", "forbidden")
        with pytest.raises(ServerError) as err:
            await bob.send(group="elsewhere", body="nobody here")
        assert err.value.code in ("not_found", "forbidden")
        # Each side saw every entry once, in order, and nothing of its own.
        assert b_in.entries() == [("p:alice:bob", 1), ("g:team", 1)]
        assert a_in.entries() == [("p:alice:bob", 2), ("g:team", 2), ("g:team", 3)]
    finally:
        await alice.close()
        await bob.close()
    assert b_in.error is None and a_in.error is None  # close() ends events() quietly
    # Everything was processed and acknowledged: a new session resumes nothing.
    again = Client(node.url, node.token("bob"))
    assert (await again.connect()).resumed_conversations == 0
    await again.close()


async def test_sends_issued_while_the_node_is_down_complete_exactly_once(
        node: NodeThread) -> None:
    alice, a_in = await online(node.url, node.token("alice"))
    bob, b_in = await online(node.url, node.token("bob"))
    try:
        for i in range(3):
            await alice.send(to="bob", body=f"before-{i}")
        await b_in.until(lambda: len(b_in.of(Message)) == 3)

        # Restart mid-conversation: sends go on before, during and after it.
        restart = asyncio.ensure_future(asyncio.to_thread(node.restart))
        stream = []
        for i in range(20):
            stream.append(asyncio.create_task(alice.send(to="bob", body=f"during-{i}")))
            await asyncio.sleep(0.01)
        await restart
        await asyncio.wait_for(asyncio.gather(*stream), 15)

        # Down for a while: these sends cannot complete until the node is back.
        port = node.port
        await asyncio.to_thread(node.stop)
        await a_in.until(lambda: not alice.connected)
        offline = [asyncio.create_task(alice.send(to="bob", body=f"offline-{i}"))
                   for i in range(5)]
        offline.append(asyncio.create_task(bob.send(to="alice", body="bob-offline")))
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in offline)
        node.settings = node.settings.replace(http_port=port)
        await asyncio.to_thread(node.start)
        sents = await asyncio.wait_for(asyncio.gather(*stream, *offline), 15)

        n = 3 + 20 + 5 + 1
        assert sorted(s.seq for s in sents) == list(range(4, n + 1))
        await b_in.until(lambda: len(b_in.of(Message)) == n - 1)
        await a_in.until(lambda: len(a_in.of(Message)) == 1)
        await asyncio.sleep(0.3)  # anything doubled would arrive by now
        conv = "p:alice:bob"
        bob_seqs = [seq for c, seq in b_in.entries()]
        assert b_in.entries() == [(conv, s) for s in bob_seqs]
        assert bob_seqs == sorted(set(bob_seqs)) and len(bob_seqs) == n - 1
        bodies = [m.body for m in b_in.of(Message)]
        assert sorted(bodies) == sorted(
            [f"before-{i}" for i in range(3)] + [f"during-{i}" for i in range(20)]
            + [f"offline-{i}" for i in range(5)])
        assert [m.body for m in a_in.of(Message)] == ["bob-offline"]
        assert set(bob_seqs) | {a_in.of(Message)[0].seq} == set(range(1, n + 1))
        reconnects = b_in.of(Disconnected)
        assert len(reconnects) >= 2 and all(e.reconnect_in is not None for e in reconnects)
        # The store really holds each message once.
        history = await bob.history(conv, limit=100)
        assert [m.seq for m in history] == list(range(1, n + 1))
    finally:
        await alice.close()
        await bob.close()


async def test_lost_connections_resume_without_loss_or_repeats(node: NodeThread) -> None:
    """Connections cut without a close frame (as by a dead network): 1006, reconnect."""
    alice, _ = await online(node.url, node.token("alice"))
    bob, b_in = await online(node.url, node.token("bob"), ack_interval=5.0)

    async def cut_everyone() -> None:
        for session in list(node.node.gateway.table.iter_sessions()):
            session.raw.abort()

    try:
        bodies = [f"m{i}" for i in range(30)]
        tasks = []
        for i, body in enumerate(bodies):
            tasks.append(asyncio.create_task(alice.send(to="bob", body=body)))
            if i in (10, 20):
                await asyncio.sleep(0.05)
                node.call(cut_everyone())
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        # Bob acknowledges rarely (ack_interval=5 s), so every reconnect re-sends
        # what he already has: the SDK must drop those repeats.
        await b_in.until(lambda: len(b_in.of(Message)) == 30 and bob.connected)
        cuts = len(b_in.of(Disconnected))
        node.call(cut_everyone())
        await b_in.until(lambda: len(b_in.of(Disconnected)) > cuts and bob.connected)
        await asyncio.sleep(0.3)
        assert [m.seq for m in b_in.of(Message)] == list(range(1, 31))
        assert sorted(m.body for m in b_in.of(Message)) == sorted(bodies)
        assert {e.code for e in b_in.of(Disconnected)} == {1006}
    finally:
        await alice.close()
        await bob.close()


async def test_a_killed_node_process_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """SIGKILL the `imfast serve` process mid-conversation and start it again."""
    port, secret = free_port(), "sdk-kill-test-secret-0123456789abcdef"
    settings = Settings(jwt_secret=secret)

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imfast", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--data-dir", str(tmp_path / "data")],
            env={**os.environ, "JWT_SECRET": secret}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        end = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                return proc
            except OSError:
                assert proc.poll() is None and time.monotonic() < end, "node did not start"
                time.sleep(0.05)

    proc = await asyncio.to_thread(start)
    url = f"ws://127.0.0.1:{port}/ws"
    alice, _ = await online(url, mint_token(settings, "alice"))
    bob, b_in = await online(url, mint_token(settings, "bob"))
    try:
        tasks = [asyncio.create_task(alice.send(to="bob", body=f"k{i}")) for i in range(40)]
        await b_in.until(lambda: len(b_in.of(Message)) >= 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        more = [asyncio.create_task(alice.send(to="bob", body=f"k{i}")) for i in range(40, 50)]
        await asyncio.sleep(0.3)
        proc = await asyncio.to_thread(start)
        sents = await asyncio.wait_for(asyncio.gather(*tasks, *more), 20)
        assert sorted(s.seq for s in sents) == list(range(1, 51))
        await b_in.until(lambda: len(b_in.of(Message)) == 50)
        await asyncio.sleep(0.3)
        assert [m.seq for m in b_in.of(Message)] == list(range(1, 51))
        assert sorted(m.body for m in b_in.of(Message)) == sorted(f"k{i}" for i in range(50))
    finally:
        await alice.close()
        await bob.close()
        proc.kill()
        proc.wait(5)


async def test_terminal_close_code_stops_reconnecting(node: NodeThread) -> None:
    alice, a_in = await online(node.url, node.token("alice"))

    async def revoke() -> None:
        for session in node.node.gateway.table.sessions_of("alice"):
            session.close(CloseCode.AUTH_FAILED, "token revoked")

    node.call(revoke())
    await a_in.until(lambda: a_in.error is not None)
    assert (a_in.error.code, a_in.error.reason) == (4500, "token revoked")
    assert a_in.of(Disconnected)[-1] == Disconnected(4500, "token revoked", None)
    with pytest.raises(ConnectionClosed):
        await alice.wait_closed()
    with pytest.raises(ConnectionClosed):
        await alice.send(to="bob", body="too late")
    await asyncio.sleep(0.5)
    assert node.node.gateway.table.sessions_of("alice") == ()  # it did not come back
    await alice.close()


async def test_a_second_copy_with_the_same_device_wins_and_the_first_stops(
        node: NodeThread) -> None:
    """Two programs with one token (one user, one device): the newer connection takes
    the session (4005 for the older), and the older does not take it back - which
    used to go back and forth several times a second, for ever."""
    first, first_in = await online(node.url, node.token("bob"))
    second, second_in = await online(node.url, node.token("bob"))
    await first_in.until(lambda: first_in.error is not None)
    assert first_in.error.code == 4005
    await asyncio.sleep(1.0)  # several of the old backoffs (0.05-0.5 s)
    assert second_in.of(Disconnected) == []
    [session] = node.node.gateway.table.sessions_of("bob")
    assert not session.closed
    await second.close()
    await first.close()


async def test_a_lone_string_where_a_list_of_users_goes_is_refused(node: NodeThread) -> None:
    alice, _ = await online(node.url, node.token("alice"))
    await alice.group_create("strings")
    for call in (alice.group_invite("strings", "carol"),
                 alice.group_remove("strings", "carol"),
                 alice.presence("carol"),
                 alice.group_create("strings2", "carol")):
        with pytest.raises(ValueError, match=r"\['carol'\]"):
            await call
    assert await alice.group_members("strings") == {"alice": "owner"}
    await alice.close()


async def test_sends_over_the_rate_limit_are_retried_and_all_stored_once(make_node) -> None:
    node = make_node(rate_msgs_per_sec=5.0, rate_burst=3)
    alice, _ = await online(node.url, node.token("alice"))
    sent = await asyncio.wait_for(
        asyncio.gather(*(alice.send(to="bob", body=f"m{i}") for i in range(4))), 30)
    assert sorted(s.seq for s in sent) == [1, 2, 3, 4]
    assert not any(s.duplicate for s in sent)
    await alice.close()


async def test_an_invite_only_group_made_with_the_sdk_refuses_joins(node: NodeThread) -> None:
    alice, _ = await online(node.url, node.token("alice"))
    eve, _ = await online(node.url, node.token("eve"))
    assert await alice.group_create("closed", ["bob"], open=False) == {
        "alice": "owner", "bob": "member"}
    with pytest.raises(ServerError) as refused:
        await eve.group_join("closed")
    assert refused.value.code == "forbidden"
    await alice.close()
    await eve.close()


async def test_bad_token_and_unreachable_server_fail_connect_clearly(node: NodeThread) -> None:
    forged = mint_token(Settings(jwt_secret="another-secret-0123456789abcdef0123"), "eve")
    with pytest.raises(ConnectionClosed) as closed:
        await Client(node.url, forged).connect()
    assert closed.value.code == 4500
    with pytest.raises(ConnectError, match="cannot connect"):
        await Client(f"ws://127.0.0.1:{free_port()}/ws", node.token("eve")).connect()


async def test_token_expiry_reconnects_with_a_fresh_token_from_the_provider(
        node: NodeThread) -> None:
    async def expire(user: str) -> None:
        for session in node.node.gateway.table.sessions_of(user):
            session.close(CloseCode.TOKEN_EXPIRED, "token expired")

    minted: list[str] = []

    async def provider() -> str:
        minted.append(node.token("carol", ttl=60))
        return minted[-1]

    carol = Client(node.url, token_provider=provider, **FAST)
    await carol.connect()
    c_in = Inbox(carol)
    node.call(expire("carol"))
    await c_in.until(lambda: any(e.code == 4006 for e in c_in.of(Disconnected)))
    await c_in.until(lambda: carol.connected)
    assert len(minted) == 2 and c_in.error is None
    await carol.close()
    # With a fixed token, 4006 is the end: the same token would be refused again.
    dave, d_in = await online(node.url, node.token("dave"))
    node.call(expire("dave"))
    await d_in.until(lambda: d_in.error is not None)
    assert d_in.error.code == 4006 and "token_provider" in d_in.error.reason
    await dave.close()
    with pytest.raises(ConnectionClosed) as closed:
        await Client(node.url, node.token("dave", ttl=-5)).connect()
    assert closed.value.code == 4006


async def test_file_store_drops_what_a_previous_run_processed(node: NodeThread,
                                                               tmp_path: Path) -> None:
    alice, _ = await online(node.url, node.token("alice"))
    for i in range(5):
        await alice.send(to="bob", body=f"s{i}")
    await alice.close()
    # A previous run of bob's program processed seqs 1-3 and saved that, but its
    # acks never reached the server (it died): the server re-sends 1-5.
    path = tmp_path / "bob-cursors.json"
    path.write_text(json.dumps({"p:alice:bob": 3}))
    bob, b_in = await online(node.url, node.token("bob"), store=JsonFileCursorStore(path))
    await b_in.until(lambda: len(b_in.of(Message)) == 2)
    await bob.close()
    assert [m.body for m in b_in.of(Message)] == ["s3", "s4"]
    assert json.loads(path.read_text()) == {"p:alice:bob": 5}
