"""One client connection speaking protocol v1 (see docs/protocol.md).

A :class:`Session` is created per accepted ``/ws`` upgrade and lives in the
gateway's :class:`~imfast._core.ConnectionTable`.  Its guarantees:

* it acts only as the identity of its verified token: a ``from`` field sent
  by the client is never read;
* frames are handled in arrival order; a send is reserved before the next
  frame is looked at, so one client's messages keep their order;
* deliveries reach the client in seq order per conversation with no gaps
  and no repeats within the session (:meth:`Session.offer` plus catch-up
  from the store); across reconnects the client may see an entry again only
  if it had not acknowledged it, and it carries the same ``seq``;
* when the client reads too slowly, droppable events are dropped first and
  chat entries wait in the store (caught up when the socket drains); past
  ``WRITE_BUFFER_LIMIT`` it is closed with 4002 (reconnect).

It keeps no timers or tasks while idle: timeouts live in the gateway's
timing wheel, and a task exists only while frames or catch-up are pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from imfast._core import decode_client_frame
from imfast._core.codec_py import is_cmid, is_request_id
from imfast.auth import AuthError, Identity
from imfast.backends.errors import BackendUnavailable
from imfast.gateway.frames import FramedListener
from imfast.protocol.codes import CloseCode, ImfastError, ProtocolError

if TYPE_CHECKING:
    from imfast.gateway.server import Gateway

__all__ = ["EchoSession", "Session"]

#: Largest frame that is decoded before the rate limit looks at it (an ``ack`` is ~60 bytes).
_FREE_ACK_MAX_BYTES = 256


def _cmid_of(frame: dict[str, Any]) -> str | None:
    """A send's ``cmid``, echoed in its answers (None for other frames)."""
    cmid = frame.get("cmid") if frame.get("type") == "send" else None
    return cmid if isinstance(cmid, str) else None


def _ids_of_refused(payload: bytes) -> dict[str, Any] | None:
    """``type``, ``id`` and ``cmid`` of a JSON object the codec refused, where they are
    themselves valid: its error then answers the request the client waits on (which
    of several pending sends was refused).  None if there is nothing to echo."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    asked: dict[str, Any] = {"type": obj.get("type")}
    rid, cmid = obj.get("id"), obj.get("cmid")
    if is_request_id(rid):  # the codec's own rules: what it would have taken
        asked["id"] = rid
    if is_cmid(cmid):
        asked["cmid"] = cmid
    return asked
#: Frames sent to im-service as casts when they carry no id (see Session._cast_now).
_CASTABLE = frozenset(("read", "typing"))

log = logging.getLogger("imfast.gateway")

PROTOCOL_VERSION = 1

#: Session.push_epoch values no gateway epoch has: the first push per conversation is
#: checked against the store - for the session's life, or until its recheck ends.
PUSH_EPOCH_DISTRUSTED = -1
PUSH_EPOCH_UNTIL_RECHECK = -2

#: Conversations with per-connection state before the idle ones are forgotten
#: (Session._forget_idle_convs): a few hundred KB per connection at most.
_CONV_STATE_TRIM = 1024


#: Log lines of a failed resume/catch-up, spelled out whole (the runbooks grep for them).
_SYNC_BUSY = {"resume": "resume failed user_id=%s device=%s: %s",
              "catch-up": "catch-up failed user_id=%s device=%s: %s"}
_SYNC_BUG = {"resume": "resume failed user_id=%s device=%s",
             "catch-up": "catch-up failed user_id=%s device=%s"}


class Session(FramedListener):
    """A chat client connection; see the module docstring."""

    __slots__ = (
        "ack_claims",
        "acked",
        "behind",
        "bound",
        "catching",
        "catchup",
        "dev_device",
        "dev_user",
        "device",
        "errors",
        "expires_at",
        "gw",
        "identity",
        "inbox",
        "last_seen",
        "out",
        "own_acks",
        "pinged",
        "push_epoch",
        "pushed",
        "query_token",
        "resuming",
        "timer_at",
        "tokens",
        "tokens_ts",
        "trim_at",
        "unacked_since",
        "user",
        "waiting",
        "worker",
        "writable",
    )

    def __init__(self, gw: Gateway, query_token: str | None = None,
                 dev_user: str | None = None, dev_device: str | None = None) -> None:
        super().__init__(gw.settings.max_frame_bytes)
        self.gw = gw
        # Pushes lost before this gateway learnt of it (Gateway.push_epoch moved on, or
        # this is -1: Gateway.pushes_were_lost) make the first push of a conversation
        # untrustworthy as "the next entry": see offer().
        self.push_epoch = gw.push_epoch
        self.user = ""
        self.device = ""
        self.bound = False
        self.out: list[bytes] | None = None
        self.identity: Identity | None = None
        self.expires_at = 0.0
        self.last_seen = gw.now
        self.pushed: dict[str, int] | None = None  # conv -> last seq sent (active convs only)
        self.acked: dict[str, int] | None = None  # conv -> last seq the client acknowledged
        self.unacked_since = 0.0  # when the oldest unacknowledged push happened (0: none)
        # A superset of the convs in ``acked`` with pushes beyond it, so that an ack
        # looks at those, not at every conversation this connection was ever pushed.
        self.waiting: set[str] | None = None
        self.timer_at = 0.0  # deadline of the wheel entry that counts
        self.own_acks: dict[str, int] | None = None  # cursor moves for our own messages
        self.ack_claims: dict[str, int] | None = None  # conv -> highest seq an ack frame named
        self.behind: set[str] | None = None  # convs to catch up from the store
        self.trim_at = _CONV_STATE_TRIM  # len(pushed) at which idle convs are forgotten
        self.catching: str | None = None  # the conv the catch-up is reading now
        self.resuming: set[str] | None = None  # convs offered while resuming
        self.inbox: list[dict[str, Any]] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.catchup: asyncio.Task[None] | None = None
        self.errors = 0
        self.tokens = float(gw.settings.rate_burst)
        self.tokens_ts = gw.now
        self.writable: asyncio.Event | None = None  # set while paused by the transport
        self.pinged = False
        self.query_token = query_token
        self.dev_user = dev_user
        self.dev_device = dev_device

    # ------------------------------------------------------------ lifecycle
    def on_ws_connected(self, transport: Any) -> None:
        super().on_ws_connected(transport)
        gw = self.gw
        gw.table.add(self)
        gw.stats.connections_opened += 1
        if self.query_token is not None:
            self._authenticate(self.query_token, None)
        elif self.dev_user is not None:
            try:
                self._bind(gw.verifier.dev_identity(self.dev_user, self.dev_device), None)
            except AuthError as exc:
                self._auth_failed(str(exc), None)
        else:
            gw.wheel.schedule(self, gw.now + gw.settings.auth_timeout)

    def on_ws_disconnected(self, transport: Any) -> None:
        self.closed = True
        gw = self.gw
        self.flush_own_acks()
        if self.bound:
            gw.on_session_closed(self)
        gw.table.remove(self)
        for task in (self.worker, self.catchup):
            if task is not None and not task.done():
                task.cancel()
        if self.writable is not None:
            self.writable.set()

    def on_activity(self) -> None:
        self.last_seen = self.gw.now
        self.pinged = False

    def now(self) -> float:
        return self.gw.now

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.Event()
        else:
            self.writable.clear()

    def resume_writing(self) -> None:
        if self.writable is not None:
            self.writable.set()
        if self.behind and (self.catchup is None or self.catchup.done()):
            self._start_catchup()

    def check_timers(self, now: float) -> None:
        """Called by the gateway's wheel when a deadline of this session passed."""
        if self.closed or (self.timer_at and now + 1.0 < self.timer_at):
            return  # closed, or a superseded wheel entry: the current one comes later
        self.timer_at = 0.0
        settings = self.gw.settings
        if self.identity is None:
            self.close(CloseCode.AUTH_TIMEOUT, "not authenticated within AUTH_TIMEOUT")
            return
        if self.expires_at and now >= self.expires_at:
            self.close(CloseCode.TOKEN_EXPIRED, "token expired; reconnect with a fresh token")
            return
        idle = now - self.last_seen
        if idle >= settings.heartbeat_timeout:
            self.close(CloseCode.HEARTBEAT_TIMEOUT, "no traffic within HEARTBEAT_TIMEOUT")
            return
        if idle >= settings.heartbeat_timeout / 2 and not self.pinged:
            # A WebSocket ping: browsers and wscat answer it by themselves.
            self.pinged = True
            self.transport.send_ping(b"hb")
        if self.unacked_since and now - self.unacked_since >= settings.ack_timeout:
            self._retransmit()
        self._schedule_timer()

    def _deadline(self, exp: float) -> float:
        """A token's ``exp`` (epoch seconds) on the gateway's loop clock; 0: never."""
        return self.gw.now + (exp - time.time()) if exp else 0.0

    def _schedule_timer(self) -> None:
        """Make sure the wheel calls us by the earliest of our deadlines."""
        settings = self.gw.settings
        half = settings.heartbeat_timeout / 2
        deadline = self.last_seen + (settings.heartbeat_timeout if self.pinged else half)
        if self.expires_at:
            deadline = min(deadline, self.expires_at)
        if self.unacked_since:
            deadline = min(deadline, self.unacked_since + settings.ack_timeout)
        deadline = max(deadline, self.gw.now + 1.0)
        if self.timer_at and self.timer_at <= deadline:
            return
        self.timer_at = deadline
        self.gw.wheel.schedule(self, deadline)

    def _retransmit(self) -> None:
        """Send again, from the stored cursor, every conversation with unacknowledged pushes."""
        pushed, acked = self.pushed or {}, self.acked or {}
        late = [c for c, seq in pushed.items() if seq > acked.get(c, seq)]
        self.unacked_since = 0.0
        if not late:
            return
        self.gw.stats.retransmits += 1
        log.info("retransmitting unacknowledged entries user_id=%s device=%s convs=%d",
                 self.user, self.device, len(late))
        behind = self.behind if self.behind is not None else set()
        self.behind = behind
        for conv in late:
            del pushed[conv]  # catch-up restarts from the stored cursor
            acked.pop(conv, None)
            behind.add(conv)
        if self.catchup is None or self.catchup.done():
            self._start_catchup()

    def _note_pushed(self, conv: str, before: int) -> None:
        """Track acknowledgements for a conversation that just got a push."""
        acked = self.acked
        if acked is None:
            acked = self.acked = {}
        acked.setdefault(conv, before)
        self._wait_for(conv)
        if not self.unacked_since:
            self.unacked_since = self.gw.now
            self._schedule_timer()

    # -------------------------------------------------------------- output
    def send_frame(self, obj: dict[str, Any]) -> None:
        """Queue one server frame (coalesced with others in this loop iteration)."""
        if not self.closed:
            self.gw.coalescer.push(self, orjson.dumps(obj))

    def send_error(self, code: str, message: str, field: str | None = None,
                   rid: Any = None, cmid: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if field is not None:
            frame["field"] = field
        if rid is not None:
            frame["id"] = rid
        if cmid is not None:
            frame["cmid"] = cmid
        self.gw.stats.errors[code] = self.gw.stats.errors.get(code, 0) + 1
        self.send_frame(frame)

    def close(self, code: int, reason: str) -> None:
        """Flush queued frames, then close with ``code``."""
        if self.closed:
            return
        out = self.out
        if out is not None and self.raw is not None:
            # The coalescer will skip us once closed: write what is queued first.
            self.out = []
            self.raw.write(b"".join(out))
        self.gw.stats.closes[int(code)] = self.gw.stats.closes.get(int(code), 0) + 1
        if self.user:
            log.info("closing connection user_id=%s device=%s code=%s reason=%s",
                     self.user, self.device, int(code), reason)
        self.fail(code, reason)

    def fail(self, code: int, reason: str) -> None:
        if not self.closed and self.out:
            self.raw.write(b"".join(self.out))
            self.out = []
        super().fail(code, reason)

    # ------------------------------------------------------------- delivery
    def offer(self, conv: str, seq: int, payload: bytes, silent: bool = False) -> bool:
        """A stored entry for this device; True if it was pushed now.

        Pushed only if it is the next in order; otherwise the conversation is
        caught up from the store (which then pushes it).
        """
        if self.closed:
            return False
        if self.resuming is not None:
            self.resuming.add(conv)
            return False
        behind = self.behind
        if (behind and conv in behind) or conv == self.catching:
            # Waiting for, or under, a catch-up from the store: it brings this entry in
            # order.  ``pushed`` may not know the device's cursor here (a retransmit
            # forgot it), so nothing is assumed from it.
            self._fall_behind(conv)
            return False
        pushed = self.pushed
        if pushed is None:
            pushed = self.pushed = {}
        last = pushed.get(conv)
        caught_up = last is None  # nothing pushed here since the resume: cursor == seq - 1
        if last is None:
            if len(pushed) >= self.trim_at:
                self._forget_idle_convs()
            if self.push_epoch != self.gw.push_epoch:
                # Pushes to this gateway were dropped since we connected (or may have
                # gone elsewhere, or arrived out of order, or we forgot this
                # conversation): this entry may not follow the device's cursor.
                # Catch up from the store (it pushes this entry too, after any the
                # device missed) - for our own entry as well: taking it as the next
                # would hide an entry lost before it.
                self._fall_behind(conv)
                return False
            last = seq - 1
        if seq <= last:
            return False
        if seq > last + 1 or (
            not silent and self.raw.get_write_buffer_size() > self.gw.settings.write_buffer_high
        ):
            pushed[conv] = last
            self._fall_behind(conv)
            return False
        pushed[conv] = seq
        if silent:
            # Our own message: nothing for the client to acknowledge.  When the device had
            # acknowledged everything before it, its cursor moves past it too, so a later
            # resume does not send the device its own messages.
            if self.acked is not None and self.acked.get(conv) == last:
                self.acked[conv] = seq
                caught_up = True
            elif self.acked is not None and conv in self.acked:
                self._wait_for(conv)  # earlier pushes are still unacknowledged
            if caught_up and not self.gw.router_moves_own_cursors:
                self._advance_own(conv, seq)
            return False
        self._note_pushed(conv, last)
        self.gw.coalescer.push(self, payload)
        return True

    def _forget_idle_convs(self) -> None:
        """Drop the per-conversation state of conversations with nothing unacknowledged.

        A long-lived connection (a support bot, a token refreshed for weeks) would
        otherwise keep ``pushed``/``acked``/``ack_claims`` entries for every
        conversation it was ever pushed in.  A conversation is forgotten only where
        the device acknowledged what was pushed (or was pushed only its own
        entries) and no catch-up wants it.  Its next entry cannot be checked against
        what was pushed any more, so from then on this session checks each
        conversation's first push against the store (``push_epoch``): one read per
        conversation, only for connections this large.  Runs when a new
        conversation would pass ``trim_at``; that then doubles past what is left,
        so a connection whose conversations are all busy does not scan each time.
        """
        pushed = self.pushed
        assert pushed is not None
        acked = self.acked if self.acked is not None else {}
        claims = self.ack_claims if self.ack_claims is not None else {}
        busy = self.behind or ()
        catching = self.catching
        idle = [c for c, seq in pushed.items()
                if acked.get(c, seq) == seq and c not in busy and c != catching]
        for conv in idle:
            del pushed[conv]
            acked.pop(conv, None)
            claims.pop(conv, None)
        if self.waiting is not None:
            self.waiting.difference_update(idle)
        if idle:
            # What arrives out of order in a forgotten conversation has no ``pushed``
            # to be found out by: its first entry is checked against the store.
            self.push_epoch = PUSH_EPOCH_DISTRUSTED
        self.trim_at = max(_CONV_STATE_TRIM, 2 * len(pushed))

    def _advance_own(self, conv: str, seq: int) -> None:
        """Move the stored cursor past our own message (batched: at most once a second)."""
        own = self.own_acks
        if own is None:
            own = self.own_acks = {}
            self.gw.loop.call_later(1.0, self.flush_own_acks)
        own[conv] = seq

    def flush_own_acks(self) -> None:
        """Write the batched cursor moves (also called when the connection closes)."""
        own, self.own_acks = self.own_acks, None
        if not own or not self.user:
            return
        remote = self.gw.remote_router
        if remote is not None:
            for conv, seq in list(own.items()):
                if remote.cast("own_ack", [self.user, self.device, conv, seq]):
                    del own[conv]
        router = self.gw.router
        for conv, seq in own.items():
            task = self.gw.loop.create_task(router.ack(self.user, self.device, conv, seq))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def offer_event(self, payload: bytes) -> bool:
        """A droppable event: sent unless the client is behind on reading."""
        if self.closed or self.identity is None:
            return False
        if self.raw.get_write_buffer_size() > self.gw.settings.write_buffer_high:
            return False
        self.gw.coalescer.push(self, payload)
        return True

    def _fall_behind(self, conv: str) -> None:
        if self.behind is None:
            self.behind = set()
        self.behind.add(conv)
        if self.raw.get_write_buffer_size() > self.gw.settings.write_buffer_limit:
            self.gw.stats.slow_consumers += 1
            self.close(CloseCode.SLOW_CONSUMER, "client reads too slowly; reconnect to resume")
            return
        if self.catchup is None or self.catchup.done():
            self._start_catchup()

    def _start_catchup(self) -> None:
        self.catchup = self.gw.loop.create_task(self._catch_up())

    async def _wait_writable(self) -> None:
        """Wait until the client has read enough; close it (4002) if it stalls too long."""
        limit = self.gw.settings.write_buffer_high
        stall_limit = self.gw.settings.write_stall_timeout
        started = self.gw.loop.time()
        while not self.closed and self.raw.get_write_buffer_size() > limit:
            if self.gw.loop.time() - started > stall_limit:
                self.gw.stats.slow_consumers += 1
                self.close(CloseCode.SLOW_CONSUMER, "client stopped reading; reconnect to resume")
                return
            if self.writable is None:
                self.writable = asyncio.Event()
            self.writable.clear()
            try:
                await asyncio.wait_for(self.writable.wait(), 1.0)
            except TimeoutError:
                pass

    async def _catch_up(self) -> None:
        """Push stored entries of every conversation in ``behind`` until none is left."""
        router = self.gw.router
        page_max = self.gw.settings.sync_page_max
        try:
            while self.behind and not self.closed:
                conv = self.behind.pop()
                self.catching = conv  # entries routed meanwhile wait for this pass
                pushed = self.pushed if self.pushed is not None else {}
                self.pushed = pushed
                after = pushed.get(conv)
                if after is None:
                    after = await router.cursor(self.user, self.device, conv)
                    holds = after  # the device holds every entry up to here
                else:
                    holds = self.acked.get(conv, after) if self.acked is not None else after
                while not self.closed:
                    await self._wait_writable()
                    try:
                        page = await router.fetch(self.user, conv, after, page_max)
                    except ImfastError:
                        break  # no longer a member: nothing to deliver
                    for m in page:
                        if m.seq > after and m.sender == self.user \
                                and m.sender_device == self.device:
                            # Our own entry: never pushed back (the device got `sent`),
                            # as on offer's silent path; right after all the device
                            # holds, its cursor steps past it.
                            if holds == after:
                                holds = m.seq
                                if self.acked is not None and conv in self.acked:
                                    self.acked[conv] = m.seq
                                if not self.gw.router_moves_own_cursors:
                                    self._advance_own(conv, m.seq)
                            elif self.acked is not None and conv in self.acked:
                                self._wait_for(conv)  # earlier pushes still unacknowledged
                            after = m.seq
                            continue
                        if m.seq > after:
                            if self.acked is None or conv not in self.acked:
                                self._note_pushed(conv, after)
                            else:
                                self._wait_for(conv)
                            self.gw.coalescer.push(self, self.gw.encode_entry(m))
                            after = m.seq
                    pushed[conv] = after
                    if len(page) < page_max:
                        break
                self.catching = None
            if not self.behind:
                self.behind = None
            if self.catchup is asyncio.current_task() and self.resuming is None:
                self.catchup = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure closes; _sync_failed sorts them
            self._sync_failed("catch-up", exc)

    def _sync_failed(self, what: str, exc: Exception) -> None:
        """Close after a failed resume or catch-up; nothing is lost (the device resumes).

        The router or a backend not answering in time (overload, outage) is not a bug:
        1013 TRY_AGAIN_LATER tells the client to reconnect after a back-off, with one
        warning line; anything else is 1011 with its traceback.
        """
        if isinstance(exc, BackendUnavailable) or (
                isinstance(exc, ImfastError) and exc.code == "unavailable"):
            log.warning(_SYNC_BUSY[what], self.user, self.device, exc)
            self.close(CloseCode.TRY_AGAIN_LATER, f"server busy during {what}; reconnect later")
            return
        log.error(_SYNC_BUG[what], self.user, self.device, exc_info=exc)
        self.close(CloseCode.INTERNAL_ERROR, f"internal error during {what}; reconnect")

    def recheck(self) -> None:
        """Look for entries committed but not pushed (e.g. routed before we were visible)."""
        if not self.closed and self.identity is not None:
            self.gw.loop.create_task(self._recheck())

    async def _recheck(self) -> None:
        async with self.gw.recheck_slots:  # a resync may ask thousands of sessions at once
            if self.closed:
                return
            epoch = self.gw.push_epoch  # what the plan below covers
            try:
                plan = await self.gw.router.resume_plan(self.user, self.device)
            except Exception:  # noqa: BLE001 - best effort; the next entry heals too
                return
        if self.push_epoch == PUSH_EPOCH_UNTIL_RECHECK:
            # Every entry stored before the plan was read is in it or acknowledged; later
            # ones are routed here (unless the gateway's epoch moved on meanwhile).
            self.push_epoch = epoch
        pushed = self.pushed if self.pushed is not None else {}
        self.pushed = pushed
        behind = self.behind if self.behind is not None else set()
        self.behind = behind
        for conv, cursor, latest in plan:
            if latest > pushed.setdefault(conv, cursor):
                behind.add(conv)
        if behind and (self.catchup is None or self.catchup.done()):
            self._start_catchup()

    async def _resume(self) -> None:
        """After auth: push everything this device has not acknowledged."""
        router = self.gw.router
        if self.resuming is None:
            self.resuming = set()  # (set by _bind, before the table could find us)
        try:
            await self.gw.before_resume(self)
            plan = await router.resume_plan(self.user, self.device)
        except Exception as exc:  # noqa: BLE001 - any failure closes; _sync_failed sorts them
            self.resuming = None
            self._sync_failed("resume", exc)
            return
        if plan:  # idle sessions keep no per-conversation state at all
            pushed = self.pushed if self.pushed is not None else {}
            self.pushed = pushed
            behind = self.behind if self.behind is not None else set()
            self.behind = behind
            for conv, cursor, _latest in plan:
                pushed[conv] = cursor
                behind.add(conv)
            await self._catch_up()
        # Entries offered while we were reading the store: catch them up too.
        while self.resuming and not self.closed:
            if self.behind is None:
                self.behind = set()
            self.behind.update(self.resuming)
            self.resuming = set()
            await self._catch_up()
        self.resuming = None
        if not self.closed:
            self.send_frame({"type": "resumed", "conversations": len(plan)})
        if self.catchup is asyncio.current_task():
            self.catchup = None  # drop the finished task (memory per idle connection)

    # --------------------------------------------------------------- input
    def on_message(self, payload: bytes, is_text: bool, validated: bool) -> None:
        gw = self.gw
        gw.stats.frames_in += 1
        # Small frames are decoded first, so that an ack of what we pushed can go free;
        # anything larger is counted before it costs a decode.
        if not (is_text and len(payload) <= _FREE_ACK_MAX_BYTES) and not self._rate_ok():
            return
        if not is_text:
            # Reserved for a compact encoding negotiated by Sec-WebSocket-Protocol.
            self._protocol_error(ProtocolError(
                "binary frames are not enabled on this connection; send JSON text",
                code="bad_json"), None)
            return
        try:
            frame = decode_client_frame(payload, gw.settings.max_body_bytes)
        except ProtocolError as exc:
            asked = _ids_of_refused(payload) if exc.code != "bad_json" else None
            if len(payload) <= _FREE_ACK_MAX_BYTES and not self._rate_ok():
                return
            if is_text and not validated and exc.code == "bad_json":
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    self.close(CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8")
                    return
            self._protocol_error(exc, asked)
            return
        if len(payload) <= _FREE_ACK_MAX_BYTES and not self._acks_a_push(frame) \
                and not self._rate_ok():
            return
        if self.inbox is None:
            # Nothing queued before it: a send, ack, read or typing the in-process
            # router can take without waiting is handled in this call (no task), and
            # so is one the link to im-service can queue at once (its answer comes
            # back as a callback); anything else, or anything behind a queued frame,
            # goes through the inbox in order.
            ftype = frame["type"]
            if (gw.local_router is not None or gw.remote_router is not None) and \
                    self.identity is not None and not self.closed and (
                    self._send_now(frame) if ftype == "send" else
                    self._ack_now(frame) if ftype == "ack" else
                    ftype in _CASTABLE and self._cast_now(frame)):
                return
            self.inbox = [frame]
            self.worker = gw.loop.create_task(self._drain_inbox())
        else:
            self.inbox.append(frame)

    def _acks_a_push(self, frame: dict[str, Any]) -> bool:
        """True for an ``ack`` that moves past entries this connection pushed (it costs no token).

        A client that acknowledges every entry of a long resume would otherwise
        be rate limited, then closed with 4503 - a terminal code - for doing what
        the protocol asks.  Free acks are bounded by the entries pushed: each
        must name a higher seq than any ack before it in that conversation.
        """
        if frame.get("type") != "ack" or self.pushed is None:
            return False
        conv, seq = frame.get("conv"), frame.get("seq")
        if not isinstance(conv, str) or not isinstance(seq, int):
            return False
        last = self.pushed.get(conv)
        if last is None or seq > last:
            return False
        claims = self.ack_claims
        if claims is None:
            claims = self.ack_claims = {}
        floor = claims.get(conv)
        if floor is None:
            floor = self.acked.get(conv, 0) if self.acked is not None else 0
        if seq <= floor:
            return False
        claims[conv] = seq
        return True

    def _rate_ok(self) -> bool:
        """Take a token for a frame; False (answered ``rate_limited``) if none is left.

        The error names no frame (no ``id``, no ``cmid``): clients resend whatever is
        still unanswered, and SDKs released before 2026-11-28 fail a send whose
        ``cmid`` an error names, where they retry on a ``rate_limited`` naming none.
        """
        settings = self.gw.settings
        now = self.gw.now
        tokens = min(float(settings.rate_burst),
                     self.tokens + (now - self.tokens_ts) * settings.rate_msgs_per_sec)
        self.tokens_ts = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens - 1.0
        if self.tokens < -float(settings.rate_burst):
            self.close(CloseCode.RATE_LIMITED, "rate limit exceeded repeatedly")
        else:
            self.send_error("rate_limited", "too many frames; slow down")
        return False

    def _protocol_error(self, exc: ImfastError, frame: dict[str, Any] | None) -> None:
        self.errors += 1
        rid = frame.get("id") if frame is not None else None
        cmid = _cmid_of(frame) if frame is not None else None
        self.send_error(exc.code, exc.message, exc.field, rid, cmid)
        if self.errors >= self.gw.settings.max_errors:
            self.close(CloseCode.TOO_MANY_ERRORS, "too many bad frames")

    async def _drain_inbox(self) -> None:
        try:
            while self.inbox and not self.closed:
                frame = self.inbox.pop(0)
                try:
                    await self._handle(frame)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - _failed answers (and logs) it
                    self._failed(frame, exc)
        finally:
            self.inbox = None
            self.worker = None

    def _failed(self, frame: dict[str, Any], exc: Exception) -> None:
        """Answer a frame whose handling raised ``exc`` (the same on every path)."""
        if isinstance(exc, ImfastError):
            if exc.code == "unavailable":  # ours, not the client's: not counted
                self.send_error(exc.code, exc.message, exc.field, frame.get("id"),
                                frame.get("cmid") if frame["type"] == "send" else None)
            else:
                self._protocol_error(exc, frame)
        elif isinstance(exc, BackendUnavailable):  # ours, passing: the client retries
            log.warning("%s user_id=%s: %s", frame.get("type"), self.user, exc)
            self.send_error("unavailable", f"{exc}; retry", rid=frame.get("id"))
        else:
            log.error("error handling %s user_id=%s", frame.get("type"), self.user,
                      exc_info=exc)
            self.gw.stats.internal_errors += 1
            self.send_error("internal", "internal error", rid=frame.get("id"))

    def _send_now(self, frame: dict[str, Any]) -> bool:
        """A ``send`` taken in this call; False: not taken.

        One the in-process router can reserve without a read (a private one, or
        to a group whose members it holds), or any queued on the link to
        im-service (which keeps the order frames were read in).  The same
        reservation, order and answers as :meth:`_on_send`: the entry is
        reserved (or its request queued) before the next frame is looked at,
        and ``sent`` (or an error) goes out once it is durable.
        """
        to = frame.get("to")
        router = self.gw.local_router or self.gw.remote_router
        if router is None:
            return False
        cmid = frame["cmid"]
        try:
            reply = self._send_reply(cmid, frame.get("id"), time.monotonic())
            if to is None:
                return bool(router.send_group_now(self.user, self.device, cmid,
                                                  frame["group"], frame["body"], reply))
            return router.send_now(self.user, self.device, cmid, to, frame["body"], reply)
        except Exception as exc:  # noqa: BLE001 - _failed answers (and logs) it
            self._failed(frame, exc)
            return True

    def _ack_now(self, frame: dict[str, Any]) -> bool:
        """An ``ack`` taken in this call; False: not taken.

        The in-process router moves the cursor now; over the link the request is
        queued now (in frame order) and ``acked`` or the error goes out when
        im-service answers.
        """
        router = self.gw.local_router
        if router is None:
            remote = self.gw.remote_router
            if remote is None:
                return False
            conv, seq = frame["conv"], frame["seq"]
            pushed = self.pushed
            # Nobody waits for the answer of an ack with no id of what this connection
            # was pushed: a cast, and the bookkeeping moves now (a failure still comes
            # back as the error frame).  Anything else (an id, a seq from a sync page)
            # waits for the cursor im-service answers.
            if "id" not in frame and pushed is not None and seq <= pushed.get(conv, 0) and \
                    remote.cast("ack", [self.user, self.device, conv, seq]):
                self._acked(frame, None, seq)
                return True
            remote.ack_with(self.user, self.device, conv, seq, partial(self._remote_acked, frame))
            return True
        try:
            # Without an id nobody is told the cursor: _acked's bookkeeping needs only a
            # lower bound, so the store may skip reading a cursor it no longer holds.
            cursor = router.ack_now(self.user, self.device, frame["conv"], frame["seq"],
                                    exact="id" in frame)
        except Exception as exc:  # noqa: BLE001 - _failed answers (and logs) it
            self._failed(frame, exc)
            return True
        if cursor is None:
            return False
        self._acked(frame, frame.get("id"), cursor)
        return True

    async def _handle(self, frame: dict[str, Any]) -> None:
        ftype = frame["type"]
        rid = frame.get("id")
        if ftype == "ping":
            reply: dict[str, Any] = {"type": "pong"}
            if rid is not None:
                reply["id"] = rid
            self.send_frame(reply)
            return
        if self.identity is None:
            if ftype == "auth":
                self._authenticate(frame["token"], rid)
                return
            raise ImfastError("authenticate first", code="not_authenticated")
        handler = _HANDLERS.get(ftype)
        if handler is None:
            if ftype == "auth":
                raise ImfastError("already authenticated", code="already_authenticated")
            raise ImfastError(f"{ftype} is not available", code="unknown_type")
        await handler(self, frame, rid)

    # ----------------------------------------------------------------- auth
    def _authenticate(self, token: str, rid: Any) -> None:
        self.query_token = None
        try:
            identity = self.gw.verifier.verify(token)
        except AuthError as exc:
            self._auth_failed(str(exc), rid)
            return
        self._bind(identity, rid)

    def _auth_failed(self, reason: str, rid: Any) -> None:
        self.gw.stats.auth_failures += 1
        log.info("authentication failed: %s", reason)
        self.send_error("auth_failed", reason, rid=rid)
        code = CloseCode.TOKEN_EXPIRED if reason == "token expired" else CloseCode.AUTH_FAILED
        self.close(code, reason)

    def _too_many_devices(self, identity: Identity) -> bool:
        """True if binding would pass MAX_DEVICES_PER_USER (a reconnecting device replaces)."""
        limit = self.gw.settings.max_devices_per_user
        if not limit:
            return False
        others = self.gw.table.sessions_of(identity.user)
        if len(others) < limit:
            return False
        return not any(s.device == identity.device for s in others)

    def _bind(self, identity: Identity, rid: Any) -> None:
        gw = self.gw
        self.dev_user = self.dev_device = None
        if self._too_many_devices(identity):
            limit = gw.settings.max_devices_per_user
            gw.stats.refused["devices_per_user"] = gw.stats.refused.get("devices_per_user", 0) + 1
            log.info("connection refused: too many devices user_id=%s device=%s limit=%d",
                     identity.user, identity.device, limit)
            self.send_error("too_many_devices",
                            f"{identity.user} already has {limit} devices connected "
                            "(MAX_DEVICES_PER_USER); disconnect one first", rid=rid)
            self.close(CloseCode.TOO_MANY_DEVICES, "too many devices connected for this user")
            return
        self.identity = identity
        self.expires_at = self._deadline(identity.expires_at)
        # Resuming from the moment the table can find us: an entry routed before the
        # resume task's first step (its callback already queued) waits for the resume,
        # instead of going out ahead of the older entries the resume brings.
        self.resuming = set()
        replaced = gw.table.bind(self, identity.user, identity.device)
        if replaced is not None:
            replaced.close(CloseCode.REPLACED, "this device connected again")
        gw.on_session_bound(self)
        log.info("user connected user_id=%s device=%s", self.user, self.device)
        welcome: dict[str, Any] = {
            "type": "welcome", "protocol": PROTOCOL_VERSION, "user": self.user,
            "device": self.device, "server": gw.settings.display_hostname,
            "heartbeat": gw.settings.heartbeat_timeout,
            "limits": {"max_body_bytes": gw.settings.max_body_bytes,
                       "sync_page_max": gw.settings.sync_page_max},
        }
        if rid is not None:
            welcome["id"] = rid
        self.send_frame(welcome)
        self._schedule_timer()
        self.catchup = gw.loop.create_task(self._resume())

    # ------------------------------------------------------------- handlers
    def _send_reply(self, cmid: str, rid: Any, started: float) -> Any:
        """The callback that answers one send: ``sent``, or the error it ended with."""
        def reply(result: Any, exc: BaseException | None) -> None:
            if exc is None:
                ack: dict[str, Any] = {"type": "sent", "cmid": cmid, "msg_id": result.msg_id,
                                       "conv": result.conv, "seq": result.seq, "ts": result.ts}
                if rid is not None:
                    ack["id"] = rid
                if result.duplicate:
                    ack["duplicate"] = True
                self.send_frame(ack)
                self.gw.stats.send_ack.observe(time.monotonic() - started)
            elif isinstance(exc, ImfastError):
                self.send_error(exc.code, exc.message, exc.field, rid, cmid)
            else:  # pragma: no cover - the router wraps every failure
                self.send_error("internal", "internal error", rid=rid, cmid=cmid)

        return reply

    async def _on_send(self, frame: dict[str, Any], rid: Any) -> None:
        cmid = frame["cmid"]
        reply = self._send_reply(cmid, rid, time.monotonic())
        pending = await self.gw.router.submit_send(
            self.user, self.device, cmid, frame.get("to"), frame.get("group"), frame["body"])
        if not isinstance(pending, asyncio.Future):
            reply(pending, None)
            return
        # The next frame is handled while this one is being stored (pipelining);
        # reservations, and therefore seqs, keep the client's order.
        def done(f: asyncio.Future[Any]) -> None:
            exc = f.exception()
            reply(None if exc is not None else f.result(), exc)

        pending.add_done_callback(done)

    def _cast_now(self, frame: dict[str, Any]) -> bool:
        """A ``read`` or ``typing`` taken in this call; False: not taken.

        The in-process router takes it when it needs no read of the store
        (``read_now`` / ``typing_now``), answering as :meth:`_on_read` and
        :meth:`_on_typing` do.  Over the link, one with no id is sent to
        im-service as a cast: nothing is answered on success (a ``read`` with
        an id gets ``read_ok`` and takes the inbox), a failure comes back as
        the error frame (:meth:`cast_failed`).
        """
        router = self.gw.local_router
        if router is not None:
            try:
                if frame["type"] == "read":
                    taken = router.read_now(self.user, self.device, frame["conv"], frame["seq"])
                    if taken:
                        self._read_ok(frame, frame.get("id"))
                    return taken
                return router.typing_now(self.user, self.device, frame["conv"])
            except Exception as exc:  # noqa: BLE001 - _failed answers (and logs) it
                self._failed(frame, exc)
                return True
        remote = self.gw.remote_router
        if remote is None or "id" in frame:
            return False
        if frame["type"] == "read":
            args = [self.user, self.device, frame["conv"], frame["seq"]]
        else:
            args = [self.user, self.device, frame["conv"]]
        return bool(remote.cast(frame["type"], args))

    def cast_failed(self, method: str, args: list[Any], exc: ImfastError) -> None:
        """im-service's report that a cast of this session failed: its error frame."""
        if self.closed:
            return
        frame: dict[str, Any] = {"type": method, "conv": args[2]}
        if len(args) > 3:
            frame["seq"] = args[3]
        self._failed(frame, exc)

    def _remote_acked(self, frame: dict[str, Any], cursor: int | None,
                      exc: BaseException | None) -> None:
        """im-service's answer to an ack queued by :meth:`_ack_now`."""
        if self.closed:
            return
        if exc is not None:
            self._failed(frame, exc)  # type: ignore[arg-type]
        else:
            self._acked(frame, frame.get("id"), cursor)  # type: ignore[arg-type]

    async def _on_ack(self, frame: dict[str, Any], rid: Any) -> None:
        cursor = await self.gw.router.ack(self.user, self.device, frame["conv"], frame["seq"])
        self._acked(frame, rid, cursor)

    def _wait_for(self, conv: str) -> None:
        """Note that ``conv`` (in ``acked``) may now have pushes beyond its acknowledgement."""
        waiting = self.waiting
        if waiting is None:
            waiting = self.waiting = set()
        waiting.add(conv)

    def _still_waiting(self) -> bool:
        """True if some conversation has pushes not acknowledged yet.

        Conversations found acknowledged on the way are dropped from ``waiting``: an
        ack looks at the first one still waiting plus those it drops, not at every
        conversation the connection was ever pushed.
        """
        waiting = self.waiting
        if not waiting:
            return False
        pushed, acked = self.pushed or {}, self.acked or {}
        done = []
        found = False
        for c in waiting:
            a = acked.get(c)
            if a is not None and pushed.get(c, 0) > a:
                found = True
                break
            done.append(c)
        waiting.difference_update(done)
        if not waiting:
            self.waiting = None  # a connection that has caught up keeps no set
        return found

    def _acked(self, frame: dict[str, Any], rid: Any, cursor: int) -> None:
        """Bookkeeping once an ack moved the stored cursor to ``cursor``; ``acked`` reply."""
        acked = self.acked
        conv = frame["conv"]
        if acked is not None and conv in acked:
            acked[conv] = max(acked[conv], cursor)
            # Progress: restart the clock while anything pushed is unacknowledged.
            self.unacked_since = self.gw.now if self._still_waiting() else 0.0
        if rid is not None:
            self.send_frame({"type": "acked", "id": rid, "conv": conv, "seq": cursor})

    async def _on_sync(self, frame: dict[str, Any], rid: Any) -> None:
        router = self.gw.router
        limit = min(frame.get("limit") or self.gw.settings.sync_page_max,
                    self.gw.settings.sync_page_max)
        conv = frame.get("conv")
        if conv is None:
            convs = await router.conversations(self.user)
            reply: dict[str, Any] = {"type": "conversations", "conversations": convs,
                                     "cursors": await router.cursors(self.user, self.device)}
            if rid is not None:
                reply["id"] = rid
            self.send_frame(reply)
            return
        after = frame.get("after")
        if after is None:
            after = await router.cursor(self.user, self.device, conv)
        page = await router.fetch(self.user, conv, after, limit)
        for m in page:
            self.gw.coalescer.push(self, self.gw.encode_entry(m))
        last = page[-1].seq if page else after
        reply = {"type": "synced", "conv": conv, "after": after, "last": last,
                 "count": len(page), "more": len(page) == limit}
        if rid is not None:
            reply["id"] = rid
        self.send_frame(reply)

    async def _on_history(self, frame: dict[str, Any], rid: Any) -> None:
        limit = frame.get("limit") or 50
        page = await self.gw.router.history(self.user, frame["conv"], frame.get("before"),
                                            frame.get("after"), limit)
        reply: dict[str, Any] = {
            "type": "history", "conv": frame["conv"],
            "messages": [self.gw.entry_dict(m) for m in page],
        }
        if rid is not None:
            reply["id"] = rid
        self.send_frame(reply)

    async def _on_read(self, frame: dict[str, Any], rid: Any) -> None:
        await self.gw.router.read(self.user, self.device, frame["conv"], frame["seq"])
        self._read_ok(frame, rid)

    def _read_ok(self, frame: dict[str, Any], rid: Any) -> None:
        if rid is not None:
            self.send_frame({"type": "read_ok", "id": rid, "conv": frame["conv"],
                             "seq": frame["seq"]})

    async def _on_typing(self, frame: dict[str, Any], rid: Any) -> None:
        await self.gw.router.typing(self.user, self.device, frame["conv"])

    async def _on_recall(self, frame: dict[str, Any], rid: Any) -> None:
        result = await self.gw.router.recall(self.user, self.device, frame["conv"], frame["seq"])
        reply: dict[str, Any] = {"type": "recalled", "conv": frame["conv"],
                                 "recalled_seq": frame["seq"], "seq": result.seq}
        if rid is not None:
            reply["id"] = rid
        self.send_frame(reply)

    async def _on_refresh(self, frame: dict[str, Any], rid: Any) -> None:
        try:
            identity = self.gw.verifier.verify(frame["token"])
        except AuthError as exc:
            raise ImfastError(str(exc), code="auth_failed") from None
        if (identity.user, identity.device) != (self.user, self.device):
            raise ImfastError("token is for another user or device", code="auth_failed")
        self.identity = identity
        self.expires_at = self._deadline(identity.expires_at)
        reply: dict[str, Any] = {"type": "refreshed", "expires_at": identity.expires_at}
        if rid is not None:
            reply["id"] = rid
        self.send_frame(reply)

    async def _on_presence(self, frame: dict[str, Any], rid: Any) -> None:
        if not self.gw.settings.feature_enabled("presence"):
            raise ImfastError("presence is switched off", code="feature_disabled")
        reply: dict[str, Any] = {"type": "presence",
                                 "users": await self.gw.presence(frame["users"])}
        if rid is not None:
            reply["id"] = rid
        self.send_frame(reply)

    async def _on_group(self, frame: dict[str, Any], rid: Any) -> None:
        router = self.gw.router
        ftype = frame["type"]
        group = frame.get("group", "")
        if ftype == "group_create":
            args = [self.user, self.device, group, frame.get("name") or "",
                    frame.get("members") or []]
            if frame.get("open") is False:  # only then: a service of the release before
                args.append(False)          # takes the five arguments (a rolling upgrade)
            members = await router.group_create(*args)
        elif ftype == "group_join":
            members = await router.group_join(self.user, self.device, group)
        elif ftype == "group_leave":
            members = await router.group_leave(self.user, self.device, group)
        elif ftype == "group_invite":
            members = await router.group_invite(self.user, self.device, group, frame["users"])
        elif ftype == "group_remove":
            members = await router.group_remove(self.user, self.device, group, frame["users"])
        elif ftype == "group_role":
            members = await router.group_role(self.user, self.device, group, frame["user"],
                                              frame["role"])
        elif ftype == "group_members":
            members = await router.group_list_members(self.user, group)
        else:  # "groups"
            reply: dict[str, Any] = {"type": "groups",
                                     "groups": await router.groups_of(self.user)}
            if rid is not None:
                reply["id"] = rid
            self.send_frame(reply)
            return
        reply = {"type": "group", "group": group, "members": members}
        if ftype == "group_create" and frame.get("open") is False:
            reply["open"] = False  # taken: a server that predates it would not say so
        if rid is not None:
            reply["id"] = rid
        self.send_frame(reply)


_HANDLERS = {
    "send": Session._on_send,
    "ack": Session._on_ack,
    "sync": Session._on_sync,
    "history": Session._on_history,
    "read": Session._on_read,
    "typing": Session._on_typing,
    "recall": Session._on_recall,
    "refresh": Session._on_refresh,
    "presence": Session._on_presence,
    "group_create": Session._on_group,
    "group_join": Session._on_group,
    "group_leave": Session._on_group,
    "group_invite": Session._on_group,
    "group_remove": Session._on_group,
    "group_role": Session._on_group,
    "group_members": Session._on_group,
    "groups": Session._on_group,
}


class EchoSession(FramedListener):
    """``/_echo`` (IMFAST_CONFORMANCE_ECHO=1): the same frame layer, echoing messages."""

    __slots__ = ()

    def on_message(self, payload: bytes, is_text: bool, validated: bool) -> None:
        if is_text and not validated:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8")
                return
        from picows import WSMsgType

        self.transport.send(WSMsgType.TEXT if is_text else WSMsgType.BINARY, payload)
