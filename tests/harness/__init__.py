"""Hermetic test harness: real Redis, MariaDB, etcd and Kafka (tansu) servers.

See :mod:`tests.harness.services` for the API and measured start times.
"""

from .services import (
    BinaryNotFound,
    EtcdServer,
    KafkaBroker,
    MariaDBServer,
    RedisServer,
    Service,
    ServiceError,
    ServiceSet,
    free_port,
    start_all,
)

__all__ = [
    "BinaryNotFound",
    "EtcdServer",
    "KafkaBroker",
    "MariaDBServer",
    "RedisServer",
    "Service",
    "ServiceError",
    "ServiceSet",
    "free_port",
    "start_all",
]
