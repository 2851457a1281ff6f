"""Type stubs for the Cython write coalescer.

Its API is the twin's by contract, so the stubs re-export the class of
:mod:`imfast._core.fanout_py` (``writes`` and ``frames`` are ints there too):
one source of truth, and the loader in ``imfast/_core/__init__.py``
type-checks whichever module it picks.  (At run time it is a distinct
``@cython.final`` class.)
"""

from imfast._core.fanout_py import WriteCoalescer as WriteCoalescer

__all__ = ["WriteCoalescer"]
