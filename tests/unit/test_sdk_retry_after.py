"""The SDK's reconnect loop honours Retry-After on 429/503 (imfast/client/sdk.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from imfast.client.sdk import _retry_after


def test_the_sdk_waits_at_least_what_retry_after_asks() -> None:
    def refused(status: int, retry_after: str | None) -> Any:
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        return SimpleNamespace(response=SimpleNamespace(status=status, headers=headers))

    for _ in range(20):
        assert 5.0 <= _retry_after(refused(429, "5"), 0.1) <= 7.5
    assert _retry_after(refused(503, "1"), 4.0) == 4.0  # the backoff is longer
    assert _retry_after(refused(429, None), 0.1) is None
    assert _retry_after(refused(429, "Wed, 21 Oct 2015 07:28:00 GMT"), 0.1) is None
    assert _retry_after(refused(403, "5"), 0.1) is None
