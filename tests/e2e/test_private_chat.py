"""Private chat end to end over real WebSocket connections (websocket-client)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from imfast.service.router import OWN_CURSOR_DELAY
from tests.helpers.fast_path import record_fast_path
from tests.helpers.node import Client, NodeThread, wait_for


def connect(node: NodeThread, user: str, device: str = "default") -> Client:
    c = Client(node.url, node.token(user, device))
    assert c.welcome()["user"] == user
    return c


def test_message_reaches_online_recipient_with_ack_and_seq(node: NodeThread) -> None:
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="c1", to="bob", body="hello bob", id=1)
    ack = alice.recv_until("sent")[-1]
    assert ack["cmid"] == "c1" and ack["conv"] == "p:alice:bob" and ack["seq"] == 1
    assert ack["id"] == 1 and ack["msg_id"]
    msg = bob.recv()
    assert msg["type"] == "msg"
    assert (msg["from"], msg["body"], msg["seq"], msg["msg_id"]) == \
        ("alice", "hello bob", 1, ack["msg_id"])
    bob.send(type="send", cmid="r1", to="alice", body="hi alice")
    assert bob.recv_until("sent")[-1]["seq"] == 2  # same conversation, next seq
    assert alice.recv()["body"] == "hi alice"


def test_recipient_who_connects_later_receives_what_was_sent(node: NodeThread) -> None:
    alice = connect(node, "alice")
    for i in range(5):
        alice.send(type="send", cmid=f"c{i}", to="carol", body=f"m{i}")
    acks = [f for f in alice.recv_until("sent", cmid="c4") if f["type"] == "sent"]
    assert [a["seq"] for a in acks] == [1, 2, 3, 4, 5]
    carol = Client(node.url, node.token("carol"))
    frames = carol.recv_until("resumed")
    bodies = [f["body"] for f in frames if f["type"] == "msg"]
    assert bodies == ["m0", "m1", "m2", "m3", "m4"]


def test_auth_by_first_frame_instead_of_query(node: NodeThread) -> None:
    c = Client(node.url)
    c.send(type="send", cmid="x", to="bob", body="too early")
    err = c.recv()
    assert err["type"] == "error" and err["code"] == "not_authenticated"
    c.send(type="auth", token=node.token("dave"), id="a1")
    welcome = c.recv()
    assert welcome["type"] == "welcome" and welcome["user"] == "dave" and welcome["id"] == "a1"


def test_retried_cmid_gets_original_ack_and_one_delivery(node: NodeThread) -> None:
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="same", to="bob", body="once")
    first = alice.recv_until("sent")[-1]
    alice.close()  # connection dropped; the client retries on a new one
    alice2 = connect(node, "alice")
    alice2.send(type="send", cmid="same", to="bob", body="once")
    second = alice2.recv_until("sent")[-1]
    assert second["duplicate"] is True
    assert (second["msg_id"], second["seq"]) == (first["msg_id"], first["seq"])
    bob.send(type="ping", id="p")
    frames = bob.recv_until("pong")
    assert [f["body"] for f in frames if f["type"] == "msg"] == ["once"]


def test_acknowledged_entries_are_not_resent_on_reconnect(node: NodeThread) -> None:
    alice, bob = connect(node, "alice"), connect(node, "bob")
    for i in range(3):
        alice.send(type="send", cmid=f"a{i}", to="bob", body=f"m{i}")
    alice.recv_until("sent", cmid="a2")
    got = [bob.recv() for _ in range(3)]
    assert [m["seq"] for m in got] == [1, 2, 3]
    bob.send(type="ack", conv="p:alice:bob", seq=2, id="k")
    assert bob.recv_until("acked")[-1]["seq"] == 2
    bob.close()
    bob2 = Client(node.url, node.token("bob"))
    frames = bob2.recv_until("resumed")
    assert [f["seq"] for f in frames if f["type"] == "msg"] == [3]


def test_offline_recipient_gets_1000_messages_in_order_exactly_once(make_node) -> None:
    node = make_node(rate_msgs_per_sec=100000.0, rate_burst=5000)
    alice = connect(node, "alice")
    n = 1000
    for i in range(n):
        alice.send(type="send", cmid=f"bulk{i}", to="erin", body=str(i))
    acks = [f for f in alice.recv_until("sent", cmid=f"bulk{n - 1}") if f["type"] == "sent"]
    assert len(acks) == n
    erin = Client(node.url, node.token("erin"), timeout=20)
    frames = erin.recv_until("resumed", limit=n + 10)
    msgs = [f for f in frames if f["type"] == "msg"]
    assert [m["seq"] for m in msgs] == list(range(1, n + 1))
    assert [m["body"] for m in msgs] == [str(i) for i in range(n)]


def test_every_device_of_the_recipient_and_the_senders_other_devices(node: NodeThread) -> None:
    phone, laptop = connect(node, "bob", "phone"), connect(node, "bob", "laptop")
    alice_phone, alice_web = connect(node, "alice", "phone"), connect(node, "alice", "web")
    alice_phone.send(type="send", cmid="m1", to="bob", body="to all devices")
    alice_phone.recv_until("sent")
    for c in (phone, laptop, alice_web):
        m = c.recv()
        assert (m["type"], m["body"], m["from_device"]) == ("msg", "to all devices", "phone")
    # The sending device gets the ack, not a copy of its own message.
    alice_phone.send(type="ping", id=1)
    assert [f["type"] for f in alice_phone.recv_until("pong")] == ["pong"]


def test_sync_pages_are_capped_and_resume_from_after(make_node) -> None:
    node = make_node(rate_msgs_per_sec=100000.0, rate_burst=5000)
    alice = connect(node, "alice")
    for i in range(250):
        alice.send(type="send", cmid=f"s{i}", to="bob", body=str(i))
    alice.recv_until("sent", cmid="s249")
    alice.send(type="sync", conv="p:alice:bob", after=0, limit=100000, id="q")
    frames = alice.recv_until("synced")
    page = [f for f in frames if f["type"] == "msg"]
    synced = frames[-1]
    assert len(page) == 200 and synced["more"] is True and synced["last"] == 200
    alice.send(type="sync", conv="p:alice:bob", after=200)
    frames = alice.recv_until("synced")
    assert [f["seq"] for f in frames if f["type"] == "msg"] == list(range(201, 251))
    assert frames[-1]["more"] is False


def test_history_before_and_after(node: NodeThread) -> None:
    alice = connect(node, "alice")
    for i in range(10):
        alice.send(type="send", cmid=f"h{i}", to="bob", body=str(i))
    alice.recv_until("sent", cmid="h9")
    alice.send(type="history", conv="p:alice:bob", before=6, limit=3, id=1)
    h = alice.recv_until("history")[-1]
    assert [m["seq"] for m in h["messages"]] == [3, 4, 5]
    alice.send(type="history", conv="p:alice:bob", after=8, id=2)
    assert [m["seq"] for m in alice.recv_until("history")[-1]["messages"]] == [9, 10]


def test_a_users_private_conversations_of_others_are_not_found(node: NodeThread) -> None:
    alice = connect(node, "alice")
    alice.send(type="send", cmid="x", to="bob", body="secret")
    alice.recv_until("sent")
    mallory = connect(node, "mallory")
    mallory.send(type="sync", conv="p:alice:bob", after=0, id=1)
    err = mallory.recv()
    assert (err["type"], err["code"], err["id"]) == ("error", "not_found", 1)
    mallory.send(type="history", conv="p:alice:bob", id=2)
    assert mallory.recv()["code"] == "not_found"


def test_messages_survive_a_node_restart(node: NodeThread) -> None:
    alice = connect(node, "alice")
    alice.send(type="send", cmid="durable", to="frank", body="kept")
    ack = alice.recv_until("sent")[-1]
    alice.close()
    node.restart()
    frank = Client(node.url, node.token("frank"))
    msgs = [f for f in frank.recv_until("resumed") if f["type"] == "msg"]
    assert [(m["msg_id"], m["body"]) for m in msgs] == [(ack["msg_id"], "kept")]
    # Sequence numbers continue after the restart, never reused.
    alice2 = connect(node, "alice")
    alice2.send(type="send", cmid="after", to="frank", body="next")
    assert alice2.recv_until("sent")[-1]["seq"] == 2
    # And the dedup memory survives too.
    alice2.send(type="send", cmid="durable", to="frank", body="kept")
    again = alice2.recv_until("sent")[-1]
    assert again["duplicate"] is True and again["seq"] == 1


def test_stats_count_connections(node: NodeThread) -> None:
    clients = [connect(node, f"u{i}") for i in range(3)]
    status, stats = node.http("/stats")
    assert status == 200 and stats["active_connections"] == 3
    clients[0].close()
    wait_for(lambda: node.http("/stats")[1]["active_connections"] == 2)


def test_unacknowledged_entries_are_retransmitted_with_the_same_seq(make_node) -> None:
    import time

    node = make_node(ack_timeout=1.0)
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="r1", to="bob", body="ack me")
    alice.recv_until("sent")
    first = bob.recv()
    assert first["seq"] == 1
    # Bob does not acknowledge: within about ACK_TIMEOUT (+ the wheel's second) it comes again.
    start = time.monotonic()
    again = bob.recv_until("msg")[-1]
    assert (again["seq"], again["msg_id"]) == (1, first["msg_id"])
    assert time.monotonic() - start < 5
    # Once acknowledged, it is not sent again.
    bob.send(type="ack", conv="p:alice:bob", seq=1, id="k")
    bob.recv_until("acked")
    time.sleep(2.5)  # longer than ACK_TIMEOUT plus the wheel's resolution
    bob.send(type="ping", id="later")
    assert [f["type"] for f in bob.recv_until("pong")] == ["pong"]


def test_an_ack_of_one_conversation_leaves_the_others_to_be_retransmitted(make_node) -> None:
    """The retransmit clock follows every conversation with unacknowledged pushes,
    not just the one an ack names (the session keeps a set of those it waits for)."""
    import time

    node = make_node(ack_timeout=1.0)
    alice, bob, carol = connect(node, "alice"), connect(node, "bob"), connect(node, "carol")
    alice.send(type="send", cmid="a1", to="bob", body="from alice")
    alice.recv_until("sent")
    carol.send(type="send", cmid="c1", to="bob", body="from carol")
    carol.recv_until("sent")
    got = [bob.recv(), bob.recv()]
    assert sorted(f["conv"] for f in got) == ["p:alice:bob", "p:bob:carol"]
    bob.send(type="ack", conv="p:alice:bob", seq=1, id="a")
    # Acked before ACK_TIMEOUT (1 s) has passed: the only frame before `acked` is a
    # retransmit of carol's entry, if the clock already ran out.
    before = bob.recv_until("acked")
    assert all(f["conv"] == "p:bob:carol" for f in before[:-1]), before
    again = bob.recv_until("msg")[-1]
    assert (again["conv"], again["seq"], again["body"]) == ("p:bob:carol", 1, "from carol")
    bob.send(type="ack", conv="p:bob:carol", seq=1, id="c")
    bob.recv_until("acked")
    time.sleep(2.5)  # longer than ACK_TIMEOUT plus the wheel's resolution: nothing comes again
    bob.send(type="ping", id="later")
    assert [f["type"] for f in bob.recv_until("pong")] == ["pong"]


def test_a_device_does_not_get_its_own_messages_back_on_resume(node: NodeThread) -> None:
    alice, bob = connect(node, "alice"), connect(node, "bob")
    bob.send(type="send", cmid="b1", to="alice", body="first")
    bob.recv_until("sent")
    assert alice.recv()["seq"] == 1
    alice.send(type="ack", conv="p:alice:bob", seq=1, id=1)
    alice.recv_until("acked")
    alice.send(type="send", cmid="a1", to="bob", body="my reply")
    alice.recv_until("sent")
    alice.close()
    # The cursor move is batched (about a second) and also written at disconnect.
    import time

    time.sleep(0.3)
    again = Client(node.url, node.token("alice"))
    frames = again.recv_until("resumed")
    assert [f for f in frames if f["type"] == "msg"] == []
    assert frames[-1]["conversations"] == 0


def test_metrics_carry_the_contract_names_and_per_hop_latencies(node: NodeThread) -> None:
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="m", to="bob", body="measure me")
    alice.recv_until("sent")
    bob.recv()
    status, text = node.http("/metrics")
    assert status == 200
    for name in ("im_gateway_active_connections 2.0",
                 'im_gateway_messages_delivered_total{status="success"}',
                 "im_gateway_message_delivery_duration_seconds_bucket",
                 "im_gateway_errors_total", "im_gateway_send_ack_duration_seconds_count 1.0",
                 "im_service_store_commit_duration_seconds_count",
                 "im_store_log_segments_waiting "):
        assert name in text, name
    # The SQLite store's backlog for the mover thread, also in /stats (a count, 0 at rest).
    stats = node.http("/stats")[1]
    assert isinstance(stats["store_segments_waiting"], int)
    assert stats["store_segments_waiting"] >= 0


def test_sends_and_acks_are_taken_in_process_without_a_task(node: NodeThread) -> None:
    """The embedded node answers a private send and an ack through Router.send_now /
    ack_now (no task per frame), with the same frames as the coroutine path."""
    calls = record_fast_path(node.node.router, "send_now", "ack_now")
    alice, bob = connect(node, "alice"), connect(node, "bob")
    for i in range(3):
        alice.send(type="send", cmid=f"f{i}", to="bob", body=f"m{i}", id=i)
    acks = [f for f in alice.recv_until("sent", cmid="f2") if f["type"] == "sent"]
    assert [(a["seq"], a["id"]) for a in acks] == [(1, 0), (2, 1), (3, 2)]
    assert [bob.recv()["seq"] for _ in range(3)] == [1, 2, 3]
    bob.send(type="ack", conv="p:alice:bob", seq=3, id="k")
    assert bob.recv_until("acked", id="k")[-1]["seq"] == 3
    alice.send(type="send", cmid="f0", to="bob", body="m0", id="again")  # a duplicate
    dup = alice.recv_until("sent", id="again")[-1]
    assert dup["duplicate"] is True and dup["seq"] == 1
    assert calls["send_now"] == [True] * 3 + [False]  # the duplicate went to the coroutine
    assert [cursor is not None for cursor in calls["ack_now"]] == [True]


def cursors(client: Client, request_id: int) -> dict[str, int]:
    client.send(type="sync", id=request_id)
    found: dict[str, int] = client.recv_until("conversations", id=request_id)[-1]["cursors"]
    return found


def cursors_after_own_batch(client: Client, request_id: int,
                            expected: dict[str, int]) -> dict[str, int]:
    """The device's cursors once the router's batch of own-entry moves has run.

    Read after the batch delay (so a cursor that must not move had its chance
    to), then again until they are ``expected`` or 10 s passed (a loaded
    machine runs the batch late)."""
    time.sleep(OWN_CURSOR_DELAY + 0.3)
    deadline = time.monotonic() + 10
    found = cursors(client, request_id)
    attempt = 0
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        attempt += 1
        found = cursors(client, request_id * 1000 + attempt)
    return found


def test_a_devices_own_message_moves_its_cursor_only_when_it_had_everything_before(
        node: NodeThread) -> None:
    # The router moves the sender's cursor past its own messages (batched, within
    # OWN_CURSOR_DELAY), so a resume does not hand the device back its own messages -
    # unless the device had not got everything before them: a cursor never claims an
    # entry the device missed.
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="a1", to="bob", body="first", id=1)
    assert alice.recv_until("sent", id=1)[-1]["seq"] == 1
    alice.send(type="send", cmid="a2", to="bob", body="second", id=2)
    assert alice.recv_until("sent", id=2)[-1]["seq"] == 2
    assert [m["seq"] for m in bob.recv_until("msg", seq=2) if m["type"] == "msg"] == [1, 2]
    # Bob answers without acknowledging what he got: his cursor stays where it was.
    bob.send(type="send", cmid="b1", to="alice", body="reply", id=3)
    assert bob.recv_until("sent", id=3)[-1]["seq"] == 3
    at_2, at_4 = {"p:alice:bob": 2}, {"p:alice:bob": 4}
    assert cursors_after_own_batch(alice, 4, at_2) == at_2  # no ack of her own
    assert cursors(bob, 5) == {}
    # Once he has acknowledged everything, his next message moves his cursor past it.
    bob.send(type="ack", conv="p:alice:bob", seq=3)
    bob.send(type="send", cmid="b2", to="alice", body="again", id=6)
    assert bob.recv_until("sent", id=6)[-1]["seq"] == 4
    assert cursors_after_own_batch(bob, 7, at_4) == at_4
    # Alice had not acknowledged Bob's seq 3 and 4: her next message leaves her at 2.
    alice.send(type="send", cmid="a3", to="bob", body="third", id=8)
    assert alice.recv_until("sent", id=8)[-1]["seq"] == 5
    assert cursors_after_own_batch(alice, 9, at_2) == at_2


def _sent_with_its_push_lost(node: NodeThread, alice: Client) -> Any:
    """alice sends bob "never pushed" (the next seq), stored but its push lost, as
    when a peer dropped the push; returns the node's gateway."""
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway
    delivered = gateway.deliver
    lost = []

    def lose_one(users: Any, message: Any, skip: Any) -> None:
        lost.append(message.seq)
        gateway.deliver = delivered  # type: ignore[method-assign]

    gateway.deliver = lose_one  # type: ignore[method-assign]
    alice.send(type="send", cmid="lost", to="bob", body="never pushed")
    alice.recv_until("sent", cmid="lost")
    wait_for(lambda: lost)
    return gateway


def test_after_pushes_were_dropped_the_next_entry_brings_the_missed_one_first(
        node: NodeThread) -> None:
    """A push lost on its way to the gateway (a peer gave up on it: in distributed mode
    it then sends ``resync``; one that cannot name the users moves the gateway's
    ``push_epoch``) is not a silent gap: the device's next entry in that
    conversation is caught up from the store, so the missed entry comes first and
    nothing is acknowledged past it."""
    alice, bob = connect(node, "alice"), connect(node, "bob")
    gateway = _sent_with_its_push_lost(node, alice)
    gateway.pushes_were_lost(None)  # what a resync naming nobody does
    alice.send(type="send", cmid="next", to="bob", body="pushed")
    alice.recv_until("sent")
    got = [bob.recv_until("msg")[-1] for _ in range(2)]
    assert [(m["seq"], m["body"]) for m in got] == [(1, "never pushed"), (2, "pushed")]
    assert gateway.pushes_lost == 1


def test_a_resync_naming_the_user_brings_the_dropped_entry_without_a_later_one(
        node: NodeThread) -> None:
    """A resync naming bob: his sessions read what they missed from the store at once
    (no later entry in the conversation needed), and alice's are left alone."""
    alice, bob = connect(node, "alice"), connect(node, "bob")
    gateway = _sent_with_its_push_lost(node, alice)
    assert node.loop is not None
    node.loop.call_soon_threadsafe(gateway.pushes_were_lost, ["bob"])
    got = bob.recv_until("msg")[-1]
    assert (got["seq"], got["body"], got["from"]) == (1, "never pushed", "alice")
    bob.send(type="ack", conv=got["conv"], seq=1)
    alice.send(type="send", cmid="next-1", to="bob", body="pushed")
    assert bob.recv_until("msg")[-1]["body"] == "pushed"
    [alice_session] = gateway.table.sessions_of("alice")
    [bob_session] = gateway.table.sessions_of("bob")
    assert bob_session.push_epoch == -1 and alice_session.push_epoch == gateway.push_epoch


def test_a_resync_naming_many_users_reads_the_store_for_a_few_sessions_at_a_time(
        node: NodeThread) -> None:
    """A resync may name 10,000 users: their sessions' store reads queue behind a bound
    (here 2) instead of all starting at once, and every one still gets its entry."""
    alice = connect(node, "alice")
    users = ["bob", "carol", "dave", "erin", "frank"]
    clients = {user: connect(node, user) for user in users}
    assert node.node is not None and node.node.gateway is not None and node.loop is not None
    gateway = node.node.gateway
    delivered = gateway.deliver
    gateway.deliver = lambda users, message, skip: None  # type: ignore[method-assign]
    for user in users:
        alice.send(type="send", cmid=f"lost-{user}", to=user, body=f"for {user}")
        alice.recv_until("sent")
    gateway.deliver = delivered  # type: ignore[method-assign]
    router = gateway.router
    plan = router.resume_plan
    reading, most = [0], [0]

    async def counted(user: str, device: str) -> Any:
        reading[0] += 1
        most[0] = max(most[0], reading[0])
        try:
            await asyncio.sleep(0.05)  # long enough for the others to pile up
            return await plan(user, device)
        finally:
            reading[0] -= 1

    async def resync() -> None:
        gateway.recheck_slots = asyncio.Semaphore(2)
        router.resume_plan = counted  # type: ignore[method-assign]
        gateway.pushes_were_lost(users)

    asyncio.run_coroutine_threadsafe(resync(), node.loop).result(5)
    for user, client in clients.items():
        assert client.recv_until("msg")[-1]["body"] == f"for {user}"
    assert most[0] == 2


def test_an_entry_routed_as_the_device_binds_waits_for_its_resume(node: NodeThread) -> None:
    """An entry committed in the moment between a device's authentication and the
    start of its resume (its route already queued on the loop) is not pushed ahead
    of the entries the resume brings: the device never sees a gap it would take as
    "everything before is a repeat"."""
    alice = connect(node, "alice")
    for i in range(3):
        alice.send(type="send", cmid=f"a{i}", to="bob", body=f"m{i}")
    alice.recv_until("sent", cmid="a2")
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway
    [latest] = node.call(node.node.router.fetch("bob", "p:alice:bob", 2, 1))
    assert latest.seq == 3
    bound = gateway.on_session_bound

    def route_as_bob_binds(session: Any) -> None:
        bound(session)
        if session.user == "bob":  # queued before the resume's first step, as a commit's is
            gateway.loop.call_soon(gateway.deliver, ["bob"], latest, None)

    gateway.on_session_bound = route_as_bob_binds  # type: ignore[method-assign]
    bob = Client(node.url, node.token("bob"))
    frames = bob.recv_until("resumed")
    assert [f["seq"] for f in frames if f["type"] == "msg"] == [1, 2, 3]
    bob.send(type="ping", id="p")
    assert [f["type"] for f in bob.recv_until("pong")] == ["pong"]  # nothing doubled


def _bob_with_one_unacknowledged_and_one_unpushed(node: NodeThread) -> tuple[Client, Any, Any]:
    """bob was pushed seq 1 and has not acknowledged it; seq 2 is stored, its push held
    back.  Returns (bob, the node's gateway, seq 2's stored entry)."""
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="a1", to="bob", body="m1")
    assert bob.recv_until("msg")[-1]["seq"] == 1
    gateway = _sent_with_its_push_lost(node, alice)
    assert node.node is not None
    [second] = node.call(node.node.router.fetch("bob", "p:alice:bob", 1, 1))
    assert second.seq == 2
    return bob, gateway, second


def _gets_seq_1_again_then_2_once(bob: Client) -> None:
    got = [bob.recv_until("msg")[-1] for _ in range(2)]
    assert [(m["seq"], m["body"]) for m in got] == [(1, "m1"), (2, "never pushed")]
    bob.send(type="ping", id="p")
    assert [f["type"] for f in bob.recv_until("pong")] == ["pong"]  # nothing doubled


def test_an_entry_routed_while_a_retransmit_waits_does_not_skip_it(node: NodeThread) -> None:
    """A retransmit reads the device's stored cursor again; an entry routed before it
    starts is not taken as "the next after what was pushed": seq 1 comes again, then 2."""
    bob, gateway, second = _bob_with_one_unacknowledged_and_one_unpushed(node)
    [session] = gateway.table.sessions_of("bob")

    async def retransmit_then_route() -> None:
        session._retransmit()  # what ACK_TIMEOUT does; its catch-up has not started yet
        gateway.deliver(["bob"], second, None)

    node.call(retransmit_then_route())
    _gets_seq_1_again_then_2_once(bob)


def test_an_entry_routed_while_a_catch_up_reads_the_cursor_waits_for_it(
        node: NodeThread) -> None:
    """An entry routed while a catch-up is reading the device's cursor goes out after
    the entries that catch-up brings, not ahead of them."""
    bob, gateway, second = _bob_with_one_unacknowledged_and_one_unpushed(node)
    [session] = gateway.table.sessions_of("bob")
    router = gateway.router
    read_cursor = router.cursor

    async def cursor_while_routed(*args: Any) -> int:
        cursor = await read_cursor(*args)
        router.cursor = read_cursor
        gateway.deliver(["bob"], second, None)  # committed while the read was in flight
        return int(cursor)

    async def retransmit() -> None:
        router.cursor = cursor_while_routed
        session._retransmit()

    node.call(retransmit())
    _gets_seq_1_again_then_2_once(bob)


def test_a_long_lived_connection_forgets_conversations_it_has_acknowledged(
        make_node) -> None:
    """A connection pushed in more conversations than Session keeps state for drops
    the state of those it acknowledged, keeps that of one it did not, and still gets
    the next entry of a forgotten conversation - once, in order - and of the kept one
    after its unacknowledged entry."""
    from imfast.gateway import session as session_module

    node = make_node(rate_msgs_per_sec=100000.0, rate_burst=5000)
    assert node.node is not None and node.node.gateway is not None
    router, gateway = node.node.router, node.node.gateway
    bob = connect(node, "bob")
    n = session_module._CONV_STATE_TRIM

    async def each_sends(seq_body: str) -> None:
        await asyncio.gather(*(router.send(f"u{i:05d}", "d", f"{seq_body}-{i}", "bob", None,
                                           seq_body) for i in range(n)))

    node.call(each_sends("first"), timeout=60)
    got = [bob.recv_until("msg")[-1] for _ in range(n)]
    assert sorted(m["conv"] for m in got) == sorted(f"p:bob:u{i:05d}" for i in range(n))
    unacked = "p:bob:u00007"
    for m in got:
        if m["conv"] != unacked:
            bob.send(type="ack", conv=m["conv"], seq=m["seq"])
    bob.send(type="ping", id="p")
    bob.recv_until("pong")
    [session] = gateway.table.sessions_of("bob")
    wait_for(lambda: session.acked is not None and sum(
        session.acked.get(m["conv"], 0) == 1 for m in got) == n - 1)
    node.call(router.send("zed", "d", "z-1", "bob", None, "new"))  # one conversation more
    assert bob.recv_until("msg")[-1]["conv"] == "p:bob:zed"
    assert session.pushed is not None and session.acked is not None
    assert sorted(session.pushed) == [unacked, "p:bob:zed"]
    node.call(router.send("u00000", "d", "second-0", "bob", None, "again"))  # forgotten
    assert (bob.recv_until("msg")[-1]["body"], bob.frames[-1]["seq"]) == ("again", 2)
    assert session.acked[unacked] == 0 and session.pushed[unacked] == 1
    node.call(router.send("u00000", "d", "third-0", "bob", None, "once more"))
    node.call(router.send("u00007", "d", "second-7", "bob", None, "after the unacked"))
    frames = bob.recv_until("msg", body="after the unacked")
    msgs = [(f["conv"], f["seq"]) for f in frames if f["type"] == "msg"]
    assert msgs == [("p:bob:u00000", 3), (unacked, 2)]
