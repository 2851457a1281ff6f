"""/work/shared/BAD_INPUTS.md cases not covered elsewhere, over real sockets.

Each test feeds one kind of bad input to a real node and asserts the
documented answer (HTTP status, close code or error frame) and, where it makes
sense, that two bystanders on the same node still chat.  docs/reliability.md
("Bad input") maps every case to the test that covers it; the frame-level
cases (7-18) are in tests/conformance/test_ws_frames.py.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.conformance.raw import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    TEXT,
    RawWS,
    close_payload,
    frame_bytes,
    http_exchange,
    upgrade_request,
)
from tests.helpers.node import Client, NodeThread, expect_close, wait_for


# ------------------------------------------------------------------ helpers
class Bystanders:
    """Two connected users; :meth:`still_chat` proves the node still serves them."""

    def __init__(self, node: NodeThread) -> None:
        self.node = node
        self.a = Client(node.url, node.token("by_a"))
        self.a.welcome()
        self.b = Client(node.url, node.token("by_b"))
        self.b.welcome()
        self.n = 0

    def still_chat(self) -> None:
        self.n += 1
        self.a.send(type="send", cmid=f"by{self.n}", to="by_b", body=f"still here {self.n}")
        assert self.a.recv_until("sent", cmid=f"by{self.n}")[-1]["type"] == "sent"
        got = [f for f in self.b.recv_until("msg") if f["type"] == "msg"]
        assert got[-1]["body"] == f"still here {self.n}"
        assert self.node.http("/health")[0] == 200


def connect(node: NodeThread, user: str, device: str = "default") -> Client:
    c = Client(node.url, node.token(user, device))
    c.welcome()
    return c


def stats(node: NodeThread) -> dict:
    return node.http("/stats")[1]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- handshake
@pytest.mark.parametrize("name,request_bytes", [
    ("missing key", upgrade_request("/ws", drop=("Sec-WebSocket-Key",))),
    ("key not base64", upgrade_request("/ws", key="not base64!")),
    ("key not 16 bytes", upgrade_request("/ws", key="c2hvcnQ=")),
    ("missing version", upgrade_request("/ws", drop=("Sec-WebSocket-Version",))),
    ("version 12", upgrade_request("/ws", version="12")),
    ("version 8", upgrade_request("/ws", version="8")),
    ("version 7", upgrade_request("/ws", version="7")),
])
def test_bad_key_or_version_is_refused_without_upgrade(node: NodeThread, name: str,
                                                       request_bytes: bytes) -> None:
    """Case 1: 400 (or 426 with the supported version) - never 101."""
    by = Bystanders(node)
    status, answer = http_exchange(node.port, request_bytes)
    assert status in (400, 426), (name, answer[:200])
    if status == 426:
        assert b"Sec-WebSocket-Version: 13" in answer
    by.still_chat()


@pytest.mark.parametrize("name,request_bytes", [
    ("POST", upgrade_request("/ws", method="POST")),
    ("HTTP/1.0", upgrade_request("/ws").replace(b"HTTP/1.1", b"HTTP/1.0", 1)),
    ("no Upgrade", upgrade_request("/ws", drop=("Upgrade",))),
    ("Upgrade: h2c", upgrade_request("/ws", extra={"Upgrade": "h2c"})),
    ("no Connection", upgrade_request("/ws", drop=("Connection",))),
    ("Connection: close", upgrade_request("/ws", extra={"Connection": "close"})),
])
def test_not_get_or_no_upgrade_headers_is_400(node: NodeThread, name: str,
                                              request_bytes: bytes) -> None:
    """Case 2."""
    by = Bystanders(node)
    status, answer = http_exchange(node.port, request_bytes)
    assert status == 400, (name, answer[:200])
    by.still_chat()


def test_connection_header_listing_upgrade_among_tokens_is_accepted(node: NodeThread) -> None:
    """Case 2, the other side: RFC 6455 4.2.1 asks for a Connection header that
    *includes* the token "Upgrade"; Firefox sends ``Connection: keep-alive, Upgrade``."""
    with RawWS(node.port, f"/ws?token={node.token('fox')}",
               extra={"Connection": "keep-alive, Upgrade"}) as ws:
        assert ws.recv_json_until("resumed")[0]["type"] == "welcome"


def test_too_many_headers_is_400(node: NodeThread) -> None:
    """Case 3: more than 128 header lines."""
    by = Bystanders(node)
    status, _ = http_exchange(node.port, upgrade_request(
        "/ws", extra={f"X-Filler-{i}": "v" for i in range(200)}))
    assert status == 400
    by.still_chat()


def test_too_large_headers_are_cut_off_at_16_kib(node: NodeThread) -> None:
    """Case 3: past picows's 16 KiB request limit the connection is closed, unanswered.

    (picows sends no 431 status line: it drops the connection as soon as the
    request head passes the limit, without waiting for its end.)
    """
    by = Bystanders(node)
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port), timeout=3) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 20_000)  # no end
        try:
            answer = sock.recv(100)
        except ConnectionResetError:
            answer = b""
    assert answer == b"" and time.monotonic() - start < 2
    by.still_chat()


def test_slowloris_handshake_is_closed_at_the_handshake_timeout(make_node) -> None:
    """Case 4: the handshake timeout is AUTH_TIMEOUT."""
    node = make_node(auth_timeout=1.0)
    by = Bystanders(node)
    start = time.monotonic()
    closed_after = None
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\n")
        for i in range(40):
            try:
                sock.sendall(b"X-Slow-%d: v\r\n" % i)
                sock.settimeout(0.1)
                if sock.recv(100) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None and 0.8 <= closed_after < 4, closed_after  # at 1 s
    by.still_chat()


def test_huge_subprotocol_header_is_parsed_in_bounded_linear_time(node: NodeThread) -> None:
    """Case 6: ~14 KB of Sec-WebSocket-Protocol is read once and ignored; 20 KB is cut off."""
    by = Bystanders(node)
    offered = ", ".join(f"proto{i}" for i in range(1300))
    assert 12_000 < len(offered) < 15_000
    start = time.monotonic()
    with RawWS(node.port, f"/ws?token={node.token('many')}",
               extra={"Sec-WebSocket-Protocol": offered}) as ws:
        assert "sec-websocket-protocol" not in ws.response_head.lower()  # none selected
        ws.recv_json_until("resumed")
    assert time.monotonic() - start < 1.0
    status, answer = http_exchange(node.port, upgrade_request(
        "/ws", extra={"Sec-WebSocket-Protocol": "p," * 10_000}))
    assert status is None and answer == b""  # over 16 KiB: closed without an upgrade
    by.still_chat()


def test_compression_is_never_negotiated_and_compressed_frames_are_1002(
        node: NodeThread) -> None:
    """Case 15: no permessage-deflate, so no decompression bomb; RSV1 frames are refused."""
    by = Bystanders(node)
    with RawWS(node.port, f"/ws?token={node.token('zip')}",
               extra={"Sec-WebSocket-Extensions":
                      "permessage-deflate; client_max_window_bits"}) as ws:
        assert "sec-websocket-extensions" not in ws.response_head.lower()
        ws.recv_json_until("resumed")
        ws.send(TEXT, b"\x78\x9c\x4b\x04\x00", rsv=4)  # deflate-looking payload, RSV1
        assert ws.expect_close()[0] == 1002
    by.still_chat()


# ------------------------------------------------------------------- frames
_VIOLATIONS: list[tuple[str, Callable[[RawWS], None], int]] = [
    ("unmasked", lambda ws: ws.send(TEXT, b"{}", mask=False), 1002),
    ("rsv", lambda ws: ws.send(TEXT, b"{}", rsv=2), 1002),
    ("opcode", lambda ws: ws.send(0x6, b"x"), 1002),
    ("fragmented ping", lambda ws: ws.send(PING, b"x", fin=False), 1002),
    ("orphan continuation", lambda ws: ws.send(CONT, b"x"), 1002),
    ("bad utf-8", lambda ws: ws.send(TEXT, b'{"type":"\xc0\xaf"}'), 1007),
    ("2^63-1 length", lambda ws: ws.send_raw(frame_bytes(BINARY, length=2**63 - 1)), 1009),
    ("ping flood", lambda ws: ws.send_raw(frame_bytes(PING, b"f") * 300), 1008),
    ("close 1005", lambda ws: ws.send(CLOSE, close_payload(1005)), 1002),
]


def test_frame_level_violations_close_only_the_offender(node: NodeThread) -> None:
    """Cases 7-18 on /ws next to bystanders (each rule: tests/conformance/test_ws_frames.py)."""
    by = Bystanders(node)
    for i, (name, violate, code) in enumerate(_VIOLATIONS):
        with RawWS(node.port, f"/ws?token={node.token('bad', f'dev{i}')}") as ws:
            ws.recv_json_until("resumed")
            violate(ws)
            assert ws.expect_close()[0] == code, name
        by.still_chat()
    closes = stats(node)["closes"]
    assert all(closes.get(str(c), 0) == 0 for c in (4002, 4003, 1011))


# ----------------------------------------------------- slow or dead clients
def test_client_that_stops_reading_is_bounded_then_closed_with_4002(make_node) -> None:
    """Case 19: events are dropped first, then 4002; its chat messages stay pending."""
    node = make_node(write_buffer_high=16 * 1024, write_buffer_limit=64 * 1024,
                     write_stall_timeout=1.0, rate_msgs_per_sec=100000.0, rate_burst=100000)
    by = Bystanders(node)
    sender = connect(node, "flood")
    reader = RawWS(node.port, f"/ws?token={node.token('sloth')}", rcvbuf=4096)
    reader.recv_json_until("resumed")  # ... and never reads again
    body = "z" * 8000
    n = 0
    # Bounded by time, not by count: the stall clock (WRITE_STALL_TIMEOUT, checked at
    # least once a second) runs while the sender may push thousands of entries.
    deadline = time.monotonic() + 20
    while not stats(node)["closes"].get("4002"):
        assert time.monotonic() < deadline, "never closed: the stalled client is kept"
        for _ in range(50):
            sender.send(type="send", cmid=f"f{n}", to="sloth", body=body)
            sender.send(type="typing", conv="p:flood:sloth")
            n += 1
        sender.recv_until("sent", cmid=f"f{n - 1}")
    # An entry for the closing connection (its CLOSE handshake has 2 s) is a failed
    # delivery: the device gets it at its next resume.
    failed = stats(node)["deliveries_failed"]
    sender.send(type="send", cmid=f"f{n}", to="sloth", body="after the close")
    n += 1
    sender.recv_until("sent", cmid=f"f{n - 1}")
    s = stats(node)
    assert s["deliveries_failed"] == failed + 1
    assert s["events_dropped"] > 0  # droppable typing events went first
    # The connection and its buffer are released (CLOSE_GRACE_SECONDS, the peer never reads).
    wait_for(lambda: stats(node)["active_connections"] == 3, timeout=6)
    reader.close()
    by.still_chat()
    # Nothing was lost: every chat message waits in the store for the next connection.
    sloth = Client(node.url, node.token("sloth"), timeout=20)
    frames = sloth.recv_until("resumed", limit=n + 10)
    seqs = [f["seq"] for f in frames if f["type"] == "msg"]
    assert seqs == list(range(1, n + 1))


def test_half_open_socket_is_closed_by_the_heartbeat_and_unregistered(make_node) -> None:
    """Case 20: a peer that vanished without FIN: silent, reads nothing, answers no ping."""
    node = make_node(heartbeat_timeout=2.0)
    by = Bystanders(node)
    watcher = connect(node, "watcher")
    watcher.send(type="send", cmid="w", to="ghost", body="are you there?")
    watcher.recv_until("sent")
    ghost = RawWS(node.port, f"/ws?token={node.token('ghost')}", rcvbuf=4096)
    ghost.recv_json_until("resumed")
    assert stats(node)["authenticated_connections"] == 4
    start = time.monotonic()
    while stats(node)["authenticated_connections"] > 3:
        # HEARTBEAT_TIMEOUT, then CLOSE_GRACE_SECONDS for a CLOSE reply that never comes.
        assert time.monotonic() - start < 8, "the silent connection is still registered"
        for c in (by.a, by.b, watcher):  # the live clients keep talking
            c.send(type="ping", id="alive")
            c.recv_until("pong", id="alive")
        time.sleep(0.3)
    assert stats(node)["closes"] == {"4003": 1}
    watcher.send(type="presence", users=["ghost"], id="p")
    assert watcher.recv_until("presence")[-1]["users"]["ghost"]["online"] is False
    ghost.close()
    by.still_chat()


# -------------------------------------------------------------- application
def test_mid_session_expiry_leaves_a_refresh_window_then_closes_with_4006(make_node) -> None:
    """Case 29, mid-session: ``refresh`` extends the session; without it, close 4006."""
    node = make_node()
    by = Bystanders(node)
    keeper = Client(node.url, node.token("keeper", ttl=2))
    keeper.welcome()
    lapser = Client(node.url, node.token("lapser", ttl=2))
    lapser.welcome()
    keeper.send(type="refresh", token=node.token("keeper", "other-device"), id=1)
    assert keeper.recv()["code"] == "auth_failed"  # another device's token: refused
    keeper.send(type="refresh", token=node.token("keeper", ttl=3600), id=2)
    assert keeper.recv_until("refreshed")[-1]["expires_at"] > time.time() + 3000
    lapser.ws.settimeout(6)
    code, _ = expect_close(lapser)
    assert code == 4006
    keeper.send(type="ping", id="alive")  # past the first token's expiry: still open
    assert keeper.recv_until("pong")[-1]["id"] == "alive"
    by.still_chat()


def test_replayed_cmid_on_the_same_connection_gets_the_original_ack(node: NodeThread) -> None:
    """Case 27 (the retry on a new connection: test_private_chat.py): back-to-back replays."""
    by = Bystanders(node)
    alice, bob = connect(node, "alice"), connect(node, "bob")
    alice.send(type="send", cmid="again", to="bob", body="original")
    alice.send(type="send", cmid="again", to="bob", body="tampered replay")
    alice.send(type="send", cmid="again", to="bob", body="original")
    alice.send(type="ping", id="p")
    acks = [f for f in alice.recv_until("pong") if f["type"] == "sent"]
    assert len(acks) == 3
    assert {(a["msg_id"], a["seq"]) for a in acks} == {(acks[0]["msg_id"], 1)}
    assert sum(1 for a in acks if a.get("duplicate")) == 2
    bob.send(type="ping", id="p")
    got = [f for f in bob.recv_until("pong") if f["type"] == "msg"]
    assert [m["body"] for m in got] == ["original"]
    by.still_chat()


def test_read_receipts_in_a_group_are_checked(node: NodeThread) -> None:
    """Case 33 for groups (private conversations: test_groups_and_events.py)."""
    owner, member, outsider = connect(node, "gown"), connect(node, "gmem"), connect(node, "gout")
    owner.send(type="group_create", group="rr", members=["gmem"], id=1)
    owner.recv_until("group", id=1)
    owner.send(type="send", cmid="g1", group="rr", body="hi")
    seq = owner.recv_until("sent")[-1]["seq"]
    member.send(type="read", conv="g:rr", seq=seq + 5, id=2)
    err = member.recv_until("error")[-1]
    assert (err["code"], err["field"]) == ("bad_request", "seq")
    outsider.send(type="read", conv="g:rr", seq=seq, id=3)
    assert outsider.recv_until("error")[-1]["code"] == "forbidden"
    member.send(type="group_leave", group="rr", id=4)
    member.recv_until("group", id=4)
    member.send(type="read", conv="g:rr", seq=seq, id=5)
    assert member.recv_until("error")[-1]["code"] == "forbidden"
    owner.send(type="ping", id="p")
    assert [f for f in owner.recv_until("pong") if f["type"] == "receipt"] == []


def test_history_of_a_huge_range_is_capped(make_node) -> None:
    """Case 34 for history (sync: test_private_chat.py::test_sync_pages_are_capped...)."""
    node = make_node(sync_page_max=5)
    by = Bystanders(node)
    alice = connect(node, "alice")
    for i in range(12):
        alice.send(type="send", cmid=f"h{i}", to="bob", body=str(i))
    alice.recv_until("sent", cmid="h11")
    for query, seqs in [
        ({"limit": 10**9}, [8, 9, 10, 11, 12]),
        ({"after": 0, "limit": 10**9}, [1, 2, 3, 4, 5]),
        ({"before": 2**53 - 1, "limit": 2**53 - 1}, [8, 9, 10, 11, 12]),
    ]:
        alice.send(type="history", conv="p:alice:bob", id="h", **query)
        assert [m["seq"] for m in alice.recv_until("history")[-1]["messages"]] == seqs
    for bad in (0, -1, 2**53, "all"):
        alice.send(type="history", conv="p:alice:bob", limit=bad)
        err = alice.recv_until("error")[-1]
        assert (err["code"], err["field"]) == ("bad_request", "limit"), bad
    by.still_chat()
