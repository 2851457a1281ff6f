"""The hot path: envelope codec, connection table, write coalescing.

Each module exists twice: a Cython extension (``_codec``, ``_table``,
``_fanout``) and a pure-Python twin (``codec_py``, ``table_py``,
``fanout_py``) with the same behaviour, proven by the same tests.  The
extensions are used when they were built; ``IMFAST_NO_EXTENSIONS=1`` forces
the twins.  :data:`USING_EXTENSIONS` tells which one loaded (tests assert it).
"""

from __future__ import annotations

import os

__all__ = [
    "USING_EXTENSIONS",
    "ConnectionTable",
    "TimerWheel",
    "WriteCoalescer",
    "decode_client_frame",
    "encode",
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
        from imfast._core._table import ConnectionTable, TimerWheel

        USING_EXTENSIONS = True
    except ImportError:
        USING_EXTENSIONS = False

if not USING_EXTENSIONS:
    from imfast._core.codec_py import decode_client_frame, encode, ws_frames, ws_text_frame
    from imfast._core.fanout_py import WriteCoalescer
    from imfast._core.table_py import ConnectionTable, TimerWheel
