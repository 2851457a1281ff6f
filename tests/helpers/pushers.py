"""A pusher for router tests: records the order entries were handed over for delivery."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from imfast.backends.base import StoredMessage


class RecordingPusher:
    """Implements the router's pusher interface; ``order`` lists (conv, seq) delivered."""

    def __init__(self) -> None:
        self.order: list[tuple[str, int]] = []

    def deliver(self, users: Iterable[str], message: StoredMessage,
                skip: tuple[str, str] | None) -> None:
        self.order.append((message.conv, message.seq))

    def event(self, users: Iterable[str], payload: dict[str, Any],
              skip: tuple[str, str] | None) -> None:
        pass
