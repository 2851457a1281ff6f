"""RFC 6455 rules of the frame layer (imfast/gateway/frames.py, with picows under it).

Raw sockets and hand-built frames, against the conformance echo endpoint
(``/_echo``) and the chat endpoint (``/ws``): both run the same
:class:`~imfast.gateway.frames.FramedListener`.  The full Autobahn|Testsuite run
is ``scripts/run-autobahn.sh`` (docs/reliability.md); these tests pin each rule
the frame layer enforces, so a regression shows up in the normal test run.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from picows import ws_create_server

from imfast.gateway.frames import FramedListener, frame_limited, valid_close_code
from imfast.gateway.session import EchoSession, Session
from tests.conformance.conftest import Endpoint
from tests.conformance.raw import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    RawWS,
    close_payload,
    frame_bytes,
)
from tests.helpers.node import NodeThread

KOSME = "κόσμε".encode()  # 11 bytes, 2-byte and 3-byte sequences
OUT_OF_RANGE = b"\xf4\x90\x80\x80"  # "U+110000": invalid from its second byte


def assert_fails(ws: RawWS, code: int) -> None:
    """The server sends CLOSE ``code`` and, once we answer it, closes TCP."""
    got, before = ws.expect_close()
    assert got == code, (got, before)
    assert ws.closed_by_server(1.0)


# ---------------------------------------------------------------- fragmentation
def test_fragmented_text_message_is_reassembled(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        msg = endpoint.probe("frag")
        ws.send(TEXT, msg[:3], fin=False)
        ws.send(CONT, msg[3:7], fin=False)
        ws.send(CONT, b"", fin=False)
        ws.send(CONT, msg[7:])
        endpoint.check(ws, "frag")


def test_fragmented_binary_message_is_echoed_as_binary(echo_node: NodeThread) -> None:
    with RawWS(echo_node.port, "/_echo") as ws:
        ws.send(BINARY, b"\x00\x01", fin=False)
        ws.send(CONT, b"\xff\xfe")
        f = ws.recv_message()
        assert (f.opcode, f.payload) == (BINARY, b"\x00\x01\xff\xfe")


def test_control_frames_inside_a_fragmented_message(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        msg = endpoint.probe("inter")
        ws.send(TEXT, msg[:5], fin=False)
        ws.send(PING, b"in between")
        ws.send(CONT, msg[5:9], fin=False)
        ws.send(PONG, b"unsolicited")
        ws.send(CONT, msg[9:])
        pong = ws.recv_frame()
        assert (pong.opcode, pong.payload) == (PONG, b"in between")
        endpoint.check(ws, "inter")


def test_continuation_without_a_started_message_is_1002(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(CONT, b"orphan")
        assert_fails(ws, 1002)


def test_new_data_frame_inside_a_fragmented_message_is_1002(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(TEXT, b"first", fin=False)
        ws.send(TEXT, b"second")
        assert_fails(ws, 1002)


# ------------------------------------------------------------ framing violations
@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_rsv_bits_without_an_extension_are_1002(endpoint: Endpoint, rsv: int) -> None:
    with endpoint.open() as ws:
        ws.send(TEXT, endpoint.probe("r"), rsv=rsv)
        assert_fails(ws, 1002)


def test_close_frame_with_rsv_bits_is_1002_and_tcp_closes_at_once(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(CLOSE, close_payload(1000), rsv=7)
        code, _ = ws.expect_close(reply=False)  # the peer's CLOSE was sent already
        assert code == 1002
        start = time.monotonic()
        assert ws.closed_by_server(1.5) and time.monotonic() - start < 1.0


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF])
def test_reserved_opcodes_are_1002(endpoint: Endpoint, opcode: int) -> None:
    with endpoint.open() as ws:
        ws.send(opcode, b"reserved")
        assert_fails(ws, 1002)


def test_unmasked_client_frame_is_1002(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(TEXT, endpoint.probe("u"), mask=False)
        assert_fails(ws, 1002)


def test_control_frame_over_125_bytes_is_1002(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(PING, b"p" * 126)
        assert_fails(ws, 1002)


def test_fragmented_control_frame_is_1002(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(PING, b"half", fin=False)
        assert_fails(ws, 1002)


# ------------------------------------------------------------------------ UTF-8
def test_invalid_utf8_in_a_single_frame_is_1007(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.text(b'{"type":"ping","id":"' + OUT_OF_RANGE + b'"}')
        assert_fails(ws, 1007)


def test_code_point_split_across_fragments_is_valid(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        msg = endpoint.probe("κόσμε")
        cut = msg.index(KOSME) + 1  # inside the first 2-byte sequence
        ws.send(TEXT, msg[:cut], fin=False)
        ws.send(CONT, msg[cut:cut + 3], fin=False)  # ends inside the 3-byte sequence
        ws.send(CONT, msg[cut + 3:])
        endpoint.check(ws, "κόσμε")


def test_invalid_utf8_fragment_fails_before_the_message_ends(endpoint: Endpoint) -> None:
    """Fail fast (Autobahn 6.4.1): the bad fragment is refused; the last one never comes."""
    with endpoint.open() as ws:
        ws.send(TEXT, b'{"type":"ping","id":"' + KOSME, fin=False)
        ws.send(CONT, OUT_OF_RANGE, fin=False)
        assert_fails(ws, 1007)


def test_message_ending_inside_a_code_point_is_1007(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(TEXT, b'{"type":"ping","id":"x"}', fin=False)
        ws.send(CONT, KOSME[:1])
        assert_fails(ws, 1007)


# ------------------------------------------------------------------- closing
@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999,
                                  5000, 65535])
def test_invalid_close_codes_are_answered_with_1002(endpoint: Endpoint, code: int) -> None:
    assert not valid_close_code(code)
    with endpoint.open() as ws:
        ws.close_frame(close_payload(code))
        got, _ = ws.expect_close(reply=False)
        assert got == 1002
        assert ws.closed_by_server(1.0)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 3999, 4000, 4999])
def test_valid_close_codes_are_echoed_and_the_server_closes_tcp(endpoint: Endpoint,
                                                                code: int) -> None:
    with endpoint.open() as ws:
        ws.close_frame(close_payload(code, b"bye \xe2\x9c\x93"))
        got, before = ws.expect_close(reply=False)
        assert got == code and before == []
        assert ws.closed_by_server(1.0)  # the server closes TCP first (RFC 6455 7.1.1)


def test_empty_close_is_answered_with_1000(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.close_frame(b"")
        assert ws.expect_close(reply=False)[0] == 1000
        assert ws.closed_by_server(1.0)


def test_one_byte_close_payload_is_1002(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.close_frame(b"\x03")
        assert ws.expect_close(reply=False)[0] == 1002
        assert ws.closed_by_server(1.0)


def test_close_reason_that_is_not_utf8_is_refused(endpoint: Endpoint) -> None:
    """picows refuses it while parsing, with 1007 (Autobahn 7.5.1 accepts 1002 or 1007)."""
    with endpoint.open() as ws:
        ws.close_frame(close_payload(1000, b"bad \xff reason"))
        assert ws.expect_close(reply=False)[0] == 1007
        assert ws.closed_by_server(1.0)


def test_frames_after_close_are_ignored(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send_raw(frame_bytes(CLOSE, close_payload(1000)) + frame_bytes(PING, b"late")
                    + frame_bytes(TEXT, endpoint.probe("late")))
        got, before = ws.expect_close(reply=False)
        assert got == 1000 and before == []
        assert ws.closed_by_server(1.0)


@pytest.mark.parametrize("first,answer", [(close_payload(1000), 1000),
                                          (close_payload(4321, b"bye"), 4321),
                                          (b"", 1000),
                                          (close_payload(5000), 1002)])
def test_two_close_frames_back_to_back_get_the_answer_to_the_first(
        endpoint: Endpoint, first: bytes, answer: int) -> None:
    """Autobahn 7.1.2: picows parses the second CLOSE (an error) before it hands us the
    first; frames.ConnectionLog answers the first before picows can send 1002."""
    with endpoint.open() as ws:
        ws.send_raw(frame_bytes(CLOSE, first) + frame_bytes(CLOSE, close_payload(1001)))
        got, before = ws.expect_close(reply=False)
        assert got == answer and before == []
        assert ws.closed_by_server(1.0)


def test_bytes_picows_refuses_after_the_close_get_the_answer_to_the_close(
        endpoint: Endpoint) -> None:
    """A frame picows fails while parsing (here a reserved opcode) after the peer's CLOSE."""
    with endpoint.open() as ws:
        ws.send_raw(frame_bytes(CLOSE, close_payload(1000)) + frame_bytes(0x3, b"reserved"))
        got, before = ws.expect_close(reply=False)
        assert got == 1000 and before == []
        assert ws.closed_by_server(1.0)


def test_server_waits_for_the_close_reply_then_drops_a_silent_peer(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(CONT, b"orphan")
        assert ws.expect_close(reply=False)[0] == 1002
        ws.send(TEXT, endpoint.probe("after close"))  # discarded: no answer
        start = time.monotonic()
        assert ws.closed_by_server(4.0)  # CLOSE_GRACE_SECONDS, then TCP is closed
        assert time.monotonic() - start > 1.0


# ------------------------------------------------------------------- ping/pong
@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))])
def test_ping_is_answered_with_the_same_payload(endpoint: Endpoint, payload: bytes) -> None:
    with endpoint.open() as ws:
        ws.send(PING, payload)
        f = ws.recv_frame()
        assert (f.opcode, f.payload) == (PONG, payload)


def test_unsolicited_pong_is_ignored(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send(PONG, b"nobody asked")
        ws.send(PONG, b"")
        ws.text(endpoint.probe("after pong"))
        endpoint.check(ws, "after pong")


def test_ping_flood_is_answered_then_closed_with_1008(endpoint: Endpoint) -> None:
    with endpoint.open() as ws:
        ws.send_raw(b"".join(frame_bytes(PING, b"%d" % i) for i in range(200)))
        code, before = ws.expect_close()
        assert code == 1008
        pongs = [f for f in before if f.opcode == PONG]
        assert 10 <= len(pongs) <= 25  # the burst, then the flood is cut off


# ----------------------------------------------------------------------- sizes
@pytest.mark.parametrize("length,code", [(2**63 - 1, 1009), (2**63, 1002)])
def test_huge_declared_length_is_refused_before_any_payload(endpoint: Endpoint, length: int,
                                                            code: int) -> None:
    """2^63 sets the top bit, which RFC 6455 forbids (1002); 2^63-1 is only too big (1009)."""
    with endpoint.open() as ws:
        ws.send_raw(frame_bytes(BINARY, b"", length=length))  # header and mask key only
        assert_fails(ws, code)


def test_ws_frame_over_max_frame_bytes_is_refused_from_its_header(node: NodeThread) -> None:
    """A production node (no conformance echo): picows checks the header, buffers nothing."""
    with Endpoint(node, "/ws").open() as ws:
        ws.send_raw(frame_bytes(TEXT, b"", length=node.settings.max_frame_bytes + 1))
        assert_fails(ws, 1009)


def test_echo_frame_over_16_mib_is_refused_from_its_header(echo_node: NodeThread) -> None:
    with RawWS(echo_node.port, "/_echo") as ws:
        ws.send_raw(frame_bytes(BINARY, b"", length=16 * 1024 * 1024 + 1))
        assert_fails(ws, 1009)


def test_fragments_adding_up_past_the_limit_are_1009(endpoint: Endpoint) -> None:
    chunk = b"x" * 60_000  # under picows's per-frame limit: the frame layer must add up
    with endpoint.open(timeout=20) as ws:
        ws.send(TEXT, chunk, fin=False)
        sent = len(chunk)
        while sent <= endpoint.limit:
            ws.send(CONT, chunk, fin=False)
            sent += len(chunk)
        # The final fragment is never sent: the limit is enforced as fragments arrive.
        assert_fails(ws, 1009)


def test_echo_takes_conformance_sized_frames_while_ws_keeps_its_limit(
        echo_node: NodeThread) -> None:
    """``/_echo`` takes the suites' big frames; ``/ws`` still refuses MAX_FRAME_BYTES + 1.

    Needs the server to raise picows's max_frame_size in conformance mode and to
    serve ``/ws`` through :func:`frame_limited` (see docs/reliability.md).
    """
    big = b"a" * (1024 * 1024)
    with RawWS(echo_node.port, "/_echo", timeout=20) as ws:
        ws.send(TEXT, big)
        f = ws.recv_message(timeout=20)
        assert (f.opcode, len(f.payload)) == (TEXT, len(big))
    ws = Endpoint(echo_node, "/ws").open()
    with ws:
        ws.send(TEXT, b" " * (echo_node.settings.max_frame_bytes + 1))
        assert_fails(ws, 1009)


# ------------------------------------------------------------ frame_limited
class _Echo(FramedListener):
    __slots__ = ()

    def on_message(self, payload: bytes, is_text: bool, validated: bool) -> None:
        self.transport.send(1 if is_text else 2, payload)


async def test_frame_limited_listener_refuses_frames_over_its_own_limit() -> None:
    cls = frame_limited(_Echo)
    assert frame_limited(_Echo) is cls and issubclass(cls, _Echo)
    assert issubclass(frame_limited(Session), Session)
    assert issubclass(frame_limited(EchoSession), EchoSession)
    server = await ws_create_server(lambda request: cls(1000), "127.0.0.1", 0,
                                    max_frame_size=1 << 20, enable_auto_pong=False)
    port = server.sockets[0].getsockname()[1]

    def client() -> tuple[bytes, int | None]:
        with RawWS(port, "/") as ws:
            ws.send(TEXT, b"a" * 1000)  # at the limit: fine
            echoed = ws.recv_message().payload
            ws.send(BINARY, b"b" * 1001)
            return echoed, ws.expect_close()[0]

    try:
        echoed, code = await asyncio.to_thread(client)
    finally:
        server.close()
    assert echoed == b"a" * 1000 and code == 1009
