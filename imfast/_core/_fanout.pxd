# Cython declarations of imfast._core._fanout (fields and C-level entry points).
cimport cython


@cython.final
cdef class WriteCoalescer:
    cdef object _loop
    cdef list _dirty          # sessions with queued frames, in first-push order
    cdef bint _scheduled      # a flush is pending via loop.call_soon
    cdef public long long writes   # write() calls made (metrics and benchmarks)
    cdef public long long frames   # frames written

    cpdef push(self, object session, object payload)
    cpdef push_framed(self, object session, object frame)
    cpdef Py_ssize_t broadcast(self, object sessions, object payload) except -1
    cpdef flush(self)
