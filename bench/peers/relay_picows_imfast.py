"""imfast's client protocol on picows with nothing behind it: the floor of a
Python server that speaks it (bench/peers, server ``picows-floor``).

    python bench/peers/relay_picows_imfast.py PORT

It answers what ``load_test/gen.py --protocol imfast --auth dev`` sends, with the
frames imfast sends - ``welcome`` and ``resumed`` on connect, ``sent`` to the
sender and ``msg`` to each recipient per ``send``, ``group`` per
``group_create`` - and takes ``ack`` frames, which imfast's clients send per
received conversation: four frames per 1:1 message against a relay's two.
Sequence numbers are a dict increment; nothing is stored, deduplicated,
checked or resumed.  What this server reaches per core bounds what any
implementation of the protocol on picows and orjson can reach: it measures
the protocol's own cost, not imfast's.
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

users: dict[str, WSTransport] = {}
groups: dict[str, list[str]] = {}
seqs: dict[str, int] = {}
cursors: dict[tuple[str, str], int] = {}
_TEXT = WSMsgType.TEXT


def _send(transport: WSTransport | None, obj: dict[str, Any]) -> None:
    if transport is not None:
        transport.send(_TEXT, orjson.dumps(obj))


class Client(WSListener):  # type: ignore[misc]
    def __init__(self, user: str) -> None:
        self.user = user

    def on_ws_connected(self, transport: WSTransport) -> None:
        users[self.user] = transport
        _send(transport, {"type": "welcome", "user": self.user, "device": "default"})
        _send(transport, {"type": "resumed", "conversations": 0})

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if users.get(self.user) is transport:
            del users[self.user]

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type is not _TEXT:
            return
        msg = orjson.loads(frame.get_payload_as_memoryview())
        kind = msg.get("type")
        if kind == "ack":
            cursors[self.user, msg["conv"]] = msg["seq"]
        elif kind == "send":
            self.on_send(transport, msg)
        elif kind == "group_create":
            groups[msg["group"]] = [self.user, *msg["members"]]
            _send(transport, {"type": "group", "group": msg["group"], "id": msg.get("id")})

    def on_send(self, transport: WSTransport, msg: dict[str, Any]) -> None:
        sender = self.user
        if "to" in msg:
            a, b = sorted((sender, msg["to"]))
            conv = f"p:{a}:{b}"
            recipients = [msg["to"]]
        else:
            conv = f"g:{msg['group']}"
            recipients = [m for m in groups.get(msg["group"], ()) if m != sender]
        seq = seqs[conv] = seqs.get(conv, 0) + 1
        _send(transport, {"type": "sent", "cmid": msg["cmid"], "conv": conv, "seq": seq})
        out = {"type": "msg", "kind": "msg", "conv": conv, "seq": seq, "from": sender,
               "body": msg["body"]}
        data = orjson.dumps(out)
        for user in recipients:
            peer = users.get(user)
            if peer is not None:
                peer.send(_TEXT, data)


def listener_for(request: WSUpgradeRequest) -> Client:
    query = parse_qs(urlsplit(request.path.decode()).query)
    return Client(query.get("user", ["anonymous"])[0])


async def main(port: int) -> None:
    server = await ws_create_server(listener_for, "127.0.0.1", port, backlog=4096)
    print(f"picows protocol floor on ws://127.0.0.1:{port}/ws", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
