"""A minimal chat relay on aiohttp (uvloop): the peer-comparison baseline.

    python bench/peers/relay_aiohttp.py PORT

Same protocol as relay_websockets.py (see there).
"""

from __future__ import annotations

import json
import sys

import uvloop
from aiohttp import WSMsgType, web

users: dict[str, web.WebSocketResponse] = {}
groups: dict[str, set[str]] = {}


async def handler(request: web.Request) -> web.WebSocketResponse:
    user = request.query.get("user", "")
    ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 20, autoping=True)
    await ws.prepare(request)
    if not user:
        await ws.close(code=4500, message=b"user required")
        return ws
    users[user] = ws
    try:
        async for raw in ws:
            if raw.type != WSMsgType.TEXT:
                continue
            msg = json.loads(raw.data)
            if msg.get("type") == "join":
                groups.setdefault(msg["group"], set()).add(user)
                await ws.send_str(json.dumps({"type": "joined", "group": msg["group"]}))
                continue
            out = json.dumps({"from": user, "body": msg["body"]})
            if "to" in msg:
                peer = users.get(msg["to"])
                if peer is not None and not peer.closed:
                    await peer.send_str(out)
            else:
                for member in groups.get(msg["group"], ()):
                    if member != user and (peer := users.get(member)) is not None:
                        await peer.send_str(out)
    except Exception:  # noqa: BLE001, S110 - a relay drops a broken client, nothing else
        pass
    finally:
        if users.get(user) is ws:
            del users[user]
    return ws


def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/ws", handler)
    print(f"aiohttp relay on ws://127.0.0.1:{port}/ws", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main(int(sys.argv[1]))
