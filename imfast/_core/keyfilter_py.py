"""A fixed-size Bloom filter: "certainly absent" or "maybe present" (pure-Python twin).

The Cython twin :mod:`imfast._core._keyfilter` sets and tests the very same
bits (three positions a key, derived from ``hash(key)``); both are checked by
``tests/unit/test_keyfilter.py`` and compared in ``tests/unit/test_core_parity.py``.
Guarantees in :mod:`imfast.backends.keyfilter`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

__all__ = ["KeyFilter"]

_BITS_PER_KEY = 16  # with 3 positions a key: ~0.5 % false "maybe" at capacity
_MIN_BITS = 1 << 16


class KeyFilter:
    """A fixed-size Bloom filter sized for ``capacity`` keys (see module docstring)."""

    __slots__ = ("_bits", "_mask", "capacity", "count")

    def __init__(self, capacity: int) -> None:
        nbits = _MIN_BITS
        while nbits < capacity * _BITS_PER_KEY:
            nbits <<= 1
        self._bits = bytearray(nbits >> 3)
        self._mask = nbits - 1
        self.capacity = max(1, capacity)
        self.count = 0  # keys added (repeats included): how full it is

    def add(self, key: Hashable) -> None:
        self.add_all((key,))

    def add_all(self, keys: Iterable[Hashable]) -> None:
        """``add`` each of ``keys`` (one call for a batch: the store adds a commit's keys)."""
        mask = self._mask
        bits = self._bits
        n = 0
        for key in keys:
            h = hash(key)
            step = (h >> 32) | 1  # odd, so the three positions differ
            i = h & mask
            bits[i >> 3] |= 1 << (i & 7)
            i = (i + step) & mask
            bits[i >> 3] |= 1 << (i & 7)
            i = (i + step) & mask
            bits[i >> 3] |= 1 << (i & 7)
            n += 1
        self.count += n

    def __contains__(self, key: Hashable) -> bool:
        h = hash(key)
        mask = self._mask
        step = (h >> 32) | 1
        bits = self._bits
        i = h & mask
        if not bits[i >> 3] & (1 << (i & 7)):
            return False
        i = (i + step) & mask
        if not bits[i >> 3] & (1 << (i & 7)):
            return False
        i = (i + step) & mask
        return bool(bits[i >> 3] & (1 << (i & 7)))

    @property
    def nbytes(self) -> int:
        return len(self._bits)

    def to_bytes(self) -> bytes:
        """The filter's bits (the twins set the same ones)."""
        return bytes(self._bits)
