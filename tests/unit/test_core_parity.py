"""The Cython core and its pure-Python twins agree on random input.

Same result, or the same error (type, ``code``, ``field``, message), for
random frames; the same observable state after random operation sequences on
the table, the wheel and the coalescer; the same bytes from the framers.
Skipped as a whole when ``IMFAST_NO_EXTENSIONS=1`` (nothing to compare);
otherwise a missing extension fails every test here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imfast._core.codec_py import CLIENT_TYPES

MAX_SEQ = (1 << 53) - 1
SETTINGS = settings(max_examples=300, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    """What a call did: ("ok", result) or ("err", type, code, field, message, str)."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - comparing whatever was raised
        return ("err", type(exc), getattr(exc, "code", None), getattr(exc, "field", None),
                getattr(exc, "message", None), str(exc))


# ------------------------------------------------------------------ codec
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@-"
ids = st.one_of(
    st.text(ID_CHARS, min_size=1, max_size=64),
    st.text(ID_CHARS, min_size=63, max_size=66),
    st.text(ID_CHARS + ": é\x00ａ", min_size=0, max_size=8),
)
json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.sampled_from([0, 1, -1, MAX_SEQ, MAX_SEQ + 1, 1 << 63, 1 << 64, 1.0, -0.0, 1e300]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), ids,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def conv_ids(draw: Any) -> str:
    form = draw(st.sampled_from(["p", "g", "junk"]))
    if form == "g":
        return "g:" + draw(ids)
    if form == "p":
        a, b = draw(ids), draw(ids)
        if draw(st.booleans()):
            a, b = sorted((a, b))
        return f"p:{a}:{b}"
    return draw(st.text(ID_CHARS + ":pg", max_size=12))


NON_ASCII = st.characters(min_codepoint=0x80, exclude_categories=("Cs",))  # no lone surrogates
# Code points where the UTF-8 length changes (1 | 2 | 3 | 4 bytes).
UTF8_EDGES = st.sampled_from(["a", "\x7f", "\x80", "\u07ff", "\u0800", "\uffff", "\U00010000",
                              "\U0010ffff"])


def value_for(kind: str) -> st.SearchStrategy[Any]:
    """Mostly valid values of a field kind, with the edges around its limits."""
    return {
        "id": ids,
        "conv": conv_ids(),
        "seq": st.one_of(st.integers(0, MAX_SEQ),
                         st.sampled_from([0, MAX_SEQ, MAX_SEQ + 1, -1, True, 2.0])),
        "limit": st.one_of(st.integers(1, 1000), st.sampled_from([0, 1, MAX_SEQ, False])),
        "cmid": st.one_of(st.text(min_size=1, max_size=64),
                          st.text(st.characters(codec="ascii"), min_size=0, max_size=66)),
        "token": st.one_of(st.text(min_size=1, max_size=40),
                           st.sampled_from(["", "t" * 8192, "t" * 8193])),
        "body": st.one_of(st.text(max_size=40),
                          st.text(NON_ASCII, max_size=20),
                          st.text(UTF8_EDGES, max_size=30)),
        "text": st.one_of(st.text(max_size=20), st.sampled_from(["n" * 256, "n" * 257])),
        "ids": st.one_of(st.lists(ids, max_size=5), st.just(["a"] * 1001),
                         st.just(["a"] * 1000)),
        "role": st.sampled_from(["admin", "member", "owner", "Admin", ""]),
        "bool": st.sampled_from([True, False, 0, 1, None, "true", 1.0]),
    }[kind]


@st.composite
def frames(draw: Any) -> Any:
    """A frame built from CLIENT_TYPES, then randomly mutated."""
    ftype = draw(st.sampled_from(sorted(CLIENT_TYPES)))
    obj: dict[str, Any] = {"type": ftype}
    for name, (kind, required) in CLIENT_TYPES[ftype].items():
        if required or draw(st.booleans()):
            obj[name] = draw(value_for(kind))
    if draw(st.booleans()):
        obj["id"] = draw(st.one_of(st.text(max_size=66), st.integers(-2, MAX_SEQ + 2),
                                   json_values))
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(st.sampled_from(["drop", "null", "replace", "extra", "type"]))
        keys = sorted(obj)
        if mutation == "drop" and keys:
            obj.pop(draw(st.sampled_from(keys)))
        elif mutation == "null" and keys:
            obj[draw(st.sampled_from(keys))] = None
        elif mutation == "replace" and keys:
            obj[draw(st.sampled_from(keys))] = draw(json_values)
        elif mutation == "extra":
            obj[draw(st.text(max_size=8))] = draw(json_values)
        elif mutation == "type":
            obj["type"] = draw(st.one_of(st.sampled_from(sorted(CLIENT_TYPES)), json_values))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.lists(st.just(obj), max_size=2), json_values))
    return obj


def serialise(draw: Any, obj: Any) -> bytes | str:
    how = draw(st.sampled_from(["orjson", "json", "json_ascii", "str"]))
    if how == "orjson":
        try:
            return orjson.dumps(obj)
        except TypeError:  # ints beyond 64 bits
            how = "json"
    text = json.dumps(obj, ensure_ascii=how == "json_ascii")
    return text if how == "str" else text.encode()


@st.composite
def wire_inputs(draw: Any) -> bytes | str:
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        depth = draw(st.integers(1, 1500))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = draw(st.sampled_from(["1", '"x"', "[]"]))
        return (opener * depth + inner + closer * depth).encode()
    if kind == 2:
        depth = draw(st.integers(1, 1200))
        return ('{"type":"send","cmid":"c","to":"b","body":' + "[" * depth + "]" * depth
                + "}").encode()
    data = serialise(draw, draw(frames()))
    if kind == 3 and data:
        raw = bytearray(data.encode() if isinstance(data, str) else data)
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    return data


max_bodies = st.one_of(st.sampled_from([0, 1, 10, 20, 4096, 1 << 70]),
                       st.integers(0, 64), st.just(10.5))


def test_decode_parity(core_pair: Any) -> None:
    py, cy = core_pair[0].codec, core_pair[1].codec

    @SETTINGS
    @given(data=wire_inputs(), max_body=max_bodies)
    def check(data: bytes | str, max_body: Any) -> None:
        a = outcome(py.decode_client_frame, data, max_body)
        b = outcome(cy.decode_client_frame, data, max_body)
        assert a == b
        if a[0] == "ok":
            assert type(b[1]) is dict

    check()


def test_decode_parity_valid_frames(core_pair: Any) -> None:
    """Unmutated frames: mostly accepted, so the success path is compared too."""
    py, cy = core_pair[0].codec, core_pair[1].codec
    accepted = 0

    @SETTINGS
    @given(ftype=st.sampled_from(sorted(CLIENT_TYPES)), data=st.data(), max_body=max_bodies)
    def check(ftype: str, data: Any, max_body: Any) -> None:
        nonlocal accepted
        obj: dict[str, Any] = {"type": ftype}
        for name, (kind, required) in CLIENT_TYPES[ftype].items():
            if required or data.draw(st.booleans()):
                obj[name] = data.draw(value_for(kind))
        raw = orjson.dumps(obj)
        a = outcome(py.decode_client_frame, raw, max_body)
        assert a == outcome(cy.decode_client_frame, raw, max_body)
        accepted += a[0] == "ok"

    check()
    assert accepted > 30


def test_decode_parity_send(core_pair: Any) -> None:
    """``send`` in detail: destinations, null, the body size in UTF-8 bytes."""
    py, cy = core_pair[0].codec, core_pair[1].codec

    @SETTINGS
    @given(to=st.one_of(st.none(), st.just("bob"), ids), group=st.one_of(st.none(), st.just("g")),
           has_to=st.booleans(), has_group=st.booleans(), cmid=value_for("cmid"),
           body=st.one_of(st.text(max_size=80), st.text(NON_ASCII, max_size=40),
                          st.text(UTF8_EDGES, max_size=30)),
           max_body=max_bodies)
    def check(to: Any, group: Any, has_to: bool, has_group: bool, cmid: str, body: str,
              max_body: Any) -> None:
        obj: dict[str, Any] = {"type": "send", "cmid": cmid, "body": body}
        if has_to:
            obj["to"] = to
        if has_group:
            obj["group"] = group
        raw = orjson.dumps(obj)
        assert outcome(py.decode_client_frame, raw, max_body) == \
            outcome(cy.decode_client_frame, raw, max_body)

    check()


def test_encode_parity(core_pair: Any) -> None:
    py, cy = core_pair[0].codec, core_pair[1].codec

    @SETTINGS
    @given(obj=json_values)
    def check(obj: Any) -> None:
        assert outcome(py.encode, obj) == outcome(cy.encode, obj)

    check()


payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n, b: bytes([b]) * n,
              st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 65537]), st.integers(0, 255)),
)


def test_framing_parity(core_pair: Any) -> None:
    py, cy = core_pair[0].codec, core_pair[1].codec

    @SETTINGS
    @given(batch=st.lists(payloads, max_size=6))
    def check(batch: list[bytes]) -> None:
        for p in batch:
            assert py.ws_text_frame(p) == cy.ws_text_frame(p)
        assert py.ws_frames(batch) == cy.ws_frames(batch)
        assert py.ws_frames(tuple(batch)) == cy.ws_frames(iter(batch))

    check()


# ------------------------------------------------------------------ table
class Sess:
    __slots__ = ("bound", "device", "idx", "user")

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.user = ""
        self.device = ""
        self.bound = False


def idx(s: Any) -> Any:
    return None if s is None else s.idx


def table_state(t: Any, sessions: list[Sess], users: list[str],
                devices: list[str]) -> tuple[Any, ...]:
    return (
        outcome(len, t), t.authenticated, t.users,
        [idx(s) for s in t.iter_sessions()],
        {u: [idx(s) for s in t.sessions_of(u)] for u in users},
        {(u, d): idx(t.session_of(u, d)) for u in users for d in devices},
        [(s.user, s.device, s.bound) for s in sessions],
    )


table_ops = st.lists(st.tuples(st.sampled_from(["add", "bind", "bind", "remove"]),
                               st.integers(0, 7), st.integers(0, 2), st.integers(0, 2)),
                     max_size=40)


def test_table_parity(core_pair: Any) -> None:
    py, cy = core_pair[0].table, core_pair[1].table
    users, devices = ["u0", "u1", "u2"], ["d0", "d1", "d2"]

    @SETTINGS
    @given(ops=table_ops, realistic=st.booleans())
    def check(ops: list[tuple[str, int, int, int]], realistic: bool) -> None:
        tables = [py.ConnectionTable(), cy.ConnectionTable()]
        sessions = [[Sess(i) for i in range(8)] for _ in tables]
        # realistic: each session is added once, bound at most once, removed once
        # (what the gateway does); otherwise anything goes, and both must still agree.
        state = ["new"] * 8
        for op, i, u, d in ops:
            if realistic:
                if op == "add" and state[i] == "new":
                    state[i] = "added"
                elif op == "bind" and state[i] == "added":
                    state[i] = "bound"
                elif op == "remove" and state[i] in ("added", "bound"):
                    state[i] = "removed"
                else:
                    continue
            results = []
            for t, ss in zip(tables, sessions):
                if op == "add":
                    results.append(outcome(t.add, ss[i]))
                elif op == "bind":
                    r = outcome(t.bind, ss[i], users[u], devices[d])
                    results.append((r[0], idx(r[1])) if r[0] == "ok" else r)
                else:
                    results.append(outcome(t.remove, ss[i]))
            assert results[0] == results[1], (op, i, u, d)
            assert table_state(tables[0], sessions[0], users, devices) == \
                table_state(tables[1], sessions[1], users, devices)

    check()


wheel_ops = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 1000),
                  st.one_of(st.floats(-50, 400), st.integers(-5, 400),
                            st.sampled_from([math.inf, math.nan, 1e30]))),
        st.tuples(st.just("expired"), st.just(0),
                  # 2000: a clock jump; the twin walks every tick up to it (keep it cheap).
                  st.one_of(st.floats(-50, 400), st.sampled_from([2000.0, 0.3, 0.7, 1.0]))),
    ),
    max_size=40,
)


def test_wheel_parity(core_pair: Any) -> None:
    py, cy = core_pair[0].table, core_pair[1].table

    @SETTINGS
    @given(resolution=st.one_of(st.sampled_from([1.0, 0.1, 0.25, 3.0, 1]),
                                st.floats(0.05, 10.0)),
           start=st.one_of(st.floats(-10, 100), st.sampled_from([0.0, 0.3, 2.9999999999999996])),
           ops=wheel_ops)
    def check(resolution: float, start: float, ops: list[tuple[str, int, float]]) -> None:
        wheels = [py.TimerWheel(resolution, start), cy.TimerWheel(resolution, start)]
        for op, item, t in ops:
            results = []
            for w in wheels:
                if op == "schedule":
                    r = outcome(w.schedule, item, t)
                else:
                    r = outcome(w.expired, t)
                # Exceptions: same type; the twin's message comes from int()/math.ceil().
                results.append(r[:2] if r[0] == "err" else r)
                results.append(len(w))
            assert results[:2] == results[2:], (op, item, t)

    check()


# -------------------------------------------------------------- coalescer
class Raw:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class OutSess:
    __slots__ = ("closed", "out", "raw")

    def __init__(self) -> None:
        self.out: list[bytes] | None = None
        self.closed = False
        self.raw = Raw()


class Loop:
    def __init__(self) -> None:
        self.scheduled: list[Any] = []

    def call_soon(self, cb: Any) -> None:
        self.scheduled.append(cb)

    def run_once(self) -> None:
        callbacks, self.scheduled = self.scheduled, []
        for cb in callbacks:
            cb()


coalescer_ops = st.lists(
    st.tuples(st.sampled_from(["push", "push", "framed", "broadcast", "close", "tick", "flush"]),
              st.integers(0, 4), st.binary(max_size=140)),
    max_size=40,
)


def test_coalescer_parity(core_pair: Any) -> None:
    py, cy = core_pair[0].fanout, core_pair[1].fanout

    @SETTINGS
    @given(ops=coalescer_ops)
    def check(ops: list[tuple[str, int, bytes]]) -> None:
        loops = [Loop(), Loop()]
        cos = [py.WriteCoalescer(loops[0]), cy.WriteCoalescer(loops[1])]
        sessions = [[OutSess() for _ in range(5)] for _ in cos]
        for op, i, payload in ops + [("tick", 0, b"")]:
            for co, loop, ss in zip(cos, loops, sessions):
                if op == "push":
                    co.push(ss[i], payload)
                elif op == "framed":
                    co.push_framed(ss[i], payload)
                elif op == "broadcast":
                    assert co.broadcast(ss[:i + 1], payload) == i + 1
                elif op == "close":
                    ss[i].closed = True
                elif op == "tick":
                    loop.run_once()
                else:
                    co.flush()
            assert len(loops[0].scheduled) == len(loops[1].scheduled)
            assert (cos[0].writes, cos[0].frames) == (cos[1].writes, cos[1].frames)
            for a, b in zip(*sessions):
                assert a.raw.writes == b.raw.writes
                assert a.out == b.out

    check()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.integers(min_value=-(2**70), max_value=2**70),
                          st.tuples(st.text(max_size=8), st.text(max_size=8), st.text(max_size=8))),
                max_size=400),
       st.lists(st.text(max_size=30), max_size=400))
def test_keyfilter_parity(core_pair: Any, added: list[Any], asked: list[Any]) -> None:
    # The same bits: every question - added keys, absent ones and their false "maybe"s
    # alike - gets the same answer from both, with a filter small enough to be crowded.
    py, cy = (impl._load("keyfilter").KeyFilter(capacity=4) for impl in core_pair)
    for f in (py, cy):
        f.add_all(added[: len(added) // 2])
        for key in added[len(added) // 2:]:
            f.add(key)
    assert (py.count, py.nbytes, py.capacity) == (cy.count, cy.nbytes, cy.capacity)
    assert [k in py for k in added + asked] == [k in cy for k in added + asked]
    assert py.to_bytes() == cy.to_bytes()
