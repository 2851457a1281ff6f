"""A role started while a backend is down waits for it instead of exiting
(imfast/startup.py): alive (/health/live 200), not ready (/health 503 naming the
backend), nothing leaked per attempt, ready by itself once the backend is up."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness.services import KafkaBroker, MariaDBServer, free_port
from tests.helpers.cluster import Proc

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def until(check: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = check()
        except OSError:  # not listening yet
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s")


def im_service_connections(server: MariaDBServer) -> int:
    out = server.execute("SELECT COUNT(*) FROM information_schema.processlist "
                         "WHERE user='im_service'")
    return int(out.split()[-1])


def offline_worker(tmp_path: Path, mysql_dsn: str, kafka: str) -> Proc:
    port = free_port()
    return Proc("offline-worker", {"MYSQL_DSN": mysql_dsn, "KAFKA_BROKERS": kafka,
                                   "DB_MAX_OPEN_CONNS": "1", "HTTP_PORT": str(port),
                                   "HOST": "127.0.0.1"},
                tmp_path / "offline-worker.log", port)


def test_a_role_waits_for_a_backend_that_is_down_then_starts(
        tmp_path: Path, mariadb_server: MariaDBServer, mariadb_app_dsn: str) -> None:
    broker = KafkaBroker()  # its port is chosen; nothing listens there yet
    proc = offline_worker(tmp_path, mariadb_app_dsn, broker.bootstrap_servers)
    before = im_service_connections(mariadb_server)
    proc.start()
    try:
        def waiting() -> dict[str, Any] | None:
            status, body = get(proc.http_port, "/health/live")
            return body if status == 200 and body.get("attempts", 0) >= 3 else None

        live = until(waiting, 30, "three attempts, alive meanwhile")
        assert live["waiting_for"] == "kafka" and live["role"] == "offline-worker"
        status, body = get(proc.http_port, "/health")
        assert status == 503 and body["status"] == "starting"
        assert get(proc.http_port, "/stats")[0] == 503
        assert proc.proc is not None and proc.proc.poll() is None
        # Each attempt opened MySQL before Kafka failed, and closed it again.
        assert im_service_connections(mariadb_server) <= before + 1
        assert "waiting for kafka" in proc.tail()
        broker.start()
        until(lambda: get(proc.http_port, "/health")[0] == 200, 45, "ready once Kafka is up")
        status, stats = get(proc.http_port, "/stats")
        assert status == 200 and stats["role"] == "offline-worker"
        assert "offline-worker started after waiting for kafka" in proc.tail()
    finally:
        proc.stop()
        broker.close()


def test_a_waiting_role_exits_at_once_on_sigterm(tmp_path: Path, mariadb_app_dsn: str) -> None:
    broker = KafkaBroker()  # never started
    proc = offline_worker(tmp_path, mariadb_app_dsn, broker.bootstrap_servers)
    proc.start()
    try:
        until(lambda: get(proc.http_port, "/health/live")[0] == 200, 30, "waiting")
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()
        broker.close()
