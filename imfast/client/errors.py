"""The SDK's exceptions: one base, and one class per way a call can end badly."""

from __future__ import annotations

__all__ = ["ClientError", "ConnectError", "ConnectionClosed", "ConnectionLost", "ServerError"]


class ClientError(Exception):
    """Base of every error the SDK raises."""


class ConnectError(ClientError):
    """The first connection could not be made (refused, timed out, HTTP error)."""


class ConnectionClosed(ClientError):
    """The client stopped for good: a terminal close code, or :meth:`Client.close`.

    ``code`` is the WebSocket close code (see docs/protocol.md), ``reason`` says why.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}" if reason
                         else f"connection closed ({code})")
        self.code = code
        self.reason = reason


class ConnectionLost(ClientError):
    """The connection dropped before the reply came: the request may or may not have
    been applied.  (Sends never raise this: they are retried with the same cmid.)"""


class ServerError(ClientError):
    """The server answered a request with an error frame (``code`` as in docs/protocol.md)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.code = code
        self.message = message
        self.field = field
