"""Fixtures for the core tests: both implementations of ``imfast._core``.

``core`` runs a test once on the pure-Python twins and once on the Cython
extensions.  A missing or broken extension makes the Cython run *fail* (at
first use, with the import error), never skip, unless
``IMFAST_NO_EXTENSIONS=1`` says the build was skipped on purpose; then only
the twins run.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

NO_EXTENSIONS = os.environ.get("IMFAST_NO_EXTENSIONS") == "1"
CORE_IMPLS = ["py"] if NO_EXTENSIONS else ["py", "cy"]


class CoreImpl:
    """The ``codec``, ``table`` and ``fanout`` modules of one implementation."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"CoreImpl({self.name!r})"

    def _load(self, module: str) -> ModuleType:
        if self.name == "py":
            return importlib.import_module(f"imfast._core.{module}_py")
        try:
            return importlib.import_module(f"imfast._core._{module}")
        except ImportError as exc:
            pytest.fail(
                f"Cython extension imfast._core._{module} is not importable ({exc}); build it "
                "with `python setup.py build_ext --inplace`, or set IMFAST_NO_EXTENSIONS=1 "
                "to test only the pure-Python twins",
                pytrace=False,
            )

    @property
    def codec(self) -> ModuleType:
        return self._load("codec")

    @property
    def table(self) -> ModuleType:
        return self._load("table")

    @property
    def fanout(self) -> ModuleType:
        return self._load("fanout")


@pytest.fixture(params=CORE_IMPLS)
def core(request: pytest.FixtureRequest) -> CoreImpl:
    """One implementation of the core (``py`` twin, ``cy`` extension)."""
    return CoreImpl(request.param)


@pytest.fixture(scope="session")
def core_pair() -> tuple[CoreImpl, CoreImpl]:
    """(twin, extension) for parity tests (deselected when extensions are off on purpose)."""
    assert not NO_EXTENSIONS, "parity tests need the extension; they are deselected without it"
    return CoreImpl("py"), CoreImpl("cy")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With IMFAST_NO_EXTENSIONS=1 there is nothing to compare the twins with: the
    parity tests are deselected (not skipped), and the twins' own tests still run."""
    if not NO_EXTENSIONS:
        return
    parity = [i for i in items if "core_pair" in getattr(i, "fixturenames", ())]
    if parity:
        config.hook.pytest_deselected(items=parity)
        items[:] = [i for i in items if i not in parity]
