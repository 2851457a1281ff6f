"""Cython core vs its pure-Python twin: operations per second, same run.

    python bench/core_bench.py [--quick]

Each row times the same work on ``imfast._core.<x>_py`` (twin) and
``imfast._core._<x>`` (extension), best of several repeats, and prints the
ratio.  If the extension is not built, only the twin is timed.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import orjson

from imfast._core import codec_py, fanout_py, keyfilter_py, table_py

try:
    from imfast._core import _codec, _fanout, _keyfilter, _table

    CY: tuple[ModuleType, ...] | None = (_codec, _table, _fanout, _keyfilter)
    CY_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the build
    CY = None
    CY_ERROR = str(exc)

PY = (codec_py, table_py, fanout_py, keyfilter_py)

SEND_FRAME = orjson.dumps({"type": "send", "id": 17, "cmid": "c-8f2a41", "to": "bob",
                           "body": "hello there, are we still on for lunch tomorrow at noon?"})
MSG_PAYLOAD = orjson.dumps({"type": "msg", "conv": "p:alice:bob", "seq": 1234, "msg_id": "m" * 26,
                            "from": "alice", "from_device": "phone", "ts": 1700000000000,
                            "kind": 0, "body": "hello there, are we still on for lunch?",
                            "cmid": "c-8f2a41"})


class Raw:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += 1


class Sess:
    __slots__ = ("bound", "closed", "device", "out", "raw", "user")

    def __init__(self) -> None:
        self.user = ""
        self.device = ""
        self.bound = False
        self.out: list[bytes] | None = None
        self.closed = False
        self.raw = Raw()


class Loop:
    """call_soon only records: the bench calls flush itself."""

    def call_soon(self, cb: Any) -> None:
        pass


# Each case: (name, unit, make(mods) -> (run, ops_per_run)).
def case_decode(mods: tuple[ModuleType, ...]) -> tuple[Callable[[], object], int]:
    decode = mods[0].decode_client_frame
    data = SEND_FRAME

    def run() -> None:
        for _ in range(1000):
            decode(data, 4096)

    return run, 1000


def case_frame(mods: tuple[ModuleType, ...]) -> tuple[Callable[[], object], int]:
    frame = mods[0].ws_text_frame
    payload = MSG_PAYLOAD

    def run() -> None:
        for _ in range(1000):
            frame(payload)

    return run, 1000


def case_frames(mods: tuple[ModuleType, ...]) -> tuple[Callable[[], object], int]:
    frames = mods[0].ws_frames
    batch = [MSG_PAYLOAD] * 8

    def run() -> None:
        for _ in range(250):
            frames(batch)

    return run, 250 * 8


def case_table(mods: tuple[ModuleType, ...]) -> tuple[Callable[[], object], int]:
    table_mod = mods[1]
    sessions = [Sess() for _ in range(1000)]
    users = [f"user{i % 300}" for i in range(1000)]  # a third of users on 2-4 devices
    devices = [f"dev{i // 300}" for i in range(1000)]

    def run() -> None:
        t = table_mod.ConnectionTable()
        for s, u, d in zip(sessions, users, devices):
            t.add(s)
            t.bind(s, u, d)
        for u in users:
            t.sessions_of(u)
        for u, d in zip(users, devices):
            t.session_of(u, d)
        for s in sessions:
            t.remove(s)

    return run, 1000


def case_wheel(mods: tuple[ModuleType, ...]) -> tuple[Callable[[], object], int]:
    table_mod = mods[1]
    deadlines = [1000.0 + (i * 7919 % 30000) / 1000.0 for i in range(1000)]

    def run() -> None:
        w = table_mod.TimerWheel(1.0, 1000.0)
        for i, d in enumerate(deadlines):
            w.schedule(i, d)
        now = 1000.0
        got = 0
        while got < 1000:
            now += 1.0
            got += len(w.expired(now))

    return run, 1000


def _coalescer_case(per_session: int) -> Callable[..., tuple[Callable[[], object], int]]:
    def make(mods: tuple[ModuleType, ...]) -> tuple[Callable[[], object], int]:
        co = mods[2].WriteCoalescer(Loop())
        push = co.push
        sessions = [Sess() for _ in range(100)]
        payload = MSG_PAYLOAD

        def run() -> None:
            for _ in range(per_session):
                for s in sessions:
                    push(s, payload)
            co.flush()

        return run, 100 * per_session

    return make


def case_broadcast(mods: tuple[ModuleType, ...]) -> tuple[Callable[[], object], int]:
    co = mods[2].WriteCoalescer(Loop())
    sessions = [Sess() for _ in range(200)]
    payload = MSG_PAYLOAD

    def run() -> None:
        co.broadcast(sessions, payload)
        co.flush()

    return run, 200


CASES = [
    ("decode `send` frame", "frames", case_decode),
    ("ws_text_frame (230 B)", "frames", case_frame),
    ("ws_frames x8 (230 B)", "frames", case_frames),
    ("table add+bind+lookups+remove", "sessions", case_table),
    ("wheel schedule+expire", "items", case_wheel),
    ("coalescer push+flush (1/session)", "pushes", _coalescer_case(1)),
    ("coalescer push+flush (4/session)", "pushes", _coalescer_case(4)),
    ("coalescer broadcast+flush (200)", "deliveries", case_broadcast),
    ("key filter add (dedup keys)", "keys", lambda mods: case_keyfilter(mods, False)),
    ("key filter lookup (absent keys)", "keys", lambda mods: case_keyfilter(mods, True)),
]


def case_keyfilter(mods: tuple[ModuleType, ...], lookup: bool
                   ) -> tuple[Callable[[], object], int]:
    keys = [f"user{i}:c{i}" for i in range(1000)]
    absent = [f"other{i}:c{i}" for i in range(1000)]
    f = mods[3].KeyFilter(100_000)
    f.add_all(keys)

    def run() -> None:
        if lookup:
            for key in absent:
                key in f  # noqa: B015 - the lookup is what is timed
        else:
            for key in keys:
                f.add(key)

    return run, len(keys)


def ops_per_sec(make: Callable[..., tuple[Callable[[], object], int]],
                mods: tuple[ModuleType, ...], min_time: float, repeats: int) -> float:
    run, ops = make(mods)
    run()  # warm up
    loops = 1
    while True:  # calibrate: a timing window of about min_time
        t0 = time.perf_counter()
        for _ in range(loops):
            run()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time / 4:
            break
        loops *= 2
    loops = max(1, int(loops * min_time / max(elapsed, 1e-9)))
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                run()
            best = min(best, time.perf_counter() - t0)
    finally:
        gc.enable()
    return ops * loops / best


def human(n: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings (noisier)")
    args = parser.parse_args()
    min_time, repeats = (0.05, 3) if args.quick else (0.15, 5)

    print(f"$ {shlex.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}), "
          f"nproc={os.cpu_count()}, {platform.machine()}")
    if CY is None:
        print(f"Cython core NOT built ({CY_ERROR}): timing the twin only")
    print()
    header = f"{'operation':34} {'unit':>10} {'python/s':>10} {'cython/s':>10} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, unit, make in CASES:
        py = ops_per_sec(make, PY, min_time, repeats)
        if CY is None:
            print(f"{name:34} {unit:>10} {human(py):>10} {'-':>10} {'-':>7}")
            continue
        cy = ops_per_sec(make, CY, min_time, repeats)
        print(f"{name:34} {unit:>10} {human(py):>10} {human(cy):>10} {cy / py:>6.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
