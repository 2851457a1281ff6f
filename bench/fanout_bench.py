"""Fan-out over real loopback sockets: raw picows sends vs imfast's WriteCoalescer.

    python bench/fanout_bench.py [--conns 200] [--deliveries 100000] [--repeats 3]

A picows server on uvloop holds ``--conns`` WebSocket connections opened by a
client *process* (picows clients, so server and clients each get a core);
the clients only count the text frames they receive and report on a control
connection when the expected total has arrived.  Each phase delivers about
``--deliveries`` messages and is timed from the first send to that report
(the whole run takes 10-20 s):

* ``raw loop``: ``transport.send(TEXT, payload)`` per connection per message,
  the baseline every other figure is divided by;
* ``coalescer broadcast``: ``WriteCoalescer.broadcast`` of the same message
  (framed once, one write per connection per loop iteration);
* with K messages per connection arriving in one loop iteration (K = 4, 8):
  one write per delivery (``transport.send`` K times) vs coalesced (K
  ``push`` calls, flushed as one write per connection).

On loopback the cost of a delivery is mostly the kernel's (one syscall and
one TCP segment per write, on both ends), so the Cython and Python
coalescers land close together here; ``core_bench.py`` shows their CPU
difference.

The coalescer phases run with the core ``imfast._core`` loaded (Cython unless
IMFAST_NO_EXTENSIONS=1) and, for comparison, with the other implementation if
it is available.  Best of ``--repeats`` per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import time
from typing import Any

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server

PAYLOAD = orjson.dumps({"type": "msg", "conv": "g:team", "seq": 1234, "msg_id": "m" * 26,
                        "from": "alice", "from_device": "phone", "ts": 1700000000000,
                        "kind": 0, "body": "hello team, the build is green again", "cmid": "c-1"})


# ------------------------------------------------------------------ clients
class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.expected = -1
        self.control: WSTransport | None = None


class DataClient(WSListener):  # type: ignore[misc]
    def __init__(self, counter: Counter) -> None:
        self.c = counter

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        c = self.c
        c.count += 1
        if c.count == c.expected:
            assert c.control is not None
            c.control.send(WSMsgType.BINARY, b"done")


class ControlClient(WSListener):  # type: ignore[misc]
    def __init__(self, counter: Counter) -> None:
        self.c = counter
        self.closed = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg = frame.get_payload_as_bytes()
        if msg.startswith(b"expect "):
            self.c.count = 0
            self.c.expected = int(msg[7:])
            transport.send(WSMsgType.BINARY, b"ready")
        elif msg == b"bye":
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def run_clients(port: int, conns: int) -> None:
    counter = Counter()
    url = f"ws://127.0.0.1:{port}"
    data = []
    for start in range(0, conns, 50):  # connect in batches: a modest accept backlog suffices
        data += await asyncio.gather(*(ws_connect(lambda: DataClient(counter), url + "/data")
                                       for _ in range(start, min(conns, start + 50))))
    counter.control, control = await ws_connect(lambda: ControlClient(counter), url + "/control")
    await control.closed
    for transport, _listener in data:
        transport.disconnect()


# ------------------------------------------------------------------- server
class Sess:
    """What the coalescer needs from a session."""

    __slots__ = ("closed", "out", "raw")

    def __init__(self, raw: Any) -> None:
        self.out: list[bytes] | None = None
        self.closed = False
        self.raw = raw


class ServerConn(WSListener):  # type: ignore[misc]
    def __init__(self, server: Server, control: bool) -> None:
        self.server = server
        self.control = control

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.control:
            self.server.control = transport
            self.server.control_ready.set()
        else:
            self.server.transports.append(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.control and self.server.waiter is not None and not self.server.waiter.done():
            self.server.waiter.set_result(frame.get_payload_as_bytes())


class Server:
    def __init__(self) -> None:
        self.transports: list[WSTransport] = []
        self.control: WSTransport | None = None
        self.control_ready = asyncio.Event()
        self.waiter: asyncio.Future[bytes] | None = None

    async def ask(self, message: bytes) -> bytes:
        assert self.control is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.control.send(WSMsgType.BINARY, message)
        return await self.waiter

    async def phase(self, total: int, send_rounds: Any) -> tuple[float, float]:
        """Tell the clients to expect ``total`` frames, run the sender, time until all arrived.

        Returns (wall seconds, server CPU seconds): the CPU time (user + system,
        so the write syscalls count) is less disturbed by the client process and
        by other tenants of the machine than the wall clock.
        """
        assert await self.ask(b"expect %d" % total) == b"ready"
        self.waiter = asyncio.get_running_loop().create_future()
        c0 = time.process_time()
        t0 = time.perf_counter()
        await send_rounds()
        assert await self.waiter == b"done"
        return time.perf_counter() - t0, time.process_time() - c0


async def bench(args: argparse.Namespace) -> None:
    import imfast._core as core

    server = Server()
    srv = await ws_create_server(
        lambda req: ServerConn(server, req.path.endswith(b"/control")), "127.0.0.1", 0,
        backlog=1024, use_aiofastnet=False)  # the gateway runs on uvloop transports
    port = srv.sockets[0].getsockname()[1]
    client = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client-port", str(port), "--conns", str(args.conns))
    try:
        await asyncio.wait_for(server.control_ready.wait(), 30)
        await asyncio.sleep(0.2)
        transports = list(server.transports)
        n = len(transports)
        assert n == args.conns, (n, args.conns)
        sessions = [Sess(t.underlying_transport) for t in transports]
        raw_type = type(sessions[0].raw)

        implementations = [("cython" if core.USING_EXTENSIONS else "twin", core.WriteCoalescer)]
        other: Any = None
        try:
            if core.USING_EXTENSIONS:
                from imfast._core.fanout_py import WriteCoalescer as other
                implementations.append(("twin", other))
            elif os.environ.get("IMFAST_NO_EXTENSIONS") == "1":
                from imfast._core._fanout import WriteCoalescer as other
                implementations.append(("cython", other))
        except ImportError:
            pass

        loop = asyncio.get_running_loop()
        text = WSMsgType.TEXT
        results: dict[str, float] = {}
        cpu_us: dict[str, float] = {}

        def rounds_for(k: int) -> int:
            return max(1, args.deliveries // (n * k))

        def raw_sender(k: int) -> Any:
            rounds = rounds_for(k)

            async def run() -> None:
                for _ in range(rounds):
                    for t in transports:
                        for _ in range(k):
                            t.send(text, PAYLOAD)
                    await asyncio.sleep(0)
            return run

        def broadcast_sender(cls: Any) -> Any:
            rounds = rounds_for(1)
            co = cls(loop)

            async def run() -> None:
                for _ in range(rounds):
                    co.broadcast(sessions, PAYLOAD)
                    await asyncio.sleep(0)  # the flush runs at the end of this iteration
            return run

        def coalesced_sender(k: int, cls: Any) -> Any:
            # push() per delivery (framing each, as for messages of different
            # conversations), so it does the same work as the transport.send() loop.
            rounds = rounds_for(k)
            co = cls(loop)

            async def run() -> None:
                push = co.push
                for _ in range(rounds):
                    for s in sessions:
                        for _ in range(k):
                            push(s, PAYLOAD)
                    await asyncio.sleep(0)
            return run

        phases: list[tuple[str, int, Any]] = [("raw loop: transport.send", 1, raw_sender(1))]
        for label, cls in implementations:
            phases.append((f"coalescer broadcast [{label}]", 1, broadcast_sender(cls)))
        for k in (4, 8):
            phases.append((f"{k}/tick: one write per delivery", k, raw_sender(k)))
            for label, cls in implementations:
                phases.append((f"{k}/tick: coalesced push [{label}]", k,
                               coalesced_sender(k, cls)))

        # Interleave the repeats so drift in machine load hits every phase alike.
        await server.phase(rounds_for(1) * n, raw_sender(1))  # warm-up
        for _ in range(args.repeats):
            for name, k, sender in phases:
                total = rounds_for(k) * k * n
                elapsed, cpu = await server.phase(total, sender)
                results[name] = max(results.get(name, 0.0), total / elapsed)
                cpu_us[name] = min(cpu_us.get(name, float("inf")), cpu / total * 1e6)

        server.control.send(WSMsgType.BINARY, b"bye")  # type: ignore[union-attr]
    finally:
        try:
            await asyncio.wait_for(client.wait(), 10)
        except TimeoutError:
            client.kill()
            await client.wait()
        srv.close()

    base = results["raw loop: transport.send"]
    base_cpu = cpu_us["raw loop: transport.send"]
    print(f"$ {shlex.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"Python {platform.python_version()}, uvloop {uvloop.__version__}, "
          f"nproc={os.cpu_count()}, "
          f"imfast core: {'Cython' if core.USING_EXTENSIONS else 'pure-Python twin'}")
    print(f"{n} connections over loopback, client process separate, {len(PAYLOAD)}-byte "
          f"messages, ~{args.deliveries} deliveries per phase, best of {args.repeats}; "
          f"server transport {raw_type.__module__}.{raw_type.__name__}")
    print()
    header = (f"{'phase':40} {'deliveries/s':>13} {'vs raw loop':>12} "
              f"{'server CPU us/delivery':>23} {'vs raw loop':>12}")
    print(header)
    print("-" * len(header))
    for name, _k, _s in phases:
        rate = results[name]
        cpu = cpu_us[name]
        print(f"{name:40} {rate:>13,.0f} {rate / base:>11.2f}x {cpu:>23.2f} "
              f"{base_cpu / cpu:>11.2f}x")
    # The coalescing goal compares like with like: K messages per connection per
    # tick, coalesced vs one write per delivery, measured in the same run.
    print()
    for k in (4, 8):
        per_write = f"{k}/tick: one write per delivery"
        for label, _cls in implementations:
            name = f"{k}/tick: coalesced push [{label}]"
            print(f"{k}/tick coalesced [{label}] vs one write per delivery: "
                  f"{results[name] / results[per_write]:.2f}x deliveries/s, "
                  f"{cpu_us[per_write] / cpu_us[name]:.2f}x by server CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=200)
    parser.add_argument("--deliveries", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_port:
        uvloop.run(run_clients(args.client_port, args.conns))
        return
    t0 = time.perf_counter()
    uvloop.run(bench(args))
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
