"""Behaviour of ``imfast._core``: every guarantee of the twins' docstrings.

Each test runs on the pure-Python twin and on the Cython extension (the
``core`` fixture, see conftest.py); ``test_core_parity.py`` checks that the two
agree on random input.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from typing import Any

import orjson
import pytest

from imfast.protocol.codes import ERRORS, ProtocolError

MAX_SEQ = (1 << 53) - 1


# ---------------------------------------------------------------- helpers
def parse_ws_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """A tiny RFC 6455 reader: (fin, opcode, payload) for every frame; refuses masks."""
    frames = []
    i = 0
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        assert b0 & 0x70 == 0, "RSV bits set"
        assert b1 & 0x80 == 0, "server frames must not be masked"
        n = b1 & 0x7F
        i += 2
        if n == 126:
            n = int.from_bytes(data[i:i + 2], "big")
            assert n >= 126, "length not minimally encoded"
            i += 2
        elif n == 127:
            n = int.from_bytes(data[i:i + 8], "big")
            assert n >= 65536 and n < 1 << 63, "length not minimally encoded"
            i += 8
        payload = data[i:i + n]
        assert len(payload) == n, "truncated frame"
        i += n
        frames.append((bool(b0 & 0x80), b0 & 0x0F, payload))
    return frames


class Raw:
    """A fake asyncio transport that records writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class Sess:
    """What the core reads and writes on a session (like gateway.session.Session)."""

    __slots__ = ("bound", "closed", "device", "name", "out", "raw", "user")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.user = ""
        self.device = ""
        self.bound = False
        self.out: list[bytes] | None = None
        self.closed = False
        self.raw = Raw()

    def __repr__(self) -> str:
        return f"Sess({self.name})"


class FakeLoop:
    """Records call_soon callbacks; ``run()`` runs them (one loop iteration)."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def call_soon(self, cb: Any, *args: Any) -> None:
        self.callbacks.append((cb, args))

    def run(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for cb, args in callbacks:
            cb(*args)


def decode_error(codec: Any, data: bytes | str, max_body: int = 100) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode_client_frame(data, max_body)
    exc = info.value
    assert exc.code in ERRORS
    assert str(exc) == exc.message
    return exc


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


# ------------------------------------------------------- which core loaded
def test_expected_core_loaded() -> None:
    """The Cython core is in use unless IMFAST_NO_EXTENSIONS=1 (CI notices a broken build)."""
    import imfast._core as core

    if os.environ.get("IMFAST_NO_EXTENSIONS") == "1":
        assert core.USING_EXTENSIONS is False
        assert core.decode_client_frame.__module__ == "imfast._core.codec_py"
        return
    problems = []
    for name in ("_codec", "_table", "_fanout"):
        try:
            __import__(f"imfast._core.{name}")
        except ImportError as exc:
            problems.append(f"imfast._core.{name}: {exc}")
    assert not problems, "Cython core not importable (build it or set IMFAST_NO_EXTENSIONS=1): " \
        + "; ".join(problems)
    assert core.USING_EXTENSIONS is True
    assert core.ConnectionTable.__module__ == "imfast._core._table"
    assert core.WriteCoalescer.__module__ == "imfast._core._fanout"


# ------------------------------------------------------------------ codec
VALID = [
    {"type": "auth", "token": "t"},
    {"type": "refresh", "token": "x" * 8192},
    {"type": "ping"},
    {"type": "ping", "id": 7},
    {"type": "send", "cmid": "c1", "to": "bob", "body": "hello"},
    {"type": "send", "cmid": "c1", "group": "team", "body": ""},
    {"type": "send", "cmid": "c1", "to": None, "group": "team", "body": "null is absent"},
    {"type": "ack", "conv": "p:alice:bob", "seq": 0},
    {"type": "ack", "conv": "p:bob:bob", "seq": MAX_SEQ},
    {"type": "sync"},
    {"type": "sync", "conv": "g:team", "after": 3, "limit": 1},
    {"type": "history", "conv": "g:team", "before": 10, "after": None, "limit": 50},
    {"type": "read", "conv": "p:a:b", "seq": 1},
    {"type": "typing", "conv": "g:x"},
    {"type": "recall", "conv": "g:x", "seq": 2},
    {"type": "presence", "users": []},
    {"type": "presence", "users": ["a", "b.c@d-e_f"]},
    {"type": "group_create", "group": "g1", "name": "n" * 256, "members": ["a"]},
    {"type": "group_create", "group": "g1"},
    {"type": "group_join", "group": "g1"},
    {"type": "group_leave", "group": "g1"},
    {"type": "group_invite", "group": "g1", "users": ["u"]},
    {"type": "group_remove", "group": "g1", "users": ["u"]},
    {"type": "group_role", "group": "g1", "user": "u", "role": "admin"},
    {"type": "group_role", "group": "g1", "user": "u", "role": "member"},
    {"type": "group_members", "group": "g1"},
    {"type": "groups", "id": "x" * 64},
    {"type": "groups", "extra": {"ignored": [1, 2]}, "id": None},
]


@pytest.mark.parametrize("frame", VALID, ids=lambda f: f["type"])
def test_decode_valid_frames(core: Any, frame: dict[str, Any]) -> None:
    codec = core.codec
    assert codec.decode_client_frame(dumps(frame), 100) == frame
    assert codec.decode_client_frame(dumps(frame).decode(), 100) == frame  # str input too


def test_every_client_type_is_covered(core: Any) -> None:
    assert {f["type"] for f in VALID} == set(core.codec.CLIENT_TYPES)


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"nul", b'{"a":1}x', b"NaN",
                                  b'"\\ud800"', "{\"type\": \"ping\"", b"[" * 2000 + b"]" * 2000])
def test_decode_bad_json(core: Any, data: bytes | str) -> None:
    exc = decode_error(core.codec, data)
    assert (exc.code, exc.field) == ("bad_json", None)
    assert exc.message.startswith("frame is not valid JSON: ") and "line 1" in exc.message


def test_json_nested_too_deeply_says_so(core: Any) -> None:
    exc = decode_error(core.codec, b"[" * 2000 + b"]" * 2000)
    assert "depth limit exceeded" in exc.message


@pytest.mark.parametrize("data", [b"[]", b"1", b'"ping"', b"null", b"true"])
def test_decode_not_an_object(core: Any, data: bytes) -> None:
    exc = decode_error(core.codec, data)
    assert (exc.code, exc.message) == ("bad_json", "frame must be a JSON object")


def test_decode_type_field(core: Any) -> None:
    for frame in ({}, {"type": None}, {"type": 1}, {"type": ["ping"]}):
        exc = decode_error(core.codec, dumps(frame))
        assert (exc.code, exc.field) == ("bad_request", "type")
    exc = decode_error(core.codec, dumps({"type": "nope" * 20}))
    assert (exc.code, exc.field) == ("unknown_type", "type")
    assert exc.message == f"unknown frame type {('nope' * 20)[:32]!r}"


@pytest.mark.parametrize("rid", ["x" * 65, -1, MAX_SEQ + 1, True, 1.5, [1], {"a": 1}])
def test_decode_bad_request_id(core: Any, rid: Any) -> None:
    exc = decode_error(core.codec, dumps({"type": "ping", "id": rid}))
    assert (exc.code, exc.field) == ("bad_request", "id")


@pytest.mark.parametrize("rid", ["", "x" * 64, "é" * 64, 0, MAX_SEQ])
def test_decode_good_request_id(core: Any, rid: Any) -> None:
    assert core.codec.decode_client_frame(dumps({"type": "ping", "id": rid}), 10)["id"] == rid


def test_decode_required_fields(core: Any) -> None:
    """A missing (or null) required field is named; fields are checked in table order."""
    for ftype, spec in core.codec.CLIENT_TYPES.items():
        required = [name for name, (_kind, req) in spec.items() if req]
        if not required:
            assert core.codec.decode_client_frame(dumps({"type": ftype}), 10) == {"type": ftype}
            continue
        for frame in ({"type": ftype}, {"type": ftype, required[0]: None}):
            exc = decode_error(core.codec, dumps(frame))
            assert (exc.code, exc.field, exc.message) == (
                "bad_request", required[0], f"`{required[0]}` is required for {ftype}")


BAD_FIELDS = [
    # (frame, field)
    ({"type": "group_join", "group": ""}, "group"),
    ({"type": "group_join", "group": "x" * 65}, "group"),
    ({"type": "group_join", "group": "a b"}, "group"),
    ({"type": "group_join", "group": "a:b"}, "group"),
    ({"type": "group_join", "group": "é"}, "group"),
    ({"type": "group_join", "group": "ａ"}, "group"),  # fullwidth: not [A-Za-z]
    ({"type": "group_join", "group": 5}, "group"),
    ({"type": "typing", "conv": "p:a"}, "conv"),
    ({"type": "typing", "conv": "p:a:b:c"}, "conv"),
    ({"type": "typing", "conv": "g:"}, "conv"),
    ({"type": "typing", "conv": "x:a"}, "conv"),
    ({"type": "typing", "conv": "p::b"}, "conv"),
    ({"type": "typing", "conv": "p:a:"}, "conv"),
    ({"type": "typing", "conv": "g:" + "x" * 65}, "conv"),
    ({"type": "typing", "conv": ["g:x"]}, "conv"),
    ({"type": "typing", "conv": "p:b:a"}, "conv"),
    ({"type": "typing", "conv": "p:ab:a"}, "conv"),
    ({"type": "ack", "conv": "g:x", "seq": -1}, "seq"),
    ({"type": "ack", "conv": "g:x", "seq": MAX_SEQ + 1}, "seq"),
    ({"type": "ack", "conv": "g:x", "seq": True}, "seq"),
    ({"type": "ack", "conv": "g:x", "seq": 1.0}, "seq"),
    ({"type": "ack", "conv": "g:x", "seq": "1"}, "seq"),
    ({"type": "sync", "limit": 0}, "limit"),
    ({"type": "sync", "limit": False}, "limit"),
    ({"type": "send", "cmid": "", "to": "b", "body": ""}, "cmid"),
    ({"type": "send", "cmid": "x" * 65, "to": "b", "body": ""}, "cmid"),
    ({"type": "send", "cmid": "a\nb", "to": "b", "body": ""}, "cmid"),
    ({"type": "send", "cmid": "a\u200bb", "to": "b", "body": ""}, "cmid"),
    ({"type": "send", "cmid": 1, "to": "b", "body": ""}, "cmid"),
    ({"type": "send", "cmid": "c", "to": "b", "body": 1}, "body"),
    ({"type": "send", "cmid": "c", "to": "b", "group": "g", "body": ""}, "to"),
    ({"type": "send", "cmid": "c", "body": ""}, "to"),
    ({"type": "send", "cmid": "c", "to": None, "body": ""}, "to"),
    ({"type": "send", "cmid": "c", "to": None, "group": None, "body": ""}, "to"),
    ({"type": "auth", "token": ""}, "token"),
    ({"type": "auth", "token": "x" * 8193}, "token"),
    ({"type": "auth", "token": {}}, "token"),
    ({"type": "group_create", "group": "g", "name": "n" * 257}, "name"),
    ({"type": "group_create", "group": "g", "name": 3}, "name"),
    ({"type": "presence", "users": "a"}, "users"),
    ({"type": "presence", "users": ["a"] * 1001}, "users"),
    ({"type": "presence", "users": ["a", 1]}, "users"),
    ({"type": "presence", "users": ["a", "b c"]}, "users"),
    ({"type": "group_role", "group": "g", "user": "u", "role": "owner"}, "role"),
    ({"type": "group_role", "group": "g", "user": "u", "role": ["admin"]}, "role"),
]


@pytest.mark.parametrize("frame,field", BAD_FIELDS)
def test_decode_bad_fields(core: Any, frame: dict[str, Any], field: str) -> None:
    exc = decode_error(core.codec, dumps(frame))
    assert (exc.code, exc.field) == ("bad_request", field)
    assert f"`{field}`" in exc.message


def test_decode_body_limit_counts_utf8_bytes(core: Any) -> None:
    codec = core.codec

    def send(body: str, max_body: int) -> Any:
        return codec.decode_client_frame(
            dumps({"type": "send", "cmid": "c", "to": "b", "body": body}), max_body)

    assert send("x" * 10, 10)["body"] == "x" * 10
    for body in ("x" * 11, "é" * 6, "€" * 4, "😀" * 3, "x" * 9 + "é"):
        exc = decode_error(codec, dumps({"type": "send", "cmid": "c", "to": "b", "body": body}),
                           10)
        assert (exc.code, exc.field, exc.message) == (
            "too_large", "body", "`body` is too large (max 10 bytes)")
    assert send("é" * 5, 10)["body"] == "é" * 5
    # Where the UTF-8 length of a code point changes: 1 | 2 | 3 | 4 bytes.
    for ch, size in (("\x7f", 1), ("\x80", 2), ("\u07ff", 2), ("\u0800", 3), ("\uffff", 3),
                     ("\U00010000", 4), ("\U0010ffff", 4)):
        assert send(ch * 2, 2 * size)["body"] == ch * 2
        exc = decode_error(codec, dumps({"type": "send", "cmid": "c", "to": "b", "body": ch * 2}),
                           2 * size - 1)
        assert exc.code == "too_large", repr(ch)
    assert send("😀" * 2 + "xx", 10)["body"] == "😀😀xx"
    assert send("", 0)["body"] == ""


def test_encode(core: Any) -> None:
    obj = {"type": "msg", "seq": 1, "body": "é", "n": [1.5, None, True]}
    assert core.codec.encode(obj) == orjson.dumps(obj)


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_ws_text_frame_lengths(core: Any, n: int) -> None:
    payload = bytes(i % 251 for i in range(n))
    frame = core.codec.ws_text_frame(payload)
    assert type(frame) is bytes
    assert parse_ws_frames(frame) == [(True, 1, payload)]
    assert len(frame) == n + (2 if n < 126 else 4 if n < 65536 else 10)


def test_ws_text_frame_bytes_like(core: Any) -> None:
    codec = core.codec
    assert codec.ws_text_frame(bytearray(b"abc")) == b"\x81\x03abc"
    assert codec.ws_text_frame(memoryview(b"abc")) == b"\x81\x03abc"
    with pytest.raises(TypeError):
        codec.ws_text_frame("abc")


def test_ws_frames(core: Any) -> None:
    codec = core.codec
    payloads = [b"", b"a", b"x" * 126, b"y" * 65536, b'{"type":"msg"}']
    data = codec.ws_frames(payloads)
    assert type(data) is bytes
    assert parse_ws_frames(data) == [(True, 1, p) for p in payloads]
    assert data == b"".join(codec.ws_text_frame(p) for p in payloads)
    assert codec.ws_frames([]) == b""
    assert codec.ws_frames(iter([b"a"])) == b"\x81\x01a"
    assert codec.ws_frames((b"a", bytearray(b"b"))) == b"\x81\x01a\x81\x01b"


# ------------------------------------------------------------------ table
def test_table_counts_and_bind(core: Any) -> None:
    t = core.table.ConnectionTable()
    a, b = Sess("a"), Sess("b")
    t.add(a)
    t.add(b)
    assert (len(t), t.authenticated, t.users) == (2, 0, 0)
    assert t.bind(a, "alice", "phone") is None
    assert (a.user, a.device, a.bound) == ("alice", "phone", True)
    assert (len(t), t.authenticated, t.users) == (2, 1, 1)
    assert t.sessions_of("alice") == (a,)
    assert t.session_of("alice", "phone") is a
    assert t.session_of("alice", "laptop") is None
    assert t.sessions_of("nobody") == ()
    assert t.session_of("nobody", "phone") is None
    assert not b.bound
    assert list(t.iter_sessions()) == [a]


def test_table_same_device_replaces(core: Any) -> None:
    t = core.table.ConnectionTable()
    old, new = Sess("old"), Sess("new")
    for s in (old, new):
        t.add(s)
    t.bind(old, "alice", "phone")
    assert t.bind(new, "alice", "phone") is old
    assert old.bound is False and new.bound is True
    assert (len(t), t.authenticated, t.users) == (2, 1, 1)
    assert t.sessions_of("alice") == (new,)
    # The replaced session closes later: removing it leaves the new one alone.
    t.remove(old)
    assert (len(t), t.authenticated, t.users) == (1, 1, 1)
    assert t.sessions_of("alice") == (new,)
    t.remove(new)
    assert (len(t), t.authenticated, t.users) == (0, 0, 0)
    assert t.sessions_of("alice") == ()


def test_table_multi_device(core: Any) -> None:
    t = core.table.ConnectionTable()
    phone, laptop, tablet, phone2 = (Sess(n) for n in ("phone", "laptop", "tablet", "phone2"))
    for s in (phone, laptop, tablet, phone2):
        t.add(s)
    t.bind(phone, "alice", "phone")
    assert t.bind(laptop, "alice", "laptop") is None
    assert t.sessions_of("alice") == (phone, laptop)
    assert type(t.sessions_of("alice")) is tuple
    assert t.bind(tablet, "alice", "tablet") is None
    assert t.sessions_of("alice") == (phone, laptop, tablet)
    assert (t.authenticated, t.users) == (3, 1)
    # Replacing one device inside the tuple keeps the others; the new one goes last.
    assert t.bind(phone2, "alice", "phone") is phone
    assert t.sessions_of("alice") == (laptop, tablet, phone2)
    assert t.session_of("alice", "phone") is phone2
    assert (len(t), t.authenticated, t.users) == (4, 3, 1)
    t.remove(phone)  # replaced: not bound any more
    assert (len(t), t.authenticated) == (3, 3)
    t.remove(tablet)
    assert t.sessions_of("alice") == (laptop, phone2)
    t.remove(laptop)
    assert t.sessions_of("alice") == (phone2,)
    assert t.session_of("alice", "laptop") is None
    t.remove(phone2)
    assert (len(t), t.authenticated, t.users) == (0, 0, 0)
    assert list(t.iter_sessions()) == []


def test_table_remove_unbound_and_twice(core: Any) -> None:
    t = core.table.ConnectionTable()
    s, other = Sess("s"), Sess("other")
    t.add(s)
    t.add(other)
    t.remove(s)  # never authenticated
    assert (len(t), t.authenticated) == (1, 0)
    t.bind(other, "bob", "d")
    t.remove(other)
    assert (len(t), t.authenticated, t.users) == (0, 0, 0)
    assert other.bound is False
    # The bound part is idempotent (the count is per call).
    t.add(other)
    t.remove(other)
    assert (len(t), t.authenticated, t.users) == (0, 0, 0)


def test_table_iter_sessions_is_a_snapshot(core: Any) -> None:
    t = core.table.ConnectionTable()
    sessions = [Sess(str(i)) for i in range(6)]
    for i, s in enumerate(sessions):
        t.add(s)
        t.bind(s, f"u{i % 3}", f"d{i}")
    seen = []
    for s in t.iter_sessions():
        seen.append(s)
        t.remove(s)  # closing while iterating is safe
    assert sorted(seen, key=lambda s: s.name) == sessions
    assert (len(t), t.authenticated, t.users) == (0, 0, 0)


def test_table_lookups_never_return_removed(core: Any) -> None:
    rng = random.Random(5)
    t = core.table.ConnectionTable()
    live: set[Sess] = set()
    removed: set[Sess] = set()
    for i in range(400):
        if live and rng.random() < 0.4:
            s = rng.choice(sorted(live, key=lambda x: x.name))
            t.remove(s)
            live.discard(s)
            removed.add(s)
        else:
            s = Sess(str(i))
            t.add(s)
            replaced = t.bind(s, f"u{rng.randrange(5)}", f"d{rng.randrange(3)}")
            live.add(s)
            if replaced is not None:
                # The gateway closes the replaced session: it leaves the table.
                t.remove(replaced)
                live.discard(replaced)
                removed.add(replaced)
        for u in range(5):
            for s in t.sessions_of(f"u{u}"):
                assert s in live and s not in removed
                assert t.session_of(s.user, s.device) is s
        assert set(t.iter_sessions()) == live
        assert len(t) == t.authenticated == len(live)
        assert t.users == len({s.user for s in live})


# ------------------------------------------------------------------ wheel
@pytest.mark.parametrize("resolution", [1.0, 0.25, 0.1, 3.0])
def test_wheel_never_early_at_most_one_resolution_late(core: Any, resolution: float) -> None:
    rng = random.Random(int(resolution * 100))
    start = 1000.3
    wheel = core.table.TimerWheel(resolution, start)
    deadlines = {}
    base = int(start / resolution)
    for i in range(300):
        # Deadlines already passed, exact bucket edges, and one ulp either side of them.
        edge = rng.randrange(base - 3, base + 30) * resolution
        d = rng.choice([start + rng.uniform(-5, 30), edge, math.nextafter(edge, math.inf),
                        math.nextafter(edge, -math.inf)])
        deadlines[i] = d
        wheel.schedule(i, d)
    assert len(wheel) == 300
    fired: dict[int, float] = {}
    step = resolution / 7
    now = start
    while len(fired) < 300:
        now += step
        for item in wheel.expired(now):
            assert item not in fired, "handed out twice"
            fired[item] = now
    assert len(wheel) == 0
    for i, d in deadlines.items():
        effective = max(d, start)  # passed deadlines fire at the first call
        assert fired[i] >= d, f"item {i} fired early: {fired[i]} < {d}"
        # At most one resolution late, plus the polling step and float slack.
        assert fired[i] - effective <= resolution + step + 1e-9, (i, d, fired[i])


def test_wheel_bucket_order_and_jumps(core: Any) -> None:
    wheel = core.table.TimerWheel(1.0, 0.0)
    wheel.schedule("c", 3.5)
    wheel.schedule("a", 1.0)
    wheel.schedule("b", 2.0)
    wheel.schedule("a2", 0.5)  # same bucket as "a", scheduled later
    assert wheel.expired(0.99) == []
    assert wheel.expired(1.0) == ["a", "a2"]
    assert len(wheel) == 2
    # A jump far ahead hands out everything, in bucket order.
    wheel.schedule("z", 1e6)
    assert wheel.expired(5e6) == ["b", "c", "z"]
    assert len(wheel) == 0
    assert wheel.expired(5e6 + 10) == []
    # A deadline already passed goes to the first bucket not handed out yet.
    wheel.schedule("late", 1.0)
    assert wheel.expired(5e6 + 10.5) == []
    assert wheel.expired(5e6 + 11) == ["late"]


def test_wheel_items_are_not_cancelled(core: Any) -> None:
    wheel = core.table.TimerWheel(1.0, 0.0)
    wheel.schedule("s", 2.0)
    wheel.schedule("s", 4.0)  # rescheduled: both come back, the owner re-checks
    assert wheel.expired(2.0) == ["s"]
    assert wheel.expired(4.0) == ["s"]


def test_wheel_bad_times(core: Any) -> None:
    with pytest.raises(ZeroDivisionError):
        core.table.TimerWheel(0.0, 1.0)
    wheel = core.table.TimerWheel(1.0, 0.0)
    with pytest.raises(OverflowError):
        wheel.schedule("x", math.inf)
    with pytest.raises(ValueError):
        wheel.schedule("x", math.nan)
    assert len(wheel) == 0


# -------------------------------------------------------------- coalescer
def test_coalescer_one_write_per_session_in_order(core: Any) -> None:
    loop = FakeLoop()
    co = core.fanout.WriteCoalescer(loop)
    a, b = Sess("a"), Sess("b")
    co.push(a, b"1")
    co.push(b, b"x")
    co.push(a, b"2")
    co.push_framed(a, core.codec.ws_text_frame(b"3"))
    assert len(loop.callbacks) == 1, "one flush scheduled per iteration"
    assert a.raw.writes == [] and b.raw.writes == []
    loop.run()
    assert len(a.raw.writes) == 1 and len(b.raw.writes) == 1
    assert [p for _f, _o, p in parse_ws_frames(a.raw.writes[0])] == [b"1", b"2", b"3"]
    assert parse_ws_frames(b.raw.writes[0]) == [(True, 1, b"x")]
    assert (co.writes, co.frames) == (2, 4)
    assert a.out is None and b.out is None
    # The next iteration schedules a new flush.
    co.push(a, b"4")
    assert len(loop.callbacks) == 1
    loop.run()
    assert parse_ws_frames(a.raw.writes[1]) == [(True, 1, b"4")]
    assert (co.writes, co.frames) == (3, 5)
    co.flush()  # nothing queued: no write
    assert (co.writes, co.frames) == (3, 5)


def test_coalescer_skips_closed_sessions(core: Any) -> None:
    loop = FakeLoop()
    co = core.fanout.WriteCoalescer(loop)
    a, b = Sess("a"), Sess("b")
    co.push(a, b"1")
    co.push(b, b"2")
    a.closed = True
    loop.run()
    assert a.raw.writes == []
    assert a.out is None
    assert len(b.raw.writes) == 1
    assert (co.writes, co.frames) == (1, 1)


def test_coalescer_broadcast_frames_once(core: Any) -> None:
    loop = FakeLoop()
    co = core.fanout.WriteCoalescer(loop)
    sessions = [Sess(str(i)) for i in range(5)]
    payload = b'{"type":"msg","body":"hi"}'
    assert co.broadcast(iter(sessions), payload) == 5
    assert co.broadcast([], payload) == 0
    first = sessions[0].out[0]
    assert all(s.out[0] is first for s in sessions), "one framed bytes object shared"
    assert first == core.codec.ws_text_frame(payload)
    loop.run()
    assert all(s.raw.writes == [first] for s in sessions)
    assert all(s.raw.writes[0] is first for s in sessions)
    assert (co.writes, co.frames) == (5, 5)


def test_coalescer_on_a_real_loop(core: Any) -> None:
    import uvloop
    loop = uvloop.new_event_loop()
    try:
        co = core.fanout.WriteCoalescer(loop)
        a = Sess("a")

        async def main() -> None:
            for i in range(10):
                co.push(a, str(i).encode())
            assert a.raw.writes == []
            await asyncio.sleep(0)  # the flush runs at the end of this iteration
            assert len(a.raw.writes) == 1
            co.broadcast([a], b"b")
            co.push(a, b"c")
            await asyncio.sleep(0)
            assert len(a.raw.writes) == 2

        loop.run_until_complete(main())
    finally:
        loop.close()
    frames = [p for w in a.raw.writes for _f, _o, p in parse_ws_frames(w)]
    assert frames == [str(i).encode() for i in range(10)] + [b"b", b"c"]
    assert (co.writes, co.frames) == (2, 12)


def test_coalescer_counters_are_public(core: Any) -> None:
    co = core.fanout.WriteCoalescer(FakeLoop())
    assert (co.writes, co.frames) == (0, 0)
    co.writes = 0  # resettable (metrics tests do it), like the twin's plain attributes
    co.frames = 0
