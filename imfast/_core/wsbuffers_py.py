"""Trims picows's per-connection buffers: the pure-Python twin, which cannot.

The buffers are C fields of picows objects (see :mod:`imfast._core._wsbuffers`),
out of Python's reach: every function leaves the connection as picows made it
and returns False (``buffer_capacities``: None), which the Cython twin also
does whenever it cannot trim.  Connections work the same either way; they
only cost ~3.5 KB more each.
"""

from __future__ import annotations

from typing import Any

__all__ = ["buffer_capacities", "drop_handshake", "trim_read_buffer", "trim_write_buffer"]

_SPARE = 256


def trim_read_buffer(protocol: Any, capacity: int) -> bool:
    """Would shrink a new protocol's read buffer; here: checks ``capacity``, returns False."""
    if capacity <= 2 * _SPARE:
        raise ValueError(f"capacity must be over {2 * _SPARE} bytes, got {capacity}")
    return False


def trim_write_buffer(transport: Any) -> bool:
    """Would give the transport an empty write buffer; returns False."""
    return False


def drop_handshake(transport: Any) -> bool:
    """Would release the kept upgrade request and response; returns False."""
    return False


def buffer_capacities(protocol: Any) -> tuple[int, int] | None:
    """Buffer capacities are not visible from Python: None."""
    return None
