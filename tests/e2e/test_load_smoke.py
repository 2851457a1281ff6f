"""The load generator (load_test/gen.py) against a real node: its accounting adds up.

A few seconds at a low rate, below the node's default per-connection rate limit.
Nothing here depends on timing: only that every count is consistent.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.helpers.node import NodeThread

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "load_test"))

from hdr import Histogram, bucket_bounds, bucket_of


def run_gen(node: NodeThread, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "load_test" / "gen.py"), "--url", node.url,
         "--jwt-secret", node.settings.jwt_secret, "--processes", "1", "--server-pid", "-1",
         "--quiet", "--json", str(out), *args],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.exists(), f"no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_chat_counts_are_consistent(node: NodeThread, tmp_path: Path) -> None:
    r = run_gen(node, tmp_path, "--scenario", "chat", "--connections", "20", "--rate", "20",
                "--duration", "5", "--drain", "10")
    t = r["totals"]
    assert r["workers"]["crashes"] == []
    assert t["connect_ok"] == 20 and t["connect_failed"] == 0
    assert t["sent"] > 0
    assert t["acknowledged"] == t["sent"]
    assert t["delivered"] == t["acknowledged"]
    assert t["deliveries"] == t["expected_deliveries"]
    assert t["duplicates"] == 0
    assert t["lost"] == 0 and t["unacknowledged"] == 0
    assert t["gaps"] == 0
    assert r["errors"] == {}
    assert r["latency_ms"]["count"] == t["deliveries"]
    assert r["derived"]["delivery_success"] == 1.0


def test_private_only_deliveries_equal_messages(node: NodeThread, tmp_path: Path) -> None:
    r = run_gen(node, tmp_path, "--scenario", "chat", "--connections", "10", "--rate", "10",
                "--duration", "3", "--group-share", "0", "--drain", "10")
    t = r["totals"]
    assert t["sent"] > 0
    assert t["delivered"] == t["acknowledged"] == t["deliveries"] == t["sent"]
    assert t["duplicates"] == 0 and t["lost"] == 0


def test_histogram_buckets_and_merge() -> None:
    for v in (0, 1, 127, 128, 129, 1000, 123_456, 10**9):
        lo, hi = bucket_bounds(bucket_of(v))
        assert lo <= v <= hi
        assert hi - lo <= max(1, lo) / 64
    a, b = Histogram(), Histogram()
    for v in range(1, 1001):
        (a if v % 2 else b).record(v)
    merged = Histogram().merge(a).merge(b)
    assert merged.n == 1000 and merged.min == 1 and merged.max == 1000
    assert 495 <= merged.percentile(50) <= 510
    assert Histogram.from_dict(merged.to_dict()).summary() == merged.summary()


class _SlowRelay:
    """A bench/peers-style relay that forwards every message ``delay`` seconds late.

    It stands for an overloaded server working through a backlog: deliveries
    keep arriving after the load stopped, for longer than the generator's
    ``--drain``.  A user whose name ends with ``refuse`` is never let in (a
    recipient that stays offline); messages to one ending with ``drop`` are
    swallowed although it is connected (a server that loses them).
    """

    def __init__(self, delay: float, refuse: str = "", drop: str = "") -> None:
        self.delay = delay
        self.refuse = refuse
        self.drop = drop
        self.users: dict[str, Any] = {}

    def listener(self, request: Any) -> Any:
        import orjson
        from picows import WSListener, WSMsgType

        relay = self
        user = parse_qs(urlsplit(request.path.decode()).query).get("user", [""])[0]
        if relay.refuse and user.endswith(relay.refuse):
            return None  # picows answers the upgrade with an error status

        class Conn(WSListener):  # type: ignore[misc]
            def on_ws_connected(self, transport: Any) -> None:
                relay.users[user] = transport

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                if frame.msg_type != WSMsgType.TEXT:
                    return
                msg = orjson.loads(frame.get_payload_as_bytes())
                if msg.get("type") == "join":
                    transport.send(WSMsgType.TEXT, orjson.dumps(
                        {"type": "joined", "group": msg["group"]}))
                    return
                out = orjson.dumps({"from": user, "body": msg["body"]})
                to = msg.get("to", "")
                peer = relay.users.get(to)
                if peer is not None and not (relay.drop and to.endswith(relay.drop)):
                    asyncio.get_running_loop().call_later(
                        relay.delay, peer.send, WSMsgType.TEXT, out)

        return Conn()


def _run_against_slow_relay(tmp_path: Path, delay: float, *args: str, refuse: str = "",
                            drop: str = "") -> dict[str, Any]:
    from picows import ws_create_server

    relay = _SlowRelay(delay=delay, refuse=refuse, drop=drop)
    ready: queue.Queue[int] = queue.Queue()
    stop = threading.Event()

    def serve() -> None:
        async def main() -> None:
            server = await ws_create_server(relay.listener, "127.0.0.1", 0)
            ready.put(server.sockets[0].getsockname()[1])
            while not stop.is_set():
                await asyncio.sleep(0.05)
            server.close()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = ready.get(timeout=10)
    out = tmp_path / "result.json"
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "load_test" / "gen.py"), "--url",
             f"ws://127.0.0.1:{port}/ws", "--protocol", "relay", "--processes", "1",
             "--server-pid", "-1", "--json", str(out), "--scenario", "chat",
             "--connections", "10", "--rate", "20", "--duration", "3", "--group-share", "0",
             "--read-share", "0", "--typing-share", "0", *args],
            capture_output=True, text=True, timeout=120, check=False)
    finally:
        stop.set()
        thread.join(timeout=10)
    return {"result": json.loads(out.read_text()), "summary": proc.stderr}


def test_the_drain_waits_for_a_backlog_that_still_moves(tmp_path: Path) -> None:
    # Messages sent in the last 2.5 s of load arrive after it; --drain 1 alone would
    # give up on them.  Nothing is lost: the drain has to wait while they come.
    t = _run_against_slow_relay(tmp_path, 2.5, "--drain", "1")["result"]["totals"]
    assert t["sent"] > 20
    assert t["deliveries"] == t["expected_deliveries"] == t["sent"]
    assert t["lost"] == 0 and t["drain_capped"] == 0


def test_a_drain_cut_short_by_its_cap_says_so(tmp_path: Path) -> None:
    # The backlog still moves when --drain-extra runs out: what is missing is reported
    # as lost, with the warning that it may be backlog.
    run = _run_against_slow_relay(tmp_path, 2.5, "--drain", "1", "--drain-extra", "0.5")
    t = run["result"]["totals"]
    assert t["lost"] > 0 and t["drain_capped"] == 1
    assert t["deliveries"] < t["expected_deliveries"]
    assert "may count messages still in the server's backlog" in run["summary"]


def test_messages_to_a_recipient_that_never_connected_are_not_lost(tmp_path: Path) -> None:
    # User 3 of 10 is refused at every attempt: what the others send it is owed to an
    # offline recipient (the server would keep it for its next sync), not lost.  Its
    # failed connection is what the error rate counts.
    run = _run_against_slow_relay(tmp_path, 0.0, "--drain", "1", refuse="u3")
    t, derived = run["result"]["totals"], run["result"]["derived"]
    assert t["connect_failed"] == 1 and t["connected_at_end"] == 9
    assert t["to_offline"] > 0 and t["to_offline_deliveries"] == t["to_offline"]
    assert t["lost"] == 0
    assert t["deliveries"] == t["expected_deliveries"] - t["to_offline_deliveries"]
    assert derived["delivery_success"] == 1.0
    assert "to recipients offline at the end" in run["summary"]


def test_messages_a_connected_recipient_never_got_are_lost(tmp_path: Path) -> None:
    # User 5 is connected the whole run, but the relay swallows what is sent to it.
    run = _run_against_slow_relay(tmp_path, 0.0, "--drain", "1", drop="u5")
    t, derived = run["result"]["totals"], run["result"]["derived"]
    assert t["connected_at_end"] == 10 and t["to_offline"] == 0
    assert t["lost"] > 0 and t["lost"] == t["expected_deliveries"] - t["deliveries"]
    assert derived["delivery_success"] < 1.0


def test_the_protocol_floor_server_of_bench_peers_speaks_what_the_generator_expects(
        tmp_path: Path) -> None:
    """bench/peers' ``picows-floor`` answers imfast's protocol as imfast does (private
    and group sends, acks): every message is acknowledged and delivered once, so its
    closed-loop figure is a fair floor next to imfast's."""
    from tests.harness.services import free_port

    port = free_port()
    relay = subprocess.Popen([sys.executable, str(ROOT / "bench/peers/relay_picows_imfast.py"),
                              str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout is not None and "picows protocol floor" in relay.stdout.readline()
        out = tmp_path / "floor.json"
        subprocess.run(
            [sys.executable, str(ROOT / "load_test" / "gen.py"), "--url",
             f"ws://127.0.0.1:{port}/ws", "--protocol", "imfast", "--auth", "dev",
             "--processes", "1", "--server-pid", str(relay.pid), "--quiet", "--json", str(out),
             "--scenario", "chat", "--connections", "20", "--rate", "40", "--group-share",
             "0.3", "--duration", "3", "--drain", "5"],
            capture_output=True, timeout=120, check=False)
        t = json.loads(out.read_text())["totals"]
        assert t["sent"] > 0 and t["groups_created"] > 0
        assert t["acknowledged"] == t["delivered"] == t["sent"]
        assert t["deliveries"] == t["expected_deliveries"] > t["sent"]  # groups fanned out
        assert t["duplicates"] == 0 and t["lost"] == 0 and t["gaps"] == 0
    finally:
        relay.terminate()
        relay.wait(10)


def test_the_locust_scenarios_run_against_a_node_without_failures(
        node: NodeThread, tmp_path: Path) -> None:
    """load_test/locustfile.py as its docstring runs it (headless, a few users): every
    kind of request it reports is made, and none failed."""
    prefix = tmp_path / "locust"
    host = node.url.removesuffix("/ws")
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "load_test" / "locustfile.py"),
         "--headless", "-u", "10", "-r", "10", "-t", "8s", "--host", host,
         "--jwt-secret", node.settings.jwt_secret, "--csv", str(prefix), "--only-summary"],
        capture_output=True, text=True, timeout=120, check=False)
    stats = (tmp_path / "locust_stats.csv").read_text().splitlines() \
        if (tmp_path / "locust_stats.csv").exists() else []
    assert proc.returncode == 0 and stats, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    rows = {r.split(",")[1]: r.split(",") for r in stats[1:]}
    for name in ("connect", "send->sent", "deliver private", "deliver group"):
        assert int(rows[name][2]) > 0, (name, stats)  # requests made
        assert int(rows[name][3]) == 0, (name, stats)  # none failed
    assert int(rows["Aggregated"][3]) == 0
