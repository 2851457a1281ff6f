"""Bloom filter of the embedded store's skipped reads, Cython twin of :mod:`imfast._core.keyfilter_py`.

Same API, and the same bits: three positions a key from ``hash(key)``,
computed on 64-bit words exactly as the twin computes them on Python ints
(an arithmetic shift for the step, the low bits for the position), so the
two answer every question alike (``tests/unit/test_core_parity.py``).
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.object cimport PyObject_Hash
from libc.stdint cimport int64_t, uint64_t

__all__ = ["KeyFilter"]

cdef enum:
    _BITS_PER_KEY = 16  # with 3 positions a key: ~0.5 % false "maybe" at capacity
    _MIN_BITS = 65536


@cython.final
cdef class KeyFilter:
    """A fixed-size Bloom filter sized for ``capacity`` keys."""

    cdef bytearray _bits
    cdef unsigned char* _data
    cdef uint64_t _mask
    cdef public Py_ssize_t capacity
    cdef public Py_ssize_t count

    def __init__(self, Py_ssize_t capacity):
        cdef Py_ssize_t nbits = _MIN_BITS
        while nbits < capacity * _BITS_PER_KEY:
            nbits <<= 1
        self._bits = bytearray(nbits >> 3)
        self._data = <unsigned char*> PyByteArray_AS_STRING(self._bits)
        self._mask = <uint64_t> (nbits - 1)
        self.capacity = max(1, capacity)
        self.count = 0

    cdef inline void _set(self, object key) except *:
        cdef int64_t h = PyObject_Hash(key)
        cdef uint64_t step = <uint64_t> ((h >> 32) | 1)
        cdef uint64_t mask = self._mask
        cdef uint64_t i = (<uint64_t> h) & mask
        cdef unsigned char* data = self._data
        data[i >> 3] |= <unsigned char> (1 << (i & 7))
        i = (i + step) & mask
        data[i >> 3] |= <unsigned char> (1 << (i & 7))
        i = (i + step) & mask
        data[i >> 3] |= <unsigned char> (1 << (i & 7))

    def add(self, key):
        self._set(key)
        self.count += 1

    def add_all(self, keys):
        """``add`` each of ``keys`` (one call for a batch: the store adds a commit's keys)."""
        cdef Py_ssize_t n = 0
        for key in keys:
            self._set(key)
            n += 1
        self.count += n

    def __contains__(self, key):
        cdef int64_t h = PyObject_Hash(key)
        cdef uint64_t step = <uint64_t> ((h >> 32) | 1)
        cdef uint64_t mask = self._mask
        cdef uint64_t i = (<uint64_t> h) & mask
        cdef unsigned char* data = self._data
        if not data[i >> 3] & (1 << (i & 7)):
            return False
        i = (i + step) & mask
        if not data[i >> 3] & (1 << (i & 7)):
            return False
        i = (i + step) & mask
        return bool(data[i >> 3] & (1 << (i & 7)))

    @property
    def nbytes(self):
        return len(self._bits)

    def to_bytes(self):
        """The filter's bits (the twins set the same ones)."""
        return bytes(self._bits)
