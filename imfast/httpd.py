"""A tiny HTTP responder for the non-gateway roles (health, stats, metrics).

Served by picows like the gateway's own endpoints: each GET is answered and
the connection closed.  Routes map a path to a function returning
(status, JSON-able body) or (status, bytes, content type).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from picows import WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

__all__ = ["http_response", "serve_http"]

Route = Callable[[], tuple[Any, ...]]


def http_response(status: int, body: Any, content_type: str = "application/json") -> Any:
    """A plain HTTP answer for a picows listener factory."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": content_type}
    if status == 200:
        resp = WSUpgradeResponse.create_ok_response(data, headers)
    else:
        resp = WSUpgradeResponse.create_error_response(status, data, headers)
    return WSUpgradeResponseWithListener(resp, None)


async def serve_http(host: str, port: int, routes: dict[str, Route]) -> asyncio.Server:
    """Serve ``routes`` on host:port; unknown paths get 404."""

    def factory(request: Any) -> Any:
        path = request.path.decode("latin-1").split("?", 1)[0]
        route = routes.get(path)
        if route is None:
            return http_response(404, {"error": "not found", "path": path})
        return http_response(*route())

    return await ws_create_server(factory, host, port, reuse_port=True)
