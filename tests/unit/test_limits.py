"""ConnectLimiter: per-address token buckets for /ws upgrades (imfast/gateway/limits.py)."""

from __future__ import annotations

import pytest

from imfast.config import ConfigError, load_settings
from imfast.gateway.limits import PRIVATE_NETWORKS, ConnectLimiter


def test_burst_then_rate_and_the_wait_until_the_next_token() -> None:
    lim = ConnectLimiter(2.0, 3, exempt=())
    assert [lim.check("203.0.113.1", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.check("203.0.113.1", 0.0) == pytest.approx(0.5)
    assert lim.check("203.0.113.1", 0.25) == pytest.approx(0.25)  # refused: no token taken
    assert lim.check("203.0.113.1", 0.5) == 0.0
    assert lim.check("203.0.113.2", 0.5) == 0.0  # another address, another bucket
    assert lim.check("203.0.113.1", 100.0) == 0.0  # refilled, capped at the burst
    assert [lim.check("203.0.113.1", 100.0) for _ in range(3)][-1] > 0


def test_rate_zero_switches_the_limit_off() -> None:
    lim = ConnectLimiter(0.0, 1, exempt=())
    assert not lim.enabled
    assert all(lim.check("203.0.113.1", 0.0) == 0.0 for _ in range(10))
    assert not lim.buckets


def test_exempt_networks_and_non_ip_peers_are_not_counted() -> None:
    lim = ConnectLimiter(1.0, 1)
    for addr in ("127.0.0.5", "::1", "10.2.3.4", "192.168.1.1", "172.20.0.1", "fd00::1",
                 "::ffff:127.0.0.1", "not-an-ip"):
        assert lim.check(addr, 0.0) == 0.0 and lim.check(addr, 0.0) == 0.0, addr
    assert not lim.buckets
    assert lim.check("8.8.8.8", 0.0) == 0.0 and lim.check("8.8.8.8", 0.0) > 0


def test_ipv6_is_counted_per_64_and_ipv4_mapped_as_ipv4() -> None:
    lim = ConnectLimiter(1.0, 1, exempt=())
    assert lim.check("2001:db8:1:2::1", 0.0) == 0.0
    assert lim.check("2001:db8:1:2:ffff::9", 0.0) > 0  # same /64
    assert lim.check("2001:db8:1:3::1", 0.0) == 0.0
    assert lim.check("::ffff:198.51.100.1", 0.0) == 0.0
    assert lim.check("198.51.100.1", 0.0) > 0
    assert set(lim.buckets) == {"2001:db8:1:2::/64", "2001:db8:1:3::/64", "198.51.100.1"}


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    lim = ConnectLimiter(1.0, 1, trusted_proxies=("10.0.0.0/8",))
    xff = "1.2.3.4, 203.0.113.9, 10.0.0.7"
    assert lim.client_address("10.0.0.2", xff) == "203.0.113.9"  # right-most untrusted hop
    assert lim.client_address("10.0.0.2", "203.0.113.9") == "203.0.113.9"
    assert lim.client_address("198.51.100.1", xff) == "198.51.100.1"  # not a proxy: ignored
    assert lim.client_address("10.0.0.2", None) == "10.0.0.2"
    assert lim.client_address("10.0.0.2", "10.0.0.3") == "10.0.0.2"  # only proxies
    assert lim.client_address("10.0.0.2", "junk, 10.0.0.3") == "10.0.0.2"
    assert ConnectLimiter(1.0, 1).client_address("10.0.0.2", xff) == "10.0.0.2"  # none trusted


def test_sweep_forgets_only_refilled_buckets() -> None:
    lim = ConnectLimiter(10.0, 20, exempt=())  # full again 2 s after the last use
    lim.check("203.0.113.1", 0.0)
    lim.check("203.0.113.2", 1.0)
    lim.check("203.0.113.1", 1.5)  # used again: moves behind .2
    assert lim.sweep(2.9) == 0
    assert lim.sweep(3.2) == 1 and list(lim.buckets) == ["203.0.113.1"]
    assert lim.sweep(10.0) == 1 and not lim.buckets


def test_settings_defaults_and_bad_values_are_refused_with_their_name() -> None:
    s = load_settings({})
    assert s.connect_rate_per_ip > 0 and s.connect_limit_exempt == PRIVATE_NETWORKS
    assert s.max_devices_per_user > 0 and s.trusted_proxies == ()
    s = load_settings({"CONNECT_LIMIT_EXEMPT": "", "TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1",
                       "CONNECT_RATE_PER_IP": "0", "MAX_DEVICES_PER_USER": "0"})
    assert s.connect_limit_exempt == () and s.trusted_proxies == ("10.0.0.0/8", "192.0.2.1")
    assert s.connect_rate_per_ip == 0 and s.max_devices_per_user == 0
    for name, value in (("TRUSTED_PROXIES", "10.0.0.0/8,proxy"), ("CONNECT_LIMIT_EXEMPT", "1.2.3"),
                        ("CONNECT_RATE_PER_IP", "-1"), ("CONNECT_RATE_PER_IP", "nan"),
                        ("CONNECT_BURST_PER_IP", "0"), ("MAX_DEVICES_PER_USER", "-2")):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value})

