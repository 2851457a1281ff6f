"""Authentication, bad input and limits over real connections (BAD_INPUTS.md)."""

from __future__ import annotations

import base64
import json
import socket
import time

import jwt
import pytest
import websocket

from tests.conformance.raw import upgrade_request
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


@pytest.mark.parametrize("frame,echoed", [
    ({"type": "send", "id": "m6", "cmid": "big1", "to": "bob", "body": "b" * 20000},
     {"id": "m6", "cmid": "big1"}),
    ({"type": "send", "id": 7, "cmid": "c7", "to": "bob", "group": "g", "body": "b"},
     {"id": 7, "cmid": "c7"}),
    ({"type": "send", "id": 8, "cmid": "c8", "body": "b"}, {"id": 8, "cmid": "c8"}),
    ({"type": "sync", "id": "s1", "conv": "p:alice:bob", "limit": -5}, {"id": "s1"}),
    ({"type": "teleport", "id": "t1", "cmid": "x"}, {"id": "t1"}),  # a cmid is a send's
    ({"type": "send", "id": {"no": 1}, "cmid": "c9", "to": "bob"}, {"cmid": "c9"}),  # bad id
    ({"type": "send", "id": 9, "cmid": "", "to": "bob", "body": "b"}, {"id": 9}),
])
def test_a_refused_frame_s_error_echoes_its_id_and_a_send_s_cmid(
        node: NodeThread, frame: dict, echoed: dict) -> None:
    """The client can tell which of its pending requests was refused."""
    c = Client(node.url, node.token("alice"))
    c.welcome()
    c.ws.send(json.dumps(frame))
    err = c.recv()
    assert err["type"] == "error"
    assert {k: err[k] for k in ("id", "cmid") if k in err} == echoed


def test_rate_limited_names_no_frame(make_node) -> None:
    """SDKs fail a send whose cmid an error names, and resend everything unanswered on
    a rate_limited naming none: the error must stay anonymous."""
    node = make_node(rate_msgs_per_sec=1.0, rate_burst=2)
    c = Client(node.url, node.token("alice"))
    c.welcome()
    for i in range(4):
        c.send(type="send", id=i, cmid=f"r{i}", to="bob", body="x")
    limited = [f for f in c.recv_until("error", code="rate_limited")
               if f.get("code") == "rate_limited"]
    assert "id" not in limited[0] and "cmid" not in limited[0]


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


def test_acknowledging_every_entry_of_a_long_resume_is_not_rate_limited(make_node) -> None:
    """A device back to 40 pending entries acks each one, as the protocol invites.

    With RATE_BURST 10 those 40 acks used to be answered ``rate_limited`` and
    then closed with 4503 (terminal).  Acks of entries this connection pushed
    cost no token; other frames still do, and a repeated ack is not free.
    """
    node = make_node(rate_msgs_per_sec=1.0, rate_burst=10)
    senders = [Client(node.url, node.token(f"s{i}")) for i in range(4)]
    for i, s in enumerate(senders):
        s.welcome()
        for n in range(10):
            s.send(type="send", cmid=f"{i}-{n}", to="back", body=f"{i}:{n}")
            s.recv_until("sent", cmid=f"{i}-{n}")
    back = Client(node.url, node.token("back"))
    frames = back.recv_until("resumed", limit=200)
    entries = [f for f in frames if f["type"] == "msg"]
    assert len(entries) == 40
    for f in entries:
        back.send(type="ack", conv=f["conv"], seq=f["seq"])
    back.send(type="ping", id="after")
    got = back.recv_until("pong", id="after")
    assert not [f for f in got if f["type"] == "error"], got
    # A repeated ack acknowledges nothing new: it counts like any frame.
    for _ in range(12):
        back.send(type="ack", conv=entries[-1]["conv"], seq=entries[-1]["seq"])
    back.recv_until("error", code="rate_limited")


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


def _upgrade(node: NodeThread, source: str = "127.0.0.1",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw /ws upgrade from ``source``: (status, response headers, body); closes it."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5,
                                  source_address=(source, 0)) as sock:
        sock.sendall(upgrade_request(f"/ws?token={node.token('u')}", extra=headers))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        length = int(fields.get("Content-Length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), fields, body


def test_connects_per_address_over_the_limit_get_429_with_retry_after(make_node) -> None:
    node = make_node(connect_rate_per_ip=0.5, connect_burst_per_ip=3, connect_limit_exempt=())
    assert [_upgrade(node)[0] for _ in range(3)] == [101, 101, 101]
    status, headers, body = _upgrade(node)
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 2
    answer = json.loads(body)
    assert answer["error"] == "rate_limited" and answer["retry_after"] == int(
        headers["Retry-After"])
    # The websocket-client view: an HTTP status, no upgrade.
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        Client(node.url, node.token("alice"))
    assert info.value.status_code == 429
    # Another address has its own bucket; the HTTP endpoints are not counted.
    assert _upgrade(node, source="127.0.0.2")[0] == 101
    assert node.http("/health")[0] == 200
    assert node.http("/stats")[1]["refused"]["connect_rate"] == 2
    metrics = node.http("/metrics")[1]
    assert 'im_gateway_connections_refused_total{reason="connect_rate"} 2.0' in metrics
    # The bucket refills at CONNECT_RATE_PER_IP.
    time.sleep(int(headers["Retry-After"]))
    assert _upgrade(node)[0] == 101


def test_loopback_and_private_addresses_are_exempt_by_default(make_node) -> None:
    node = make_node(connect_burst_per_ip=5, connect_rate_per_ip=0.1)
    assert node.settings.connect_rate_per_ip > 0
    assert all(_upgrade(node, source=f"127.0.0.{1 + i % 3}")[0] == 101 for i in range(30))
    assert "connect_rate" not in node.http("/stats")[1]["refused"]


def test_behind_a_trusted_proxy_the_forwarded_client_address_is_counted(make_node) -> None:
    node = make_node(connect_rate_per_ip=0.1, connect_burst_per_ip=2,
                     trusted_proxies=("127.0.0.1",))

    def via_proxy(client: str) -> int:
        return _upgrade(node, headers={"X-Forwarded-For": f"{client}, 127.0.0.1"})[0]

    assert [via_proxy("203.0.113.7") for _ in range(3)] == [101, 101, 429]
    assert via_proxy("198.51.100.9") == 101  # another client behind the same proxy
    assert via_proxy("10.1.2.3") == 101  # private: exempt, as when it connects directly
    # From a peer that is not a trusted proxy the header is ignored (127.0.0.2 is exempt).
    spoofed = {"X-Forwarded-For": "203.0.113.7"}
    assert _upgrade(node, source="127.0.0.2", headers=spoofed)[0] == 101


def test_devices_per_user_are_limited_and_a_reconnecting_device_still_replaces(
        make_node) -> None:
    node = make_node(max_devices_per_user=2)
    phone = Client(node.url, node.token("alice", "phone"))
    phone.welcome()
    laptop = Client(node.url, node.token("alice", "laptop"))
    laptop.welcome()
    # A third device: an error frame naming the limit, then the terminal close 4505.
    tablet = Client(node.url, node.token("alice", "tablet"))
    code, frames = expect_close(tablet)
    assert code == 4505
    assert frames[-1]["code"] == "too_many_devices" and "MAX_DEVICES_PER_USER" in (
        frames[-1]["message"])
    # The same through an auth frame (the reply carries the request id).
    late = Client(node.url)
    late.send(type="auth", id="a1", token=node.token("alice", "tablet"))
    code, frames = expect_close(late)
    assert code == 4505 and frames[-1]["id"] == "a1"
    # Other users are not affected; the phone reconnecting replaces its old connection.
    bob = Client(node.url, node.token("bob", "tablet"))
    bob.welcome()
    phone2 = Client(node.url, node.token("alice", "phone"))
    assert phone2.welcome()["device"] == "phone"
    assert expect_close(phone)[0] == 4005
    assert node.http("/stats")[1]["refused"]["devices_per_user"] == 2
    assert 'im_gateway_connections_refused_total{reason="devices_per_user"} 2.0' in (
        node.http("/metrics")[1])
    # Once a device leaves there is room again.
    laptop.close()
    wait_for(lambda: len(node.call(_sessions_of(node, "alice"))) == 1)
    Client(node.url, node.token("alice", "tablet")).welcome()


def _sessions_of(node: NodeThread, user: str):  # type: ignore[no-untyped-def]
    async def get() -> tuple:
        return tuple(node.node.gateway.table.sessions_of(user))  # type: ignore[union-attr]
    return get()


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
    wait_for(lambda: node.http("/stats")[1]["authenticated_connections"] == 1)


def test_insecure_dev_auth_only_when_switched_on(make_node) -> None:
    strict = make_node()
    c = Client(f"{strict.url}?user=alice")
    start = time.monotonic()
    code, frames = expect_close(c)  # told why at once, not left to the auth timeout
    assert code == 4500 and time.monotonic() - start < 5  # the auth timeout is 10 s
    assert frames[-1]["code"] == "auth_failed" and "INSECURE_DEV_AUTH" in frames[-1]["message"]
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
