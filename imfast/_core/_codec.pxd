# Cython declarations of imfast._core._codec, for sibling modules to cimport
# (``_fanout`` frames broadcast payloads with a C call, no Python dispatch).

cdef Py_ssize_t ws_header_size(Py_ssize_t n) noexcept nogil
cdef Py_ssize_t ws_write_header(unsigned char* out, Py_ssize_t n) noexcept nogil
cdef bytes ws_frame_from(const unsigned char* data, Py_ssize_t n)

cpdef bytes ws_text_frame(object payload)
cpdef bytes ws_frames(object payloads)
