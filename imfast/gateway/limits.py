"""Connection-rate limit per client address (BAD_INPUTS case 30: connects/s).

:class:`ConnectLimiter` keeps one token bucket per client address: a burst of
``CONNECT_BURST_PER_IP`` upgrades, refilled at ``CONNECT_RATE_PER_IP`` per
second.  Guarantees:

* a refused upgrade costs no token, and the answer says when the next one is
  due (:meth:`ConnectLimiter.check` returns the seconds to wait, for
  ``Retry-After``);
* addresses in ``CONNECT_LIMIT_EXEMPT`` (default: loopback and the private
  ranges, so load tests and a proxy that hides the client address are never
  throttled by accident) are never counted;
* behind a reverse proxy listed in ``TRUSTED_PROXIES`` the client address is
  the right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy
  (what the proxy saw); from any other peer the header is ignored, so a client
  cannot choose its own bucket;
* IPv6 clients are counted per /64 (one subscriber usually holds a whole /64);
* memory is bounded by the accept rate: a bucket is forgotten once it would be
  full again (``burst / rate`` seconds after its last use), in
  :meth:`ConnectLimiter.sweep`, which looks only at the buckets it removes.

The state is per process: with ``--workers N`` each worker keeps its own
buckets, and the kernel spreads one address's connections over the workers
(``SO_REUSEPORT``), so one address may open up to N times the burst and rate.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["PRIVATE_NETWORKS", "ConnectLimiter", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Loopback, RFC 1918, link-local and IPv6 unique-local/link-local: the default exemption.
PRIVATE_NETWORKS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12",
                    "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10")


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) as networks; ValueError names the bad one."""
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return tuple(nets)


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: tuple[Network, ...]) -> bool:
    return any(addr in net for net in nets)


class ConnectLimiter:
    """Per-address token buckets for ``/ws`` upgrades; see the module docstring."""

    __slots__ = ("buckets", "burst", "exempt", "horizon", "rate", "trusted")

    def __init__(self, rate: float, burst: int, exempt: Iterable[str] = PRIVATE_NETWORKS,
                 trusted_proxies: Iterable[str] = ()) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.exempt = parse_networks(exempt)
        self.trusted = parse_networks(trusted_proxies)
        # address key -> [tokens, time of last update]; ordered by last update
        self.buckets: dict[str, list[float]] = {}
        self.horizon = self.burst / self.rate if self.rate > 0 else 0.0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The address to count: the TCP peer, or what a trusted proxy says it saw."""
        if not self.trusted or not forwarded_for:
            return peer
        try:
            if not _in(ipaddress.ip_address(peer), self.trusted):
                return peer
        except ValueError:
            return peer
        # X-Forwarded-For: client, proxy1, proxy2 - each proxy appends the address it saw.
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            try:
                addr = ipaddress.ip_address(hop)
            except ValueError:
                return peer  # garbage in the chain: count the proxy, not a guess
            if not _in(addr, self.trusted):
                return hop
        return peer

    def key(self, address: str) -> str | None:
        """The bucket for ``address``, or None if it is exempt (or not an IP address)."""
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            return None  # a Unix socket or similar: nothing to count
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if _in(addr, self.exempt):
            return None
        if isinstance(addr, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
        return str(addr)

    def check(self, address: str, now: float) -> float:
        """Take a token for ``address``: 0.0 if allowed, else seconds until one is due."""
        if self.rate <= 0:
            return 0.0
        key = self.key(address)
        if key is None:
            return 0.0
        buckets = self.buckets
        bucket = buckets.pop(key, None)  # re-inserted at the end: oldest first
        if bucket is None:
            bucket = [self.burst, now]
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        buckets[key] = bucket
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate

    def sweep(self, now: float) -> int:
        """Forget buckets that have refilled completely; returns how many."""
        buckets = self.buckets
        stale = []
        for key, bucket in buckets.items():
            if bucket[1] + self.horizon > now:
                break  # the rest were used more recently
            stale.append(key)
        for key in stale:
            del buckets[key]
        return len(stale)
