"""What each index of the embedded store's ``messages`` table costs the mover thread.

    python bench/sqlite_index_cost.py [--prefill 500000] [--rows 150000] [--repeats 2]

Fills a fresh file with the store's schema (imfast.backends.sqlite) to
``--prefill`` rows, then inserts ``--rows`` more in transactions of one
second's entries at 15K msgs/s (``--per-commit``), as the entry-log mover does,
and prints the CPU time per row (the WAL writes' system time included) for:

* ``schema``: the store's schema as it is;
* ``no dedup index``: without ``messages_dedup`` (the unique dedup-key index);
* ``hashed dedup``: the dedup key's 64-bit hash in an INTEGER column, indexed.

Variants alternate, ``--repeats`` times each, in one run; compare the ratios.
Rows are 1:1 messages between ``--users`` users with 4 contacts each, keys like
imfast's generator's.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import time

from imfast.backends.sqlite import _SCHEMA

_DEDUP_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON messages(dedup_key) "
                "WHERE dedup_key IS NOT NULL;")
VARIANTS = {
    "schema": _SCHEMA,
    "no dedup index": _SCHEMA.replace(_DEDUP_INDEX, ""),
    "hashed dedup": _SCHEMA.replace(_DEDUP_INDEX, "CREATE INDEX messages_dh ON messages(dh);")
                           .replace("dedup_key TEXT\n", "dedup_key TEXT, dh INTEGER\n"),
}
assert all(v != _SCHEMA for k, v in VARIANTS.items() if k != "schema"), "schema changed"


def rows(n: int, users: int, start: int, hashed: bool) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    now = int(time.time() * 1000)
    for k in range(start, start + n):
        a = random.randrange(users)
        b = (a + 1 + random.randrange(4)) % users
        x, y = sorted((f"u{a}", f"u{b}"))
        key = f"u{a}:w0.{k}"
        row: tuple[object, ...] = (f"p:{x}:{y}", k, f"m{k:016x}", f"u{a}", "default", f"w0.{k}",
                                   "x" * 80, now, "msg", key)
        out.append(row + (hash(key) & 0x7FFFFFFFFFFFFFFF,) if hashed else row)
    return out


def measure(name: str, opts: argparse.Namespace, workdir: str) -> float:
    path = os.path.join(workdir, "bench.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("page_size=4096", "journal_mode=WAL", "synchronous=NORMAL",
                   "cache_size=-16384"):
        db.execute(f"PRAGMA {pragma}")
    db.executescript(VARIANTS[name])
    hashed = name == "hashed dedup"
    cols = "conv, seq, msg_id, sender, sender_device, cmid, body, ts, kind, dedup_key"
    cols += ", dh" if hashed else ""
    insert = f"INSERT INTO messages ({cols}) VALUES ({', '.join('?' * (cols.count(',') + 1))})"
    k = 0
    while k < opts.prefill:
        db.execute("BEGIN")
        db.executemany(insert, rows(50_000, opts.users, k, hashed))
        db.execute("COMMIT")
        k += 50_000
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    batches = []
    for _ in range(opts.rows // opts.per_commit):
        batches.append(rows(opts.per_commit, opts.users, k, hashed))
        k += opts.per_commit
    started = time.process_time()
    for batch in batches:
        db.execute("BEGIN")
        db.executemany(insert, batch)
        db.execute("COMMIT")
    spent = time.process_time() - started
    db.close()
    return spent * 1e6 / (len(batches) * opts.per_commit)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", type=int, default=500_000)
    p.add_argument("--rows", type=int, default=150_000)
    p.add_argument("--per-commit", type=int, default=15_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=2)
    opts = p.parse_args()
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="imfast-index-cost-") as workdir:
        for _ in range(opts.repeats):
            for name in VARIANTS:
                results[name].append(measure(name, opts, workdir))
    base = min(results["schema"])
    print(f"insert CPU per row, {opts.prefill:,} rows already stored, "
          f"{opts.per_commit:,} per commit (best of {opts.repeats}):")
    for name, runs in results.items():
        print(f"  {name:15s} {min(runs):6.2f} us  ({min(runs) / base:.2f}x)  "
              f"runs: {', '.join(f'{r:.2f}' for r in runs)}")


if __name__ == "__main__":
    main()
