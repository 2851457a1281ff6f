"""Type stubs for the Cython key filter.

Its API is the twin's by contract, so the stubs re-export the class of
:mod:`imfast._core.keyfilter_py`: one source of truth, and the loader in
``imfast/_core/__init__.py`` type-checks whichever module it picks.  (At run
time it is a distinct ``@cython.final`` class.)
"""

from imfast._core.keyfilter_py import KeyFilter as KeyFilter

__all__ = ["KeyFilter"]
