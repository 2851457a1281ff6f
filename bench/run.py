"""``make bench``: every benchmark, one after another, each with its baseline.

    python bench/run.py            # core, fan-out, memory at 10K connections
    python bench/run.py --full     # also memory at 100K (several worker processes)

Each benchmark prints its own figures next to a baseline measured in the same
run (machines are noisy: compare ratios, not absolute numbers).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(*args: str) -> None:
    print(f"\n$ python {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=HERE.parent)


def main() -> None:
    run("bench/core_bench.py")
    run("bench/fanout_bench.py")
    run("bench/memory_bench.py", "--connections", "10000")
    if "--full" in sys.argv:
        run("bench/memory_bench.py", "--connections", "100000", "--workers", "6")


if __name__ == "__main__":
    main()
