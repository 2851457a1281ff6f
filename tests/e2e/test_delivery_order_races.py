"""Interleavings that break per-(device, conversation) push order (audit of the delivery path).

Each test drives an embedded node over real WebSocket connections and injects
one interleaving on the node's loop (``node.call``), as the last tests of
test_private_chat.py do.  A device must get every stored entry it has not
acknowledged, in seq order: the SDK drops an entry at or below the highest seq
it has seen, so a push that overtakes an older one turns into a permanent loss
once the device acknowledges it.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from tests.helpers.node import Client, NodeThread, wait_for


def connect(node: NodeThread, user: str, device: str = "default") -> Client:
    c = Client(node.url, node.token(user, device))
    assert c.welcome()["user"] == user
    return c


def entries_until_pong(c: Client, rid: str) -> list[dict[str, Any]]:
    c.send(type="ping", id=rid)
    return [f for f in c.recv_until("pong", id=rid) if f["type"] == "msg"]


def _routes_held(node: NodeThread) -> tuple[Any, list[Any], Any]:
    """Hold back the router's route of every committed batch (entries are stored and
    their senders answered, nothing is pushed); returns (router, held entries, release)
    - release() puts the real route back and returns it."""
    assert node.node is not None and node.node.router is not None
    router = node.node.router
    committer = router._committer
    route = committer._on_commit
    held: list[Any] = []
    committer._on_commit = held.extend

    def release() -> Any:
        committer._on_commit = route
        return route

    return router, held, release


def _alice_sends_then_pushes_arrive_reversed(node: NodeThread, alice: Client, bob: Client,
                                             seqs: tuple[int, int]) -> list[dict[str, Any]]:
    """alice sends bob m<seq> for both ``seqs``; their pushes reach the gateway in the
    reverse order (as from two im-service replicas); returns what bob then got."""
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway
    _router, held, release = _routes_held(node)
    for i in seqs:
        alice.send(type="send", cmid=f"a{i}", to="bob", body=f"m{i}", id=i)
        assert alice.recv_until("sent", id=i)[-1]["seq"] == i
    release()
    earlier, later = held

    async def pushes_out_of_order() -> None:
        gateway.deliver(["alice", "bob"], later, ("alice", "default"))
        gateway.deliver(["alice", "bob"], earlier, ("alice", "default"))
        await asyncio.sleep(0.05)

    node.call(pushes_out_of_order())
    return entries_until_pong(bob, "p")


def test_a_group_entry_routed_late_is_not_overtaken_by_the_next(node: NodeThread) -> None:
    """Router._route_committed routes a group entry whose members are not cached (the
    membership changed while it was stored) through a task, ``_route_late``, that reads
    them first: "gateways reorder by seq, so lateness is safe".  They do not for a
    device with nothing pushed in that conversation since its resume (no
    ``pushed[conv]``): Session.offer takes the first entry it is offered as the one
    right after the cursor.

    Interleaving: seq 2 commits while the members are not cached -> its late route
    starts a members read on a slow store; another read of them (a sender's) answers
    first and fills the cache; seq 3 commits and is routed at once -> bob is pushed 3
    as "the next"; then the late route delivers 2, which offer drops as already
    pushed.  Bob never gets seq 2 (his SDK acknowledges 3: lost for good).
    """
    owner = connect(node, "owner")
    owner.send(type="group_create", group="team", members=["bob"], id=1)
    owner.recv_until("group", id=1)
    bob = connect(node, "bob")  # the resume brings seq 1 ("created")
    bob.send(type="ack", conv="g:team", seq=1, id="k")
    assert bob.recv_until("acked", id="k")[-1]["seq"] == 1
    bob.close()
    bob = connect(node, "bob")  # nothing to resume: no state kept for g:team
    router, held, release = _routes_held(node)
    for i in (2, 3):
        owner.send(type="send", cmid=f"m{i}", group="team", body=f"m{i}", id=i)
        assert owner.recv_until("sent", id=i)[-1]["seq"] == i
    route = release()
    assert [m.seq for m in held] == [2, 3]
    store = router.store
    read_members = store.members

    async def late_route_overtaken() -> None:
        answer = asyncio.Event()
        reads = 0

        async def slow_first_read(group: str) -> dict[str, str]:
            nonlocal reads
            reads += 1
            if reads == 1:  # the late route's read, on a slow (networked) store
                await answer.wait()
            return dict(await read_members(group))

        store.members = slow_first_read
        try:
            router._members_cache.forget("team")  # membership changed as seq 2 was stored
            route([held[0]])  # seq 2: members not cached -> _route_late task
            await asyncio.sleep(0)  # ... whose read is under way
            await router.group_members("team")  # a second read answers first: cached again
            route([held[1]])  # seq 3 commits: members cached, routed now
            answer.set()
            await asyncio.sleep(0.05)  # the late route delivers seq 2
        finally:
            store.members = read_members

    node.call(late_route_overtaken())
    got = entries_until_pong(bob, "p")
    assert [(m["seq"], m["body"]) for m in got] == [(2, "m2"), (3, "m3")]


def test_a_devices_own_message_after_pushes_were_lost_does_not_skip_the_lost_one(
        node: NodeThread) -> None:
    """A peer reports pushes to this gateway dropped without naming users
    (Gateway.pushes_were_lost(None), e.g. a push link broke): ``push_epoch`` moves on,
    and a session connected before that must check the store at its first entry per
    conversation instead of taking it as the entry after its cursor.  Session.offer
    skips that check for the device's own message (``silent``): it sets
    ``pushed[conv]`` to the own seq as if the device had everything before it.

    Interleaving: alice -> bob seq 1 is stored, its push to bob's gateway lost; the
    loss is reported; bob sends seq 2 (his own, offered silent: pushed = 2, no store
    check); alice sends seq 3 -> pushed as "the next after 2".  Seq 1 never reaches
    bob, who acknowledges 3.
    """
    alice, bob = connect(node, "alice"), connect(node, "bob")
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway
    delivered = gateway.deliver
    lost: list[int] = []

    def lose_one(users: Any, message: Any, skip: Any) -> None:
        lost.append(message.seq)
        gateway.deliver = delivered  # type: ignore[method-assign]

    gateway.deliver = lose_one  # type: ignore[method-assign]
    alice.send(type="send", cmid="a1", to="bob", body="lost push", id=1)
    assert alice.recv_until("sent", id=1)[-1]["seq"] == 1
    wait_for(lambda: lost == [1])

    async def report_the_loss() -> None:
        gateway.pushes_were_lost(None, "a push link broke")

    node.call(report_the_loss())
    bob.send(type="send", cmid="b2", to="alice", body="own", id=2)
    assert bob.recv_until("sent", id=2)[-1]["seq"] == 2
    alice.send(type="send", cmid="a3", to="bob", body="after", id=3)
    assert alice.recv_until("sent", id=3)[-1]["seq"] == 3
    got = entries_until_pong(bob, "p")
    from_alice = [(m["seq"], m["body"]) for m in got if m["from"] == "alice"]
    assert from_alice == [(1, "lost push"), (3, "after")]
    assert [m["seq"] for m in got] == sorted({m["seq"] for m in got})


def test_a_devices_own_message_routed_during_a_named_recheck_does_not_hide_the_lost_one(
        node: NodeThread) -> None:
    """The named variant: a ``resync`` naming bob (Gateway.pushes_were_lost(["bob"]))
    sets his session's ``push_epoch`` to -1 and starts ``_recheck``, which compares
    each conversation's latest seq with ``pushed.setdefault(conv, cursor)``.  Bob's own
    message routed before that read answers is offered ``silent``, skips the epoch
    check and sets ``pushed[conv]`` to its seq; the recheck then finds latest == pushed
    and catches nothing up.

    Interleaving: seq 1 (alice -> bob) stored, its push lost; the resync for bob
    arrives and, in the same loop iteration (before the recheck's store read), the
    commit of bob's own seq 2 is routed; alice's seq 3 then goes out as the next.
    """
    alice, bob = connect(node, "alice"), connect(node, "bob")
    _router, held, release = _routes_held(node)
    alice.send(type="send", cmid="a1", to="bob", body="lost push", id=1)
    assert alice.recv_until("sent", id=1)[-1]["seq"] == 1
    bob.send(type="send", cmid="b2", to="alice", body="own", id=2)
    assert bob.recv_until("sent", id=2)[-1]["seq"] == 2
    route = release()
    [seq1, seq2] = held
    assert (seq1.seq, seq2.seq) == (1, 2)  # seq 1's push is the one lost: never routed
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway

    async def resync_then_own_entry() -> None:
        gateway.pushes_were_lost(["bob"], "a peer dropped pushes for bob")
        route([seq2])  # bob's own entry, routed before the recheck's read answers
        await asyncio.sleep(0.05)  # the recheck runs

    node.call(resync_then_own_entry())
    alice.send(type="send", cmid="a3", to="bob", body="after", id=3)
    assert alice.recv_until("sent", id=3)[-1]["seq"] == 3
    got = entries_until_pong(bob, "p")
    from_alice = [(m["seq"], m["body"]) for m in got if m["from"] == "alice"]
    assert from_alice == [(1, "lost push"), (3, "after")]



def test_an_entry_arriving_before_the_delayed_recheck_does_not_hide_a_misrouted_one(
        node: NodeThread, monkeypatch: Any) -> None:
    """ClusterGateway.before_resume schedules ``session.recheck`` RECHECK_DELAY after the
    resume: "a second check a little later closes the window of the service's registry
    cache lagging etcd" - an entry routed in that window to the gateway the stale cache
    named is never pushed here, and the recheck is what finds it.  It cannot, once a
    later entry of the conversation reached the session first: Session.offer takes that
    one as the entry right after the cursor (no ``pushed[conv]``: ``last = seq - 1``),
    and _recheck's ``pushed.setdefault(conv, cursor)`` then equals the latest seq.

    Interleaving (the embedded gateway runs ClusterGateway.before_resume; its timer is
    fired by hand): bob connects and resumes; seq 1 for him is routed elsewhere (its push
    never reaches this gateway); seq 2 is routed here and pushed as "the next"; the
    delayed recheck runs and finds nothing missing.  Seq 1 never reaches bob, who
    acknowledges 2.
    """
    from imfast.gateway import cluster
    from imfast.gateway.cluster import ClusterGateway

    monkeypatch.setattr(cluster, "RECHECK_DELAY", 3600.0)  # fired by hand below
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway
    gateway._registrations = {}  # type: ignore[attr-defined]  # registered: nothing to wait for
    cluster_before_resume = partial(ClusterGateway.before_resume, gateway)

    async def before_resume(session: Any) -> None:
        if not isinstance(session, str):  # (the router, as the embedded pusher, asks too)
            await cluster_before_resume(session)

    gateway.before_resume = before_resume  # type: ignore[method-assign]
    alice, bob = connect(node, "alice"), connect(node, "bob")
    delivered = gateway.deliver
    elsewhere: list[int] = []

    def routed_elsewhere(users: Any, message: Any, skip: Any) -> None:
        elsewhere.append(message.seq)  # the stale registry cache named another gateway
        gateway.deliver = delivered  # type: ignore[method-assign]

    gateway.deliver = routed_elsewhere  # type: ignore[method-assign]
    alice.send(type="send", cmid="a1", to="bob", body="misrouted", id=1)
    assert alice.recv_until("sent", id=1)[-1]["seq"] == 1
    wait_for(lambda: elsewhere == [1])
    alice.send(type="send", cmid="a2", to="bob", body="routed here", id=2)
    assert alice.recv_until("sent", id=2)[-1]["seq"] == 2
    [session] = gateway.table.sessions_of("bob")

    async def delayed_recheck() -> None:
        session.recheck()  # what before_resume's call_later(RECHECK_DELAY, ...) runs
        await asyncio.sleep(0.05)

    node.call(delayed_recheck())
    got = entries_until_pong(bob, "p")
    assert [(m["seq"], m["body"]) for m in got] == [(1, "misrouted"), (2, "routed here")]
    # The recheck covered the window: the session trusts its pushes again.
    assert session.push_epoch == gateway.push_epoch


def test_a_forgotten_conversation_still_catches_up_an_entry_that_arrives_out_of_order(
        node: NodeThread) -> None:
    """Session._forget_idle_convs (f03ba3f) drops ``pushed[conv]`` of a conversation the
    device acknowledged everything of, "so its next entry goes out as before".  Before,
    an entry arriving above ``pushed[conv] + 1`` was a gap, caught up from the store; a
    forgotten conversation takes any entry as the one right after the cursor.  Entries
    do arrive out of order: two im-service replicas during a replica-set change
    (link/replicas.py), a late group route.

    Interleaving: bob was pushed and acknowledged seq 1 of p:alice:bob; a first entry of
    another conversation passes ``trim_at`` and p:alice:bob is forgotten; seqs 2 and 3
    are stored and their pushes arrive 3 first -> 3 goes out as "the next", 2 is
    dropped as already pushed.  (Without the forget, 3 is a gap: 2 and 3 in order.)
    """
    alice, bob, carol = connect(node, "alice"), connect(node, "bob"), connect(node, "carol")
    alice.send(type="send", cmid="a1", to="bob", body="m1", id=1)
    assert [m["seq"] for m in bob.recv_until("msg")] == [1]
    bob.send(type="ack", conv="p:alice:bob", seq=1, id="k")
    assert bob.recv_until("acked", id="k")[-1]["seq"] == 1
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway
    [session] = gateway.table.sessions_of("bob")
    session.trim_at = 1  # (1,024 conversations in production: the same path)
    carol.send(type="send", cmid="c1", to="bob", body="hi", id=1)
    assert [m["conv"] for m in bob.recv_until("msg")] == ["p:bob:carol"]
    assert "p:alice:bob" not in (session.pushed or {})  # forgotten
    got = _alice_sends_then_pushes_arrive_reversed(node, alice, bob, (2, 3))
    assert [(m["seq"], m["body"]) for m in got] == [(2, "m2"), (3, "m3")]


def test_after_the_replicas_changed_a_first_push_is_checked_against_the_store(
        node: NodeThread) -> None:
    """While gateways disagree on a conversation's replica (its set changed), two
    replicas may push its entries out of order: ``replicas_changed`` has the sessions
    check their next first push per conversation against the store, so seq 2
    arriving before seq 1 brings 1 first, then 2, once each - for sessions connected
    before the change and until one resolution interval after it."""
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway
    alice, bob = connect(node, "alice"), connect(node, "bob")
    node.call(_replicas_changed(gateway))
    got = _alice_sends_then_pushes_arrive_reversed(node, alice, bob, (1, 2))
    assert [(m["seq"], m["body"]) for m in got] == [(1, "m1"), (2, "m2")]
    assert entries_until_pong(alice, "q") == []  # her own entries never come back
    carol = connect(node, "carol")  # connected within the interval: checked as well
    assert carol.welcome  # (resumed)
    [session] = gateway.table.sessions_of("carol")
    # The epoch moves once more at the end of the interval: she checks from then on.
    wait_for(lambda: gateway.push_epoch == session.push_epoch + 1, timeout=10)


async def _replicas_changed(gateway: Any) -> None:
    gateway.replicas_changed(3.0)  # (the resolution interval: 10 s in production)


def test_a_catch_up_never_pushes_the_devices_own_entries_back(node: NodeThread) -> None:
    """The sending device gets `sent`, not a copy (docs/protocol.md) - from a catch-up
    too: bob's own entry right after all he holds moves his cursor past it; one after
    an entry he has not acknowledged is skipped, and his ack of a later entry covers it."""
    assert node.node is not None and node.node.gateway is not None
    gateway = node.node.gateway
    alice, bob = connect(node, "alice"), connect(node, "bob")
    [session] = gateway.table.sessions_of("bob")
    session.push_epoch = -1  # every first push per conversation is a catch-up
    bob.send(type="send", cmid="b1", to="alice", body="mine", id=1)
    assert bob.recv_until("sent", id=1)[-1]["seq"] == 1
    assert [m["body"] for m in entries_until_pong(alice, "p")] == ["mine"]
    alice.send(type="send", cmid="a2", to="bob", body="yours", id=2)
    assert alice.recv_until("sent", id=2)[-1]["seq"] == 2
    assert [(m["seq"], m["body"]) for m in entries_until_pong(bob, "q")] == [(2, "yours")]

    def cursor() -> int:
        return int(node.call(node.node.router.cursor("bob", "default", "p:alice:bob")))

    wait_for(lambda: cursor() == 1)  # stepped past his own entry, batched
    # His own entry after one he has not acknowledged: a retransmit sends 2 again, never 3.
    bob.send(type="send", cmid="b3", to="alice", body="mine again", id=3)
    assert bob.recv_until("sent", id=3)[-1]["seq"] == 3

    async def retransmit() -> None:
        session._retransmit()
        await asyncio.sleep(0.05)

    node.call(retransmit())
    assert [(m["seq"], m["body"]) for m in entries_until_pong(bob, "r")] == [(2, "yours")]
    bob.send(type="ack", conv="p:alice:bob", seq=3, id="k")
    assert bob.recv_until("acked", id="k")[-1]["seq"] == 3
