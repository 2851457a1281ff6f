"""The internal link's hot path: requests answered without a task, calls that expire."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from imfast.backends.errors import BackendUnavailable
from imfast.link.endpoints import LinkClient, LinkServer
from imfast.protocol.codes import ImfastError
from tests.e2e.test_workers import Served


def _handler(tasks_served: list[str]) -> Any:
    async def handle(method: str, args: Any) -> Any:
        tasks_served.append(method)
        return ["task", args]

    def now(method: str, args: Any, answer: Any) -> bool:
        if method == "fast":
            answer(["now", args], None)
            return True
        if method == "later":  # taken now, answered in a later loop iteration
            asyncio.get_running_loop().call_soon(answer, ["later", args], None)
            return True
        if method == "refused":
            answer(None, ImfastError("no such thing", code="bad_request", field="x"))
            return True
        if method == "busy":
            answer(None, BackendUnavailable("redis", "timeout"))
            return True
        if method == "broken":
            raise RuntimeError("bug")
        return False  # everything else: the task path

    handle.now = now  # type: ignore[attr-defined]
    return handle


async def test_a_now_handler_answers_in_order_without_a_task() -> None:
    served: list[str] = []
    server = LinkServer(_handler(served))
    port = await server.start("127.0.0.1", 0)
    client = LinkClient(f"127.0.0.1:{port}", timeout=5)
    try:
        calls = [client.call(m, [i]) for i, m in enumerate(["fast", "slow", "later", "fast"])]
        assert await asyncio.gather(*calls) == [["now", [0]], ["task", [1]], ["later", [2]],
                                                ["now", [3]]]
        assert served == ["slow"]  # only the one it declined went to a task

        with pytest.raises(ImfastError) as refused:
            await client.call("refused", [])
        assert (refused.value.code, refused.value.field) == ("bad_request", "x")
        with pytest.raises(ImfastError) as busy:
            await client.call("busy", [])
        assert busy.value.code == "unavailable"  # a passing backend failure: retry
        with pytest.raises(ImfastError) as broken:
            await client.call("broken", [])
        assert broken.value.code == "internal"  # a bug is not the caller's to retry
        assert await client.call("fast", ["after"]) == ["now", ["after"]]  # link still fine
    finally:
        await client.close()
        await server.close()


async def test_unanswered_calls_expire_and_are_forgotten() -> None:
    release = asyncio.Event()

    async def stuck(method: str, args: Any) -> Any:
        await release.wait()
        return "late"

    server = LinkServer(stuck)
    port = await server.start("127.0.0.1", 0)
    client = LinkClient(f"127.0.0.1:{port}", timeout=0.3)
    try:
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(client.call("cursors", [i]) for i in range(3)),
                                       return_exceptions=True)
        waited = asyncio.get_running_loop().time() - started
        assert all(isinstance(r, ImfastError) and r.code == "unavailable" for r in results)
        assert f"127.0.0.1:{port} did not answer cursors within 0.3 s" in str(results[0])
        assert 0.3 <= waited < 5  # the 0.3 s timeout, not the default 10 s
        proto = await client.connection()
        assert proto._pending == {}  # expired calls hold nothing
        release.set()  # their late answers arrive and are dropped
        await asyncio.sleep(0.1)
        assert not proto.closed
    finally:
        await client.close()
        await server.close()


async def test_casts_keep_their_place_among_calls_and_only_failures_come_back(
        tmp_path: Path) -> None:
    """Over a Unix domain socket (as between `imfast serve --workers N`'s processes)."""
    seen: list[Any] = []
    pushed: list[tuple[str, Any]] = []

    async def handle(method: str, args: Any) -> Any:
        seen.append(("call", args))
        return args

    def now(method: str, args: Any, answer: Any) -> bool:
        seen.append(("call", args))
        answer(args, None)
        return True

    def cast(method: str, args: Any, link: Any) -> None:
        seen.append(("cast", args))
        if method == "bad":
            link.cast_failed(method, args, ImfastError("no", code="bad_request", field="seq"))

    handle.now = now  # type: ignore[attr-defined]
    handle.cast = cast  # type: ignore[attr-defined]
    server = LinkServer(handle)
    path = str(tmp_path / "link.sock")
    await server.start_unix(path)
    client = LinkClient(f"unix:{path}", timeout=5, on_push=lambda m, a: pushed.append((m, a)))
    try:
        await client.connection()
        first = client.call("c", [1])
        assert client.cast("ok", [2]) and client.cast("bad", [3])
        answers: list[Any] = []
        client.call_with("c", [4], lambda result, exc: answers.append((result, exc)))
        assert await first == [1]
        for _ in range(100):
            if answers and pushed:
                break
            await asyncio.sleep(0.01)
        assert seen == [("call", [1]), ("cast", [2]), ("cast", [3]), ("call", [4])]
        assert answers == [([4], None)]  # answered by callback, no future
        assert pushed == [("cast_failed", ["bad", [3], "bad_request", "no", "seq"])]
    finally:
        await client.close()
        await server.close()
    # An endpoint that takes no casts says so instead of dropping them.
    async def no_casts(method: str, args: Any) -> Any:
        return None

    plain = LinkServer(no_casts)
    await plain.start_unix(path)  # the stale socket file is replaced
    pushed.clear()
    client = LinkClient(f"unix:{path}", timeout=5, on_push=lambda m, a: pushed.append((m, a)))
    try:
        await client.connection()
        assert client.cast("ack", ["u", "d", "p:a:b", 1])
        for _ in range(100):
            if pushed:
                break
            await asyncio.sleep(0.01)
        assert pushed == [("cast_failed", ["ack", ["u", "d", "p:a:b", 1], "internal",
                                           "internal error: cast not served", None])]
    finally:
        await client.close()
        await plain.close()


@pytest.fixture
def served(tmp_path: Path) -> Any:
    s = Served(tmp_path, workers=2)
    yield s
    s.stop()


def test_acks_over_the_link_are_answered_and_checked(served: Served) -> None:
    alice = served.client("alice")
    bob = served.client("bob")
    for i in range(3):
        alice.send(type="send", cmid=f"c{i}", to="bob", body=f"m{i}")
    seqs = [m["seq"] for m in bob.recv_until("msg", limit=50) if m.get("type") == "msg"]
    while len(seqs) < 3:
        seqs += [m["seq"] for m in bob.recv_until("msg") if m.get("type") == "msg"]
    conv = "p:alice:bob"
    bob.send(type="ack", conv=conv, seq=2, id=7)
    assert bob.recv_until("acked", id=7)[-1]["seq"] == 2
    bob.send(type="ack", conv=conv, seq=99, id=8)  # beyond the latest entry
    err = bob.recv_until("error", id=8)[-1]
    assert (err["code"], err["field"]) == ("bad_request", "seq")
    bob.send(type="ack", conv=conv, seq=1, id=9)  # never backwards
    assert bob.recv_until("acked", id=9)[-1]["seq"] == 2
    bob.send(type="ack", conv="p:alice:carol", seq=1, id=10)  # not bob's conversation
    assert bob.recv_until("error", id=10)[-1]["code"] == "not_found"


async def test_frames_split_anywhere_across_reads_arrive_whole_and_in_order() -> None:
    import orjson

    from imfast.link.wire import PUSH, LinkProtocol

    got: list[Any] = []
    proto = LinkProtocol(on_push=lambda method, args: got.append((method, args)))
    big = "x" * 200_000  # one frame over many reads
    frames = [orjson.dumps([PUSH, "m", i]) for i in range(50)]
    frames.insert(25, orjson.dumps([PUSH, "big", big]))
    stream = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    pos = 0
    for step in [1, 3, 4, 5, 7, 4096, 65536, 2] * 1000:  # splits inside headers and bodies
        if pos >= len(stream):
            break
        proto.data_received(stream[pos:pos + step])
        pos += step
    assert [m for m, _ in got] == ["m"] * 25 + ["big"] + ["m"] * 25
    assert [a for m, a in got if m == "m"] == list(range(50))
    assert got[25][1] == big and not proto._buffer
