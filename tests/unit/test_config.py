"""Settings: env vars win over the file, bad values are refused with their name."""

from __future__ import annotations

from pathlib import Path

import pytest

from imfast.config import ConfigError, Settings, load_settings


def test_defaults_and_contract_names() -> None:
    s = load_settings({})
    assert (s.http_port, s.push_port, s.service_port) == (8080, 9093, 9094)
    envs = {row[0] for row in Settings.describe()}
    for name in ("KAFKA_BROKERS", "DB_MAX_OPEN_CONNS", "REDIS_URL", "ETCD_ENDPOINTS",
                 "MYSQL_DSN", "ROUTE_ALL_OFFLINE", "FEATURES_DISABLED", "MAX_CONNECTIONS"):
        assert name in envs


def test_environment_parsing() -> None:
    s = load_settings({"KAFKA_BROKERS": "k1:9092, k2:9092", "DB_MAX_OPEN_CONNS": "50",
                       "ROUTE_ALL_OFFLINE": "true", "FEATURES_DISABLED": "typing,presence"})
    assert s.kafka_brokers == ("k1:9092", "k2:9092")
    assert s.db_max_open_conns == 50 and s.route_all_offline is True
    assert not s.feature_enabled("typing") and s.feature_enabled("groups")
    s = load_settings({"DB_READ_TIMEOUT": "1.5", "DB_WRITE_TIMEOUT": "3"})
    assert (s.db_read_timeout, s.db_write_timeout) == (1.5, 3.0)
    assert (Settings().db_read_timeout, Settings().db_write_timeout) == (5.0, 10.0)


@pytest.mark.parametrize("env,needle", [
    ({"DB_MAX_OPEN_CONNS": "lots"}, "DB_MAX_OPEN_CONNS='lots'"),
    ({"DB_MAX_OPEN_CONNS": "0"}, "positive"),
    ({"DB_READ_TIMEOUT": "0"}, "DB_READ_TIMEOUT='0'"),
    ({"DB_WRITE_TIMEOUT": "soon"}, "DB_WRITE_TIMEOUT"),
    ({"HTTP_PORT": "70000"}, "HTTP_PORT"),
    ({"FEATURES_DISABLED": "teleport"}, "teleport"),
    ({"ROUTE_ALL_OFFLINE": "maybe"}, "ROUTE_ALL_OFFLINE"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"GATEWAY_WORKER_NICE": "20"}, "GATEWAY_WORKER_NICE='20'.*0 to 19"),
    ({"GATEWAY_WORKER_NICE": "-5"}, "GATEWAY_WORKER_NICE"),
    # NaN compares False with everything: a NaN timeout never fires
    ({"AUTH_TIMEOUT": "nan"}, "AUTH_TIMEOUT='nan'.*positive"),
    ({"ACK_TIMEOUT": "inf"}, "ACK_TIMEOUT='inf'.*positive"),
])
def test_bad_values_are_refused_naming_the_variable(env: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_settings(env)


def test_file_then_env(tmp_path: Path) -> None:
    f = tmp_path / "imfast.toml"
    f.write_text('http_port = 9000\nmax_connections = 10\nkafka_brokers = ["a:1", "b:2"]\n')
    s = load_settings({"MAX_CONNECTIONS": "20"}, str(f))
    assert (s.http_port, s.max_connections, s.kafka_brokers) == (9000, 20, ("a:1", "b:2"))
    f.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="no_such_setting|NO_SUCH_SETTING"):
        load_settings({}, str(f))


def test_kafka_fetch_wait_is_kafkas_default_and_must_be_positive() -> None:
    assert load_settings({}).kafka_fetch_max_wait_ms == 500
    assert load_settings({"KAFKA_FETCH_MAX_WAIT_MS": "100"}).kafka_fetch_max_wait_ms == 100
    with pytest.raises(ConfigError, match="KAFKA_FETCH_MAX_WAIT_MS"):
        load_settings({"KAFKA_FETCH_MAX_WAIT_MS": "0"})
