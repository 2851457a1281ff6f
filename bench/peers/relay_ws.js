// A minimal chat relay on Node.js `ws`: the peer-comparison baseline.
//
//     node bench/peers/relay_ws.js PORT
//
// Same protocol as relay_websockets.py (see there). `ws` is installed into
// bench/peers/node_modules by run.py (`npm ci`, version pinned in package.json).
"use strict";
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2]);
const users = new Map();
const groups = new Map();
const wss = new WebSocketServer({ host: "127.0.0.1", port, perMessageDeflate: false,
                                  maxPayload: 1 << 20, backlog: 4096 });

wss.on("connection", (ws, req) => {
  const user = new URL(req.url, "http://x").searchParams.get("user");
  if (!user) { ws.close(4500, "user required"); return; }
  users.set(user, ws);
  ws.on("message", (data) => {
    let msg;
    try { msg = JSON.parse(data); } catch { return; }
    if (msg.type === "join") {
      if (!groups.has(msg.group)) groups.set(msg.group, new Set());
      groups.get(msg.group).add(user);
      ws.send(JSON.stringify({ type: "joined", group: msg.group }));
      return;
    }
    const out = JSON.stringify({ from: user, body: msg.body });
    if (msg.to !== undefined) {
      const peer = users.get(msg.to);
      if (peer) peer.send(out);
    } else {
      for (const member of groups.get(msg.group) || []) {
        const peer = users.get(member);
        if (member !== user && peer) peer.send(out);
      }
    }
  });
  ws.on("close", () => { if (users.get(user) === ws) users.delete(user); });
  ws.on("error", () => {});
});
wss.on("listening", () => console.log(`node ws relay on ws://127.0.0.1:${port}/ws`));
