"""Trims picows's per-connection buffers for idle chat sockets: the Cython twin.

picows gives every connection a read buffer of at least 2,048 bytes and a
1,024-byte write buffer, both ``PyMem_Malloc``-ed and never shrunk, and its
transport keeps the upgrade request and response for the connection's life.
No picows option reaches them; together they are ~3.5 KB of the ~9 KB an
idle authenticated imfast connection costs.  picows declares ``WSTransport``
and ``MemoryBuffer`` in its ``picows.pxd`` (its Cython API), so this module
can resize them from C; the read buffer belongs to ``WSProtocol``, which the
pxd does not declare, so it is found among the protocol's references.

Guarantees (tests/unit/test_wsbuffers.py):

* every function either does its whole job and returns True, or changes
  nothing and returns False (another picows layout, a buffer already in use);
* picows's invariants hold afterwards: the read buffer keeps 256 spare bytes
  past the part offered to the socket (picows's SIMD unmasking may touch
  them), and its first growth reallocates (size * 2 > capacity), so a larger
  frame or upgrade request grows it exactly as picows would; the write buffer
  grows on picows's first ``send`` (every picows write resizes it first).

The pure-Python twin (:mod:`imfast._core.wsbuffers_py`) cannot reach C
fields and returns False from every function: connections then keep picows's
sizes, and work the same.
"""

import gc

from cpython.mem cimport PyMem_Realloc
from picows.picows cimport MemoryBuffer, WSTransport

__all__ = ["buffer_capacities", "drop_handshake", "trim_read_buffer", "trim_write_buffer"]

# picows keeps this many bytes past the readable part of its read buffer (WSProtocol.__init__).
cdef Py_ssize_t _SPARE = 256


cdef MemoryBuffer _read_buffer(object protocol):
    """The protocol's one MemoryBuffer (its read buffer), or None if not exactly one."""
    cdef MemoryBuffer found = None
    for obj in gc.get_referents(protocol):
        if type(obj) is MemoryBuffer:
            if found is not None:
                return None
            found = <MemoryBuffer>obj
    return found


def trim_read_buffer(object protocol, Py_ssize_t capacity):
    """Shrink a *new* picows ``WSProtocol``'s read buffer to ``capacity`` bytes.

    Call it right after constructing the protocol, before it is connected: the
    buffer must still be in picows's initial state (``size == capacity - 256``),
    holding nothing.  ``capacity`` must be over 512 so that picows's first
    growth (``resize(size * 2)``) reallocates and keeps the spare bytes.
    """
    if capacity <= 2 * _SPARE:
        raise ValueError(f"capacity must be over {2 * _SPARE} bytes, got {capacity}")
    cdef MemoryBuffer buf = _read_buffer(protocol)
    if buf is None or buf.size != buf.capacity - _SPARE or capacity >= buf.capacity:
        return False
    cdef char* data = <char*>PyMem_Realloc(buf.data, capacity)
    if data == NULL:
        return False
    buf.data = data
    buf.capacity = capacity
    buf.size = capacity - _SPARE
    return True


def trim_write_buffer(WSTransport transport):
    """Give the transport an empty write buffer; picows grows it on its first send.

    imfast writes its frames to the socket's transport itself (WriteCoalescer):
    picows's buffer is used only for the frames picows sends (close, pong).
    Safe at any time outside a picows send (all of them are synchronous).
    """
    if transport._write_buffer is None or transport._write_buffer.capacity == 0:
        return False
    transport._write_buffer = MemoryBuffer(0)
    return True


def drop_handshake(WSTransport transport):
    """Release the upgrade request and response the transport keeps.

    picows only fills them in; imfast reads what it needs from the request
    in the listener factory, before the connection starts.
    """
    if transport.request is None and transport.response is None:
        return False
    transport.request = None
    transport.response = None
    return True


def buffer_capacities(object protocol):
    """``(read buffer capacity, write buffer capacity)`` of a connected protocol (tests)."""
    cdef MemoryBuffer buf = _read_buffer(protocol)
    cdef WSTransport transport = protocol.transport
    if buf is None or transport is None:
        return None
    return buf.capacity, transport._write_buffer.capacity
