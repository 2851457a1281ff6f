"""The hot path: envelope codec, connection table, write coalescing, buffer trimming,
and the embedded store's key filter.

Each module exists twice: a Cython extension (``_codec``, ``_table``,
``_fanout``, ``_keyfilter``, ``_wsbuffers``) and a pure-Python twin
(``codec_py``, ``table_py``, ``fanout_py``, ``keyfilter_py``, ``wsbuffers_py``)
with the same behaviour, proven by the same tests.  The extensions are used
when they were built; ``IMFAST_NO_EXTENSIONS=1`` forces the twins.
:data:`USING_EXTENSIONS` tells which one loaded (tests assert it).
``_wsbuffers`` is built against picows's Cython declarations and loads on its
own (:data:`TRIMS_PICOWS_BUFFERS`): without it connections keep picows's
buffer sizes and the rest of the core is unaffected.
"""

from __future__ import annotations

import os

__all__ = [
    "TRIMS_PICOWS_BUFFERS",
    "USING_EXTENSIONS",
    "ConnectionTable",
    "KeyFilter",
    "TimerWheel",
    "WriteCoalescer",
    "decode_client_frame",
    "drop_handshake",
    "encode",
    "trim_read_buffer",
    "trim_write_buffer",
    "ws_frames",
    "ws_text_frame",
]

USING_EXTENSIONS = False

if os.environ.get("IMFAST_NO_EXTENSIONS") != "1":
    try:
        from imfast._core._codec import (
            decode_client_frame,
            encode,
            ws_frames,
            ws_text_frame,
        )
        from imfast._core._fanout import WriteCoalescer
        from imfast._core._keyfilter import KeyFilter
        from imfast._core._table import ConnectionTable, TimerWheel

        USING_EXTENSIONS = True
    except ImportError:
        USING_EXTENSIONS = False

if not USING_EXTENSIONS:
    from imfast._core.codec_py import decode_client_frame, encode, ws_frames, ws_text_frame
    from imfast._core.fanout_py import WriteCoalescer
    from imfast._core.keyfilter_py import KeyFilter
    from imfast._core.table_py import ConnectionTable, TimerWheel

TRIMS_PICOWS_BUFFERS = False

if USING_EXTENSIONS:
    try:
        from imfast._core._wsbuffers import drop_handshake, trim_read_buffer, trim_write_buffer

        TRIMS_PICOWS_BUFFERS = True
    # Not built (no picows at build time), or built against another picows layout
    # (Cython's type-size check at import raises ValueError).
    except (ImportError, ValueError):
        TRIMS_PICOWS_BUFFERS = False

if not TRIMS_PICOWS_BUFFERS:
    from imfast._core.wsbuffers_py import drop_handshake, trim_read_buffer, trim_write_buffer
