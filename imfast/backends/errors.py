"""Errors the networked backends raise, whatever client library they use.

Callers catch these instead of a driver's own exceptions, so the service can
answer ``unavailable`` (and retry later) without knowing which backend failed.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["BACKEND_ERRORS", "BackendUnavailable"]

#: backend name -> how many BackendUnavailable errors this process has seen
#: (exported as ``im_backend_errors_total{backend=...}``).
BACKEND_ERRORS: Counter[str] = Counter()


class BackendUnavailable(ConnectionError):
    """A backing service cannot be reached or refuses work right now.

    Raised for a refused or lost connection, a server out of connections
    ("too many connections") and the like: conditions that pass without a
    code change.  ``backend`` names the service (``"mysql"``, ``"redis"``...),
    ``reason`` says what happened in words an operator can grep.
    """

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend} unavailable: {reason}")
        BACKEND_ERRORS[backend] += 1
        self.backend = backend
        self.reason = reason

    def __reduce__(self) -> tuple[type[BackendUnavailable], tuple[str, str]]:
        # Keep (backend, reason) through pickling (multiprocessing, link workers).
        return (type(self), (self.backend, self.reason))
