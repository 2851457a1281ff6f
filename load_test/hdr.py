"""A small HDR-style latency histogram: log-linear buckets, mergeable, JSON-able.

Values are integers (the load tools record microseconds).  Values below
``2**SUB_BITS`` get a bucket each (exact); above, every power of two is split
into ``2**(SUB_BITS-1)`` linear sub-buckets, so a reported percentile is at
most ~1.6 % above the true value (``SUB_BITS = 7``), whatever the magnitude.

Buckets are kept in a sparse ``dict`` (index -> count): recording is one
``bit_length`` and one dict increment, a histogram of a second's worth of
latencies pickles in a few hundred bytes, and two histograms merge by adding
counts, so worker processes each keep their own and the parent sums them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["SUB_BITS", "Histogram", "bucket_bounds", "bucket_of"]

SUB_BITS = 7
_SUB = 1 << SUB_BITS          # 128 exact buckets for 0..127
_HALF = _SUB >> 1             # 64 sub-buckets per power of two above


def bucket_of(value: int) -> int:
    """Index of the bucket holding ``value`` (negative values count as 0)."""
    if value < _SUB:
        return max(0, value)
    shift = value.bit_length() - SUB_BITS
    return _SUB + (shift - 1) * _HALF + ((value >> shift) - _HALF)


def bucket_bounds(index: int) -> tuple[int, int]:
    """(lowest, highest) value that falls in bucket ``index``."""
    if index < _SUB:
        return index, index
    shift = (index - _SUB) // _HALF + 1
    top = (index - _SUB) % _HALF + _HALF
    return top << shift, ((top + 1) << shift) - 1


class Histogram:
    """Counts of values in log-linear buckets, plus exact min, max, sum and count."""

    __slots__ = ("counts", "max", "min", "n", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int) -> None:
        """Add one value."""
        value = max(value, 0)
        if value < _SUB:
            idx = value
        else:
            shift = value.bit_length() - SUB_BITS
            idx = _SUB + (shift - 1) * _HALF + ((value >> shift) - _HALF)
        counts = self.counts
        counts[idx] = counts.get(idx, 0) + 1
        if self.n == 0 or value < self.min:
            self.min = value
        self.max = max(self.max, value)
        self.n += 1
        self.total += value

    def merge(self, other: Histogram) -> Histogram:
        """Add ``other``'s counts into this one; returns self."""
        if other.n == 0:
            return self
        counts = self.counts
        for idx, c in other.counts.items():
            counts[idx] = counts.get(idx, 0) + c
        self.min = other.min if self.n == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.n += other.n
        self.total += other.total
        return self

    def percentile(self, p: float) -> int:
        """The value at percentile ``p`` (0-100): the upper bound of its bucket, at most max."""
        if self.n == 0:
            return 0
        rank = max(1, math.ceil(p / 100.0 * self.n))
        seen = 0
        for idx in sorted(self.counts):
            seen += self.counts[idx]
            if seen >= rank:
                return min(bucket_bounds(idx)[1], self.max)
        return self.max

    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def summary(self, scale: float = 1e-3, percentiles: Iterable[float] = (50, 90, 99, 99.9)
                ) -> dict[str, Any]:
        """count, min, mean, the percentiles and max, each value multiplied by ``scale``.

        With microsecond values and the default scale the figures are milliseconds.
        """
        out: dict[str, Any] = {"count": self.n}
        if self.n == 0:
            return out
        out["min"] = round(self.min * scale, 3)
        out["mean"] = round(self.mean() * scale, 3)
        for p in percentiles:
            out[f"p{p:g}"] = round(self.percentile(p) * scale, 3)
        out["max"] = round(self.max * scale, 3)
        return out

    def buckets(self) -> list[tuple[int, int, int]]:
        """(low, high, count) of every non-empty bucket, in order."""
        return [(*bucket_bounds(i), self.counts[i]) for i in sorted(self.counts)]

    # ------------------------------------------------------------ transport
    def to_dict(self) -> dict[str, Any]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "n": self.n,
                "total": self.total, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        h = cls()
        h.counts = {int(k): int(v) for k, v in d.get("counts", {}).items()}
        h.n = int(d.get("n", 0))
        h.total = int(d.get("total", 0))
        h.min = int(d.get("min", 0))
        h.max = int(d.get("max", 0))
        return h

    def __getstate__(self) -> dict[str, Any]:
        return {"counts": self.counts, "n": self.n, "total": self.total, "min": self.min,
                "max": self.max}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
