"""Every Store implementation runs the same contract suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imfast.backends.memory import MemoryRegistry, MemoryStore
from imfast.backends.sqlite import SQLiteStore


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: Any, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "memory":
        s: Any = MemoryStore()
    else:
        s = SQLiteStore(str(tmp_path / "contract.db"))
    yield s
    await s.close()


@pytest.fixture(params=["memory"])
async def registry(request: Any) -> AsyncIterator[Any]:
    yield MemoryRegistry()
