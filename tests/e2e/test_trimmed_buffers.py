"""picows's per-connection buffers, trimmed by imfast._core (see ``_wsbuffers``).

The Cython twin shrinks the read buffer to 1 KiB at accept, empties the write
buffer and drops the kept upgrade request/response once connected; the pure
Python twin leaves picows's sizes.  Either way a connection must work exactly
as before: upgrade requests and messages larger than the trimmed buffers,
picows's own writes (pong, close) after the write buffer was emptied.  These
tests run on both (``IMFAST_NO_EXTENSIONS=1`` for the twin, see the Makefile).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import websocket

from imfast import _core
from imfast._core import wsbuffers_py
from tests.helpers.node import Client, NodeThread, expect_close, wait_for

NO_EXTENSIONS = os.environ.get("IMFAST_NO_EXTENSIONS") == "1"


def server_protocols(node: NodeThread, user: str) -> list[Any]:
    """picows WSProtocol of each of ``user``'s server-side sessions."""
    assert node.node is not None and node.node.gateway is not None
    sessions = node.node.gateway.table.sessions_of(user)
    return [s.transport.underlying_transport.get_protocol() for s in sessions]


def capacities(node: NodeThread, user: str) -> tuple[int, int] | None:
    protocols = server_protocols(node, user)
    assert len(protocols) == 1
    return node.call(_capacities(protocols[0]))  # type: ignore[no-any-return]


async def _capacities(protocol: Any) -> tuple[int, int] | None:
    if _core.TRIMS_PICOWS_BUFFERS:
        from imfast._core import _wsbuffers

        return _wsbuffers.buffer_capacities(protocol)  # type: ignore[no-any-return]
    return wsbuffers_py.buffer_capacities(protocol)


def test_the_cython_core_trims_when_built() -> None:
    # A build with the Cython core must trim: a silent fallback would cost ~4 KB/connection.
    assert _core.TRIMS_PICOWS_BUFFERS is (not NO_EXTENSIONS)


def test_an_idle_connection_holds_trimmed_buffers_and_no_handshake(node: NodeThread) -> None:
    alice = Client(node.url, node.token("alice"))
    alice.welcome()
    caps = capacities(node, "alice")
    transport = node.node.gateway.table.sessions_of("alice")[0].transport  # type: ignore[union-attr]
    if _core.TRIMS_PICOWS_BUFFERS:
        assert caps == (1024, 0)
        assert transport.request is None and transport.response is None
    else:
        assert caps is None
        assert transport.request is not None
    alice.close()


def test_large_upgrade_request_and_message_grow_the_trimmed_read_buffer(node: NodeThread) -> None:
    # 3 KB of headers: three times the trimmed read buffer.
    big_header = [f"X-Filler-{i}: {'f' * 90}" for i in range(30)]
    alice = Client(node.url, node.token("alice"))
    alice.welcome()
    bob_ws = websocket.create_connection(f"{node.url}?token={node.token('bob')}", timeout=5,
                                         header=big_header)
    bob = Client.__new__(Client)
    bob.ws, bob.frames = bob_ws, []
    bob.welcome()
    body = "x" * 15_000  # one 15 KB frame: 15 times the trimmed read buffer
    bob.send(type="send", cmid="big", to="alice", body=body)
    assert bob.recv_until("sent")[-1]["seq"] == 1
    got = alice.recv_until("msg")[-1]
    assert got["body"] == body and got["from"] == "bob"
    if _core.TRIMS_PICOWS_BUFFERS:
        read_cap, _ = capacities(node, "bob")  # type: ignore[misc]
        assert read_cap > 15_000
    alice.close()
    bob.close()


def test_picows_writes_pong_and_close_after_the_write_buffer_was_emptied(node: NodeThread) -> None:
    alice = Client(node.url, node.token("alice"))
    alice.welcome()
    payload = b"p" * 120
    alice.ws.ping(payload)
    opcode, data = alice.ws.recv_data(control_frame=True)
    while opcode != websocket.ABNF.OPCODE_PONG:
        opcode, data = alice.ws.recv_data(control_frame=True)
    assert data == payload
    if _core.TRIMS_PICOWS_BUFFERS:
        _, write_cap = capacities(node, "alice")  # type: ignore[misc]
        assert write_cap >= len(payload)  # grown by picows's own send, as before trimming
    # The closing handshake: the gateway echoes the code through picows's send_close.
    alice.ws.send_close(4000, b"bye")
    code, _ = expect_close(alice)
    assert code == 4000
    wait_for(lambda: not node.node.gateway.table.sessions_of("alice"))  # type: ignore[union-attr]


@pytest.mark.parametrize("capacity", [0, 256, 512])
def test_read_buffer_capacity_must_leave_room_for_growth(capacity: int) -> None:
    for impl in _trimmers():
        with pytest.raises(ValueError, match="over 512"):
            impl.trim_read_buffer(object(), capacity)


def test_objects_that_are_not_picows_are_left_alone() -> None:
    for impl in _trimmers():
        assert impl.trim_read_buffer(object(), 1024) is False


def _trimmers() -> list[Any]:
    impls: list[Any] = [wsbuffers_py]
    if not NO_EXTENSIONS:
        from imfast._core import _wsbuffers

        impls.append(_wsbuffers)
    return impls
