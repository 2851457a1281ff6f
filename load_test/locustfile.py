"""Locust scenarios for imfast: raw-WebSocket chat users (websocket-client under gevent).

    locust -f load_test/locustfile.py --headless -u 20 -r 10 -t 15s --host ws://127.0.0.1:PORT

Each Locust user is one chat user on one WebSocket (``/ws`` is added to a bare
host).  What a user does, weighted like a real client:

* private messages to other users of this Locust process (``send``, ``to``);
* group messages to the group its block of users created at start (``group``);
* cumulative ``ack`` of every entry it receives, ``read`` receipts for some;
* ``typing`` before some sends;
* now and then a reconnect (close, connect again, resume from its cursor).

Reported to Locust (custom events, so they show in the stats table and CSV):

* ``WS deliver private`` / ``WS deliver group``: from the sender's send (the
  timestamp inside the body) to the recipient's receive, in ms;
* ``WS send->sent``: send to the server's ``sent`` (stored) answer;
* ``WS connect``: connect + authenticate + resume;
* failures: error frames, unexpected closes, sends never answered.

Authentication, first that applies: ``JWT_SECRET`` (or ``--jwt-secret``): mint
HS256 tokens like ``imfast token``; ``--imfast-data-dir DIR``: the embedded
node's dev secret in DIR; otherwise ``?user=NAME`` (a node started with
``--insecure-dev-auth``).  The node's per-connection rate limit (default 50
frames/s) is far above what these users send.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import threading
import time
from typing import Any

import gevent
import websocket
from locust import User, between, events, task

_RUN = f"{int(time.time()) % 100000:05d}{os.getpid() % 1000:03d}"
_counter = itertools.count()
_online: dict[str, ChatUser] = {}          # user name -> Locust user (this process)
_lock = threading.Lock()
GROUP_SIZE = 5


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--jwt-secret", default=os.environ.get("JWT_SECRET", ""),
                        help="the node's JWT_SECRET (default $JWT_SECRET)")
    parser.add_argument("--imfast-data-dir", default="",
                        help="or the embedded node's data dir (its dev secret)")


def _minter(env: Any) -> Any:
    opts = env.parsed_options
    secret = getattr(opts, "jwt_secret", "") if opts else ""
    data_dir = getattr(opts, "imfast_data_dir", "") if opts else ""
    if not secret and data_dir:
        with open(os.path.join(data_dir, "jwt_secret")) as fh:
            secret = fh.read().strip()
    if not secret:
        return None
    from imfast.auth import mint_token
    from imfast.config import Settings

    settings = Settings(jwt_secret=secret)
    return lambda user: mint_token(settings, user, "default", 24 * 3600)


def _fire(env: Any, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
    env.events.request.fire(request_type="WS", name=name, response_time=ms,
                            response_length=length, exception=exc, context={})


class ChatUser(User):
    """One chat user on one raw WebSocket; see the module docstring."""

    wait_time = between(0.2, 1.0)
    host = "ws://127.0.0.1:8080"

    def on_start(self) -> None:
        n = next(_counter)
        self.user_no = n
        self.user_id = f"lc{_RUN}u{n}"
        self.chat_group = f"lc{_RUN}g{n // GROUP_SIZE}"
        self.chat_group_ready = False
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.pending: dict[str, tuple[float, dict[str, Any]]] = {}  # cmid -> (t0, frame)
        self.last_seq: dict[str, int] = {}
        self.cmid_n = 0
        self.closing = False
        base = self.host.rstrip("/")
        self.url = base if base.endswith("/ws") else base + "/ws"
        self.mint = _minter(self.environment)
        self.connect()
        with _lock:
            _online[self.user_id] = self
        if n % GROUP_SIZE == 0:
            self.send({"type": "group_create", "group": self.chat_group, "members": []})
        else:
            gevent.sleep(0.5)  # let the first of the block create it
            self.send({"type": "group_join", "group": self.chat_group})

    def on_stop(self) -> None:
        with _lock:
            _online.pop(self.user_id, None)
        deadline = time.monotonic() + 2.0
        while self.pending and self.ws is not None and time.monotonic() < deadline:
            gevent.sleep(0.05)  # let the answers in flight arrive
        self.disconnect()
        self.fail_pending("never answered")

    # ----------------------------------------------------------- connection
    def connect(self) -> None:
        if self.mint is not None:
            url = f"{self.url}?token={self.mint(self.user_id)}"
        else:
            url = f"{self.url}?user={self.user_id}"
        t0 = time.perf_counter()
        try:
            ws = websocket.create_connection(url, timeout=10, enable_multithread=True)
            while True:  # welcome, the resumed entries, then `resumed`
                frame = json.loads(ws.recv())
                if frame.get("type") == "resumed":
                    break
                if frame.get("type") == "msg":
                    self.on_msg(ws, frame, resumed=True)
                elif frame.get("type") == "error":
                    raise ConnectionError(f"{frame.get('code')}: {frame.get('message')}")
        except Exception as exc:  # noqa: BLE001
            _fire(self.environment, "connect", (time.perf_counter() - t0) * 1000, 0, exc)
            self.ws = None
            return
        ws.settimeout(None)
        _fire(self.environment, "connect", (time.perf_counter() - t0) * 1000)
        self.ws = ws
        self.closing = False
        self.reader = gevent.spawn(self.read_loop, ws)
        # Sends that had no `sent` yet go again with the same cmid: stored at most once.
        for _, frame in list(self.pending.values()):
            self.send(frame)

    def disconnect(self) -> None:
        self.closing = True
        ws, self.ws = self.ws, None
        if self.reader is not None:  # stop reading first: one greenlet per socket
            self.reader.kill(block=True)
            self.reader = None
        if ws is not None:
            with contextlib.suppress(Exception):  # gone already: nothing to close
                ws.close(timeout=1)

    def send(self, frame: dict[str, Any]) -> bool:
        if self.ws is None:
            self.connect()
            if self.ws is None:
                return False
        try:
            self.ws.send(json.dumps(frame))
            return True
        except Exception as exc:  # noqa: BLE001
            _fire(self.environment, f"send {frame.get('type')}", 0, 0, exc)
            self.ws = None
            return False

    def fail_pending(self, why: str) -> None:
        for t0, _ in list(self.pending.values()):
            _fire(self.environment, "send->sent", (time.perf_counter() - t0) * 1000, 0,
                  RuntimeError(why))
        self.pending.clear()

    def read_loop(self, ws: websocket.WebSocket) -> None:
        while True:
            try:
                data = ws.recv()
            except Exception as exc:  # noqa: BLE001
                if not self.closing:
                    _fire(self.environment, "unexpected close", 0, 0, exc)
                    self.ws = None
                return
            if not data:
                if not self.closing:
                    _fire(self.environment, "unexpected close", 0, 0,
                          ConnectionError("closed by the server"))
                    self.ws = None
                return
            frame = json.loads(data)
            kind = frame.get("type")
            if kind == "msg":
                self.on_msg(ws, frame, resumed=False)
            elif kind == "sent":
                entry = self.pending.pop(frame.get("cmid", ""), None)
                if entry is not None:
                    _fire(self.environment, "send->sent", (time.perf_counter() - entry[0]) * 1000)
            elif kind == "error":
                if frame.get("cmid"):
                    self.pending.pop(frame["cmid"], None)
                _fire(self.environment, f"error {frame.get('code')}", 0, 0,
                      RuntimeError(frame.get("message", "")))
            elif kind == "group":
                self.chat_group_ready = True

    def on_msg(self, ws: websocket.WebSocket, frame: dict[str, Any], resumed: bool) -> None:
        conv, seq = frame["conv"], frame["seq"]
        if seq <= self.last_seq.get(conv, 0):
            return  # a re-push after a reconnect: already processed
        self.last_seq[conv] = seq
        try:
            ws.send(json.dumps({"type": "ack", "conv": conv, "seq": seq}))
            if random.random() < 0.3:
                ws.send(json.dumps({"type": "read", "conv": conv, "seq": seq}))
        except Exception:  # noqa: BLE001, S110 - the reader notices the close
            pass
        if frame.get("kind") != "msg" or frame.get("from") == self.user_id or resumed:
            return
        body = frame.get("body", "")
        try:
            sent_ns = int(body.split("|", 1)[0])
        except ValueError:
            return
        name = "deliver group" if conv.startswith("g:") else "deliver private"
        _fire(self.environment, name, (time.time_ns() - sent_ns) / 1e6, len(body))

    # ---------------------------------------------------------------- tasks
    def _send_message(self, to: str | None = None, group: str | None = None) -> None:
        self.cmid_n += 1
        cmid = f"{self.user_id}.{self.cmid_n}"
        frame: dict[str, Any] = {"type": "send", "cmid": cmid,
                                 "body": f"{time.time_ns()}|{cmid}|hello from locust"}
        if to is not None:
            frame["to"] = to
            conv = "p:" + ":".join(sorted((self.user_id, to)))
        else:
            frame["group"] = group
            conv = f"g:{group}"
        if random.random() < 0.2:
            self.send({"type": "typing", "conv": conv})
        t0 = time.perf_counter()
        self.send(frame)  # reconnects first if the socket is gone
        self.pending[cmid] = (t0, frame)  # until `sent`; a reconnect sends it again

    @task(10)
    def private_message(self) -> None:
        with _lock:
            others = [u for u in _online if u != self.user_id]
        if others:
            self._send_message(to=random.choice(others))

    @task(2)
    def group_message(self) -> None:
        if self.chat_group_ready:
            self._send_message(group=self.chat_group)

    @task(1)
    def ping(self) -> None:
        self.send({"type": "ping"})

    @task(1)
    def reconnect(self) -> None:
        if random.random() < 0.2:  # ~ one reconnect per 50 tasks
            self.disconnect()
            self.connect()
