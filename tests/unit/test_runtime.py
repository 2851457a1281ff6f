"""Start-up process settings (run in a child: they are process-wide)."""

from __future__ import annotations

import subprocess
import sys


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds() -> None:
    code = ("import gc; from imfast.runtime import tune_gc, GC_THRESHOLDS; "
            "assert gc.get_freeze_count() == 0; tune_gc(); "
            "assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold(); "
            "assert gc.get_freeze_count() > 1000, gc.get_freeze_count(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
