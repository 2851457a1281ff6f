"""Type stubs for the Cython codec.

Its API is the twin's by contract, so the stubs re-export the signatures of
:mod:`imfast._core.codec_py`: one source of truth, and the loader in
``imfast/_core/__init__.py`` type-checks whichever module it picks.
"""

from imfast._core.codec_py import CLIENT_TYPES as CLIENT_TYPES
from imfast._core.codec_py import decode_client_frame as decode_client_frame
from imfast._core.codec_py import encode as encode
from imfast._core.codec_py import ws_frames as ws_frames
from imfast._core.codec_py import ws_text_frame as ws_text_frame

__all__ = ["CLIENT_TYPES", "decode_client_frame", "encode", "ws_frames", "ws_text_frame"]
