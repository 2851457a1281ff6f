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
import urllib.request
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LocalCluster:
    """Real backing services + im-service + offline worker + ``gateways`` gateways."""

    def __init__(self, report_dir: str, gateways: int, workers: int = 1) -> None:
        self.report_dir = Path(report_dir)
        self.gateways = gateways
        self.workers = workers  # processes per gateway (GATEWAY_WORKERS)
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
                           "RATE_BURST": "100000",
                           "MAX_CONNECTIONS": str(18_000 * self.workers),
                           "GATEWAY_WORKERS": str(self.workers),
                           # tansu (memory storage here) holds every fetch for the full
                           # wait; real Kafka answers as records arrive.
                           "KAFKA_FETCH_MAX_WAIT_MS": "25"})
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

    def hop_figures(self) -> list[str]:
        """P50/P99 of every duration histogram each role exposes (where the time went).

        Also saves each role's /metrics text in the report directory.
        """
        from prometheus_client.parser import text_string_to_metric_families

        lines = []
        for proc in self.cluster.procs:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/metrics",
                                            timeout=5) as r:
                    text = r.read().decode()
            except OSError as exc:
                lines.append(f"{proc.role} :{proc.http_port}: /metrics unavailable ({exc})")
                continue
            (self.report_dir / f"metrics-{proc.role}-{proc.http_port}.txt").write_text(text)
            for family in text_string_to_metric_families(text):
                if family.type != "histogram" or not family.name.endswith("_seconds"):
                    continue
                buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples
                                 if s.name.endswith("_bucket"))
                total = buckets[-1][1] if buckets else 0
                if not total:
                    continue
                p50, p99 = (_quantile(buckets, q) for q in (0.5, 0.99))
                lines.append(f"{proc.role} :{proc.http_port} {family.name}: n={int(total)} "
                             f"p50<={p50} p99<={p99}")
        return lines

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.services is not None:
            self.services.stop()


def _quantile(buckets: list[tuple[float, float]], q: float) -> str:
    """Upper bound of the cumulative bucket holding quantile ``q``, in ms."""
    total = buckets[-1][1]
    for upper, count in buckets:
        if count >= q * total:
            return "inf" if upper == float("inf") else f"{upper * 1000:g} ms"
    return "inf"
