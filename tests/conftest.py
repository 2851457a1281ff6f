"""Shared fixtures: embedded nodes on free ports, and real backing servers.

The real servers (tests/harness/services.py) start lazily on first use and stop
at the end of the session, so a run that needs only Redis never pays for
MariaDB. They are shared: a test that kills or restarts a server must start its
own instance (``with RedisServer() as server: ...``) instead of using these.
Missing binaries fail with a hint to run scripts/install-test-services.sh;
they are never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imfast.config import Settings
from tests.harness.services import EtcdServer, KafkaBroker, MariaDBServer, RedisServer
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


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A running Redis; ``redis_server.url`` is ``redis://127.0.0.1:PORT/0``."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """A running MariaDB; ``.url`` is the root DSN, ``.create_app_database()`` the app's."""
    with MariaDBServer() as server:
        yield server


@pytest.fixture(scope="session")
def mariadb_app_dsn(mariadb_server: MariaDBServer) -> str:
    """``mysql://im_service:PASSWORD@127.0.0.1:PORT/im_chat``, database and user created."""
    return mariadb_server.create_app_database()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A running single-member etcd; ``.url`` is ``http://127.0.0.1:PORT``."""
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A running tansu broker (in-memory); ``.bootstrap_servers`` is ``127.0.0.1:PORT``."""
    with KafkaBroker() as broker:
        yield broker
