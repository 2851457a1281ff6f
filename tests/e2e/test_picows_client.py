"""A second client library: picows (asyncio), talking to a websocket-client peer."""

from __future__ import annotations

import asyncio
import json

from picows import WSListener, WSMsgType, ws_connect

from tests.helpers.node import Client, NodeThread


class Collector(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.frames: asyncio.Queue[dict] = asyncio.Queue()

    def on_ws_frame(self, transport, frame) -> None:  # type: ignore[no-untyped-def]
        if frame.msg_type == WSMsgType.TEXT:
            self.frames.put_nowait(json.loads(frame.get_payload_as_bytes()))


async def next_of(listener: Collector, ftype: str) -> dict:
    while True:
        frame = await asyncio.wait_for(listener.frames.get(), 5)
        if frame["type"] == ftype:
            return frame


async def test_picows_client_chats_with_a_websocket_client_peer(node: NodeThread) -> None:
    transport, listener = await ws_connect(Collector, f"{node.url}?token={node.token('pia')}")
    try:
        await next_of(listener, "resumed")
        bob = Client(node.url, node.token("bob"))
        bob.welcome()
        transport.send(WSMsgType.TEXT, json.dumps(
            {"type": "send", "cmid": "p1", "to": "bob", "body": "from picows"}).encode())
        ack = await next_of(listener, "sent")
        assert ack["seq"] == 1
        got = await asyncio.to_thread(bob.recv)
        assert (got["from"], got["body"]) == ("pia", "from picows")
        bob.send(type="send", cmid="b1", to="pia", body="from websocket-client")
        msg = await next_of(listener, "msg")
        assert (msg["from"], msg["body"], msg["seq"]) == ("bob", "from websocket-client", 2)
    finally:
        transport.disconnect()
