"""Build the optional Cython core (``imfast/_core/*.pyx``).

Every extension has a pure-Python twin, so a failed or skipped build still
leaves a working package: set ``IMFAST_NO_EXTENSIONS=1`` to skip building, and
at run time to force the twins.
"""

import glob
import os

from setuptools import setup

ext_modules = []
if os.environ.get("IMFAST_NO_EXTENSIONS") != "1":
    sources = sorted(glob.glob("imfast/_core/*.pyx"))
    # _wsbuffers cimports picows's declarations (picows.pxd; pyproject.toml lists picows
    # among the build requirements): a build where picows is absent skips it, and its
    # pure-Python twin stands in.
    import importlib.util

    if importlib.util.find_spec("picows") is None:
        sources = [s for s in sources if not s.endswith("_wsbuffers.pyx")]
    if sources:
        from Cython.Build import cythonize

        ext_modules = cythonize(
            sources,
            language_level=3,
            # Directives set once here rather than per file (picows does the same).
            compiler_directives={
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
                "initializedcheck": False,
                "embedsignature": True,
            },
        )

setup(ext_modules=ext_modules)
