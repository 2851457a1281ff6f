"""bench/instructions.py end to end: every server process is counted, per accepted message.

A short run (two counted seconds at a low rate) of ``imfast serve --workers 2``
under callgrind: the main process and its gateway processes must all report
instructions (a gateway process's control pipe is named after its own $HOST,
which the bench has to match), the messages counted must be some of those the
generator sent, and nothing may be lost on the way.  No figure is compared with a threshold of
time; the lower bound on instructions per message only says something was
counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_server_process_is_counted_per_accepted_message(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "instructions.py"), "--workers", "2",
         "--connections", "20", "--rate", "40", "--seconds", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"][str(ROOT)]
    # About 80 messages fall in the counted window (40/s for 2 s): some, and never more
    # than the generator sent in the whole run.
    assert 0 < run["messages"] < run["sent"], run
    assert set(run["roles"]) == {"main process", "gateway workers"}, run
    assert all(n > 10_000 for n in run["roles"].values()), run
    assert run["per_message"] == pytest.approx(sum(run["roles"].values()), rel=1e-12)
    assert run["lost"] == 0
    assert "| this |" in proc.stdout
