"""Starting a distributed role while a backend is down (a degraded start).

:func:`start_when_backends_are_up` starts a role; while its start fails with
:class:`~imfast.backends.errors.BackendUnavailable`, it:

* serves ``HTTP_PORT`` meanwhile: ``/health/live`` answers 200 (the process
  is fine: no restart loop), ``/health`` and ``/stats`` answer 503 naming the
  backend it waits for (no traffic is sent to it);
* undoes the failed attempt (``node.stop()``: connections already opened to
  the other backends are closed) and tries again after 1 s, doubling up to
  ``RETRY_MAX`` (30 s), logging ``"waiting for <backend>"`` each time;
* gives up only on SIGINT/SIGTERM (returns ``None``) or on another error (a
  bad setting is not something to wait out: it propagates).

So a role started before its backends, or during their outage, comes up by
itself within ``RETRY_MAX`` of them, instead of crash-looping behind
Kubernetes' growing restart back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from imfast.backends.errors import BackendUnavailable
from imfast.config import Settings
from imfast.httpd import serve_http

__all__ = ["RETRY_FIRST", "RETRY_MAX", "start_when_backends_are_up"]

log = logging.getLogger("imfast.startup")

RETRY_FIRST = 1.0
RETRY_MAX = 30.0


async def start_when_backends_are_up(make_node: Callable[[], Any], settings: Settings,
                                     role: str) -> Any | None:
    """A started node from ``make_node()``, or None if signalled first (module docstring)."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    waiting: dict[str, Any] = {"status": "starting", "role": role,
                               "hostname": settings.display_hostname, "since": time.time()}

    def not_ready() -> tuple[int, dict[str, Any]]:
        return 503, waiting

    server: asyncio.Server | None = None
    delay = RETRY_FIRST
    try:
        while not signalled.is_set():
            node = make_node()
            try:
                await node.start()
            except BackendUnavailable as exc:
                await _undo(node)
                waiting.update(waiting_for=exc.backend, reason=exc.reason,
                               attempts=waiting.get("attempts", 0) + 1)
                log.warning("waiting for %s: %s; %s retries in %.0fs", exc.backend,
                            exc.reason, role, delay)
                if server is None:  # SO_REUSEPORT: the node's own server can bind beside it
                    server = await serve_http(settings.host, settings.http_port, {
                        "/health/live": lambda: (200, waiting),
                        "/health": not_ready, "/stats": not_ready})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signalled.wait(), delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if signalled.is_set():  # a signal during the start: do not run
                await _undo(node)
                return None
            if "waiting_for" in waiting:
                log.warning("%s started after waiting for %s", role, waiting["waiting_for"])
            return node
        return None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if server is not None:
            server.close()


async def _undo(node: Any) -> None:
    """Close what a failed start opened; a role's ``stop`` copes with a partial start."""
    try:
        await node.stop()
    except Exception:  # best effort: the next attempt starts afresh
        log.exception("cleaning up a failed start failed")
