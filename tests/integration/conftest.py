"""Integration tests: real Redis, MariaDB, etcd and Kafka (fixtures in tests/conftest.py)."""
