"""Clients for imfast protocol v1: the asyncio SDK and ``imfast chat`` (docs/client.md).

>>> from imfast.client import Client, Message
>>> async with Client("ws://localhost:8080/ws", token) as client:  # doctest: +SKIP
...     await client.send(to="bob", body="hi bob")
...     async for event in client.events():
...         if isinstance(event, Message):
...             print(event.sender, event.body)
"""

from imfast.client.errors import (
    ClientError,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ServerError,
)
from imfast.client.events import (
    Connected,
    Conversations,
    Disconnected,
    Entry,
    Event,
    GroupEvent,
    Message,
    Presence,
    Recall,
    Receipt,
    Sent,
    SyncPage,
    Typing,
)
from imfast.client.sdk import Client, EventCallback, TokenProvider
from imfast.client.store import CursorStore, JsonFileCursorStore, MemoryCursorStore

__all__ = [
    "Client",
    "ClientError",
    "ConnectError",
    "Connected",
    "ConnectionClosed",
    "ConnectionLost",
    "Conversations",
    "CursorStore",
    "Disconnected",
    "Entry",
    "Event",
    "EventCallback",
    "GroupEvent",
    "JsonFileCursorStore",
    "MemoryCursorStore",
    "Message",
    "Presence",
    "Recall",
    "Receipt",
    "Sent",
    "ServerError",
    "SyncPage",
    "TokenProvider",
    "Typing",
]
