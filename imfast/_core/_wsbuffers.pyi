"""Type stubs for the Cython buffer trimmer: the twin's API (one source of truth)."""

from imfast._core.wsbuffers_py import (
    buffer_capacities as buffer_capacities,
)
from imfast._core.wsbuffers_py import (
    drop_handshake as drop_handshake,
)
from imfast._core.wsbuffers_py import (
    trim_read_buffer as trim_read_buffer,
)
from imfast._core.wsbuffers_py import (
    trim_write_buffer as trim_write_buffer,
)

__all__ = ["buffer_capacities", "drop_handshake", "trim_read_buffer", "trim_write_buffer"]
