"""A minimal chat relay on `websockets` (asyncio, uvloop): the peer-comparison baseline.

    python bench/peers/relay_websockets.py PORT

Protocol (the same for every relay in bench/peers): connect ``/ws?user=NAME``;
send ``{"to": USER, "body": ...}`` (the recipient gets ``{"from": NAME, "body": ...}``)
or ``{"group": G, "body": ...}`` (every other member gets it); join a group with
``{"type": "join", "group": G}`` (answer ``{"type": "joined", "group": G}``).
Nothing is stored, acknowledged, numbered or deduplicated: a relay, not a messenger.
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import parse_qs, urlsplit

import uvloop
from websockets.asyncio.server import ServerConnection, serve

users: dict[str, ServerConnection] = {}
groups: dict[str, set[str]] = {}


async def handler(ws: ServerConnection) -> None:
    query = parse_qs(urlsplit(ws.request.path).query)
    user = query.get("user", [""])[0]
    if not user:
        await ws.close(4500, "user required")
        return
    users[user] = ws
    try:
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("type") == "join":
                groups.setdefault(msg["group"], set()).add(user)
                await ws.send(json.dumps({"type": "joined", "group": msg["group"]}))
                continue
            out = json.dumps({"from": user, "body": msg["body"]})
            if "to" in msg:
                peer = users.get(msg["to"])
                if peer is not None:
                    await peer.send(out)
            else:
                for member in groups.get(msg["group"], ()):
                    if member != user and (peer := users.get(member)) is not None:
                        await peer.send(out)
    except Exception:  # noqa: BLE001, S110 - a relay drops a broken client, nothing else
        pass
    finally:
        if users.get(user) is ws:
            del users[user]


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=1 << 20,
                     ping_interval=None, backlog=4096):
        print(f"websockets relay on ws://127.0.0.1:{port}/ws", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
