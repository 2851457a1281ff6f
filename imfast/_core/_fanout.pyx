"""Write coalescing, Cython twin of :mod:`imfast._core.fanout_py`.

Same API and guarantees as the pure-Python module (see its docstring): one
``raw.write`` per session per loop iteration, frames in queue order, a
broadcast framed once and shared, closed sessions skipped.  Sessions are
Python objects; their ``out``/``closed``/``raw`` attributes are used as is.
"""

cimport cython
from cpython.list cimport PyList_GET_SIZE

from imfast._core._codec cimport ws_text_frame

__all__ = ["WriteCoalescer"]


@cython.final
cdef class WriteCoalescer:
    """Batches frames per session and flushes them once per loop iteration."""

    def __cinit__(self, loop):
        self._loop = loop
        self._dirty = []
        self._scheduled = False
        self.writes = 0
        self.frames = 0

    cpdef push(self, object session, object payload):
        """Queue one message (JSON bytes) for ``session``."""
        self.push_framed(session, ws_text_frame(payload))

    cpdef push_framed(self, object session, object frame):
        """Queue an already framed message for ``session``."""
        out = session.out
        if out is None:
            session.out = [frame]
            self._dirty.append(session)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.flush)
        elif type(out) is list:
            (<list>out).append(frame)
        else:
            out.append(frame)

    cpdef Py_ssize_t broadcast(self, object sessions, object payload) except -1:
        """Queue ``payload`` for every session, framing it once; returns the count."""
        cdef bytes frame = ws_text_frame(payload)
        cdef Py_ssize_t n = 0
        for session in sessions:
            self.push_framed(session, frame)
            n += 1
        return n

    cpdef flush(self):
        """Write every session's queued frames now, one write per session."""
        cdef list dirty
        cdef long long writes = 0, frames = 0
        self._scheduled = False
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for session in dirty:
            out = session.out
            session.out = None
            if session.closed:
                continue
            if len(out) == 1:
                session.raw.write(out[0])
            else:
                session.raw.write(b"".join(out))
            writes += 1
            frames += len(out)
        self.writes += writes
        self.frames += frames
