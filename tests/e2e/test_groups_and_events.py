"""Groups, read receipts, typing, presence and recall over real connections."""

from __future__ import annotations

from tests.helpers.fast_path import RAISED, record_fast_path
from tests.helpers.node import Client, NodeThread


def connect(node: NodeThread, user: str, device: str = "default") -> Client:
    c = Client(node.url, node.token(user, device))
    c.welcome()
    return c


def frames_until_pong(c: Client) -> list[dict]:
    c.send(type="ping", id="sync-point")
    return [f for f in c.recv_until("pong", id="sync-point") if f["type"] != "pong"]


def test_group_lifecycle_membership_checked_on_send_and_fanout(node: NodeThread) -> None:
    owner, bob, carol = connect(node, "owner"), connect(node, "bob"), connect(node, "carol")
    owner.send(type="group_create", group="team", name="Team", members=["bob"], id=1)
    created = owner.recv_until("group", id=1)[-1]
    assert created["members"] == {"owner": "owner", "bob": "member"}
    event = bob.recv()
    assert event["kind"] == "event" and event["event"]["event"] == "created"
    # An outsider can neither send nor read.
    carol.send(type="send", cmid="c1", group="team", body="let me in")
    assert carol.recv()["code"] == "forbidden"
    carol.send(type="sync", conv="g:team", after=0)
    assert carol.recv()["code"] == "forbidden"
    # Invite carol: everyone sees the membership event, then messages fan out.
    owner.send(type="group_invite", group="team", users=["carol"], id=2)
    owner.recv_until("group", id=2)
    assert carol.recv()["event"]["event"] == "invited"
    bob.send(type="send", cmid="b1", group="team", body="hello team")
    ack = bob.recv_until("sent")[-1]
    assert ack["conv"] == "g:team"
    for c in (owner, carol):
        got = [f for f in frames_until_pong(c) if f.get("kind") == "msg"]
        assert [(m["from"], m["body"]) for m in got] == [("bob", "hello team")]
    # Remove carol: she learns of it, then neither sends nor receives.
    owner.send(type="group_remove", group="team", users=["carol"], id=3)
    owner.recv_until("group", id=3)
    removed = [f for f in frames_until_pong(carol) if f.get("kind") == "event"]
    assert removed[-1]["event"] == {"event": "removed", "group": "team", "by": "owner",
                                    "users": ["carol"]}
    bob.send(type="send", cmid="b2", group="team", body="carol is gone")
    bob.recv_until("sent")
    assert [f for f in frames_until_pong(carol) if f.get("kind") == "msg"] == []
    carol.send(type="send", cmid="c2", group="team", body="still here?")
    assert carol.recv()["code"] == "forbidden"


def test_a_removed_member_cannot_rejoin_an_open_group_until_invited_again(
        node: NodeThread) -> None:
    owner, carol, dave = connect(node, "owner"), connect(node, "carol"), connect(node, "dave")
    owner.send(type="group_create", group="lobby", id=1)  # open: anyone may join
    owner.recv_until("group", id=1)
    for user, c in (("carol", carol), ("dave", dave)):
        c.send(type="group_join", group="lobby", id=2)
        assert set(c.recv_until("group", id=2)[-1]["members"]) >= {"owner", user}
    owner.send(type="group_remove", group="lobby", users=["carol"], id=3)
    owner.recv_until("group", id=3)
    carol.send(type="group_join", group="lobby", id=4)
    error = carol.recv_until("error")[-1]
    assert (error["code"], error["field"], error["id"]) == ("forbidden", "group", 4)
    carol.send(type="history", conv="g:lobby", id=5)
    assert carol.recv_until("error")[-1]["code"] == "forbidden"  # nor read it
    # Leaving by oneself bars nothing: dave comes back.
    dave.send(type="group_leave", group="lobby", id=6)
    dave.recv_until("group", id=6)
    dave.send(type="group_join", group="lobby", id=7)
    assert "dave" in dave.recv_until("group", id=7)[-1]["members"]
    # An invitation lifts carol's bar: she may leave and join again afterwards.
    owner.send(type="group_invite", group="lobby", users=["carol"], id=8)
    owner.recv_until("group", id=8)
    carol.send(type="group_leave", group="lobby", id=9)
    carol.recv_until("group", id=9)
    carol.send(type="group_join", group="lobby", id=10)
    assert "carol" in carol.recv_until("group", id=10)[-1]["members"]


def test_an_invite_only_group_takes_members_by_invitation_alone(node: NodeThread) -> None:
    owner, bob, eve = connect(node, "owner"), connect(node, "bob"), connect(node, "eve")
    owner.send(type="group_create", group="board", open=False, members=["bob"], id=1)
    created = owner.recv_until("group", id=1)[-1]
    assert created["members"] == {"owner": "owner", "bob": "member"}
    assert created["open"] is False  # said back: a client can tell an older server ignored it
    eve.send(type="group_join", group="board", id=2)
    assert eve.recv_until("error")[-1]["code"] == "forbidden"
    bob.send(type="group_leave", group="board", id=3)
    bob.recv_until("group", id=3)
    bob.send(type="group_join", group="board", id=4)  # left: only an invitation again
    assert bob.recv_until("error")[-1]["code"] == "forbidden"
    owner.send(type="group_invite", group="board", users=["bob", "eve"], id=5)
    assert set(owner.recv_until("group", id=5)[-1]["members"]) == {"owner", "bob", "eve"}
    owner.send(type="group_create", group="board2", open="no", id=6)
    error = owner.recv_until("error")[-1]
    assert (error["code"], error["field"]) == ("bad_request", "open")


def test_group_roles(node: NodeThread) -> None:
    owner, admin, member = connect(node, "o"), connect(node, "a"), connect(node, "m")
    owner.send(type="group_create", group="g1", members=["a", "m"], id=1)
    owner.recv_until("group", id=1)
    member.send(type="group_invite", group="g1", users=["x"], id=2)
    assert member.recv_until("error")[-1]["code"] == "forbidden"
    owner.send(type="group_role", group="g1", user="a", role="admin", id=3)
    assert owner.recv_until("group", id=3)[-1]["members"]["a"] == "admin"
    admin.send(type="group_invite", group="g1", users=["x"], id=4)
    assert "x" in admin.recv_until("group", id=4)[-1]["members"]
    admin.send(type="group_remove", group="g1", users=["o"], id=5)
    assert admin.recv_until("error")[-1]["code"] == "forbidden"
    member.send(type="group_leave", group="g1", id=6)
    assert "m" not in member.recv_until("group", id=6)[-1]["members"]
    member.send(type="groups", id=7)
    assert member.recv_until("groups", id=7)[-1]["groups"] == []


def test_group_size_limit(make_node) -> None:
    node = make_node(max_group_members=3)
    owner = connect(node, "o")
    owner.send(type="group_create", group="small", members=["a", "b", "c"], id=1)
    err = owner.recv_until("error")[-1]
    assert err["code"] == "bad_request" and err["field"] == "members"


def test_read_receipts_move_forward_only_and_reach_the_other_side(node: NodeThread) -> None:
    alice, bob = connect(node, "alice"), connect(node, "bob")
    for i in range(3):
        alice.send(type="send", cmid=f"r{i}", to="bob", body=str(i))
    alice.recv_until("sent", cmid="r2")
    bob.send(type="read", conv="p:alice:bob", seq=2, id=1)
    assert bob.recv_until("read_ok", id=1)
    receipt = [f for f in frames_until_pong(alice) if f["type"] == "receipt"]
    assert receipt == [{"type": "receipt", "conv": "p:alice:bob", "user": "bob", "seq": 2}]
    bob.send(type="read", conv="p:alice:bob", seq=1, id=2)  # backwards: accepted, no event
    bob.recv_until("read_ok", id=2)
    assert [f for f in frames_until_pong(alice) if f["type"] == "receipt"] == []
    bob.send(type="read", conv="p:alice:bob", seq=99, id=3)
    assert bob.recv_until("error")[-1]["field"] == "seq"
    mallory = connect(node, "mallory")
    mallory.send(type="read", conv="p:alice:bob", seq=1)
    assert mallory.recv()["code"] == "not_found"


def test_group_sends_are_taken_in_process_once_the_members_are_held(node: NodeThread) -> None:
    """Router.send_group_now answers a group send in the call that decoded it, with the
    same frames and errors as the coroutine path."""
    taken = record_fast_path(node.node.router, "send_group_now")["send_group_now"]
    owner, bob, carol = connect(node, "owner"), connect(node, "bob"), connect(node, "carol")
    owner.send(type="group_create", group="fast", members=["bob"], id=1)
    owner.recv_until("group", id=1)
    assert bob.recv()["event"]["event"] == "created"
    for i in range(3):
        owner.send(type="send", cmid=f"g{i}", group="fast", body=str(i), id=i)
    sent = [f for f in owner.recv_until("sent", cmid="g2") if f["type"] == "sent"]
    assert [(f["seq"], f["id"]) for f in sent] == [(2, 0), (3, 1), (4, 2)]
    assert [bob.recv()["body"] for _ in range(3)] == ["0", "1", "2"]
    assert taken == [True] * 3
    carol.send(type="send", cmid="c", group="fast", body="let me in", id="c")
    err = carol.recv()
    assert (err["code"], err["field"], err["cmid"]) == ("forbidden", "group", "c")
    assert taken == [True] * 3 + [RAISED]  # refused in the call
    assert [f for f in frames_until_pong(bob) if f["type"] == "msg"] == []


def test_reads_and_typing_are_taken_in_process_without_a_task(node: NodeThread) -> None:
    """The embedded node takes a read or a typing through Router.read_now / typing_now
    (no task per frame), with the same frames and errors as the coroutine path."""
    calls = record_fast_path(node.node.router, "read_now", "typing_now")
    alice, bob = connect(node, "alice"), connect(node, "bob")
    for i in range(2):
        alice.send(type="send", cmid=f"t{i}", to="bob", body=str(i))
    alice.recv_until("sent", cmid="t1")
    bob.send(type="read", conv="p:alice:bob", seq=1)  # no id: nothing answered
    bob.send(type="read", conv="p:alice:bob", seq=2, id="r")
    assert bob.recv_until("read_ok", id="r")[-1] == {
        "type": "read_ok", "id": "r", "conv": "p:alice:bob", "seq": 2}
    bob.send(type="typing", conv="p:alice:bob")
    receipts = [f for f in alice.recv_until("typing") if f["type"] == "receipt"]
    assert [r["seq"] for r in receipts] == [1, 2]
    assert calls == {"read_now": [True, True], "typing_now": [True]}
    bob.send(type="read", conv="p:alice:bob", seq=99, id="far")  # not committed: the coroutine
    assert bob.recv_until("error")[-1]["field"] == "seq"
    mallory = connect(node, "mallory")
    mallory.send(type="typing", conv="p:alice:bob")  # refused in the call
    assert mallory.recv()["code"] == "not_found"
    mallory.send(type="read", conv="p:alice:bob", seq=1, id="m")
    assert mallory.recv()["code"] == "not_found"
    # The seq not yet committed declined; the outsider's typing and read were refused.
    assert calls == {"read_now": [True, True, False, RAISED], "typing_now": [True, RAISED]}
    assert [f for f in frames_until_pong(alice) if f["type"] in ("receipt", "typing")] == []


def test_typing_and_presence(node: NodeThread) -> None:
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="typing", conv="p:alice:bob")
    assert bob.recv() == {"type": "typing", "conv": "p:alice:bob", "user": "alice"}
    alice.send(type="presence", users=["bob", "nobody"], id=1)
    p = alice.recv_until("presence")[-1]["users"]
    assert p["bob"]["online"] is True and p["nobody"] == {"online": False, "last_seen": None}
    bob.close()
    for _ in range(50):
        alice.send(type="presence", users=["bob"], id=2)
        p = alice.recv_until("presence")[-1]["users"]
        if not p["bob"]["online"]:
            break
    assert p["bob"]["online"] is False and p["bob"]["last_seen"] > 0


def test_contacts_are_told_when_a_user_comes_online_and_leaves(node: NodeThread) -> None:
    alice = connect(node, "alice")
    alice.send(type="send", cmid="p", to="bob", body="are you there?")
    alice.recv_until("sent")
    bob = connect(node, "bob")
    came = alice.recv_until("presence")[-1]
    assert came["users"]["bob"]["online"] is True
    bob.close()
    left = alice.recv_until("presence")[-1]["users"]["bob"]
    assert left["online"] is False and left["last_seen"] > 0


def test_recall_own_message_within_window(node: NodeThread) -> None:
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="oops", to="bob", body="wrong chat")
    seq = alice.recv_until("sent")[-1]["seq"]
    assert bob.recv()["body"] == "wrong chat"
    bob.send(type="recall", conv="p:alice:bob", seq=seq, id=1)
    assert bob.recv_until("error")[-1]["code"] == "not_found"  # not bob's message
    alice.send(type="recall", conv="p:alice:bob", seq=seq, id=2)
    assert alice.recv_until("recalled", id=2)[-1]["recalled_seq"] == seq
    recall = bob.recv()
    assert recall["kind"] == "recall" and recall["recalled_seq"] == seq


def test_features_can_be_switched_off(make_node) -> None:
    node = make_node(features_disabled=("typing", "groups"))
    alice = connect(node, "alice")
    alice.send(type="typing", conv="p:alice:bob")
    assert alice.recv()["code"] == "feature_disabled"
    alice.send(type="group_create", group="g")
    assert alice.recv()["code"] == "feature_disabled"


def test_route_all_offline_stores_but_does_not_push(make_node) -> None:
    node = make_node(route_all_offline=True)
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="q", to="bob", body="queued")
    assert alice.recv_until("sent")[-1]["seq"] == 1
    assert frames_until_pong(bob) == []
    bob.send(type="sync", conv="p:alice:bob")
    assert [f["body"] for f in bob.recv_until("synced") if f["type"] == "msg"] == ["queued"]
