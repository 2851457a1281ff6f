"""A backend that does not answer: clients get `unavailable` (retry), never `internal`,
and such errors are not counted against the client (they are not its fault)."""

from __future__ import annotations

import asyncio
from typing import Any

from imfast.link.endpoints import LinkClient, LinkServer
from imfast.protocol.codes import ImfastError
from tests.helpers.node import Client, expect_close


async def test_a_link_call_that_times_out_is_unavailable() -> None:
    async def slow(method: str, args: Any) -> Any:
        await asyncio.sleep(5)

    server = LinkServer(slow)
    port = await server.start("127.0.0.1", 0)
    client = LinkClient(f"127.0.0.1:{port}", timeout=0.2)
    try:
        try:
            await client.call("cursors", ["alice", "d"])
        except ImfastError as exc:
            assert exc.code == "unavailable"
            assert "did not answer cursors" in exc.message
        else:
            raise AssertionError("the call did not time out")
    finally:
        await client.close()
        await server.close()


def test_unavailable_answers_do_not_use_up_the_clients_error_budget(make_node: Any) -> None:
    node = make_node(max_errors=3)
    router = node.node.router

    async def down(*args: Any) -> Any:
        raise ImfastError("im-service did not answer; retry", code="unavailable")

    alice = Client(node.url, node.token("alice"))
    alice.recv_until("resumed")
    router.conversations = down  # every `sync` without a conv now fails server-side
    for i in range(6):  # twice MAX_ERRORS
        alice.send(type="sync", id=i)
        err = alice.recv_until("error", id=i)[-1]
        assert err["code"] == "unavailable"
    alice.send(type="ping", id="still-here")
    assert alice.recv_until("pong", id="still-here")  # not closed with 4xxx too-many-errors
    alice.close()


def test_a_resume_the_router_cannot_answer_closes_with_try_again_later(make_node: Any) -> None:
    # An overloaded router (a link call that timed out) is not a server bug: 1013 asks
    # the client to come back after a back-off; nothing is lost, the next resume replays.
    node = make_node()
    router = node.node.router

    async def busy(*args: Any) -> Any:
        raise ImfastError("127.0.0.1:1 did not answer resume_plan within 10 s; retry",
                          code="unavailable")

    router.resume_plan = busy
    code, _ = expect_close(Client(node.url, node.token("alice")))
    assert code == 1013


def test_a_resume_that_fails_otherwise_closes_with_internal_error(make_node: Any) -> None:
    node = make_node()
    router = node.node.router

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    router.resume_plan = broken
    code, _ = expect_close(Client(node.url, node.token("alice")))
    assert code == 1011
