"""Internal links between imfast processes (gateway <-> im-service, gateway <-> gateway)."""

from imfast.link.endpoints import LinkClient, LinkPool, LinkServer
from imfast.link.wire import LinkProtocol

__all__ = ["LinkClient", "LinkPool", "LinkProtocol", "LinkServer"]
