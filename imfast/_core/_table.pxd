# Cython declarations of imfast._core._table: fields and C-level methods, so a
# sibling module can cimport the classes and skip Python dispatch.
cimport cython


@cython.final
cdef class ConnectionTable:
    cdef dict _by_user        # user -> session, or a tuple of sessions (several devices)
    cdef Py_ssize_t _count    # sessions added and not removed
    cdef Py_ssize_t _bound    # sessions bound to a user

    cdef tuple sessions_tuple(self, object user)


@cython.final
cdef class TimerWheel:
    cdef double _resolution
    cdef dict _buckets        # tick (int) -> list of items
    cdef long long _next_tick # first tick expired() has not handed out yet
    cdef Py_ssize_t _size     # items held (the twin sums the buckets instead)

    cdef long long _tick_at(self, double now) except? -1
