"""One node with the conformance echo endpoint, shared by a module's tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conformance.raw import RawWS
from tests.conftest import node_settings
from tests.helpers.node import NodeThread


@pytest.fixture(scope="module")
def echo_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeThread]:
    """A node serving ``/ws`` and ``/_echo`` (IMFAST_CONFORMANCE_ECHO=1), default limits."""
    n = NodeThread(node_settings(tmp_path_factory.mktemp("conformance"),
                                 conformance_echo=True)).start()
    yield n
    n.stop()


class Endpoint:
    """How to open a connection to one endpoint and round-trip a message on it.

    ``/_echo`` answers a text message with the same text; ``/ws`` answers the
    chat protocol's ``ping`` with ``pong``: either way, the frame layer under
    test is the same.
    """

    def __init__(self, node: NodeThread, path: str) -> None:
        self.node = node
        self.path = path
        self.limit = node.settings.max_frame_bytes if path == "/ws" else 16 * 1024 * 1024

    def open(self, **kw: object) -> RawWS:
        if self.path == "/_echo":
            return RawWS(self.node.port, "/_echo", **kw)  # type: ignore[arg-type]
        token = self.node.token("conf", uuid.uuid4().hex[:12])
        ws = RawWS(self.node.port, f"/ws?token={token}", **kw)  # type: ignore[arg-type]
        ws.recv_json_until("resumed")
        return ws

    def probe(self, tag: str) -> bytes:
        """A text message the endpoint answers (see :meth:`check`)."""
        if self.path == "/_echo":
            return f"probe {tag}".encode()
        return b'{"type":"ping","id":"' + tag.encode() + b'"}'

    def check(self, ws: RawWS, tag: str) -> None:
        """Read the answer to :meth:`probe` ``tag``."""
        f = ws.recv_message()
        assert f.opcode == 0x1, f
        if self.path == "/_echo":
            assert f.payload == self.probe(tag)
        else:
            assert f.json() == {"type": "pong", "id": tag}


@pytest.fixture(params=["/_echo", "/ws"], ids=["echo", "ws"])
def endpoint(request: pytest.FixtureRequest, echo_node: NodeThread) -> Endpoint:
    return Endpoint(echo_node, request.param)
