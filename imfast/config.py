"""Settings: one frozen object built from environment variables and a file.

Precedence (highest first): command-line flags (applied by the CLI with
:meth:`Settings.replace`), environment variables, the TOML config file named
by ``--config`` or ``IMFAST_CONFIG``, then the ``DEFAULT_*`` values below.

Every setting has exactly one environment variable, spelled as in
``CONTRACT.md`` (``KAFKA_BROKERS``, ``DB_MAX_OPEN_CONNS``, ...); in the file
the same names are accepted in lower case.  A bad value is refused at start-up
with :class:`ConfigError`, whose message names the variable and the value.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imfast.gateway.limits import PRIVATE_NETWORKS, parse_networks

__all__ = ["FEATURES", "ConfigError", "Settings", "load_settings"]

DEFAULT_HTTP_PORT = 8080
DEFAULT_PUSH_PORT = 9093
DEFAULT_SERVICE_PORT = 9094
DEFAULT_MAX_CONNECTIONS = 100_000
DEFAULT_MAX_FRAME_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 16 * 1024
DEFAULT_AUTH_TIMEOUT = 10.0
DEFAULT_HEARTBEAT_TIMEOUT = 90.0
DEFAULT_SYNC_PAGE_MAX = 200
DEFAULT_WRITE_BUFFER_HIGH = 256 * 1024
DEFAULT_WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
DEFAULT_DEDUP_TTL = 7 * 24 * 3600
DEFAULT_MAX_ERRORS = 20
DEFAULT_RATE_MSGS_PER_SEC = 50.0
DEFAULT_RATE_BURST = 100
DEFAULT_CONNECT_RATE_PER_IP = 20.0
DEFAULT_CONNECT_BURST_PER_IP = 100
DEFAULT_MAX_DEVICES_PER_USER = 10
DEFAULT_MAX_GROUP_MEMBERS = 1000
DEFAULT_RECALL_WINDOW = 120.0
DEFAULT_DB_MAX_OPEN_CONNS = 20
DEFAULT_DB_READ_TIMEOUT = 5.0
DEFAULT_DB_WRITE_TIMEOUT = 10.0

#: Features that can be switched off by configuration (``FEATURES_DISABLED``).
FEATURES = ("typing", "presence", "receipts", "groups", "recall", "history")


class ConfigError(ValueError):
    """A setting has a value we refuse; the message names the variable and value."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


def _niceness(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 19:
        raise ValueError("must be a whole number from 0 to 19")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number, 0 or more")
    return value


def _networks(text: str) -> tuple[str, ...]:
    items = _parse_list(text)
    parse_networks(items)  # refuses a bad entry, naming it
    return items


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0-65535")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # NaN too: every comparison with it is False
        raise ValueError("must be a positive number")
    return value


def _features(text: str) -> tuple[str, ...]:
    names = _parse_list(text)
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known: {', '.join(FEATURES)}")
    return names


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _setting(env: str, parse: Callable[[str], Any], default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse, "doc": doc})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of every role; roles read only what they need."""

    host: str = _setting("HOST", str, "0.0.0.0", "address the gateway listens on")
    http_port: int = _setting(
        "HTTP_PORT", _port, DEFAULT_HTTP_PORT, "WebSocket /ws and HTTP /health /stats /metrics"
    )
    push_port: int = _setting(
        "PUSH_PORT", _port, DEFAULT_PUSH_PORT, "gateway's internal push port (im-service -> gateway)"
    )
    service_port: int = _setting(
        "SERVICE_PORT", _port, DEFAULT_SERVICE_PORT, "im-service internal port (gateway -> service)"
    )
    service_addr: str = _setting(
        "SERVICE_ADDR", str, "127.0.0.1:9094", "host:port where gateways reach im-service; a comma list, or a name that "
        "resolves to every replica (a headless Service), for several replicas"
    )
    advertise_addr: str = _setting(
        "GATEWAY_ADVERTISE_ADDR", str, "", "host:port of this gateway's push port, as registered"
    )
    hostname: str = _setting(
        "POD_NAME", str, "", "name shown by /health (defaults to the host name)"
    )
    workers: int = _setting("GATEWAY_WORKERS", _positive_int, 1, "gateway worker processes")
    worker_nice: int = _setting(
        "GATEWAY_WORKER_NICE", _niceness, 10,
        "imfast serve --workers: how much lower (nice) the gateway processes run than the router "
        "process when CPU is short (0 = the same)",
    )
    data_dir: str = _setting("DATA_DIR", str, "./data", "embedded mode: where the SQLite file lives")
    sqlite_synchronous: str = _setting(
        "SQLITE_SYNCHRONOUS", _choice("OFF", "NORMAL", "FULL"), "NORMAL",
        "embedded mode: SQLite durability (NORMAL survives a process crash, FULL a power cut)",
    )
    jwt_secret: str = _setting("JWT_SECRET", str, "", "HS256 secret for client tokens")
    jwt_public_key_file: str = _setting(
        "JWT_PUBLIC_KEY_FILE", str, "", "PEM public key for RS256/ES256 tokens"
    )
    jwt_algorithm: str = _setting(
        "JWT_ALGORITHM", _choice("HS256", "RS256", "ES256"), "HS256", "the one accepted algorithm"
    )
    jwt_audience: str = _setting("JWT_AUDIENCE", str, "imfast", "required `aud` claim")
    jwt_issuer: str = _setting("JWT_ISSUER", str, "imfast", "required `iss` claim")
    insecure_dev_auth: bool = _setting(
        "INSECURE_DEV_AUTH", _parse_bool, False,
        "DEMO ONLY: accept ?user=NAME without a token",
    )
    max_connections: int = _setting(
        "MAX_CONNECTIONS", _positive_int, DEFAULT_MAX_CONNECTIONS,
        "sockets per gateway node (split evenly over its worker processes)"
    )
    max_frame_bytes: int = _setting(
        "MAX_FRAME_BYTES", _positive_int, DEFAULT_MAX_FRAME_BYTES, "largest WebSocket message"
    )
    max_body_bytes: int = _setting(
        "MAX_BODY_BYTES", _positive_int, DEFAULT_MAX_BODY_BYTES, "largest chat message body"
    )
    auth_timeout: float = _setting(
        "AUTH_TIMEOUT", _positive_float, DEFAULT_AUTH_TIMEOUT, "seconds to authenticate"
    )
    heartbeat_timeout: float = _setting(
        "HEARTBEAT_TIMEOUT", _positive_float, DEFAULT_HEARTBEAT_TIMEOUT,
        "seconds of silence before a socket is considered dead",
    )
    ack_timeout: float = _setting(
        "ACK_TIMEOUT", _positive_float, 30.0,
        "seconds a pushed entry may stay unacknowledged before it is sent again",
    )
    sync_page_max: int = _setting(
        "SYNC_PAGE_MAX", _positive_int, DEFAULT_SYNC_PAGE_MAX, "cap on messages per sync page"
    )
    write_buffer_high: int = _setting(
        "WRITE_BUFFER_HIGH", _positive_int, DEFAULT_WRITE_BUFFER_HIGH,
        "bytes queued to a client before droppable events are dropped and chat waits",
    )
    write_buffer_limit: int = _setting(
        "WRITE_BUFFER_LIMIT", _positive_int, DEFAULT_WRITE_BUFFER_LIMIT,
        "bytes queued to a client before it is closed with a reconnect code",
    )
    write_stall_timeout: float = _setting(
        "WRITE_STALL_TIMEOUT", _positive_float, 20.0,
        "seconds a client may leave chat entries waiting on a full write buffer before it is "
        "closed with 4002 (reconnect; nothing is lost)",
    )
    max_errors: int = _setting(
        "MAX_PROTOCOL_ERRORS", _positive_int, DEFAULT_MAX_ERRORS,
        "bad frames tolerated per connection before it is closed",
    )
    rate_msgs_per_sec: float = _setting(
        "RATE_MSGS_PER_SEC", _positive_float, DEFAULT_RATE_MSGS_PER_SEC,
        "sustained frames/s per connection",
    )
    rate_burst: int = _setting(
        "RATE_BURST", _positive_int, DEFAULT_RATE_BURST, "frame burst per connection"
    )
    connect_rate_per_ip: float = _setting(
        "CONNECT_RATE_PER_IP", _non_negative_float, DEFAULT_CONNECT_RATE_PER_IP,
        "sustained /ws upgrades per second per client address (IPv6: per /64), per gateway "
        "process; above it HTTP 429 with Retry-After; 0 switches the limit off",
    )
    connect_burst_per_ip: int = _setting(
        "CONNECT_BURST_PER_IP", _positive_int, DEFAULT_CONNECT_BURST_PER_IP,
        "/ws upgrades one client address may make at once before CONNECT_RATE_PER_IP applies",
    )
    connect_limit_exempt: tuple[str, ...] = _setting(
        "CONNECT_LIMIT_EXEMPT", _networks, PRIVATE_NETWORKS,
        "comma list of CIDRs never counted by CONNECT_RATE_PER_IP (default: loopback and "
        "private ranges); empty counts every address",
    )
    trusted_proxies: tuple[str, ...] = _setting(
        "TRUSTED_PROXIES", _networks, (),
        "comma list of CIDRs of reverse proxies whose X-Forwarded-For names the client "
        "(for CONNECT_RATE_PER_IP); from other peers the header is ignored",
    )
    max_devices_per_user: int = _setting(
        "MAX_DEVICES_PER_USER", _non_negative_int, DEFAULT_MAX_DEVICES_PER_USER,
        "connections (devices) one user may hold on a gateway process; one more is refused "
        "with `too_many_devices` and close 4505; the same device reconnecting replaces its old "
        "connection; 0: no limit",
    )
    max_group_members: int = _setting(
        "MAX_GROUP_MEMBERS", _positive_int, DEFAULT_MAX_GROUP_MEMBERS, "largest group"
    )
    recall_window: float = _setting(
        "RECALL_WINDOW", _positive_float, DEFAULT_RECALL_WINDOW, "seconds a sender may recall"
    )
    dedup_ttl: int = _setting(
        "DEDUP_TTL", _positive_int, DEFAULT_DEDUP_TTL, "seconds a client message id is remembered"
    )
    allowed_origins: tuple[str, ...] = _setting(
        "ALLOWED_ORIGINS", _parse_list, (), "comma list; empty allows any Origin"
    )
    drain_annotations_file: str = _setting(
        "DRAIN_ANNOTATIONS_FILE", str, "",
        "downward-API annotations file; drain=\"true\" there drains this gateway",
    )
    admin_token: str = _setting(
        "ADMIN_TOKEN", str, "",
        "enables GET /admin/drain with header X-Admin-Token: <this value>",
    )
    route_all_offline: bool = _setting(
        "ROUTE_ALL_OFFLINE", _parse_bool, False,
        "emergency: store every message for sync instead of pushing it",
    )
    features_disabled: tuple[str, ...] = _setting(
        "FEATURES_DISABLED", _features, (), f"comma list of {', '.join(FEATURES)}"
    )
    conformance_echo: bool = _setting(
        "IMFAST_CONFORMANCE_ECHO", _parse_bool, False,
        "serve /_echo (Autobahn conformance); off in production",
    )
    log_format: str = _setting("LOG_FORMAT", _choice("json", "text"), "json", "json or text")
    log_level: str = _setting(
        "LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", "log level"
    )
    redis_url: str = _setting("REDIS_URL", str, "", "distributed mode: redis://host:6379/0")
    kafka_brokers: tuple[str, ...] = _setting(
        "KAFKA_BROKERS", _parse_list, (), "distributed mode: host:9092,host:9092"
    )
    kafka_fetch_max_wait_ms: int = _setting(
        "KAFKA_FETCH_MAX_WAIT_MS", _positive_int, 500,
        "longest a consumer's fetch waits for records; Kafka answers as soon as records "
        "arrive, but brokers that hold every fetch this long (tansu) add it to group delivery",
    )
    kafka_topic_partitions: int = _setting(
        "KAFKA_TOPIC_PARTITIONS", _positive_int, 6,
        "partitions of group_msg/offline_msg when imfast creates them (an existing topic "
        "keeps its own): every gateway process consumes group_msg, so at least the "
        "number of gateway processes",
    )
    kafka_topic_replication: int = _setting(
        "KAFKA_TOPIC_REPLICATION", _positive_int, 1,
        "replication factor of group_msg/offline_msg when imfast creates them "
        "(at most the number of brokers)",
    )
    etcd_endpoints: tuple[str, ...] = _setting(
        "ETCD_ENDPOINTS", _parse_list, (), "distributed mode: http://host:2379,..."
    )
    mysql_dsn: str = _setting(
        "MYSQL_DSN", str, "", "distributed mode: mysql://user:pass@host:3306/im_chat"
    )
    message_retention_days: float = _setting(
        "MESSAGE_RETENTION_DAYS", _non_negative_float, 0.0,
        "conversation entries older than this many days are deleted hourly (by "
        "offline-worker from MySQL; by `imfast serve` from its own store); sequence "
        "numbers, cursors and receipts stay; 0 = keep forever",
    )
    db_max_open_conns: int = _setting(
        "DB_MAX_OPEN_CONNS", _positive_int, DEFAULT_DB_MAX_OPEN_CONNS, "MySQL pool size"
    )
    db_read_timeout: float = _setting(
        "DB_READ_TIMEOUT", _positive_float, DEFAULT_DB_READ_TIMEOUT,
        "seconds a MySQL query waits for its reply; then the connection is dropped",
    )
    db_write_timeout: float = _setting(
        "DB_WRITE_TIMEOUT", _positive_float, DEFAULT_DB_WRITE_TIMEOUT,
        "seconds a MySQL write or transaction may take; then the connection is dropped "
        "and the sender told 'unavailable'",
    )

    def feature_enabled(self, name: str) -> bool:
        """True unless ``name`` is listed in ``FEATURES_DISABLED``."""
        return name not in self.features_disabled

    @property
    def display_hostname(self) -> str:
        """The name /health reports: ``POD_NAME`` or the machine's host name."""
        return self.hostname or socket.gethostname()

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (used for command-line flags)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(env var, default, doc) for every setting, for help text and docs."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(default)
            rows.append((f.metadata["env"], str(default), f.metadata["doc"]))
        return rows


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | None = None
) -> Settings:
    """Build :class:`Settings` from a config file and the environment.

    Raises :class:`ConfigError` naming the first bad variable.
    """
    env = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    path = config_file or env.get("IMFAST_CONFIG", "")
    if path:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path!r}: {exc}") from exc
        file_values = {str(k).upper(): v for k, v in raw.items()}
        known = {f.metadata["env"] for f in dataclasses.fields(Settings)}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigError(f"config file {path!r}: unknown setting(s) {unknown}")

    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        name = f.metadata["env"]
        if name in env:
            text = env[name]
        elif name in file_values:
            raw_value = file_values[name]
            if isinstance(raw_value, bool):
                text = "true" if raw_value else "false"
            elif isinstance(raw_value, list):
                text = ",".join(str(v) for v in raw_value)
            else:
                text = str(raw_value)
        else:
            continue
        try:
            values[f.name] = f.metadata["parse"](text)
        except ValueError as exc:
            raise ConfigError(f"{name}={text!r} is not valid: {exc}") from None
    return Settings(**values)
