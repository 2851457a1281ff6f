"""A distributed imfast deployment on this machine, for ``run-load-tests.sh --distributed``.

Starts private Redis, MariaDB, etcd and a Kafka-compatible broker on free ports
(the test harness, ``tests/harness/services.py``: the same real servers the
integration tests use), then im-service, the offline worker and N gateways as
separate ``python -m imfast <role>`` processes configured only by environment
variables, as Kubernetes would.  ``stop`` tears everything down; nothing is
left behind but the logs in the report directory.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LocalCluster:
    """Real backing services + im-service + offline worker + ``gateways`` gateways."""

    def __init__(self, report_dir: str, gateways: int) -> None:
        self.report_dir = Path(report_dir)
        self.gateways = gateways
        self.secret = secrets.token_urlsafe(32)
        self.services: Any = None
        self.cluster: Any = None

    def start(self) -> None:
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        from tests.harness.services import ServiceSet
        from tests.helpers.cluster import Cluster

        # The roles inherit this process's environment (Cluster adds the addresses).
        os.environ.update({"JWT_SECRET": self.secret, "RATE_MSGS_PER_SEC": "100000",
                           "RATE_BURST": "100000", "MAX_CONNECTIONS": "18000"})
        self.services = ServiceSet("redis", "mariadb", "etcd", "kafka").start()
        dsn = self.services.mariadb.create_app_database()
        self.cluster = Cluster({"redis": self.services.redis, "etcd": self.services.etcd,
                                "kafka": self.services.kafka, "mysql_dsn": dsn},
                               self.report_dir, gateways=self.gateways)
        self.cluster.common["JWT_SECRET"] = self.secret
        for proc in self.cluster.procs:
            proc.env["JWT_SECRET"] = self.secret
            proc.env["LOG_LEVEL"] = "WARNING"
        self.cluster.start()

    @property
    def urls(self) -> list[str]:
        return [self.cluster.url(i) for i in range(self.gateways)]

    @property
    def gateway_pids(self) -> list[int]:
        return [p.proc.pid for p in self.cluster.gateways if p.proc is not None]

    def describe(self) -> str:
        roles = ", ".join(f"{p.role} :{p.http_port}" for p in self.cluster.procs)
        return (f"distributed: {roles}; Redis, MariaDB, etcd, Kafka-compatible broker "
                f"(tansu) on free ports; logs in {self.report_dir}")

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.services is not None:
            self.services.stop()
