"""The embedded store's CPU per message, the way the router drives it, variants side by side.

    python bench/store_bench.py [--users 20000] [--messages 100000] [--batch 256]

Per message, as the router and an acknowledging recipient do it: a
``reserve_now`` (dedup check + sequence number), an ``append`` per batch
(one commit, like the group committer), and the recipient's ``advance_now``
(delivery cursor).  Moved cursors are written every ``--flush-every``
batches.  The file is first filled with ``--prefill`` messages and reopened,
so the indexes have the size of a store that has been running a while.

Rows: CPU time of the whole process (the entry log's mover thread and the WAL
checkpoint thread included, the moves awaited) per message, for each variant in
the same run, with the ratio to the first:

* ``file reads``: every "was this stored?" question read from SQLite (how
  the store worked before the key filters);
* ``key filters``: the default - certain "no" answers from memory
  (imfast/backends/sqlite_keys.py);
* ``... cursors every N batches``: the same with fewer cursor writes;
* ``... blind acks``: the default, with the recipient's ack taken as a cast
  ack is (``advance_blind_now``: a cursor not in memory is moved without
  reading it).  With ``--contacts`` above 1 there are more cursors than the
  store keeps in memory (at 80K users and 4 contacts, most acks).

``loop us`` is the part of it on the driving thread (the event loop's, in the
server): what limits one router process's messages per second when the
threads beside it (the entry log's mover, the checkpoints) have a core of
their own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

from imfast.backends import sqlite as sqlite_mod
from imfast.backends.base import StoredMessage
from imfast.backends.sqlite import SQLiteStore


def _workload(users: int, count: int, seed: int, start: int,
              contacts: int = 1) -> list[tuple[str, str, str, str]]:
    """(conv, sender, recipient, cmid), gen.py-style cmids: random pairs of neighbours, or
    with ``contacts`` above 1 a random user and one of the next ``contacts`` users."""
    rnd = random.Random(seed)
    out = []
    for n in range(start, start + count):
        if contacts > 1:
            i = rnd.randrange(users)
            a, b = sorted((i, (i + 1 + rnd.randrange(contacts)) % users))
        else:
            a = rnd.randrange(users // 2) * 2
            b = a + 1
        sender, recipient = (f"u{a}", f"u{b}") if rnd.random() < 0.5 else (f"u{b}", f"u{a}")
        conv = f"p:u{a}:u{b}" if f"u{a}" < f"u{b}" else f"p:u{b}:u{a}"
        out.append((conv, sender, recipient, f"1.{n}"))
    return out


async def _drive(store: SQLiteStore, work: list[tuple[str, str, str, str]], batch: int,
                 flush_every: int, blind: bool = False) -> None:
    body = "x" * 64
    ts = int(time.time() * 1000)
    advance = store.advance_blind_now if blind else store.advance_now
    for b, i in enumerate(range(0, len(work), batch)):
        chunk = work[i:i + batch]
        messages = []
        for conv, sender, _, cmid in chunk:
            msg_id = f"m{cmid}"
            res = store.reserve_now(conv, f"{sender}:{cmid}", msg_id, 0)
            messages.append(StoredMessage(conv, res.seq, msg_id, sender, "d1", cmid, body, ts))
        await store.append(messages)
        for m, (_, _, recipient, _) in zip(messages, chunk, strict=True):
            advance(recipient, "d1", m.conv, m.seq)
        if (b + 1) % flush_every == 0:
            store._flush_moved()
    settle = getattr(store, "settle", None)  # the entry log's moves count too
    if settle is not None:
        await settle()
        store._flush_moved(wait=True)
    else:  # a store from before the entry log (run from an older checkout as the baseline)
        store._flush_moved()


async def _until_ready(store: SQLiteStore) -> float:
    started = time.monotonic()
    while not store._known.ready():
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def _one(path: str, variant: str, opts: argparse.Namespace,
               seed: int) -> tuple[float, ...]:
    store = SQLiteStore(path)
    try:
        scan = await _until_ready(store)
        if variant == "file reads":
            store._known.complete = False
            store._known.ready = lambda: False  # type: ignore[method-assign]
        else:
            print(f"  ({variant}: key scan of the reopened file took {scan:.2f} s)", flush=True)
        flush_every = opts.flush_every if "cursors every" in variant else 1
        work = _workload(opts.users, opts.messages, seed, start=10_000_000 * seed,
                         contacts=opts.contacts)
        io, cpu, loop = _io(), time.process_time(), time.thread_time()
        await _drive(store, work, opts.batch, flush_every, blind="blind" in variant)
        cpu = (time.process_time() - cpu) / opts.messages * 1e6
        loop = (time.thread_time() - loop) / opts.messages * 1e6
        after = _io()
        return cpu, *((after[k] - io[k]) / opts.messages for k in ("syscr", "syscw", "wchar")), \
            loop
    finally:
        await store.close()


def _io() -> dict[str, int]:
    """This process's read/write system calls and bytes written (all threads), or zeros."""
    try:
        with open("/proc/self/io") as fh:
            return {k: int(v) for k, v in (line.split(": ") for line in fh)}
    except OSError:
        return {"syscr": 0, "syscw": 0, "wchar": 0}


async def main(opts: argparse.Namespace) -> None:
    sqlite_mod._FLUSH_DELAY = 3600.0  # cursors are written when the bench says so
    tmp = tempfile.mkdtemp(prefix="imfast-store-bench-")
    try:
        seed_file = os.path.join(tmp, "seed.db")
        store = SQLiteStore(seed_file)
        await _drive(store, _workload(opts.users, opts.prefill, 1, start=0, contacts=opts.contacts),
                     1000, 1)
        await store.close()
        every = f"key filters, cursors every {opts.flush_every} batches"
        variants = ["file reads", "key filters", every, "key filters, blind acks"]
        results: dict[str, list[tuple[float, ...]]] = {v: [] for v in variants}
        for r in range(opts.repeats):
            for v in variants:  # interleaved: the machine's noise hits all alike
                path = os.path.join(tmp, f"run{r}-{len(results[v])}-{v[:4]}.db")
                shutil.copyfile(seed_file, path)  # closed: the WAL is checkpointed and empty
                results[v].append(await _one(path, v, opts, seed=2 + r))
                os.unlink(path)
        print(f"\nstore per message ({opts.users:,} users, {opts.contacts} contacts each, "
              f"{opts.prefill:,} messages "
              f"before, {opts.messages:,} measured in batches of {opts.batch}; median of "
              f"{opts.repeats} interleaved runs; {platform.python_version()}, "
              f"{os.cpu_count()} CPUs).  CPU time varies run to run on a shared VM; the\n"
              f"system calls (/proc/self/io, checkpoint thread included) do not.")
        print(f"{'variant':42s} {'CPU us':>7s} {'vs first':>8s} {'loop us':>7s} {'reads':>6s} "
              f"{'writes':>6s} {'KiB out':>7s}  CPU runs")
        base = statistics.median(x[0] for x in results[variants[0]])
        for v in variants:
            cpu, reads, writes, out, loop = (statistics.median(x[i] for x in results[v])
                                             for i in range(5))
            runs = ", ".join(f"{x[0]:.0f}" for x in results[v])
            print(f"{v:42s} {cpu:7.1f} {base / cpu:7.2f}x {loop:7.1f} {reads:6.2f} "
                  f"{writes:6.2f} {out / 1024:7.2f}  {runs}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--prefill", type=int, default=200_000)
    p.add_argument("--messages", type=int, default=40_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--contacts", type=int, default=1,
                   help="each user writes to this many neighbours (1: fixed pairs)")
    p.add_argument("--flush-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    asyncio.run(main(p.parse_args(sys.argv[1:])))
