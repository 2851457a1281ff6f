"""The gateway: one picows listener serving ``/ws`` and the HTTP endpoints.

Guarantees:

* ``/ws`` upgrades are refused with an HTTP status, never half-accepted: 503
  (with ``Retry-After``) while draining or at ``MAX_CONNECTIONS``, 429 (with
  ``Retry-After``) for a client address over ``CONNECT_RATE_PER_IP``, 403 for
  an Origin outside ``ALLOWED_ORIGINS``; nothing is allocated for them;
* ``GET /health`` answers 200 ``{"status":"ok","hostname":...}`` only while
  the gateway takes connections (readiness); ``/health/live`` answers 200
  while the process runs; ``/stats`` and ``/metrics`` always answer;
* :meth:`Gateway.deliver` pushes an entry to every local session of the
  given users, framing it once; it never blocks and never raises for a slow
  or closed session;
* :meth:`Gateway.drain` stops new connections, asks every client to
  reconnect elsewhere (a ``reconnect`` frame, then close 4001) in stages, and
  returns when no session is left or the deadline passes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from picows import (
    WSAutoPingStrategy,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from imfast._core import (
    USING_EXTENSIONS,
    ConnectionTable,
    TimerWheel,
    WriteCoalescer,
    trim_read_buffer,
)
from imfast.auth import TokenVerifier
from imfast.backends.base import KIND_EVENT, KIND_RECALL, StoredMessage
from imfast.config import Settings
from imfast.gateway.frames import CONFORMANCE_MAX_MESSAGE, ConnectionLog, frame_limited
from imfast.gateway.limits import ConnectLimiter
from imfast.gateway.metrics import GatewayCollector, GatewayStats
from imfast.gateway.presence import LastSeen
from imfast.gateway.session import PUSH_EPOCH_DISTRUSTED, EchoSession, Session
from imfast.protocol.codes import CloseCode
from imfast.service.router import Router

__all__ = ["Gateway"]

log = logging.getLogger("imfast.gateway")

_JSON = {"Content-Type": "application/json"}

#: Read buffer each connection starts with: chat frames and upgrade requests (a JWT in the
#: query string included) fit; picows grows it for larger ones.  picows allocates at least
#: 2,048 bytes: the gateway's own protocol factory trims it (imfast._core.trim_read_buffer).
_READ_BUFFER_INIT = 1024
#: Sessions reading what they missed (after a named ``resync``) at once, at most: a
#: resync may name 10,000 users, and as many store reads at once (over the link, in
#: distributed mode) would run into their timeouts; the rest queue in order.
RECHECKS_AT_ONCE = 64


def _json_response(status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> Any:
    headers = dict(_JSON)
    if extra:
        headers.update(extra)
    data = orjson.dumps(body)
    if status == 200:
        return _http(WSUpgradeResponse.create_ok_response(data, headers))
    return _http(WSUpgradeResponse.create_error_response(status, data, headers))


def _http(response: Any) -> Any:
    """A plain HTTP answer (no upgrade): picows sends it and closes the connection."""
    return WSUpgradeResponseWithListener(response, None)


class Gateway:
    """Holds the client connections of one process; see the module docstring."""

    def __init__(self, settings: Settings, verifier: TokenVerifier, router: Any = None,
                 *, role: str = "embedded") -> None:
        self.settings = settings
        self.verifier = verifier
        self.local_router: Router | None = None
        self.remote_router: Any = None  # a RemoteRouter: its send_now / ack_with queue link calls
        self.router = router
        self.role = role
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()
        self.table = ConnectionTable()
        self.wheel = TimerWheel(1.0, self.now)
        self.coalescer = WriteCoalescer(self.loop)
        self.stats = GatewayStats()
        #: How many times a peer told us it dropped pushes meant for us (``resync``).
        self.pushes_lost = 0
        #: Bumped when a peer dropped pushes for users it could not name: a session
        #: connected before that catches a conversation up from the store at its
        #: first push there, instead of taking that push as the next entry.
        self.push_epoch = 0
        #: Bounds the store reads of sessions told to look for dropped pushes.
        self.recheck_slots = asyncio.Semaphore(RECHECKS_AT_ONCE)
        self.draining = False
        self.drain_reason = ""
        self.started_at = time.time()
        self.last_seen = LastSeen()  # user -> epoch seconds of last disconnect
        self.server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.extra_stats: Any = None  # callable returning extra /stats fields (service side)
        # picows has one max_frame_size per server: raised for /_echo in conformance mode,
        # so /ws sessions then check MAX_FRAME_BYTES themselves (frames.frame_limited).
        self.max_frame_size = settings.max_frame_bytes
        self.session_cls: type[Session] = Session
        if settings.conformance_echo:
            self.max_frame_size = max(settings.max_frame_bytes, CONFORMANCE_MAX_MESSAGE)
            self.session_cls = frame_limited(Session)
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.metrics_registry.register(GatewayCollector(self.stats, self._gauges))
        # Per process: each worker of `--workers N` keeps its own buckets (limits.py).
        self.connect_limiter = ConnectLimiter(
            settings.connect_rate_per_ip, settings.connect_burst_per_ip,
            settings.connect_limit_exempt, settings.trusted_proxies)

    @property
    def router(self) -> Any:
        """The router client operations go to (in process, or a link to im-service)."""
        return self._router

    @router.setter
    def router(self, router: Any) -> None:
        self._router = router
        # In process: sessions may call its synchronous fast paths (send_now, ack_now);
        # over the link, ones that queue the call at once (no task per frame).
        self.local_router = router if isinstance(router, Router) else None
        self.remote_router = router if hasattr(router, "ack_with") else None
        # Then sessions send no ack for their device's own messages: the router moved it.
        self.router_moves_own_cursors = bool(getattr(router, "moves_own_cursors", False))

    # --------------------------------------------------------------- serving
    async def start(self, port: int | None = None, host: str | None = None) -> int:
        """Listen (SO_REUSEPORT, so worker processes can share the port); returns the port."""
        host = host or self.settings.host
        port = self.settings.http_port if port is None else port
        listen: dict[str, Any] = {"reuse_port": True, "backlog": 4096}
        factory = _protocol_factory(self)
        if factory is not None:
            self.server = await self.loop.create_server(factory, host, port, **listen)
        else:
            if self.connect_limiter.enabled:
                log.warning("CONNECT_RATE_PER_IP is not enforced: this picows cannot tell the "
                            "listener factory the client address")
            self.server = await ws_create_server(
                self._listener_factory, host, port,
                websocket_handshake_timeout=self.settings.auth_timeout,
                enable_auto_pong=False,  # the frame layer answers pings, with a flood limit
                max_frame_size=self.max_frame_size,
                read_buffer_init_size=_READ_BUFFER_INIT,
                # uvloop's own transports: 10.5 KB of server RSS per idle connection against
                # 15.7 KB with aiofastnet's (bench/memory_bench.py, 5,000 connections).
                use_aiofastnet=False,
                **listen,
            )
        self._ticker = self.loop.create_task(self._tick())
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every connection (GOING_AWAY)."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self.server is not None:
            self.server.close()
        for s in list(self.table.iter_sessions()):
            s.close(CloseCode.GOING_AWAY, "server shutting down")
        self.coalescer.flush()
        await asyncio.sleep(0.05)

    async def _tick(self) -> None:
        """Once a second: the coarse clock, timeouts, the drain annotation."""
        annotations_file = self.settings.drain_annotations_file
        while True:
            await asyncio.sleep(1.0)
            self.now = now = self.loop.time()
            self.connect_limiter.sweep(now)
            for session in self.wheel.expired(now):
                try:
                    session.check_timers(now)
                except Exception:
                    log.exception("timer check failed")
            if annotations_file:
                self._follow_annotation(_drain_requested(annotations_file))

    def _follow_annotation(self, requested: bool | None) -> None:
        """Drain when the pod is annotated drain=true; take connections again when a
        drain that the annotation started loses it (``None``: the file is unreadable,
        change nothing)."""
        if requested and not self.draining:
            log.warning("drain requested by pod annotation drain=true")
            self.start_drain("annotation")
        elif requested is False and self.draining and self.drain_reason == "annotation":
            self.end_drain("pod annotation drain=true removed")

    # ---------------------------------------------------------------- routing
    def _listener_factory(self, request: WSUpgradeRequest, protocol: Any = None) -> Any:
        """Route one HTTP request; ``protocol`` (picows's, when known) gives the peer address."""
        try:
            url = urlsplit(request.path.decode("latin-1"))
        except Exception:  # noqa: BLE001
            return _json_response(400, {"error": "bad request path"})
        path = url.path
        if path == "/ws" or path == "/_echo":
            refused = _check_upgrade(request)
            if refused is not None:
                return refused
        if path == "/ws":
            return self._accept_ws(request, url.query, protocol)
        if path == "/health":
            return self._health()
        if path == "/health/live":
            return _json_response(200, {"status": "ok", "hostname": self.settings.display_hostname})
        if path == "/stats":
            return _json_response(200, self.stats_snapshot())
        if path == "/metrics":
            return _http(WSUpgradeResponse.create_ok_response(
                self.metrics_text(), {"Content-Type": CONTENT_TYPE_LATEST}))
        if path == "/admin/drain":
            return self._admin_drain(request)
        if path in ("/", "/index.html"):
            return self._chat_page()
        if path == "/_echo" and self.settings.conformance_echo:
            # Conformance suites send 16 MiB messages; the limit stays bounded.
            return EchoSession(self.max_frame_size)
        return _json_response(404, {"error": "not found", "path": path})

    def _accept_ws(self, request: WSUpgradeRequest, query: str, protocol: Any = None) -> Any:
        settings = self.settings
        if self.draining:
            self.stats.refused["draining"] = self.stats.refused.get("draining", 0) + 1
            return _json_response(503, {"error": "draining", "retry": "connect to another gateway"},
                                  {"Retry-After": "1"})
        if len(self.table) >= settings.max_connections:
            self.stats.refused["capacity"] = self.stats.refused.get("capacity", 0) + 1
            return _json_response(503, {"error": "over capacity", "retry": "later or elsewhere"},
                                  {"Retry-After": "5"})
        if protocol is not None:
            refused = self._check_connect_rate(request, protocol)
            if refused is not None:
                return refused
        if settings.allowed_origins:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in settings.allowed_origins:
                self.stats.refused["origin"] = self.stats.refused.get("origin", 0) + 1
                return _json_response(403, {"error": "origin not allowed"})
        params = parse_qs(query, max_num_fields=8) if query else {}
        token = params.get("token", [None])[0]
        session_cls = self.session_cls
        if token is not None:
            return session_cls(self, query_token=token)
        if "user" in params:
            # Without INSECURE_DEV_AUTH the session refuses it at once (auth_failed, 4500,
            # saying why) rather than leaving the client to the auth timeout.
            return session_cls(self, dev_user=params["user"][0],
                               dev_device=params.get("device", [None])[0])
        return session_cls(self)

    def _check_connect_rate(self, request: WSUpgradeRequest, protocol: Any) -> Any:
        """429 for a client address over CONNECT_RATE_PER_IP, else None."""
        limiter = self.connect_limiter
        try:
            peer = protocol.transport.underlying_transport.get_extra_info("peername")[0]
        except (AttributeError, IndexError, TypeError):
            return None  # no IP peer (e.g. a Unix socket): nothing to count
        address = limiter.client_address(peer, request.headers.get("X-Forwarded-For"))
        wait = limiter.check(address, self.loop.time())
        if not wait:
            return None
        self.stats.refused["connect_rate"] = self.stats.refused.get("connect_rate", 0) + 1
        retry_after = max(1, math.ceil(wait))
        return _json_response(429, {"error": "rate_limited",
                                    "message": "too many connections from your address; "
                                               "retry after Retry-After seconds",
                                    "retry_after": retry_after},
                              {"Retry-After": str(retry_after)})

    def _admin_drain(self, request: WSUpgradeRequest) -> Any:
        """``GET /admin/drain`` with ``X-Admin-Token``: start draining this gateway."""
        expected = self.settings.admin_token
        if not expected:
            return _json_response(403, {"error": "admin endpoint disabled: set ADMIN_TOKEN"})
        given = request.headers.get("X-Admin-Token", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _json_response(403, {"error": "bad or missing X-Admin-Token"})
        log.warning("drain requested by the admin endpoint")
        self.request_drain("admin")
        return _json_response(200, {"status": "draining",
                                    "active_connections": len(self.table)})

    def _chat_page(self) -> Any:
        """The browser chat page (imfast/gateway/static/index.html), if shipped."""
        page = _static("index.html")
        if page is None:
            return _json_response(404, {"error": "no chat page in this build"})
        return _http(WSUpgradeResponse.create_ok_response(
            page, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"}))

    def _health(self) -> Any:
        host = self.settings.display_hostname
        if self.draining:
            return _json_response(503, {"status": "draining", "hostname": host,
                                        "reason": self.drain_reason})
        if len(self.table) >= self.settings.max_connections:
            return _json_response(503, {"status": "over_capacity", "hostname": host,
                                        "reason": "MAX_CONNECTIONS reached"})
        return _json_response(200, {"status": "ok", "hostname": host})

    # ------------------------------------------------------------------ stats
    def _gauges(self) -> dict[str, Any]:
        write_buffer = 0
        for n, s in enumerate(self.table.iter_sessions()):
            if n >= 1000:
                break
            if s.raw is not None:
                write_buffer += s.raw.get_write_buffer_size()
        return {
            "active_connections": len(self.table),
            "authenticated": self.table.authenticated,
            "capacity": self.settings.max_connections,
            "draining": 1 if self.draining else 0,
            "write_buffer": write_buffer,
            "writes": self.coalescer.writes,
            "histograms": getattr(self.router, "histograms", ()),
            "store_gauges": self.store_gauges(),
        }

    def store_gauges(self) -> list[tuple[str, str, str, int]]:
        """The in-process router's store gauges (none behind a link: im-service has them)."""
        return [] if self.local_router is None else self.local_router.store_gauges()

    def metrics_text(self) -> bytes:
        """What ``GET /metrics`` returns (Prometheus text format)."""
        return bytes(generate_latest(self.metrics_registry))

    def stats_snapshot(self) -> dict[str, Any]:
        """What ``GET /stats`` returns."""
        s = self.stats
        p99 = s.latency_quantile(0.99)
        snap: dict[str, Any] = {
            "active_connections": len(self.table),
            "authenticated_connections": self.table.authenticated,
            "online_users": self.table.users,
            "capacity": self.settings.max_connections,
            "draining": self.draining,
            "hostname": self.settings.display_hostname,
            "role": self.role,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "cython_core": USING_EXTENSIONS,
            "frames_received": s.frames_in,
            "messages_delivered": s.delivered,
            "events_dropped": s.dropped,
            "deliveries_failed": s.failed,
            "push_losses_reported": self.pushes_lost,
            "socket_writes": self.coalescer.writes,
            "delivery_p99_seconds_upper_bound": p99,
            "errors": dict(s.errors),
            "closes": {str(k): v for k, v in s.closes.items()},
            "refused": dict(s.refused),
        }
        if self.extra_stats is not None:
            snap.update(self.extra_stats())
        snap.update({key: value for key, _, _, value in self.store_gauges()})
        return snap

    # --------------------------------------------------------------- delivery
    @staticmethod
    def entry_dict(m: StoredMessage) -> dict[str, Any]:
        """The client-facing form of a stored entry (frame type ``msg``)."""
        d: dict[str, Any] = {"type": "msg", "conv": m.conv, "seq": m.seq, "msg_id": m.msg_id,
                             "from": m.sender, "from_device": m.sender_device, "ts": m.ts,
                             "kind": m.kind}
        if m.kind == KIND_EVENT:
            d["event"] = orjson.loads(m.body)
        elif m.kind == KIND_RECALL:
            d["recalled_seq"] = int(m.body)
        else:
            d["body"] = m.body
            d["cmid"] = m.cmid
        return d

    def encode_entry(self, m: StoredMessage) -> bytes:
        self.stats.delivered += 1
        return orjson.dumps(self.entry_dict(m))

    def deliver(self, users: Iterable[str], message: StoredMessage,
                skip: tuple[str, str] | None) -> None:
        """Offer ``message`` to every local session of ``users`` (see module docstring)."""
        payload: bytes | None = None
        table = self.table
        pushed = 0
        for user in users:
            for session in table.sessions_of(user):
                silent = skip is not None and session.user == skip[0] \
                    and session.device == skip[1]
                if payload is None:
                    payload = orjson.dumps(self.entry_dict(message))
                if session.offer(message.conv, message.seq, payload, silent):
                    pushed += 1
                elif session.closed:  # e.g. just closed as a slow reader: at its resume
                    self.stats.failed += 1
        if pushed:
            self.stats.delivered += pushed
            self.stats.observe_latency(max(0.0, time.time() - message.ts / 1000.0), pushed)

    def replicas_changed(self, settle: float) -> None:
        """The im-service replica set changed: until every gateway picks the same replica
        for a conversation again (within ``settle`` s), two replicas may push one
        conversation's entries out of order.  Every session connected before the end
        of that window checks its next first push per conversation against the store
        (``push_epoch`` moves now and again after ``settle``), so a later entry is
        not taken as the next after the device's cursor."""
        self.push_epoch += 1
        log.info("im-service replicas changed: sessions check the store at their next "
                 "entry per conversation")

        def again() -> None:
            self.push_epoch += 1

        self.loop.call_later(settle, again)

    def pushes_were_lost(self, users: list[str] | None,
                         why: str = "a peer could not reach it") -> None:
        """A peer dropped pushes meant for ``users`` here (None: it cannot say whom).

        Every session of those users reads what it missed from the store now, and
        takes none of its next pushes as the entry after its cursor without checking
        the store first, so a dropped entry is neither skipped nor left waiting for a
        later one.  With no names, every session connected now does the latter.
        """
        self.pushes_lost += 1
        if users is None:
            self.push_epoch += 1
            log.warning("pushes to this gateway were dropped (%s); "
                        "sessions check the store at their next entry per conversation", why)
            return
        sessions = 0
        for user in users:
            for session in self.table.sessions_of(user):
                session.push_epoch = PUSH_EPOCH_DISTRUSTED  # see Session.offer
                session.recheck()
                sessions += 1
        log.warning("pushes to this gateway were dropped (%s) for %d users; their %d "
                    "sessions here read what they missed from the store",
                    why, len(users), sessions)

    def event(self, users: Iterable[str], payload: dict[str, Any],
              skip: tuple[str, str] | None) -> None:
        """Send a droppable event to every local session of ``users``."""
        data = orjson.dumps(payload)
        for user in users:
            for session in self.table.sessions_of(user):
                if skip is not None and session.user == skip[0] and session.device == skip[1]:
                    continue
                if session.offer_event(data):
                    self.stats.delivered += 1
                else:
                    self.stats.dropped += 1

    # --------------------------------------------------------------- presence
    def on_session_bound(self, session: Session) -> None:
        """A session authenticated (the distributed gateway also registers it)."""
        if self.settings.feature_enabled("presence") and len(self.table.sessions_of(
                session.user)) == 1:
            self._presence_changed(session.user, True)

    async def before_resume(self, session: Session) -> None:
        """Runs before a session's resume (the cluster gateway waits for registration)."""

    def on_session_closed(self, session: Session) -> None:
        """A bound session went away."""
        remaining = [s for s in self.table.sessions_of(session.user) if s is not session]
        if not remaining:
            self.last_seen.note(session.user, time.time())
            if self.settings.feature_enabled("presence"):
                self._presence_changed(session.user, False)

    def _presence_changed(self, user: str, online: bool) -> None:
        """Tell the user's contacts, in the background (a droppable event)."""
        if self.router is None:
            return
        task = self.loop.create_task(self.router.presence(user, online))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def presence(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """A ``presence`` request's answer: :meth:`presence_of`, plus whatever this
        process must ask elsewhere (a worker of several asks its main process)."""
        return self.presence_of(users)

    def presence_of(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """user -> {"online": bool, "last_seen": epoch seconds or None}, as this process
        knows it."""
        result = {}
        for u in users:
            online = bool(self.table.sessions_of(u))
            result[u] = {"online": online, "last_seen": None if online else self.last_seen.get(u)}
        return result

    # ------------------------------------------------------------------ drain
    def request_drain(self, reason: str) -> None:
        """Drain everything this endpoint answers for: this process (a worker of several
        also has its supervisor drain the others)."""
        self.start_drain(reason)

    def start_drain(self, reason: str, deadline: float = 30.0) -> asyncio.Task[None]:
        """Begin draining (idempotent); returns the task that finishes it.

        A drain asked for another reason while the annotation's runs (the admin
        endpoint, SIGTERM) takes it over: removing the annotation no longer ends it.
        """
        if self._drain_task is None:
            self.draining = True
            self.drain_reason = reason
            self._drain_task = self.loop.create_task(self._drain(deadline))
        elif self.drain_reason == "annotation":
            self.drain_reason = reason
        return self._drain_task

    def end_drain(self, why: str) -> None:
        """Stop draining: clients not yet moved stay, new connections are taken again."""
        task, self._drain_task = self._drain_task, None
        if task is not None:
            task.cancel()
        self.draining = False
        self.drain_reason = ""
        log.warning("drain ended (%s): taking connections again", why)

    async def _drain(self, deadline: float) -> None:
        """Move clients off in stages so they do not all reconnect at once."""
        end = self.loop.time() + deadline
        sessions = list(self.table.iter_sessions())
        total = len(sessions)
        log.warning("draining gateway: %d sessions to move (%s)", total, self.drain_reason)
        stages = 10
        per_stage = max(1, -(-total // stages))
        pause = max(0.05, deadline / (stages * 2))
        for i in range(0, total, per_stage):
            for s in sessions[i:i + per_stage]:
                s.send_frame({"type": "reconnect", "reason": "draining",
                              "retry_after_ms": 100})
                s.close(CloseCode.DRAINING, "gateway draining: reconnect")
            self.coalescer.flush()
            if self.loop.time() + pause >= end:
                continue
            await asyncio.sleep(pause)
        for s in list(self.table.iter_sessions()):
            s.close(CloseCode.DRAINING, "gateway draining: reconnect")
        while len(self.table) and self.loop.time() < end:
            await asyncio.sleep(0.05)
        log.warning("drain finished: %d connections left", len(self.table))


class _Accept:
    """The listener factory of one connection: the gateway's, plus picows's protocol."""

    __slots__ = ("connection_log", "gateway", "protocol")

    def __init__(self, gateway: Gateway, connection_log: ConnectionLog | None) -> None:
        self.gateway = gateway
        self.connection_log = connection_log
        self.protocol: Any = None

    def __call__(self, request: WSUpgradeRequest) -> Any:
        protocol, self.protocol = self.protocol, None  # no cycle left after the handshake
        if self.connection_log is not None:
            self.connection_log.watch(protocol.transport)
            self.connection_log = None
        return self.gateway._listener_factory(request, protocol)


def _protocol_factory(gw: Gateway) -> Any:
    """A protocol factory for ``loop.create_server``, or None if this picows has none.

    Two things ``picows.ws_create_server`` cannot do: tell the listener factory
    the client address (the per-IP connect limit answers 429 before any
    upgrade), and give each connection a logger that can answer the peer's
    CLOSE when picows is about to fail the frame after it (frames.ConnectionLog).
    So the gateway builds picows's ``WSProtocol`` itself, with the arguments
    ``ws_create_server`` gives it, one :class:`_Accept` as listener factory and one
    :class:`~imfast.gateway.frames.ConnectionLog` as logger per connection.
    ``WSProtocol`` and its constructor are not public API: this is tried once
    at start-up and, if this picows differs, the gateway falls back to
    ``ws_create_server`` without the two (and says so).
    """
    try:
        from picows.picows import WSProtocol  # type: ignore[attr-defined]
    except ImportError:
        return None
    s = gw.settings
    picows_log = logging.getLogger("picows.server")

    def make() -> Any:
        connection_log = ConnectionLog(picows_log)
        accept = _Accept(gw, connection_log)
        protocol = WSProtocol(
            None, None, False,   # host+port, ws_path, is_client_side
            accept, connection_log,
            True,                # disconnect_on_exception
            s.auth_timeout,      # websocket_handshake_timeout
            False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE,  # no auto-ping
            False,               # enable_auto_pong: the frame layer answers pings, with a limit
            gw.max_frame_size,
            None,                # extra_headers
            _READ_BUFFER_INIT,
        )
        accept.protocol = protocol
        trim_read_buffer(protocol, _READ_BUFFER_INIT)  # nothing read yet: safe now only
        return protocol

    try:
        probe = make()
    except Exception:  # noqa: BLE001 - another picows: fall back, the caller logs it
        return None
    if not hasattr(probe, "transport"):
        return None
    return make


def _check_upgrade(request: WSUpgradeRequest) -> Any:
    """The answer to an upgrade picows would get wrong, or None (picows validates the rest).

    * ``Sec-WebSocket-Version`` other than 13: 426 naming 13 (RFC 6455 4.2.2); picows
      would also upgrade the draft versions 7 and 8;
    * ``Connection`` listing ``Upgrade`` among other tokens (Firefox sends
      ``keep-alive, Upgrade``): accepted as RFC 6455 4.2.1 asks; picows wants it alone.
    """
    headers = request.headers
    version = headers.get("Sec-WebSocket-Version")
    if version is not None and version.strip() != "13":
        return _json_response(426, {"error": "unsupported WebSocket version", "supported": "13"},
                              {"Sec-WebSocket-Version": "13"})
    connection = headers.get("Connection")
    if connection is not None and connection.strip().lower() != "upgrade" and "upgrade" in (
            token.strip().lower() for token in connection.split(",")):
        headers["Connection"] = "Upgrade"
    return None


def _drain_requested(path: str) -> bool | None:
    """Whether a downward-API annotations file says ``drain="true"``; None if it cannot
    be read (the kubelet rewrites it by a rename, so this is rare and passes)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.strip().partition("=")
                if key.strip() == "drain" and value.strip().strip('"').lower() == "true":
                    return True
    except OSError:
        return None
    return False


def _static(name: str) -> bytes | None:
    """A file shipped in imfast/gateway/static/, or None."""
    path = os.path.join(os.path.dirname(__file__), "static", name)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None
