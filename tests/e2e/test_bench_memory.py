"""The store memory benchmarks run, on a small scale, and print what they measured.

No figure is compared with a threshold: the counts they print are exact
(entries stored and kept), the bytes only have to be there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_dedup_filter_retention_counts_what_retention_kept() -> None:
    lines = _bench("bench/dedup_filter_retention.py", "--days", "3", "--per-day", "2000",
                   "--keep", "1")
    run = json.loads(lines[0].removeprefix("this checkout: ").replace("'", '"'))
    assert (run["stored"], run["kept"]) == (6000, 2000)
    assert run["filter_keys"] >= run["kept"] and run["filter_bytes"] > 0
    assert lines[-1].startswith("6,000 stored, 2,000 kept: dedup filter ")


def test_store_memory_prints_growth_per_conversation() -> None:
    lines = _bench("bench/store_memory.py", "--conversations", "4000")
    run = json.loads(lines[0].removeprefix("this checkout: ").replace("'", '"'))
    assert run["latest_kept"] == 4000 and run["counters_kept"] == 4000
    assert lines[-1].startswith("RSS growth per conversation over conversations 2,000-4,000")
