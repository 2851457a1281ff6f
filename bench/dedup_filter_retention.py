"""Embedded store under retention: dedup filter memory against the entries kept.

    python bench/dedup_filter_retention.py [--days 12] [--per-day 100000] [--keep 3]
                                           [--baseline DIR]

The SQLite store answers "was this cmid stored before?" from an in-memory
Bloom filter (about 2 bytes a key, see imfast/backends/keyfilter.py).
Retention deletes entries, not their keys from the filter; so that the filter
follows the table rather than every message ever stored, the store rebuilds
it from the table once retention deleted half as many entries as it holds.
Here one process plays ``--days`` days of a node that keeps ``--keep`` days:
each day stores ``--per-day`` messages (each with a cmid, dated that day),
then runs retention.  It prints the entries the table holds at the end and
the filter's keys and bytes - figures, not timings, so one run is enough.
``--baseline DIR`` (another checkout, see bench/instructions.py) runs the
same and prints the ratio of the filters' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

from store_memory import python_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child process, with the checkout under test first on sys.path.
_CHILD = r"""
import asyncio, json, os, sys, tempfile, time
from imfast.backends.base import StoredMessage
from imfast.backends.sqlite import SQLiteStore

DAY = 24 * 3600

async def main(days: int, per_day: int, keep: int) -> None:
    store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "r.db"))
    now = time.time()
    seq = 0
    for day in range(days):
        ts = int((now - (days - 1 - day) * DAY) * 1000)
        for start in range(0, per_day, 1000):
            batch = []
            for i in range(start, min(start + 1000, per_day)):
                seq += 1
                conv = f"p:a{seq % 5000:05d}:b"
                batch.append(StoredMessage(conv, seq, f"m{seq}", "a", "d", f"c{seq}", "hi", ts))
            await store.append(batch)
        await store.settle()
        # The node's clock on that day: older than `keep` days goes.
        await store.purge_messages((keep + days - 1 - day) * DAY - 60)
    rows = store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    print(json.dumps({"stored": seq, "kept": rows, "filter_keys": store._known.dedup.count,
                      "filter_bytes": store._known.dedup.nbytes}))
    await store.close()

asyncio.run(main(*map(int, sys.argv[1:4])))
"""


def measure(checkout: str, days: int, per_day: int, keep: int) -> dict[str, int]:
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run([python_of(checkout), "-c", _CHILD, str(days), str(per_day), str(keep)],
                         env=env, cwd=checkout, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=12)
    parser.add_argument("--per-day", type=int, default=100_000)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout to measure the same way")
    args = parser.parse_args()
    if args.days < 1 or args.per_day < 1 or args.keep < 1:
        parser.error("--days, --per-day and --keep must be at least 1")
    this = measure(ROOT, args.days, args.per_day, args.keep)
    print("this checkout:", this, flush=True)
    line = (f"{this['stored']:,} stored, {this['kept']:,} kept: dedup filter "
            f"{this['filter_keys']:,} keys, {this['filter_bytes']:,} B")
    if args.baseline:
        base = measure(os.path.abspath(args.baseline), args.days, args.per_day, args.keep)
        print("baseline:     ", base, flush=True)
        line += (f"; baseline {base['filter_keys']:,} keys, {base['filter_bytes']:,} B, "
                 f"ratio {this['filter_bytes'] / base['filter_bytes']:.2f}x")
    print(line)


if __name__ == "__main__":
    main()
