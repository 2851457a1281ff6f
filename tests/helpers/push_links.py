"""A gateway's push link for tests of what pushes to gateways: a real LinkServer on a
Unix socket that records the seq of every entry pushed to it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from imfast.link.endpoints import UNIX_PREFIX, LinkServer


class RecordingGateway:
    """Listens on ``path`` once :meth:`listen` is awaited; ``got`` lists the seqs of the
    ``deliver`` items of every ``batch`` push, ``methods`` every push's method, in
    arrival order, and ``resyncs`` the users each ``resync`` named."""

    def __init__(self, path: str) -> None:
        self.addr = UNIX_PREFIX + path
        self.path = path
        self.got: list[int] = []
        self.methods: list[str] = []
        self.resyncs: list[list[str] | None] = []
        self.server = LinkServer(None, self._on_push)

    def _on_push(self, method: str, items: Any) -> None:
        self.methods.append(method)
        if method == "batch":
            self.got += [item[1]["e"][1] for item in items]
        elif method == "resync":
            self.resyncs.append(items)

    async def listen(self) -> RecordingGateway:
        await self.server.start_unix(self.path)
        return self


async def until(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Return once ``check()`` is true; AssertionError after ``timeout`` s."""
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")
