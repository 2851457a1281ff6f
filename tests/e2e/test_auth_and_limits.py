"""Authentication, bad input and limits over real connections (BAD_INPUTS.md)."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
import websocket

from tests.helpers.node import Client, NodeThread, expect_close, wait_for


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _claims(**extra: object) -> dict:
    now = int(time.time())
    claims = {"sub": "eve", "aud": "imfast", "iss": "imfast", "iat": now, "exp": now + 60}
    claims.update(extra)
    return claims


def test_forged_tokens_are_closed_with_terminal_code(node: NodeThread) -> None:
    secret = node.settings.jwt_secret
    forged = [
        jwt.encode(_claims(), "wrong-secret-wrong-secret-wrong-secret", algorithm="HS256"),
        _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(_claims()) + ".",
        jwt.encode(_claims(aud="someone-else"), secret, algorithm="HS256"),
        jwt.encode(_claims(iss="evil"), secret, algorithm="HS256"),
        jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, secret, algorithm="HS256"),
        jwt.encode(_claims(sub="bad:user"), secret, algorithm="HS256"),
        "not-a-jwt",
    ]
    for token in forged:
        c = Client(node.url, token)
        code, frames = expect_close(c)
        assert code == 4500, token
        assert frames and frames[0]["code"] == "auth_failed"


def test_expired_token_is_refused_with_reconnect_code(node: NodeThread) -> None:
    token = jwt.encode(_claims(exp=int(time.time()) - 10), node.settings.jwt_secret,
                       algorithm="HS256")
    code, frames = expect_close(Client(node.url, token))
    assert code == 4006 and frames[0]["message"] == "token expired"


def test_connection_that_never_authenticates_is_closed(make_node) -> None:
    node = make_node(auth_timeout=1.0)
    c = Client(node.url)
    c.ws.settimeout(5)
    start = time.monotonic()
    code, _ = expect_close(c)
    assert code == 4501 and time.monotonic() - start < 4


def test_sender_id_comes_from_the_token(node: NodeThread) -> None:
    alice = Client(node.url, node.token("alice"))
    alice.welcome()
    bob = Client(node.url, node.token("bob"))
    bob.welcome()
    alice.send(type="send", cmid="s", to="bob", body="hi", **{"from": "mallory"})
    alice.recv_until("sent")
    assert bob.recv()["from"] == "alice"


@pytest.mark.parametrize("frame,code,field", [
    ("{not json", "bad_json", None),
    ("[1,2,3]", "bad_json", None),
    (json.dumps({"type": "teleport"}), "unknown_type", "type"),
    (json.dumps({"cmid": "x"}), "bad_request", "type"),
    (json.dumps({"type": "send", "cmid": "x", "to": "bob"}), "bad_request", "body"),
    (json.dumps({"type": "send", "cmid": "x", "to": 5, "body": "b"}), "bad_request", "to"),
    (json.dumps({"type": "send", "cmid": "", "to": "bob", "body": "b"}), "bad_request", "cmid"),
    (json.dumps({"type": "send", "cmid": "x", "to": "bob", "body": "b" * 20000}), "too_large",
     "body"),
    (json.dumps({"type": "ack", "conv": "p:bob:alice", "seq": 1}), "bad_request", "conv"),
    (json.dumps({"type": "ack", "conv": "p:alice:bob", "seq": -1}), "bad_request", "seq"),
    (json.dumps({"type": "ack", "conv": "p:alice:bob", "seq": True}), "bad_request", "seq"),
    ("[" * 5000 + "]" * 5000, "bad_json", None),
])
def test_bad_frames_get_an_error_naming_the_field_and_the_connection_stays(
        node: NodeThread, frame: str, code: str, field: str | None) -> None:
    c = Client(node.url, node.token("alice"))
    c.welcome()
    c.ws.send(frame)
    err = c.recv()
    assert err["type"] == "error" and err["code"] == code and err.get("field") == field
    c.send(type="ping", id="still-open")
    assert c.recv() == {"type": "pong", "id": "still-open"}


def test_too_many_bad_frames_close_the_connection(make_node) -> None:
    node = make_node(max_errors=3)
    c = Client(node.url, node.token("alice"))
    c.welcome()
    for _ in range(3):
        c.ws.send("nope")
    code, frames = expect_close(c)
    assert code == 4502 and len(frames) == 3


def test_invalid_utf8_text_closes_with_1007(node: NodeThread) -> None:
    c = Client(node.url, node.token("alice"))
    c.welcome()
    c.ws.send(b"\xff\xfe{", opcode=websocket.ABNF.OPCODE_TEXT)
    assert expect_close(c)[0] == 1007


def test_oversized_frame_closes_with_1009(make_node) -> None:
    node = make_node(max_frame_bytes=1024)
    c = Client(node.url, node.token("alice"))
    c.welcome()
    c.ws.send("x" * 5000)
    assert expect_close(c)[0] == 1009


def test_rate_limit_errors_then_closes(make_node) -> None:
    node = make_node(rate_msgs_per_sec=1.0, rate_burst=5)
    c = Client(node.url, node.token("alice"))
    c.welcome()
    for i in range(20):
        try:
            c.send(type="ping", id=i)
        except (BrokenPipeError, ConnectionResetError, websocket.WebSocketException):
            break
    code, frames = expect_close(c, max_frames=40)
    assert code == 4503
    assert any(f.get("code") == "rate_limited" for f in frames)


def test_capacity_refuses_upgrades_with_503(make_node) -> None:
    node = make_node(max_connections=2)
    a = Client(node.url, node.token("a"))
    b = Client(node.url, node.token("b"))
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        Client(node.url, node.token("c"))
    assert info.value.status_code == 503
    status, body = node.http("/health")
    assert status == 503 and body["status"] == "over_capacity"
    a.close()
    b.close()
    wait_for(lambda: node.http("/health")[0] == 200)


def test_origin_allow_list(make_node) -> None:
    node = make_node(allowed_origins=("https://chat.example",))
    ok = websocket.create_connection(f"{node.url}?token={node.token('a')}",
                                     origin="https://chat.example")
    ok.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"{node.url}?token={node.token('a')}",
                                    origin="https://evil.example")
    assert info.value.status_code == 403


def test_same_device_connecting_again_replaces_the_old_connection(node: NodeThread) -> None:
    first = Client(node.url, node.token("alice", "phone"))
    first.welcome()
    second = Client(node.url, node.token("alice", "phone"))
    second.welcome()
    assert expect_close(first)[0] == 4005
    status, stats = node.http("/stats")
    wait_for(lambda: node.http("/stats")[1]["authenticated_connections"] == 1)


def test_insecure_dev_auth_only_when_switched_on(make_node) -> None:
    strict = make_node()
    c = Client(f"{strict.url}?user=alice")
    c.send(type="send", cmid="x", to="bob", body="b")
    assert c.recv()["code"] == "not_authenticated"
    demo = make_node(insecure_dev_auth=True)
    d = Client(f"{demo.url}?user=alice&device=tab1")
    w = d.welcome()
    assert (w["user"], w["device"]) == ("alice", "tab1")


def test_heartbeat_timeout_closes_silent_connections(make_node) -> None:
    node = make_node(heartbeat_timeout=2.0)
    c = Client(node.url, node.token("alice"))
    c.welcome()
    c.ws.settimeout(8)
    # websocket-client answers the server's ping automatically unless we read raw
    # frames; recv_data(control_frame=True) hands us the ping and we stay silent.
    start = time.monotonic()
    code, _ = expect_close(c)
    assert code == 4003 and time.monotonic() - start < 6
