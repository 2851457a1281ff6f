"""Shared fixtures: an embedded node on a free port with a temporary data dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imfast.config import Settings
from tests.helpers.node import NodeThread


def node_settings(tmp_path: Path, **overrides: object) -> Settings:
    base = Settings(http_port=0, host="127.0.0.1", data_dir=str(tmp_path / "data"),
                    jwt_secret="test-secret-0123456789abcdef0123456789", log_format="text")
    return base.replace(**overrides) if overrides else base


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeThread]:
    """A running embedded node (SQLite store) for one test."""
    n = NodeThread(node_settings(tmp_path)).start()
    yield n
    n.stop()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[object]:
    """Factory for nodes with custom settings: ``make_node(max_connections=2)``."""
    started: list[NodeThread] = []

    def make(**overrides: object) -> NodeThread:
        n = NodeThread(node_settings(tmp_path, **overrides)).start()
        started.append(n)
        return n

    yield make
    for n in started:
        n.stop()
