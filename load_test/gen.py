#!/usr/bin/env python3
"""imfast load generator: uvloop + picows clients in several worker processes.

Scenarios
  chat   N connections; 1:1 private messages at an offered total rate (open
         loop: a constant rate whatever the answers), with the mix a real
         client produces: cumulative ``ack`` of what it received, a share of
         group sends, ``read`` receipts, ``typing`` before some sends.
         ``--steps R1,R2,..`` runs the rates one after the other (stress).
  max    closed loop: ``--inflight`` messages in flight, a new one sent as
         soon as one is delivered; measures the highest msgs/s.
  hold   connect N and keep them idle for ``--duration``; sample server RSS;
         at the end ping a sample of them to prove they are alive.
  storm  chat at a low rate while, every ``--storm-every`` seconds, a share of
         the connections drops at once and reconnects at once (a reconnect
         storm); unacknowledged sends are retried with the same ``cmid``.

Latency: every message body starts with the sender's ``time.time_ns()``; the
receiving client subtracts it from its own clock (same machine, same clock),
so the figure is end to end (client send -> server -> client receive).  A
delivery that arrives while a connection is still resuming (after a
reconnect) goes to a separate ``resume`` histogram, not the delivery one.

Accounting (JSON ``totals``): ``sent`` send frames, ``acknowledged`` (got
``sent``), ``delivered`` messages that reached every recipient, ``deliveries``
per recipient and ``expected_deliveries``, ``duplicates`` (a message delivered
again after it reached every recipient: under a new seq, i.e. stored twice),
``delivered_after_error`` (deliveries, per recipient, of messages answered with
an error such as ``unavailable`` yet stored after all), ``redelivered`` (a seq at or below one
already processed: the protocol's allowed re-push on resume or after ``ACK_TIMEOUT``, dropped by seq),
``lost`` (acknowledged but not delivered to every recipient when the drain
ended: nothing arrived for ``--drain`` seconds, or a backlog still moving
after ``--drain`` + ``--drain-extra`` (60 s) - then ``drain_capped`` counts
the processes where that happened), ``to_offline`` (acknowledged, and every
recipient still waiting for it was not connected when the drain ended - it
never connected, or its socket closed: the server keeps it for their next
sync, so it is not lost; their connections count under ``connect_failed``
and ``unexpected_closes``), ``unacknowledged``, ``errors`` by code.

Each worker process owns its users, and every message it sends goes to users
of the same process, so each process can match sends to deliveries by itself;
the parent sums counters and merges histograms.  Users and groups carry a run
id, so every run starts on fresh conversations.

Safety: only loopback targets (127.0.0.0/8, localhost) unless ``--allow-remote``;
every loop is bounded by ``--duration`` plus a hard deadline.

    python load_test/gen.py --url ws://127.0.0.1:8080/ws --jwt-secret S \\
        --scenario chat --connections 1000 --rate 500 --duration 30 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import json
import math
import multiprocessing as mp
import os
import random
import socket
import sys
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hdr import Histogram

__all__ = ["SLO", "Config", "evaluate_slo", "main", "run"]

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONNS_PER_SOURCE_ADDR = 10_000     # of 28K ephemeral ports: the kernel's port search stays short
MAX_CONNS_PER_PROCESS = 15_000     # the fd hard limit here is 20,000 per process


@dataclass
class SLO:
    """The service levels of CONTRACT.md (overridable for tests: SLO_* env vars)."""

    p99_ms: float = 200.0
    warn_p99_ms: float = 150.0
    max_error_rate: float = 0.01
    min_delivery_success: float = 0.99

    @classmethod
    def from_env(cls) -> SLO:
        """The defaults, overridden by SLO_* variables; ValueError naming a bad one."""
        s = cls()
        for name, env in (("p99_ms", "SLO_P99_MS"), ("warn_p99_ms", "SLO_WARN_P99_MS"),
                          ("max_error_rate", "SLO_MAX_ERROR_RATE"),
                          ("min_delivery_success", "SLO_MIN_DELIVERY_SUCCESS")):
            if os.environ.get(env):
                try:
                    value = float(os.environ[env])
                except ValueError:
                    raise ValueError(f"{env}={os.environ[env]!r} is not a number") from None
                if not value >= 0:
                    raise ValueError(f"{env}={os.environ[env]!r} must be >= 0")
                setattr(s, name, value)
        return s


@dataclass
class Config:
    """Everything a run needs; also what ends up under ``config`` in the JSON."""

    url: str = "ws://127.0.0.1:8080/ws"
    scenario: str = "chat"                 # chat | max | hold | storm
    protocol: str = "imfast"               # imfast | relay (bench/peers relays)
    connections: int = 100
    rate: float = 100.0                    # offered msgs/s, all processes together
    steps: list[float] = field(default_factory=list)   # stress: rates, one after the other
    step_duration: float = 10.0
    duration: float = 10.0
    inflight: int = 200                    # scenario max: messages in flight
    processes: int = 0                     # 0 = ceil(connections / MAX_CONNS_PER_PROCESS)
    auth: str = "token"                    # token | dev (?user=)
    jwt_secret: str = ""
    jwt_audience: str = "imfast"
    jwt_issuer: str = "imfast"
    group_size: int = 5
    group_share: float = 0.1               # share of sends that go to the sender's group
    read_share: float = 0.3                # share of ack flushes that also send `read`
    typing_share: float = 0.2              # share of sends preceded by `typing`
    contacts: int = 4                      # each user talks to this many others
    body_bytes: int = 64
    drain: float = 5.0                     # the drain ends after this long with nothing arriving
    drain_extra: float = 60.0              # ... or this much later while a backlog still moves
    connect_concurrency: int = 256         # per process
    connect_rate: float = 0.0              # connections/s in total, 0 = as fast as it goes
    connect_timeout: float = 120.0         # the whole connect phase
    connect_retries: int = 5
    storm_every: float = 10.0
    storm_share: float = 0.5
    storm_jitter: float = 0.05             # each dropped client reconnects within this many s
    ping_sample: int = 200                 # hold: pings per process at the end
    source_addrs: str = "auto"             # auto | none | comma list of 127.x addresses
    allow_remote: bool = False
    server_pid: int = 0
    stats_url: str = ""
    knee_p99_ms: float = 150.0             # stress: a step above this (or with errors) is the knee
    stop_at_knee: bool = True
    run_id: str = ""
    seed: int = 0
    quiet: bool = False

    def finish(self) -> Config:
        if self.processes <= 0:
            self.processes = max(1, math.ceil(self.connections / MAX_CONNS_PER_PROCESS))
        self.processes = min(self.processes, max(1, self.connections // 2))
        if not self.run_id:
            self.run_id = _base36(int(time.time() * 1000) % 36**6) + _base36(os.getpid() % 1296)
        if self.steps:
            self.duration = self.step_duration * len(self.steps)
        if not self.stats_url:
            parts = urlsplit(self.urls[0])
            self.stats_url = f"http://{parts.hostname}:{parts.port or 80}/stats"
        return self

    @property
    def urls(self) -> list[str]:
        """``--url`` may list several gateways (comma-separated): connection i uses
        ``urls[i % len(urls)]``, so users spread over them and messages cross."""
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def rate_at(self, t: float) -> float:
        if self.steps:
            k = min(int(t // self.step_duration), len(self.steps) - 1)
            return self.steps[k]
        return self.rate


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return socket.inet_aton(host)[0] == 127
    except OSError:
        return False


# --------------------------------------------------------------------------- tokens
def make_minter(cfg: Config) -> Any:
    """A function user -> token (HS256, the server's JWT_SECRET)."""
    from imfast.auth import mint_token
    from imfast.config import Settings

    settings = Settings(jwt_secret=cfg.jwt_secret, jwt_audience=cfg.jwt_audience,
                        jwt_issuer=cfg.jwt_issuer)
    ttl = cfg.duration + cfg.connect_timeout + 3600
    return lambda user: mint_token(settings, user, "default", ttl)


# --------------------------------------------------------------------------- /proc
def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(rest[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()
        ticks += int(rest[11]) + int(rest[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def find_listening_pid(port: int) -> int:
    """The pid of the process listening on TCP ``port`` on this machine (0 if not found)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    if not inodes:
        return 0
    targets = {f"socket:[{i}]" for i in inodes}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        if len(fds) > 25_000:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") in targets:
                    found.append(int(name))
                    break
            except OSError:
                continue
    if not found:
        return 0
    # With SO_REUSEPORT workers, the common ancestor is the one to measure.
    found_set = set(found)
    for p in sorted(found):
        if _ppid(p) not in found_set:
            parent = _ppid(p)
            if parent and any(_ppid(q) == parent for q in found) and len(found) > 1:
                return parent
            return p
    return found[0]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return int(stat[stat.rfind(b")") + 2:].split()[1])
    except OSError:
        return 0


def fetch_json(url: str, timeout: float = 3.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - stats are best effort
        return None


# =========================================================================== worker
class Counters:
    """Plain counters of one worker (cumulative)."""

    NAMES = ("sent", "acknowledged", "dedup_hits", "delivered", "deliveries",
             "expected_deliveries", "duplicates", "delivered_after_error", "redelivered", "gaps",
             "acks_sent",
             "reads_sent", "typing_sent", "receipts_rx", "typing_rx", "events_rx",
             "send_errors", "error_frames", "connect_ok", "connect_failed",
             "connect_attempts", "unexpected_closes", "reconnects", "retried_sends",
             "skipped_behind", "frames_in", "frames_out", "pings_ok", "pings_lost",
             "groups_created", "storms", "own_resumed", "drain_capped")

    def __init__(self) -> None:
        for n in self.NAMES:
            setattr(self, n, 0)

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in self.NAMES}


def _worker_main(cfg_dict: dict[str, Any], wid: int, lo: int, hi: int, t_begin: float,
                 pipe: Connection) -> None:
    try:
        import uvloop

        cfg = Config(**cfg_dict)
        random.seed(cfg.seed * 1000 + wid if cfg.seed else None)
        worker = Worker(cfg, wid, lo, hi, t_begin, pipe)
        uvloop.run(worker.main())
    except BaseException:  # noqa: BLE001 - report anything to the parent
        with contextlib.suppress(Exception):  # the parent may be gone already
            pipe.send(("crash", wid, traceback.format_exc()))
        raise SystemExit(1) from None


def _make_conn_class() -> Any:
    from picows import WSListener, WSMsgType

    text, close = WSMsgType.TEXT, WSMsgType.CLOSE

    class Conn(WSListener):  # type: ignore[misc]
        __slots__ = (
            "acks",
            "close_code",
            "dropping",
            "i",
            "last_seq",
            "own",
            "pending_cmids",
            "ready",
            "resuming",
            "t_drop",
            "transport",
            "user",
            "w",
            "waiter",
        )

        def __init__(self, w: Worker, i: int, user: str) -> None:
            self.w = w
            self.i = i
            self.user = user
            self.transport: Any = None
            self.ready = False
            self.waiter: asyncio.Future[Any] | None = None
            self.last_seq: dict[str, int] = {}
            self.acks: dict[str, int] | None = None
            self.resuming = False
            self.dropping = False
            self.close_code = 0
            self.pending_cmids: set[str] | None = None  # storm: sends not yet acknowledged
            self.t_drop = 0.0
            self.own: dict[str, set[int]] | None = None  # conv -> seqs of own sends not passed

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            self.close_code = 0

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            mt = frame.msg_type
            if mt == text:
                self.w.on_text(self, frame.get_payload_as_memoryview())
            elif mt == close:
                self.close_code = int(frame.get_close_code())
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport: Any) -> None:
            if transport is self.transport:  # not a late callback of a dropped socket
                self.w.on_disconnected(self)

    return Conn


class Worker:
    """One process: its users, their connections, the load, the accounting."""

    def __init__(self, cfg: Config, wid: int, lo: int, hi: int, t_begin: float,
                 pipe: Connection) -> None:
        self.cfg = cfg
        self.wid = wid
        self.lo, self.hi = lo, hi
        self.n = hi - lo
        self.t_begin = t_begin
        self.pipe = pipe
        self.c = Counters()
        self.hist = Histogram()          # live deliveries, microseconds
        self.sec_hist = Histogram()      # this second's live deliveries
        self.resume_hist = Histogram()   # deliveries that came with a resume
        self.ack_hist = Histogram()      # send -> `sent`
        self.reconnect_hist = Histogram()
        self.connect_hist = Histogram()
        self.ping_hist = Histogram()
        self.errors: dict[str, int] = {}
        self.closes: dict[str, int] = {}
        # cmid -> [send_ns, remaining, acked, sender, frame, (conv, seq) once stored,
        #          recipients (conn indexes) still waiting]
        self.pending: dict[str, list[Any]] = {}
        self.refused: set[str] = set()  # cmids answered with an error (see _delivered)
        self.cmid_n = 0
        self.phase = "connect"
        self.stop_at = 0.0
        self.stopped = False
        self.start_evt: asyncio.Event | None = None
        self.dirty: list[Any] = []
        self.flush_scheduled = False
        self.conns: list[Any] = []
        self.groups: dict[int, str] = {}
        self.pings: dict[int, int] = {}
        self.holes: set[tuple[int, str, int]] = set()  # (conn, conv, seq) not seen, not own
        self.reconnecting = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.imfast = cfg.protocol == "imfast"
        self.pad = "x" * max(0, cfg.body_bytes - 40)
        self.is_closed_loop = cfg.scenario == "max"
        from picows import WSMsgType

        self.text = WSMsgType.TEXT

    # ------------------------------------------------------------ helpers
    def user_name(self, i: int) -> str:
        return f"lt{self.cfg.run_id}w{self.wid}u{i}"

    def group_of(self, i: int) -> int:
        g = self.cfg.group_size
        if g < 2 or self.cfg.group_share <= 0:
            return -1
        k = i // g
        return k if (k + 1) * g <= self.n else -1

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def send(self, conn: Any, obj: dict[str, Any]) -> None:
        conn.transport.send(self.text, _dumps(obj))
        self.c.frames_out += 1

    # ------------------------------------------------------------ frames in
    def on_text(self, conn: Any, data: memoryview) -> None:
        self.c.frames_in += 1
        try:
            obj = _loads(data)
        except ValueError:
            self.error("bad_json_from_server")
            return
        if not self.imfast:
            self.on_relay(conn, obj)
            return
        t = obj.get("type")
        if t == "msg":
            self.on_msg(conn, obj)
        elif t == "sent":
            self.on_sent(conn, obj)
        elif t == "receipt":
            self.c.receipts_rx += 1
        elif t == "typing":
            self.c.typing_rx += 1
        elif t == "welcome":
            conn.resuming = True
        elif t == "resumed":
            conn.resuming = False
            conn.ready = True
            if conn.waiter is not None and not conn.waiter.done():
                conn.waiter.set_result(True)
        elif t == "group":
            if conn.waiter is not None and not conn.waiter.done():
                conn.waiter.set_result(obj)
        elif t == "pong":
            sent_ns = self.pings.pop(obj.get("id", -1), None)
            if sent_ns is not None:
                self.ping_hist.record((time.time_ns() - sent_ns) // 1000)
                self.c.pings_ok += 1
        elif t == "error":
            self.on_error(conn, obj)
        elif t == "reconnect":
            self.error("server_reconnect_request")

    def on_msg(self, conn: Any, obj: dict[str, Any]) -> None:
        now_ns = time.time_ns()
        conv = obj["conv"]
        seq = obj["seq"]
        last = conn.last_seq.get(conv, 0)
        if seq <= last:
            # The same seq again: a resume or a retransmit after ACK_TIMEOUT, which the
            # protocol allows (clients drop it by seq). A message seen twice under two
            # seqs is a real duplicate: counted by cmid in _delivered.
            self.c.redelivered += 1
            self._want_ack(conn, conv, last)
            return
        own = conn.own.get(conv) if conn.own is not None else None
        if last and seq != last + 1:
            # A hole is fine where this device's own sends took the seqs; their `sent`
            # may still be on its way, so a hole is only a gap if it stays one.  (Before
            # the first entry, own entries such as the group's `created` are never seen.)
            for s in range(last + 1, seq):
                if own is None or s not in own:
                    self.holes.add((conn.i, conv, s))
        if own:
            own.difference_update([s for s in own if s <= seq])
        conn.last_seq[conv] = seq
        self._want_ack(conn, conv, seq)
        if obj.get("kind") != "msg":
            self.c.events_rx += 1
            return
        if obj.get("from") == conn.user:
            # This device's own message, re-pushed by a resume: the server does not
            # move a cursor on send, only on ack (architecture.md, decision 7).
            self.c.own_resumed += 1
            return
        self._delivered(conn, obj.get("body", ""), now_ns)

    def _delivered(self, conn: Any, body: str, now_ns: int) -> None:
        try:
            ns_text, cmid, _ = body.split("|", 2)
            send_ns = int(ns_text)
        except ValueError:
            self.error("foreign_message")
            return
        lat = (now_ns - send_ns) // 1000
        if conn.resuming:
            self.resume_hist.record(lat)
        else:
            self.hist.record(lat)
            self.sec_hist.record(lat)
        rec = self.pending.get(cmid)
        if rec is None:
            if cmid in self.refused:
                # Answered with an error (`unavailable`: the node gave up waiting) yet
                # stored after all: a delivery (one per recipient), not a duplicate.
                self.c.delivered_after_error += 1
            else:
                self.c.duplicates += 1
            return
        self.c.deliveries += 1
        rec[6].discard(conn.i)
        rec[1] -= 1
        if rec[1] == 0:
            self.c.delivered += 1
            if rec[2] or not self.imfast:
                del self.pending[cmid]
            if self.is_closed_loop and not self.stopped:
                self.send_one()

    def on_sent(self, conn: Any, obj: dict[str, Any]) -> None:
        cmid = obj.get("cmid", "")
        rec = self.pending.get(cmid)
        if conn.pending_cmids is not None:
            conn.pending_cmids.discard(cmid)
        conv, seq = obj.get("conv"), obj.get("seq", 0)
        if seq > conn.last_seq.get(conv, 0):
            if conn.own is None:
                conn.own = {}
            conn.own.setdefault(conv, set()).add(seq)
        elif self.holes:
            self.holes.discard((conn.i, conv, seq))
        if obj.get("duplicate"):
            self.c.dedup_hits += 1
        if rec is None or rec[2]:
            return
        rec[2] = True
        rec[5] = (conv, seq)  # where it was stored, for the lost sample
        self.c.acknowledged += 1
        self.ack_hist.record((time.time_ns() - rec[0]) // 1000)
        if rec[1] <= 0:
            del self.pending[cmid]

    def on_error(self, conn: Any, obj: dict[str, Any]) -> None:
        code = str(obj.get("code", "unknown"))
        self.c.error_frames += 1
        self.error(code)
        cmid = obj.get("cmid")
        if cmid and cmid in self.pending:
            self.c.send_errors += 1
            self.refused.add(cmid)
            rec = self.pending.pop(cmid)
            self.c.expected_deliveries -= rec[1]
            if conn.pending_cmids is not None:
                conn.pending_cmids.discard(cmid)

    def on_relay(self, conn: Any, obj: dict[str, Any]) -> None:
        body = obj.get("body")
        if body is not None:
            self._delivered(conn, body, time.time_ns())
        elif obj.get("type") == "joined":
            if conn.waiter is not None and not conn.waiter.done():
                conn.waiter.set_result(obj)
        elif obj.get("type") == "error":
            self.c.error_frames += 1
            self.error(str(obj.get("code", "relay_error")))

    def _want_ack(self, conn: Any, conv: str, seq: int) -> None:
        if conn.acks is None:
            conn.acks = {}
            self.dirty.append(conn)
        conn.acks[conv] = seq
        if not self.flush_scheduled:
            self.flush_scheduled = True
            assert self.loop is not None
            self.loop.call_soon(self.flush_acks)

    def flush_acks(self) -> None:
        """One cumulative ack per conversation per loop iteration (and sometimes `read`)."""
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        read_share = self.cfg.read_share
        for conn in dirty:
            acks, conn.acks = conn.acks, None
            if not conn.ready and not conn.resuming or conn.transport is None:
                continue
            for conv, seq in acks.items():
                self.send(conn, {"type": "ack", "conv": conv, "seq": seq})
                self.c.acks_sent += 1
                if read_share and random.random() < read_share:
                    self.send(conn, {"type": "read", "conv": conv, "seq": seq})
                    self.c.reads_sent += 1

    def on_disconnected(self, conn: Any) -> None:
        was_ready = conn.ready
        conn.ready = False
        conn.resuming = False
        conn.transport = None
        if conn.waiter is not None and not conn.waiter.done():
            conn.waiter.set_exception(ConnectionError("closed"))
        if conn.close_code:
            key = str(conn.close_code)
            self.closes[key] = self.closes.get(key, 0) + 1
        if conn.dropping or self.phase == "closing":
            return
        if was_ready:
            # Like a real client: count it, then reconnect (and resume) after a backoff.
            self.c.unexpected_closes += 1
            self.error(f"closed_{conn.close_code or 'abnormal'}")
            if self.phase in ("ready", "load", "drain"):
                assert self.loop is not None
                conn.dropping = True
                self.loop.create_task(self.reconnect(conn, time.monotonic()))

    # ------------------------------------------------------------ sending
    def pick_sender(self) -> Any:
        conns = self.conns
        for _ in range(8):
            conn = conns[random.randrange(self.n)]
            if conn.ready:
                return conn
        return None

    def send_one(self) -> bool:
        conn = self.pick_sender()
        if conn is None:
            self.c.skipped_behind += 1
            return False
        cfg = self.cfg
        i = conn.i
        g = self.group_of(i)
        now_ns = time.time_ns()
        self.cmid_n += 1
        cmid = f"{self.wid}.{self.cmid_n}"
        body = f"{now_ns}|{cmid}|{self.pad}"
        if g >= 0 and random.random() < cfg.group_share:
            group = self.groups.get(g)
            if group is None:
                return False
            expected = cfg.group_size - 1
            recipients = set(range(g * cfg.group_size, (g + 1) * cfg.group_size))
            recipients.discard(i)
            frame: dict[str, Any] = {"group": group, "body": body}
            conv = f"g:{group}"
        else:
            k = 1 + random.randrange(max(1, min(cfg.contacts, self.n - 1)))
            peer = self.conns[(i + k) % self.n]
            expected = 1
            recipients = {peer.i}
            frame = {"to": peer.user, "body": body}
            a, b = sorted((conn.user, peer.user))
            conv = f"p:{a}:{b}"
        if self.imfast:
            if cfg.typing_share and random.random() < cfg.typing_share:
                self.send(conn, {"type": "typing", "conv": conv})
                self.c.typing_sent += 1
            frame["type"] = "send"
            frame["cmid"] = cmid
            if conn.pending_cmids is not None:
                conn.pending_cmids.add(cmid)
        self.pending[cmid] = [now_ns, expected, False, i, frame, None, recipients]
        self.c.expected_deliveries += expected
        self.send(conn, frame)
        self.c.sent += 1
        return True

    async def open_loop(self) -> None:
        """Send at the configured rate (this process's share) until the end of the load."""
        cfg = self.cfg
        share = 1.0 / cfg.processes
        t0 = self.t0
        due = 0.0
        last = t0
        done = 0
        while not self.stopped:
            now = time.time()
            if now >= self.stop_at:
                break
            due += (now - last) * cfg.rate_at(now - t0) * share
            last = now
            n = int(due) - done
            burst = max(2, int(cfg.rate_at(now - t0) * share * 0.05))
            if n > burst:  # behind: do not catch up in a burst (would distort latency)
                self.c.skipped_behind += n - burst
                done += n - burst
                n = burst
            for _ in range(n):
                self.send_one()
            done += n
            await asyncio.sleep(0.005)

    async def closed_loop(self) -> None:
        share = max(1, self.cfg.inflight // self.cfg.processes)
        for _ in range(share):
            self.send_one()
        while not self.stopped and time.time() < self.stop_at:
            await asyncio.sleep(0.05)
            # Top up what was lost to errors, so the window stays full.
            missing = share - len(self.pending)
            for _ in range(max(0, missing)):
                self.send_one()
        self.stopped = True

    # ------------------------------------------------------------ connecting
    def url_for(self, conn: Any) -> str:
        urls = self.cfg.urls
        base = urls[conn.i % len(urls)]
        sep = "&" if "?" in base else "?"
        if self.cfg.auth == "dev" or not self.imfast:
            return f"{base}{sep}user={conn.user}"
        return f"{base}{sep}token={self.minter(conn.user)}"

    def socket_factory_for(self, i: int) -> Any:
        addr = self.source_addr(self.lo + i)
        if addr is None:
            return None

        def factory(parsed: Any) -> socket.socket:
            family = socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            except OSError:
                pass
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.bind((addr, 0))
            return s

        return factory

    def source_addr(self, g: int) -> str | None:
        spec = self.cfg.source_addrs
        if spec == "none":
            return None
        if spec == "auto":
            if self.cfg.connections <= 10_000 or not is_loopback_url(self.cfg.urls[0]):
                return None
            return f"127.0.0.{2 + g // CONNS_PER_SOURCE_ADDR}"
        addrs = [a.strip() for a in spec.split(",") if a.strip()]
        return addrs[(g // CONNS_PER_SOURCE_ADDR) % len(addrs)]

    async def connect(self, conn: Any, retries: int) -> bool:
        from picows import WSError, ws_connect

        loop = asyncio.get_running_loop()
        for attempt in range(retries + 1):
            if self.phase == "closing":
                return False
            self.c.connect_attempts += 1
            t0 = time.monotonic()
            conn.waiter = loop.create_future()
            try:
                await ws_connect(lambda: conn, self.url_for(conn),
                                 socket_factory=self.socket_factory_for(conn.i),
                                 websocket_handshake_timeout=30,
                                 enable_auto_pong=True, read_buffer_init_size=4096,
                                 max_frame_size=1 << 20, logger_name=_QUIET_LOGGER)
                if self.imfast:
                    await asyncio.wait_for(conn.waiter, 30)
                else:
                    conn.ready = True
                conn.waiter = None
                self.c.connect_ok += 1
                self.connect_hist.record(int((time.monotonic() - t0) * 1e6))
                return True
            except WSError as exc:
                response = getattr(exc, "response", None)
                status = getattr(response, "status", None)
                self.error(f"connect_http_{int(status)}" if status else "connect_handshake")
            except TimeoutError:
                self.error("connect_timeout")
            except OSError as exc:
                self.error(f"connect_{errno.errorcode.get(exc.errno or 0, 'oserror')}")
            except ConnectionError:
                self.error("connect_closed")
            except Exception as exc:  # noqa: BLE001
                self.error(f"connect_{type(exc).__name__}")
            conn.waiter = None
            if conn.transport is not None:
                conn.transport.disconnect(False)
            if attempt < retries:
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt) * (0.5 + random.random()))
        self.c.connect_failed += 1
        return False

    async def connect_all(self) -> None:
        cfg = self.cfg
        sem = asyncio.Semaphore(cfg.connect_concurrency)
        interval = cfg.processes / cfg.connect_rate if cfg.connect_rate > 0 else 0.0
        deadline = time.monotonic() + cfg.connect_timeout

        async def one(conn: Any) -> None:
            async with sem:
                if time.monotonic() < deadline:
                    await self.connect(conn, cfg.connect_retries)

        tasks = []
        next_at = time.monotonic()
        for conn in self.conns:
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(conn)))
            if len(tasks) % 64 == 0:
                await asyncio.sleep(0)
        if tasks:
            await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))

    async def setup_groups(self) -> None:
        g = self.cfg.group_size
        if g < 2 or self.cfg.group_share <= 0 or self.n < g:
            return
        loop = asyncio.get_running_loop()
        for k in range(self.n // g):
            members = self.conns[k * g:(k + 1) * g]
            if not all(m.ready for m in members):
                continue
            name = f"lt{self.cfg.run_id}w{self.wid}g{k}"
            try:
                if self.imfast:
                    owner = members[0]
                    owner.waiter = loop.create_future()
                    self.send(owner, {"type": "group_create", "group": name,
                                      "members": [m.user for m in members[1:]], "id": k})
                    await asyncio.wait_for(owner.waiter, 10)
                    owner.waiter = None
                else:
                    for m in members:
                        m.waiter = loop.create_future()
                        self.send(m, {"type": "join", "group": name})
                    for m in members:
                        await asyncio.wait_for(m.waiter, 10)
                        m.waiter = None
                self.groups[k] = name
                self.c.groups_created += 1
            except Exception:  # noqa: BLE001
                self.error("group_setup_failed")

    async def reconnect(self, conn: Any, t_drop: float) -> None:
        self.reconnecting += 1
        try:
            await asyncio.sleep(random.random() * self.cfg.storm_jitter)
            ok = await self.connect(conn, retries=8)
            if ok:
                self.c.reconnects += 1
                self.reconnect_hist.record(int((time.monotonic() - t_drop) * 1e6))
                # Retry the sends that had no `sent` yet: same cmid, so never twice.
                for cmid in list(conn.pending_cmids or ()):
                    rec = self.pending.get(cmid)
                    if rec is not None and not rec[2] and conn.ready:
                        self.send(conn, rec[4])
                        self.c.retried_sends += 1
        finally:
            conn.dropping = False
            self.reconnecting -= 1

    async def storms(self) -> None:
        cfg = self.cfg
        while not self.stopped:
            wait_s = min(cfg.storm_every, self.stop_at - time.time() - 2.0)
            if wait_s <= 0:
                return
            await asyncio.sleep(wait_s)
            if self.stopped or time.time() > self.stop_at - 2.0:
                return
            victims = [c for c in self.conns if c.ready and random.random() < cfg.storm_share]
            self.c.storms += 1
            now = time.monotonic()
            for conn in victims:
                conn.dropping = True
                conn.transport.disconnect(False)
            # Everyone reconnects at once (bounded only by the kernel and the server).
            for conn in victims:
                asyncio.ensure_future(self.reconnect(conn, now))

    async def ping_sample(self) -> None:
        sample = [c for c in self.conns if c.ready][: self.cfg.ping_sample]
        for k, conn in enumerate(sample):
            self.pings[k] = time.time_ns()
            self.send(conn, {"type": "ping", "id": k})
        deadline = time.monotonic() + 5.0
        while self.pings and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.c.pings_lost += len(self.pings)

    # ------------------------------------------------------------ reporting
    def snapshot(self) -> dict[str, Any]:
        return {"counters": self.c.as_dict(), "phase": self.phase,
                "ready": sum(1 for c in self.conns if c.ready),
                "pending": len(self.pending), "errors": dict(self.errors)}

    async def ticker(self) -> None:
        k = 0
        while True:
            k += 1
            delay = self.t_begin + k - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            snap = self.snapshot()
            hist, self.sec_hist = self.sec_hist, Histogram()
            snap["hist"] = hist.__getstate__()
            self.pipe.send(("tick", self.wid, k, snap))

    def on_command(self) -> None:
        while self.pipe.poll():
            msg = self.pipe.recv()
            if msg[0] == "start":
                self.t0 = msg[1]
                self.stop_at = self.t0 + self.cfg.duration
                assert self.start_evt is not None
                self.start_evt.set()
            elif msg[0] == "stop":
                self.stop_at = min(self.stop_at or time.time(), time.time())
                self.stopped = True
                if self.start_evt is not None:
                    self.start_evt.set()

    # ------------------------------------------------------------ main
    async def main(self) -> None:
        cfg = self.cfg
        self.loop = asyncio.get_running_loop()
        self.start_evt = asyncio.Event()
        self.t0 = 0.0
        self.loop.add_reader(self.pipe.fileno(), self.on_command)
        if self.imfast and cfg.auth == "token":
            self.minter = make_minter(cfg)
        Conn = _make_conn_class()
        self.conns = [Conn(self, i, self.user_name(i)) for i in range(self.n)]
        if self.imfast:
            for conn in self.conns:
                conn.pending_cmids = set()
        tick = self.loop.create_task(self.ticker())
        await self.connect_all()
        if cfg.scenario in ("chat", "max", "storm"):
            await self.setup_groups()
        # Its connections live as long as the run: leave them out of every collection
        # from now on, and collect the young rarely. Untuned, this process's full
        # collections paused it 230-350 ms (collecting nothing) and the pause showed up
        # as the server's latency.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 1_000)
        self.phase = "ready"
        self.pipe.send(("ready", self.wid, self.snapshot()))
        hard_deadline = time.time() + cfg.duration + cfg.connect_timeout + 60
        while not self.start_evt.is_set() and time.time() < hard_deadline:
            try:
                await asyncio.wait_for(self.start_evt.wait(), 1.0)
            except TimeoutError:
                pass
        if not self.stopped and self.t0:
            delay = self.t0 - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.phase = "load"
            jobs = []
            if cfg.scenario == "chat" or cfg.scenario == "storm":
                jobs.append(self.loop.create_task(self.open_loop()))
            elif cfg.scenario == "max":
                jobs.append(self.loop.create_task(self.closed_loop()))
            if cfg.scenario == "storm":
                jobs.append(self.loop.create_task(self.storms()))
            while time.time() < self.stop_at and not self.stopped:
                await asyncio.sleep(min(0.1, max(0.0, self.stop_at - time.time())))
            self.stopped = True
            for j in jobs:
                j.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
        # Drain: let the answers and deliveries in flight arrive.  A backlog (an
        # overloaded server) may take longer than --drain to clear: wait while it
        # moves, so "lost" means nothing arrived for a whole --drain period.
        self.phase = "drain"
        now = time.monotonic()
        drain_end, drain_cap = now + cfg.drain, now + cfg.drain + cfg.drain_extra
        moved = (self.c.deliveries, self.c.acknowledged)
        extended = False
        while time.monotonic() < drain_end:
            if self.reconnecting == 0 and (not self.pending or not any(
                    r[1] > 0 or (self.imfast and not r[2]) for r in self.pending.values())):
                break
            await asyncio.sleep(0.05)
            if (self.c.deliveries, self.c.acknowledged) != moved:
                moved = (self.c.deliveries, self.c.acknowledged)
                drain_end = min(drain_cap, time.monotonic() + cfg.drain)
                extended = True
        else:  # out of time, not out of work: was the backlog still moving at the cap?
            self.c.drain_capped = int(extended and drain_end >= drain_cap)
        if cfg.scenario == "hold" and self.imfast:  # relays know no `ping` frame
            await self.ping_sample()
        self.flush_acks()
        await asyncio.sleep(0.05)
        final = self.finish()
        self.phase = "closing"
        tick.cancel()
        self.pipe.send(("final", self.wid, final))
        for conn in self.conns:
            if conn.transport is not None:
                with contextlib.suppress(Exception):  # closing anyway
                    conn.transport.send_close()
                    conn.transport.disconnect()
        await asyncio.sleep(0.2)

    def finish(self) -> dict[str, Any]:
        lost = unacked = lost_deliveries = to_offline = to_offline_deliveries = 0
        lost_sample: list[dict[str, Any]] = []
        conns = self.conns
        for cmid, rec in self.pending.items():
            if self.imfast and not rec[2]:
                unacked += 1
                lost_deliveries += max(0, rec[1])
            elif rec[1] > 0 and not any(conns[j].ready for j in rec[6]):
                # Every recipient still waiting is offline now: stored for their next
                # sync (their connections are counted as failed or closed).
                to_offline += 1
                to_offline_deliveries += rec[1]
            elif rec[1] > 0:
                lost += 1
                lost_deliveries += rec[1]
                if len(lost_sample) < 20:
                    conv, seq = rec[5] or (None, None)
                    lost_sample.append({
                        "cmid": cmid, "sender": self.conns[rec[3]].user
                        if rec[3] is not None and rec[3] < len(self.conns) else rec[3],
                        "conv": conv, "seq": seq, "missing_deliveries": rec[1],
                        "sent_at": time.strftime("%H:%M:%S", time.localtime(rec[0] / 1e9))})
        self.c.gaps = len(self.holes)
        counters = self.c.as_dict()
        counters["lost"] = lost
        counters["unacknowledged"] = unacked
        counters["lost_deliveries"] = lost_deliveries
        counters["to_offline"] = to_offline
        counters["to_offline_deliveries"] = to_offline_deliveries
        counters["connected_at_end"] = sum(1 for c in self.conns if c.ready)
        return {"counters": counters, "errors": self.errors, "closes": self.closes,
                "lost_sample": lost_sample,
                "hist": self.hist.__getstate__(), "resume_hist": self.resume_hist.__getstate__(),
                "ack_hist": self.ack_hist.__getstate__(),
                "reconnect_hist": self.reconnect_hist.__getstate__(),
                "connect_hist": self.connect_hist.__getstate__(),
                "ping_hist": self.ping_hist.__getstate__()}


try:
    import orjson

    _loads = orjson.loads
    _dumps = orjson.dumps
except ImportError:  # pragma: no cover - orjson comes with imfast
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


class _QuietLogger:
    """picows logs every failed handshake; a load test counts them instead."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


_QUIET_LOGGER = _QuietLogger()


# =========================================================================== parent
def _hist(state: dict[str, Any]) -> Histogram:
    h = Histogram()
    h.__setstate__(dict(state))
    return h


def run(cfg: Config, progress: Any = None) -> dict[str, Any]:
    """Run the load described by ``cfg``; returns the result (what ``--json`` writes).

    ``progress(row)`` is called once a second with the timeline row (default:
    print a progress line to stderr unless ``cfg.quiet``).
    """
    cfg.finish()
    if not cfg.allow_remote and not all(is_loopback_url(u) for u in cfg.urls):
        raise SystemExit(f"gen: refusing non-loopback target {cfg.url} (use --allow-remote)")
    if cfg.protocol == "imfast" and cfg.auth == "token" and not cfg.jwt_secret:
        raise SystemExit("gen: token auth needs --jwt-secret (or JWT_SECRET), the server's")
    if progress is None:
        progress = (lambda row: None) if cfg.quiet else _print_progress
    server_pid = max(0, cfg.server_pid)  # -1: do not look for it
    if cfg.server_pid == 0 and is_loopback_url(cfg.urls[0]):
        server_pid = find_listening_pid(urlsplit(cfg.urls[0]).port or 80)
    server_pids = proc_tree(server_pid) if server_pid else []
    stats_before = fetch_json(cfg.stats_url)
    rss_before = rss_bytes(server_pids) if server_pids else 0
    cpu_before = cpu_seconds(server_pids) if server_pids else 0.0

    ctx = mp.get_context("fork")
    P = cfg.processes
    bounds = [(cfg.connections * w // P, cfg.connections * (w + 1) // P) for w in range(P)]
    t_begin = time.time()
    procs, pipes = [], []
    for w, (lo, hi) in enumerate(bounds):
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(asdict(cfg), w, lo, hi, t_begin, child_end),
                        daemon=True)
        p.start()
        child_end.close()
        procs.append(p)
        pipes.append(parent_end)

    hard_deadline = (t_begin + cfg.connect_timeout + cfg.duration + cfg.drain + cfg.drain_extra
                     + 90)
    ticks: dict[int, dict[int, dict[str, Any]]] = {}
    last_snap: dict[int, dict[str, Any]] = {}
    ready: dict[int, dict[str, Any]] = {}
    finals: dict[int, dict[str, Any]] = {}
    crashes: list[str] = []
    timeline: list[dict[str, Any]] = []
    emitted = 0
    t0 = 0.0
    load_started_at = None
    knee: dict[str, Any] | None = None
    steps_out: list[dict[str, Any]] = []
    stopped = False
    prev_cpu = (time.time(), cpu_before)
    prev_gen = [time.time(), 0.0]
    cpu_load_start = None
    rss_samples: list[int] = []
    alive = set(range(P))

    def broadcast(msg: Any) -> None:
        for w in alive:
            try:
                pipes[w].send(msg)
            except OSError:
                pass

    def emit(k: int) -> None:
        nonlocal prev_cpu
        rows = ticks.pop(k, {})
        for w, snap in rows.items():
            last_snap[w] = snap
        merged = Histogram()
        for snap in rows.values():
            merged.merge(_hist(snap["hist"]))
        tot: dict[str, int] = {}
        errs = 0
        for snap in last_snap.values():
            for name, v in snap["counters"].items():
                tot[name] = tot.get(name, 0) + v
            errs += sum(snap["errors"].values())
        prev = timeline[-1]["cum"] if timeline else {}
        now = time.time()
        row: dict[str, Any] = {
            "t": k, "phase": _phase(last_snap),
            "ready": sum(s["ready"] for s in last_snap.values()),
            "pending": sum(s["pending"] for s in last_snap.values()),
            "sent": tot.get("sent", 0) - prev.get("sent", 0),
            "acknowledged": tot.get("acknowledged", 0) - prev.get("acknowledged", 0),
            "deliveries": tot.get("deliveries", 0) - prev.get("deliveries", 0),
            "errors": errs - (timeline[-1]["errors_cum"] if timeline else 0),
            "errors_cum": errs, "cum": tot,
            "p50_ms": merged.percentile(50) / 1000, "p99_ms": merged.percentile(99) / 1000,
            "max_ms": merged.max / 1000, "n_lat": merged.n, "hist": merged.__getstate__(),
        }
        if server_pids:
            pids = proc_tree(server_pid)
            rss = rss_bytes(pids)
            cpu = cpu_seconds(pids)
            row["server_rss_mb"] = round(rss / 2**20, 1)
            row["server_cpu_pct"] = round(100 * (cpu - prev_cpu[1]) / max(1e-6, now - prev_cpu[0]),
                                          1)
            prev_cpu = (now, cpu)
            rss_samples.append(rss)
        gcpu = cpu_seconds([p.pid for p in procs])
        row["gen_cpu_pct"] = round(100 * (gcpu - prev_gen[1]) / max(1e-6, now - prev_gen[0]), 1)
        prev_gen[:] = [now, gcpu]
        timeline.append(row)
        progress(row)

    while alive and time.time() < hard_deadline:
        ready_pipes = wait([pipes[w] for w in alive], timeout=0.25)
        for pc in ready_pipes:
            w = pipes.index(pc)  # type: ignore[arg-type]
            try:
                msg = pc.recv()
            except (EOFError, OSError):
                alive.discard(w)
                continue
            kind = msg[0]
            if kind == "tick":
                if msg[2] <= emitted:  # late (a busy worker): fold it into what was shown
                    last_snap[w] = msg[3]
                    row = next((r for r in reversed(timeline) if r["t"] == msg[2]), None)
                    if row is not None:
                        h = _hist(row["hist"]).merge(_hist(msg[3]["hist"]))
                        row["hist"] = h.__getstate__()
                        row["n_lat"] = h.n
                else:
                    ticks.setdefault(msg[2], {})[w] = msg[3]
            elif kind == "ready":
                ready[w] = msg[2]
                last_snap[w] = msg[2] | {"hist": {}}
                if len(ready) == P and not t0:
                    t0 = time.time() + 0.3
                    load_started_at = t0 - t_begin
                    if server_pids:
                        cpu_load_start = (t0, cpu_seconds(proc_tree(server_pid)))
                        rss_after_connect = rss_bytes(proc_tree(server_pid))
                    broadcast(("start", t0))
            elif kind == "final":
                finals[w] = msg[2]
                alive.discard(w)
            elif kind == "crash":
                crashes.append(msg[2])
                print(f"gen: worker {w} crashed:\n{msg[2]}", file=sys.stderr, flush=True)
                alive.discard(w)
        # Emit complete seconds (or late ones after 2 s).
        while True:
            k = emitted + 1
            have = ticks.get(k, {})
            if not have:
                if ticks and min(ticks) > k:
                    emitted = k
                    continue
                break
            if len(have) < len(alive | set(have)) and time.time() < t_begin + k + 2:
                break
            emit(k)
            emitted = k
            if cfg.steps and t0 and not stopped:
                knee, stopped = _check_steps(cfg, timeline, t0 - t_begin, steps_out, knee)
                if stopped:
                    broadcast(("stop",))
        if not t0 and time.time() > t_begin + cfg.connect_timeout + 30:
            broadcast(("stop",))
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=2)
    while ticks:
        k = min(ticks)
        emit(k)
    cpu_end = (time.time(), cpu_seconds(proc_tree(server_pid))) if server_pids else None
    stats_after = fetch_json(cfg.stats_url, timeout=10.0)
    if cfg.steps and t0:
        _check_steps(cfg, timeline, t0 - t_begin, steps_out, knee, final=True)
        knee = next((s for s in steps_out if s.get("knee")), None)

    # ------------------------------------------------------------ merge
    counters: dict[str, int] = {}
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    lost_sample: list[dict[str, Any]] = []
    hists = {name: Histogram() for name in ("hist", "resume_hist", "ack_hist", "reconnect_hist",
                                            "connect_hist", "ping_hist")}
    for f in finals.values():
        for k2, v in f["counters"].items():
            counters[k2] = counters.get(k2, 0) + v
        for k2, v in f["errors"].items():
            errors[k2] = errors.get(k2, 0) + v
        for k2, v in f["closes"].items():
            closes[k2] = closes.get(k2, 0) + v
        lost_sample.extend(f.get("lost_sample", [])[: 20 - len(lost_sample)])
        for name, h in hists.items():
            h.merge(_hist(f[name]))
    load_rows = [r for r in timeline if r["phase"] == "load"]
    load_s = cfg.duration if not stopped else max(1, len(load_rows))
    result: dict[str, Any] = {
        "tool": "imfast load_test/gen.py", "version": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_begin)),
        "config": asdict(cfg) | {"jwt_secret": "<redacted>" if cfg.jwt_secret else ""},
        "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": sys.platform},
        "workers": {"started": P, "finished": len(finals), "crashes": crashes},
        "connect_seconds": round(load_started_at, 2) if load_started_at else None,
        "load_seconds": round(load_s, 2),
        "totals": counters, "errors": errors, "closes": closes, "lost_sample": lost_sample,
        "latency_ms": hists["hist"].summary(),
        "latency_hist": hists["hist"].to_dict(),
        "ack_latency_ms": hists["ack_hist"].summary(),
        "resume_latency_ms": hists["resume_hist"].summary(),
        "reconnect_ms": hists["reconnect_hist"].summary(),
        "connect_ms": hists["connect_hist"].summary(),
        "ping_ms": hists["ping_hist"].summary(),
        "rates": {
            "sent_per_s": round(counters.get("sent", 0) / load_s, 1),
            "delivered_per_s": round(counters.get("delivered", 0) / load_s, 1),
            "deliveries_per_s": round(counters.get("deliveries", 0) / load_s, 1),
            "frames_out_per_s": round(counters.get("frames_out", 0) / load_s, 1),
        },
        "timeline": [{k2: v for k2, v in r.items() if k2 not in ("cum", "hist")}
                     for r in timeline],
        "steps": steps_out, "knee": knee,
        "server": {"pid": server_pid or None, "stats_before": stats_before,
                   "stats_after": stats_after},
    }
    if server_pids:
        srv = result["server"]
        srv["rss_before_mb"] = round(rss_before / 2**20, 1)
        srv["rss_peak_mb"] = round(max(rss_samples or [0]) / 2**20, 1)
        srv["rss_end_mb"] = round((rss_samples[-1] if rss_samples else 0) / 2**20, 1)
        if cpu_load_start and cpu_end:
            span = cpu_end[0] - cpu_load_start[0]
            srv["cpu_seconds_load"] = round(cpu_end[1] - cpu_load_start[1], 2)
            srv["cpu_pct_load"] = round(100 * (cpu_end[1] - cpu_load_start[1]) / max(span, 1e-6),
                                        1)
        if load_started_at:
            connected = max(1, counters.get("connect_ok", 0))
            srv["rss_after_connect_mb"] = round(rss_after_connect / 2**20, 1)
            srv["rss_per_connection_bytes"] = round((rss_after_connect - rss_before) / connected)
    result["derived"] = derive(result)
    return result


def _phase(snaps: dict[int, dict[str, Any]]) -> str:
    phases = {s["phase"] for s in snaps.values()}
    for p in ("connect", "load", "drain", "ready", "closing"):
        if p in phases:
            return p
    return "?"


def _check_steps(cfg: Config, timeline: list[dict[str, Any]], load_offset: float,
                 steps_out: list[dict[str, Any]], knee: Any, final: bool = False) -> Any:
    """Evaluate finished stress steps; returns (knee, stop?)."""
    stop = False
    for idx, rate in enumerate(cfg.steps):
        if idx < len(steps_out):
            continue
        start = load_offset + idx * cfg.step_duration
        end = start + cfg.step_duration
        rows = [r for r in timeline if start + 1 < r["t"] <= end]  # skip the first second
        if not final and (not timeline or timeline[-1]["t"] < end):
            break
        if not rows:
            break
        h = Histogram()
        for r in rows:
            h.merge(_hist(r["hist"]))
        secs = len(rows)
        sent = sum(r["sent"] for r in rows)
        acked = sum(r["acknowledged"] for r in rows)
        errs = sum(r["errors"] for r in rows)
        step = {"rate": rate, "seconds": secs, "sent_per_s": round(sent / secs, 1),
                "acknowledged_per_s": round(acked / secs, 1),
                "deliveries_per_s": round(sum(r["deliveries"] for r in rows) / secs, 1),
                "errors": errs, "latency_ms": h.summary()}
        reasons = []
        if h.n and h.percentile(99) / 1000 > cfg.knee_p99_ms:
            reasons.append(f"P99 {h.percentile(99) / 1000:.1f} ms > {cfg.knee_p99_ms:g} ms")
        if errs:
            reasons.append(f"{errs} errors")
        if sent < 0.9 * rate * secs:
            reasons.append(f"only {sent / secs:.0f}/s sent of {rate:g}/s offered (generator)")
        if cfg.protocol == "imfast" and acked < 0.9 * sent:
            reasons.append(f"only {acked / secs:.0f}/s acknowledged of {sent / secs:.0f}/s sent")
        step["ok"] = not reasons
        step["reasons"] = reasons
        if reasons and knee is None:
            step["knee"] = True
            knee = step
            stop = cfg.stop_at_knee
        steps_out.append(step)
        if stop:
            break
    return knee, stop


def derive(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the SLO lines use (error rate, delivery success)."""
    t = result["totals"]
    attempts = t.get("sent", 0) + t.get("connect_attempts", 0)
    errors = (t.get("error_frames", 0) + t.get("connect_failed", 0)
              + t.get("unexpected_closes", 0))
    # Deliveries owed to recipients offline at the end are not judged here: their
    # connections failed or closed, which the error rate counts.
    expected = t.get("expected_deliveries", 0) - t.get("to_offline_deliveries", 0)
    delivered = t.get("deliveries", 0)
    return {
        "error_rate": round(errors / attempts, 6) if attempts else 0.0,
        "errors_counted": errors,
        "delivery_success": round(min(1.0, delivered / expected), 6) if expected else None,
        "connect_success": round(t.get("connect_ok", 0) / max(1, result["config"]["connections"]),
                                 6) if result["config"]["scenario"] in ("hold",) else None,
    }


def evaluate_slo(result: dict[str, Any], slo: SLO | None = None) -> list[dict[str, Any]]:
    """Verdict lines: {name, ok, level ('fail'|'warn'|'ok'), text}."""
    slo = slo or SLO.from_env()
    d = result["derived"]
    lat = result["latency_ms"]
    lines = []
    scenario = result["config"]["scenario"]
    if lat.get("count"):
        p99 = lat["p99"]
        ok = p99 < slo.p99_ms
        lines.append({"name": "delivery P99", "ok": ok, "level": "ok" if ok else "fail",
                      "text": f"delivery P99 {p99:.1f} ms {'<' if ok else '>='} "
                              f"{slo.p99_ms:g} ms"})
        warn = p99 > slo.warn_p99_ms
        lines.append({"name": "scale-up line", "ok": True, "level": "warn" if warn else "ok",
                      "text": f"delivery P99 {p99:.1f} ms "
                              + (f"> {slo.warn_p99_ms:g} ms: scale up" if warn
                                 else f"<= {slo.warn_p99_ms:g} ms (scale-up line)")})
    elif scenario != "hold":
        lines.append({"name": "delivery P99", "ok": False, "level": "fail",
                      "text": "no message was delivered: no latency to judge"})
    er = d["error_rate"]
    ok = er < slo.max_error_rate
    lines.append({"name": "error rate", "ok": ok, "level": "ok" if ok else "fail",
                  "text": f"error rate {100 * er:.3f} % {'<' if ok else '>='} "
                          f"{100 * slo.max_error_rate:g} % ({d['errors_counted']} errors)"})
    if d["delivery_success"] is not None:
        ds = d["delivery_success"]
        ok = ds > slo.min_delivery_success
        lines.append({"name": "delivery success", "ok": ok, "level": "ok" if ok else "fail",
                      "text": f"delivery success {100 * ds:.3f} % {'>' if ok else '<='} "
                              f"{100 * slo.min_delivery_success:g} % "
                              f"(lost {result['totals'].get('lost', 0)}, unacknowledged "
                              f"{result['totals'].get('unacknowledged', 0)})"})
    if d.get("connect_success") is not None:
        cs = d["connect_success"]
        lines.append({"name": "connections held", "ok": cs > slo.min_delivery_success,
                      "level": "ok" if cs > slo.min_delivery_success else "fail",
                      "text": f"connections held {result['totals'].get('connected_at_end', 0)}"
                              f"/{result['config']['connections']} ({100 * cs:.2f} %)"})
    return lines


def _print_progress(row: dict[str, Any]) -> None:
    parts = [f"[{row['t']:>4}s] {row['phase']:<7} conns {row['ready']:>6}"]
    if row["phase"] in ("load", "drain"):
        parts.append(f"sent {row['sent']:>6}/s ack {row['acknowledged']:>6}/s "
                     f"deliv {row['deliveries']:>6}/s")
        if row["n_lat"]:
            parts.append(f"p50 {row['p50_ms']:7.1f} p99 {row['p99_ms']:7.1f} "
                         f"max {row['max_ms']:7.1f} ms")
        parts.append(f"pending {row['pending']}")
    parts.append(f"err {row['errors']}")
    if "server_rss_mb" in row:
        parts.append(f"srv {row['server_rss_mb']:.0f} MB {row['server_cpu_pct']:.0f}% cpu")
    parts.append(f"gen {row.get('gen_cpu_pct', 0):.0f}% cpu")
    print("  ".join(parts), file=sys.stderr, flush=True)


def print_summary(result: dict[str, Any], out: Any = sys.stdout) -> None:
    t = result["totals"]
    lat = result["latency_ms"]
    print(f"scenario {result['config']['scenario']}: {result['config']['connections']} "
          f"connections, {result['load_seconds']} s of load", file=out)
    print(f"  sent {t.get('sent', 0)}  acknowledged {t.get('acknowledged', 0)}  delivered "
          f"{t.get('delivered', 0)}  deliveries {t.get('deliveries', 0)}/"
          f"{t.get('expected_deliveries', 0)}  duplicates {t.get('duplicates', 0)}  "
          f"delivered after an error {t.get('delivered_after_error', 0)}  lost "
          f"{t.get('lost', 0)}  unacknowledged {t.get('unacknowledged', 0)}  gaps "
          f"{t.get('gaps', 0)}", file=out)
    if t.get("to_offline"):
        print(f"  to recipients offline at the end {t['to_offline']} "
              f"({t.get('to_offline_deliveries', 0)} deliveries; stored for their next sync, "
              f"not lost: {t.get('connect_failed', 0)} connections failed, "
              f"{t.get('unexpected_closes', 0)} closed unexpectedly, "
              f"{t.get('connected_at_end', 0)} connected at the end)", file=out)
    if t.get("drain_capped") and t.get("lost"):
        print(f"  note: in {t['drain_capped']} generator process(es) deliveries were still "
              f"arriving when the drain reached its cap (--drain-extra past --drain): "
              "'lost' may count messages still in the server's backlog", file=out)
    for lost in result.get("lost_sample", [])[:5]:
        print(f"  lost: {lost}", file=out)
    print(f"  rates: {result['rates']}", file=out)
    if lat.get("count"):
        print(f"  delivery latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
              f"p99.9 {lat['p99.9']}  max {lat['max']}  (n={lat['count']})", file=out)
    for name in ("ack_latency_ms", "resume_latency_ms", "reconnect_ms", "connect_ms", "ping_ms"):
        s = result[name]
        if s.get("count"):
            print(f"  {name}: p50 {s['p50']}  p99 {s['p99']}  max {s['max']}  (n={s['count']})",
                  file=out)
    if result["errors"]:
        print(f"  errors: {result['errors']}", file=out)
    srv = result["server"]
    if srv.get("rss_end_mb") is not None:
        print(f"  server pid {srv['pid']}: rss {srv.get('rss_before_mb')} -> "
              f"{srv.get('rss_end_mb')} MB (peak {srv.get('rss_peak_mb')}), "
              f"{srv.get('rss_per_connection_bytes', '?')} B/connection, "
              f"cpu {srv.get('cpu_pct_load', '?')} % during load", file=out)
    if result.get("knee"):
        k = result["knee"]
        print(f"  knee at {k['rate']:g} msgs/s: {'; '.join(k['reasons'])}", file=out)


# =========================================================================== CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--url", default=d.url, help="the gateway's ws:// URL (default %(default)s)")
    p.add_argument("--scenario", choices=("chat", "max", "hold", "storm"), default=d.scenario)
    p.add_argument("--protocol", choices=("imfast", "relay"), default=d.protocol)
    p.add_argument("--connections", "-n", type=int, default=d.connections)
    p.add_argument("--rate", "-r", type=float, default=d.rate, help="offered msgs/s in total")
    p.add_argument("--steps", default="", help="stress: comma list of rates, one per step")
    p.add_argument("--step-duration", type=float, default=d.step_duration)
    p.add_argument("--duration", "-d", type=float, default=d.duration)
    p.add_argument("--inflight", type=int, default=d.inflight, help="scenario max: window")
    p.add_argument("--processes", "-p", type=int, default=0,
                   help=f"worker processes (default: one per {MAX_CONNS_PER_PROCESS} connections)")
    p.add_argument("--auth", choices=("token", "dev"), default=d.auth,
                   help="token: mint HS256 tokens with --jwt-secret; "
                        "dev: ?user= (INSECURE_DEV_AUTH)")
    p.add_argument("--jwt-secret", default=os.environ.get("JWT_SECRET", ""),
                   help="the server's JWT_SECRET (default $JWT_SECRET)")
    p.add_argument("--data-dir", help="or: read the embedded node's dev secret from DATA_DIR")
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--group-share", type=float, default=d.group_share)
    p.add_argument("--read-share", type=float, default=d.read_share)
    p.add_argument("--typing-share", type=float, default=d.typing_share)
    p.add_argument("--body-bytes", type=int, default=d.body_bytes)
    p.add_argument("--drain", type=float, default=d.drain,
                   help="end the drain once nothing has arrived for this long (s)")
    p.add_argument("--drain-extra", type=float, default=d.drain_extra,
                   help="while a backlog still moves, wait at most this long past --drain (s)")
    p.add_argument("--connect-concurrency", type=int, default=d.connect_concurrency)
    p.add_argument("--connect-rate", type=float, default=d.connect_rate)
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    p.add_argument("--storm-every", type=float, default=d.storm_every)
    p.add_argument("--storm-share", type=float, default=d.storm_share)
    p.add_argument("--storm-jitter", type=float, default=d.storm_jitter,
                   help="storm: reconnects spread over this many seconds (0.05: at once)")
    p.add_argument("--source-addrs", default=d.source_addrs)
    p.add_argument("--allow-remote", action="store_true")
    p.add_argument("--server-pid", type=int, default=0,
                   help="measure this process tree's RSS/CPU (default: the local listener of "
                        "the URL's port; -1: none)")
    p.add_argument("--stats-url", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    secret = args.jwt_secret
    if not secret and args.data_dir:
        with open(os.path.join(args.data_dir, "jwt_secret")) as fh:
            secret = fh.read().strip()
    return Config(url=args.url, scenario=args.scenario, protocol=args.protocol,
                  connections=args.connections, rate=args.rate,
                  steps=[float(x) for x in args.steps.split(",") if x.strip()],
                  step_duration=args.step_duration, duration=args.duration,
                  inflight=args.inflight, processes=args.processes, auth=args.auth,
                  jwt_secret=secret, group_size=args.group_size, group_share=args.group_share,
                  read_share=args.read_share, typing_share=args.typing_share,
                  body_bytes=args.body_bytes, drain=args.drain, drain_extra=args.drain_extra,
                  connect_concurrency=args.connect_concurrency, connect_rate=args.connect_rate,
                  connect_timeout=args.connect_timeout, storm_every=args.storm_every,
                  storm_share=args.storm_share, storm_jitter=args.storm_jitter,
                  source_addrs=args.source_addrs,
                  allow_remote=args.allow_remote, server_pid=args.server_pid,
                  stats_url=args.stats_url, seed=args.seed, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    result = run(cfg)
    verdict = evaluate_slo(result)
    if not cfg.quiet:
        print_summary(result, sys.stderr)
        for line in verdict:
            label = "PASS" if line["level"] == "ok" else line["level"].upper()
            print(f"  {label:<4}  {line['text']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    else:
        json.dump({k: v for k, v in result.items() if k not in ("timeline", "latency_hist")},
                  sys.stdout, indent=1)
        print()
    return 0 if all(line["ok"] for line in verdict) else 1


if __name__ == "__main__":
    sys.exit(main())
