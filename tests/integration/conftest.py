"""Session-scoped real servers for integration tests (see tests/harness/services.py).

Each fixture starts its server lazily, on first use, and stops it at the end of
the session, so a run that needs only Redis never pays for MariaDB. The
servers are shared: a test that kills or restarts a server must start its own
instance (``with RedisServer() as server: ...``) instead of using these.

Missing server binaries fail the fixture with a hint to run
``scripts/install-test-services.sh``; they are never silently skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests` is not a package and pytest's rootdir-relative sys.path insertion
# covers only this directory, so make `tests.harness` importable however
# pytest was launched (`pytest`, `python -m pytest`, from any cwd).
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.harness.services import (
    EtcdServer,
    KafkaBroker,
    MariaDBServer,
    RedisServer,
)


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
