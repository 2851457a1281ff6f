"""Type stubs for the Cython table and wheel.

Their API is the twins' by contract, so the stubs re-export the classes of
:mod:`imfast._core.table_py`: one source of truth, and the loader in
``imfast/_core/__init__.py`` type-checks whichever module it picks.  (At run
time these are distinct ``@cython.final`` classes.)
"""

from imfast._core.table_py import ConnectionTable as ConnectionTable
from imfast._core.table_py import TimerWheel as TimerWheel

__all__ = ["ConnectionTable", "TimerWheel"]
