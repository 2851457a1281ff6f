"""imfast: an instant-messaging WebSocket gateway (uvloop + picows + Cython core).

Run ``imfast serve`` for an embedded node; see README.md.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
