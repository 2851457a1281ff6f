"""``imfast serve --workers N``: one embedded node spread over N+1 processes.

Python runs one core per process, and one process may hold at most 20,000
file descriptors here, so 100K sockets need several processes.  The layout:

* the **main process** keeps the Router and the embedded store (one SQLite
  writer, so one owner), a registry of which worker holds which device, and
  the node-wide statistics; it serves the workers on a loopback link port;
* **N gateway workers** (``python -m imfast.workers``) share ``HTTP_PORT``
  with ``SO_REUSEPORT`` (the kernel spreads connections over them), call the
  main process for every state change (like ``imfast gateway`` calls
  im-service) and receive pushes on their own loopback push port.

Guarantees: the delivery promises of the single process hold (same Router,
same store, same session logic); ``/stats`` and ``/metrics`` on any worker
report the whole node (aggregated by the main process once a second);
``MAX_CONNECTIONS`` is split evenly over the workers; a worker that dies is
restarted and its registrations dropped (its clients reconnect to the
others and resume); SIGTERM drains every worker, then stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from imfast.auth import TokenVerifier, dev_secret
from imfast.backends.memory import MemoryRegistry, MemoryStore
from imfast.backends.sqlite import SQLiteStore
from imfast.config import Settings, load_settings
from imfast.gateway.aggregate import NodeAggregate, worker_report
from imfast.gateway.cluster import ClusterGateway
from imfast.gateway.presence import LastSeen
from imfast.link.endpoints import UNIX_PREFIX, LinkClient, LinkPool, LinkServer
from imfast.node import router_stats
from imfast.retention import Retention, RetentionCollector, start_retention
from imfast.service.pusher import ClusterPusher
from imfast.service.remote import RemoteRouter, serve_router
from imfast.service.router import Router

__all__ = ["EmbeddedSupervisor", "GatewaySupervisor", "WorkerGateway", "remove_orphan_socket_dirs",
           "report_loop", "run_worker"]

log = logging.getLogger("imfast.workers")

REPORT_EVERY = 1.0


async def stop_children(procs: Any, grace: float = 10.0) -> None:
    """SIGINT every child still running, wait up to ``grace`` s, then SIGKILL the rest."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        await asyncio.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


SOCKETS_DIR_PREFIX = "imfast-"


def remove_orphan_socket_dirs(parent: str | None = None) -> list[str]:
    """Remove the socket directories of supervisors that died without cleaning up.

    A SIGKILLed ``imfast serve --workers N`` leaves its private directory
    behind.  Only directories this user owns, named like ours, whose ``pid``
    file names a process that no longer exists are removed: a live node's, one
    without a pid file, or another user's are left alone.  Returns the paths
    removed.
    """
    parent = parent or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(SOCKETS_DIR_PREFIX):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(os.path.join(path, "pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue  # not ours, not a directory, or no pid written yet
        try:
            os.kill(pid, 0)
            continue  # alive (or reused by another process): keep it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a process of another user has that pid now
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed socket directories of supervisors no longer running: %s",
                 ", ".join(removed))
    return removed


class _NodeDrain:
    """A supervisor's drain of all its workers, asked by one of them, and its answer to
    their reports: [node /stats, node /metrics, drain reason or None]."""

    aggregate: NodeAggregate
    #: Set once any worker is asked to drain (``/admin/drain``): every worker drains.
    drain_reason: str | None = None

    def answer_report(self, worker: str, report: dict[str, Any]) -> list[Any]:
        return [*self.aggregate.report(worker, report), self.drain_reason]

    def node_drain(self, reason: str) -> None:
        """A worker was asked to drain (``/admin/drain``): every worker drains, told in
        the answer to its next report.  The processes keep running, like one
        gateway's after the endpoint: the pod is replaced or stopped later."""
        if self.drain_reason is None:
            log.warning("draining every gateway worker (%s)", reason)
            self.drain_reason = reason


class EmbeddedSupervisor(_NodeDrain):
    """The main process of ``imfast serve --workers N`` (see module docstring)."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        # The link and the workers' push servers listen on Unix domain sockets
        # here: private to this machine, and a write costs about half a
        # loopback TCP one.  The owner's pid is written in it, so that a later
        # node can remove it if this one is killed before it can.
        remove_orphan_socket_dirs()
        self.sockets_dir = tempfile.mkdtemp(prefix=SOCKETS_DIR_PREFIX)
        with open(os.path.join(self.sockets_dir, "pid"), "w") as f:
            f.write(str(os.getpid()))
        self._stopping = False
        self.retention: Retention | None = None
        #: user -> when their last device left any worker (for presence's last_seen), bounded.
        self.last_seen = LastSeen()

    async def start(self) -> int:
        s = self.settings
        if s.data_dir == ":memory:":
            self.store: Any = MemoryStore()
        else:
            self.store = SQLiteStore(os.path.join(s.data_dir, "imfast.db"), s.sqlite_synchronous)
        self.registry = MemoryRegistry()
        self.links = LinkPool()
        self.router = Router(s, self.store, ClusterPusher(self.registry, None, self.links))
        router = self.router
        self.retention = retention = start_retention(self.store, s)

        def own_metrics() -> list[Metric]:
            families: list[Metric] = [hist.family(name, help_text)
                                      for name, help_text, hist in router.histograms]
            families += [GaugeMetricFamily(name, help_text, value=value)
                         for _key, name, help_text, value in router.store_gauges()]
            if retention is not None:
                families += list(RetentionCollector(retention).collect())
            return families

        def own_stats() -> dict[str, Any]:
            snap = router_stats(router, s, retention)
            snap.update({key: value for key, _, _, value in router.store_gauges()})
            return snap

        self.aggregate = NodeAggregate(s, "embedded", own_stats, own_metrics)
        registry = self.registry

        async def report(worker: str, snapshot: dict[str, Any]) -> list[Any]:
            return self.answer_report(worker, snapshot)

        async def drain(reason: str) -> None:
            self.node_drain(reason)

        last_seen = self.last_seen

        async def unregister(user: str, device: str, gateway: str) -> None:
            await registry.unregister(user, device, gateway)
            if not registry.cached_lookup(user):
                last_seen.note(user, time.time())

        async def online(users: list[str]) -> list[list[Any]]:
            """[user, online, last seen or None] of each of ``users``, node-wide."""
            return [[u, True, None] if registry.cached_lookup(u) else [u, False, last_seen.get(u)]
                    for u in users]

        # The workers' own calls beside the router's (whose hot paths the handler keeps).
        self.link = LinkServer(serve_router(self.router, {
            "register": registry.register, "unregister": unregister,
            "report": report, "drain": drain, "online": online}))
        self.link_addr = UNIX_PREFIX + os.path.join(self.sockets_dir, "router.sock")
        await self.link.start_unix(self.link_addr[len(UNIX_PREFIX):])
        self.secret = s.jwt_secret or dev_secret(s.data_dir)
        for i in range(self.workers):
            self._spawn(i)
        self._watch = asyncio.get_running_loop().create_task(self._supervise())
        return s.http_port

    def _spawn(self, index: int) -> None:
        s = self.settings
        push_path = self._push_path(index)
        per_worker = max(1, s.max_connections // self.workers)
        env = {
            **os.environ,
            "IMFAST_WORKER_INDEX": str(index),
            "SERVICE_ADDR": self.link_addr,
            "IMFAST_PUSH_SOCKET": push_path,
            "IMFAST_ROUTER_MOVES_OWN_CURSORS": "1" if self.router.moves_own_cursors else "",
            "GATEWAY_ADVERTISE_ADDR": UNIX_PREFIX + push_path,
            "JWT_SECRET": self.secret,
            "HTTP_PORT": str(s.http_port),
            "HOST": s.host,
            "MAX_CONNECTIONS": str(per_worker),
            "DATA_DIR": s.data_dir,
            "INSECURE_DEV_AUTH": "true" if s.insecure_dev_auth else "false",
            "LOG_FORMAT": s.log_format,
            "IMFAST_PARENT_PID": str(os.getpid()),
        }
        proc = self.procs[index] = subprocess.Popen([sys.executable, "-m", "imfast.workers"],
                                                    env=env)
        _lower_priority(proc.pid, s.worker_nice)

    def _push_path(self, index: int) -> str:
        return os.path.join(self.sockets_dir, f"worker-{index}.sock")

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, proc in list(self.procs.items()):
                if proc.poll() is not None and not self._stopping:
                    offline = self.registry.drop_gateway(UNIX_PREFIX + self._push_path(index))
                    now = time.time()
                    for user in offline:  # presence's last_seen
                        self.last_seen.note(user, now)
                    log.error("gateway worker %d exited with %s; restarting (%d users went "
                              "offline)", index, proc.returncode, len(offline))
                    self._spawn(index)

    async def drain(self, deadline: float = 30.0) -> None:
        """SIGTERM every worker (each drains), wait for them."""
        self._stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + deadline
        while time.monotonic() < end and any(p.poll() is None for p in self.procs.values()):
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._stopping = True
        if self.retention is not None:
            await self.retention.stop()
        await stop_children(self.procs.values())
        await self.link.close()
        await self.links.close()
        self.router.move_own_cursors()  # what waits for its batch, before the store closes
        await self.store.close()
        shutil.rmtree(self.sockets_dir, ignore_errors=True)


class _LinkRegistry:
    """A worker's view of the main process's registry."""

    def __init__(self, link: LinkClient) -> None:
        self.link = link

    async def register(self, user: str, device: str, gateway: str) -> None:
        await self.link.call("register", [user, device, gateway])

    async def unregister(self, user: str, device: str, gateway: str) -> None:
        await self.link.call("unregister", [user, device, gateway])

    def cached_lookup(self, user: str) -> dict[str, str]:
        return {}

    async def online(self, users: list[str]) -> list[list[Any]]:
        """[user, online, last seen or None] of each of ``users``, over every worker."""
        return list(await self.link.call("online", [users]))

    async def close(self) -> None:
        return None


class WorkerGateway(ClusterGateway):
    """A gateway worker: node-wide /stats and /metrics come from the main process.

    A drain asked of one worker (``/admin/drain`` reaches whichever worker the
    kernel hands the request) is a drain of the whole node: the worker tells
    its supervisor, whose answer to every worker's next report (within
    :data:`REPORT_EVERY`) makes it drain too.
    """

    aggregate: tuple[dict[str, Any], bytes] | None = None
    #: The link to the supervisor (the main process, or ``imfast gateway --workers``').
    supervisor: LinkClient | None = None

    async def presence(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """Users on other workers of ``imfast serve --workers`` are online too, and one who
        left another worker has a ``last_seen``: the main process's registry says
        (this worker's cache holds nobody)."""
        result = self.presence_of(users)
        registry = self.registry
        if isinstance(registry, _LinkRegistry):
            offline = [u for u, state in result.items() if not state["online"]]
            if offline:
                for user, online, seen in await registry.online(offline):
                    times = [t for t in (result[user]["last_seen"], seen) if t]
                    result[user] = {"online": online,
                                    "last_seen": None if online else max(times, default=None)}
        return result

    def request_drain(self, reason: str) -> None:
        self.start_drain(reason)
        if self.supervisor is not None:
            self.supervisor.call("drain", [reason]).add_done_callback(_log_drain_failure)

    def stats_snapshot(self) -> dict[str, Any]:
        if self.aggregate is not None:
            return self.aggregate[0]
        return super().stats_snapshot()

    def metrics_text(self) -> bytes:
        if self.aggregate is not None:
            return self.aggregate[1]
        return super().metrics_text()

    def worker_report(self) -> dict[str, Any]:
        """This process's own /stats and metrics, for the supervisor to merge."""
        return worker_report(super().stats_snapshot(), self.stats, self.metrics_registry)


def _log_drain_failure(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled() and answer.exception() is not None:
        log.error("could not ask the supervisor to drain the other workers: %s",
                  answer.exception())


async def report_loop(gateway: WorkerGateway, link: LinkClient, name: str) -> None:
    """Send this worker's counters to the supervisor; keep the node-wide answer, and
    drain when the supervisor says the node drains."""
    parent = int(os.environ.get("IMFAST_PARENT_PID", "0"))
    gateway.supervisor = link
    while True:
        try:
            snap, text, drain = await link.call("report", [name, gateway.worker_report()])
            gateway.aggregate = (snap, text.encode())
            if drain:
                if not gateway.draining:
                    log.warning("drain requested by the supervisor (%s)", drain)
                gateway.start_drain(drain)  # idempotent; takes an annotation's drain over
        except Exception:  # noqa: BLE001 - serve this worker's own numbers meanwhile
            gateway.aggregate = None
        if parent and os.getppid() != parent:
            log.error("supervisor is gone; worker exiting")
            os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(REPORT_EVERY)


class GatewaySupervisor(_NodeDrain):
    """``imfast gateway --workers N``: N gateway processes of one pod.

    Each child is a full ``imfast gateway`` with its own push port
    (``PUSH_PORT`` + i) and registry entries; they share ``HTTP_PORT``
    (SO_REUSEPORT); the supervisor aggregates their /stats and /metrics.
    """

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False

    async def start(self) -> int:
        self.aggregate = NodeAggregate(self.settings, "gateway")

        async def handle(method: str, args: list[Any]) -> Any:
            if method == "report":
                return self.answer_report(*args)
            if method == "drain":
                return self.node_drain(*args)
            raise ValueError(method)

        self.link = LinkServer(handle)
        self.report_port = await self.link.start("127.0.0.1", 0)
        for i in range(self.workers):
            self._spawn(i)
        self._watch = asyncio.get_running_loop().create_task(self._supervise())
        return self.settings.http_port

    def _spawn(self, index: int) -> None:
        s = self.settings
        host = s.advertise_addr.rpartition(":")[0] if s.advertise_addr else "127.0.0.1"
        push_port = s.push_port + index
        env = {
            **os.environ,
            "GATEWAY_WORKERS": "1",
            "IMFAST_WORKER_INDEX": str(index),
            "IMFAST_PARENT_PID": str(os.getpid()),
            "IMFAST_REPORT_ADDR": f"127.0.0.1:{self.report_port}",
            "PUSH_PORT": str(push_port),
            "GATEWAY_ADVERTISE_ADDR": f"{host}:{push_port}",
            "HTTP_PORT": str(s.http_port),
            "MAX_CONNECTIONS": str(max(1, s.max_connections // self.workers)),
        }
        self.procs[index] = subprocess.Popen([sys.executable, "-m", "imfast", "gateway"],
                                             env=env)

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, proc in list(self.procs.items()):
                if proc.poll() is not None and not self._stopping:
                    log.error("gateway worker %d exited with %s; restarting", index,
                              proc.returncode)
                    self._spawn(index)

    drain = EmbeddedSupervisor.drain

    async def stop(self) -> None:
        self._stopping = True
        await stop_children(self.procs.values())
        await self.link.close()


async def _worker_main() -> None:
    settings = load_settings()
    index = os.environ.get("IMFAST_WORKER_INDEX", "0")
    from imfast.logs import setup_logging
    from imfast.node import run_until_signalled

    setup_logging(settings.log_format, settings.log_level, f"worker-{index}")
    # The gateway is made below; pushes on this link (cast failures) reach it.
    service = LinkClient(settings.service_addr,
                         on_push=lambda method, args: gateway.on_push(method, args))
    verifier = TokenVerifier(settings, embedded=False)
    push = LinkServer(None, None)
    push_socket = os.environ.get("IMFAST_PUSH_SOCKET")
    if push_socket:  # a worker of `imfast serve --workers N`
        await push.start_unix(push_socket)
    else:
        await push.start("127.0.0.1", settings.push_port)
    router = RemoteRouter(service, moves_own_cursors=bool(
        os.environ.get("IMFAST_ROUTER_MOVES_OWN_CURSORS")))
    gateway = WorkerGateway(settings, verifier, router, _LinkRegistry(service),
                            settings.advertise_addr)
    push._on_push = gateway.on_push
    push.on_broken = gateway.push_link_broken
    await gateway.start()
    task = asyncio.get_running_loop().create_task(
        report_loop(gateway, service, f"worker-{index}"))

    class _Node:
        async def drain(self, deadline: float = 30.0) -> None:
            await gateway.start_drain("shutdown", deadline)

        async def stop(self) -> None:
            task.cancel()
            await gateway.stop()
            await push.close()
            await service.close()

    await run_until_signalled(_Node())


def _lower_priority(pid: int, by: int) -> None:
    """Run gateway process ``pid`` ``by`` nice levels below this (the router's) process.

    Every message passes the one router process; the gateway processes are
    many and each is mostly idle.  When the machine is short of CPU, the
    router waiting for a core delays every message, so it goes first (measured
    in docs/performance.md: delivery P99 about halved at 20K sockets and 5K
    msgs/s on 2 vCPUs).  Raising a niceness needs no privilege.
    """
    if not by:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + by))
    except OSError as exc:  # e.g. the process already exited: its restart sets it again
        log.warning("could not lower gateway worker %d's CPU priority: %s", pid, exc)


def run_worker() -> None:
    """Entry point of ``python -m imfast.workers`` (started by the supervisor)."""
    import uvloop

    from imfast.runtime import tune_gc

    tune_gc()
    uvloop.run(_worker_main())


if __name__ == "__main__":
    run_worker()
