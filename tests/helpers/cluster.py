"""A distributed imfast deployment as separate processes, on real services.

``Cluster`` starts im-service, an offline worker and N gateways with
``python -m imfast <role>``, each configured only by environment variables
(as Kubernetes would), on free ports, and stops or kills them on demand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.harness.services import free_port

JWT_SECRET = "cluster-test-secret-0123456789abcdef0123"


class Proc:
    """One imfast role process with its log file."""

    def __init__(self, role: str, env: dict[str, str], log: Path, http_port: int) -> None:
        self.role = role
        self.env = env
        self.log_path = log
        self.http_port = http_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        full = {**os.environ, **self.env, "LOG_FORMAT": "text", "LOG_LEVEL": "INFO"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - as long as the role runs
        self.proc = subprocess.Popen([sys.executable, "-m", "imfast", self.role], env=full,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health",
                                            timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.role} not healthy in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Cluster:
    """service + offline worker + gateways; see module docstring."""

    def __init__(self, services: Any, workdir: Path, gateways: int = 2,
                 replicas: int = 1) -> None:
        self.services = services
        self.workdir = workdir
        self.service_ports = [free_port() for _ in range(replicas)]
        self.service_port = self.service_ports[0]
        self.common = {
            "REDIS_URL": services["redis"].url,
            "KAFKA_BROKERS": services["kafka"].bootstrap_servers,
            "ETCD_ENDPOINTS": services["etcd"].url,
            "MYSQL_DSN": services["mysql_dsn"],
            "DB_MAX_OPEN_CONNS": "5",
            "JWT_SECRET": JWT_SECRET,
            "SERVICE_ADDR": ",".join(f"127.0.0.1:{p}" for p in self.service_ports),
            "HOST": "127.0.0.1",
        }
        self.procs: list[Proc] = []
        self.replicas = [self._proc("service", {"SERVICE_PORT": str(p)})
                         for p in self.service_ports]
        self.service = self.replicas[0]
        self.worker = self._proc("offline-worker", {})
        self.gateways = [self._proc("gateway", {"PUSH_PORT": str(free_port()),
                                                "POD_NAME": f"gw{i}"}) for i in range(gateways)]

    def _proc(self, role: str, extra: dict[str, str]) -> Proc:
        port = free_port()
        env = {**self.common, "HTTP_PORT": str(port), **extra}
        if role == "gateway":
            env["GATEWAY_ADVERTISE_ADDR"] = f"127.0.0.1:{extra['PUSH_PORT']}"
        p = Proc(role, env, self.workdir / f"{role}-{port}.log", port)
        self.procs.append(p)
        return p

    def start(self) -> Cluster:
        for p in self.replicas:
            p.start()
        for p in self.replicas:
            p.wait_healthy()
        for p in [self.worker, *self.gateways]:
            p.start()
        for p in [self.worker, *self.gateways]:
            p.wait_healthy()
        return self

    def free_pair(self) -> int:
        """A port P with P+1 free too (a two-worker gateway pushes on both)."""
        import socket

        for _ in range(50):
            port = free_port()
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
        raise RuntimeError("no free port pair")

    def url(self, gateway: int) -> str:
        return f"ws://127.0.0.1:{self.gateways[gateway].http_port}/ws"

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.role} ---\n{p.tail()}" for p in self.procs)


@contextmanager
def running(cluster: Cluster, services: Any) -> Iterator[Cluster]:
    """Start ``cluster``; on the way out stop it and its private ``services``.

    If anything fails meanwhile, the roles' last log lines are printed first.
    """
    try:
        cluster.start()
        yield cluster
    except Exception:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        services.stop()
