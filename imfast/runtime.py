"""Process-wide settings every imfast server process applies at start-up."""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLDS", "tune_gc"]

#: Young-generation threshold and the two older ones.  Each routed message
#: allocates a few dozen short-lived objects (frames, dicts, futures), so the
#: default (700) runs a young collection every few messages: about 10 % of a
#: busy process's CPU on the closed-loop benchmark, 13 % more messages per
#: second with a higher threshold.  But a young collection's pause grows with
#: the threshold: at 100,000 the router process paused 60-130 ms at a time
#: under load (delivery P99 274-328 ms at 20K sockets / 5K msgs/s on 2 vCPUs);
#: at 20,000 it pauses at most ~35 ms (P99 133-172 ms) for the same
#: throughput (docs/performance.md).  A smaller middle threshold (10) made the
#: middle collections run often and pause 60-150 ms: worse.
GC_THRESHOLDS = (20_000, 50, 100)


def tune_gc() -> None:
    """Freeze what start-up created (never scanned again) and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
