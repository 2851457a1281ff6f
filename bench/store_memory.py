"""Embedded store memory as conversations pile up: RSS growth per conversation.

    python bench/store_memory.py [--conversations 2400000] [--baseline DIR]

An embedded node's SQLite store keeps a little per conversation in memory to
number entries without reading the file.  It used to keep it for every
conversation it ever saw; now at most ``_LATEST_CACHE`` (1,000,000) are kept
and the rest are read back when used.  Here one process stores one message in
each of N new private conversations (reserve + append, as a send does; the
entry log is let move into the table every 20,000, as at a node's pace, so
no backlog's high-water mark stays in the RSS) and
prints the RSS it grew by over the second half of them, per conversation: the
first half fills what is bounded (the per-conversation seq maps, the caches, SQLite's
page cache, mostly), so with N above twice the bound the second half shows
what still grows: the key filters (about 3 bytes per message and per new
conversation, see keyfilter.py) and whatever else does, which this figure is
here to catch.
``--baseline DIR`` (another checkout, see
bench/instructions.py) runs the same in the same run, alternately, and prints
the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child process, with the checkout under test first on sys.path.
_CHILD = r"""
import asyncio, gc, json, os, sys, tempfile, time
from imfast.backends.base import StoredMessage
from imfast.backends.sqlite import SQLiteStore

def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

async def main(n: int) -> None:
    store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))
    async def store_each(first: int, last: int) -> None:
        for i in range(first, last):
            if i % 20_000 == 0:  # a node's pace, not a backlog: RSS keeps no high-water mark
                await store.settle()
            conv = f"p:a{i:08d}:b{i:08d}"
            r = store.reserve_now(conv, f"a{i:08d}:c{i}", f"m{i}", 0)
            await store.append([StoredMessage(conv, r.seq, f"m{i}", f"a{i:08d}", "d",
                                              f"c{i}", "hi", 0)])
    await store_each(0, n // 2)
    await store.settle()
    gc.collect()
    before = rss()
    started = time.perf_counter()
    await store_each(n // 2, n)
    await store.settle()
    gc.collect()
    print(json.dumps({"bytes_per_conv": (rss() - before) / (n - n // 2),
                      "seconds": round(time.perf_counter() - started, 1),
                      "latest_kept": len(store._stored_latest),
                      "counters_kept": len(store._counters)}))
    await store.close()

asyncio.run(main(int(sys.argv[1])))
"""


def python_of(checkout: str) -> str:
    venv = os.path.join(checkout, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def measure(checkout: str, conversations: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run([python_of(checkout), "-c", _CHILD, str(conversations)], env=env,
                         cwd=checkout, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=2_400_000)
    parser.add_argument("--baseline", help="another checkout to measure the same way")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.conversations < 2:
        parser.error("--conversations must be at least 2")
    runs: dict[str, list[dict[str, float]]] = {"this": [], "baseline": []}
    for _ in range(args.repeats):
        runs["this"].append(measure(ROOT, args.conversations))
        print("this checkout:", runs["this"][-1], flush=True)
        if args.baseline:
            runs["baseline"].append(measure(os.path.abspath(args.baseline), args.conversations))
            print("baseline:     ", runs["baseline"][-1], flush=True)
    this = sum(r["bytes_per_conv"] for r in runs["this"]) / len(runs["this"])
    print(f"RSS growth per conversation over conversations {args.conversations // 2:,}-"
          f"{args.conversations:,}: "
          f"this {this:,.0f} B", end="")
    if runs["baseline"]:
        base = sum(r["bytes_per_conv"] for r in runs["baseline"]) / len(runs["baseline"])
        print(f", baseline {base:,.0f} B, ratio {this / base:.2f}x" if base > 0 else
              f", baseline {base:,.0f} B")
    else:
        print()


if __name__ == "__main__":
    main()
