"""Server RSS per idle authenticated WebSocket connection: imfast vs a plain picows server.

Usage:
    python bench/memory_bench.py [--connections 10000] [--workers 1]

Starts each server in its own process (imfast: ``imfast serve``; baseline: a
minimal picows server that accepts and holds sockets with default settings),
opens N connections from a separate client process (each one authenticated
for imfast, i.e. it got its ``welcome``), waits for the server to settle,
and reads the server's RSS from /proc.  Prints RSS per connection for both
and their ratio, measured in the same run.  Several 127.0.0.x source
addresses are used so N can exceed one address's ephemeral ports.

With ``--workers N`` imfast runs ``imfast serve --workers N`` and the RSS of
the main process plus every worker is summed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

BASELINE_SERVER = r"""
import asyncio, sys, uvloop
from picows import ws_create_server, WSListener
class L(WSListener):
    pass
async def main():
    server = await ws_create_server(lambda r: L(), "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


#: Tries per connection: with 100K connects in a few minutes a loaded server may time some out.
CONNECT_ATTEMPTS = 5


def _client_proc(url_base: str, tokens: list[str] | None, n: int, offset: int,
                 ready: mp.Queue, done: mp.Event) -> None:  # type: ignore[type-arg]
    import uvloop
    from picows import WSListener, ws_connect
    from picows.common import WSInvalidStatusError

    class Waiter(WSListener):  # type: ignore[misc]
        def __init__(self, fut: asyncio.Future[None] | None) -> None:
            self.fut = fut

        def on_ws_frame(self, transport, frame) -> None:  # type: ignore[no-untyped-def]
            if self.fut is not None and not self.fut.done():
                self.fut.set_result(None)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        transports = []
        reasons: Counter[str] = Counter()
        sem = asyncio.Semaphore(100)  # handshakes in flight per client process

        async def one(i: int) -> int:
            """Open connection i; returns the attempts it took (0: it never opened)."""
            url = url_base + (f"?token={tokens[i]}" if tokens else "")
            src = f"127.0.0.{2 + (offset + i) // 20000}"
            for attempt in range(1, CONNECT_ATTEMPTS + 1):
                fut = loop.create_future() if tokens else None
                async with sem:
                    try:
                        t, _ = await ws_connect(functools.partial(Waiter, fut), url,
                                                local_addr=(src, 0),
                                                websocket_handshake_timeout=30)
                        if fut is not None:
                            await asyncio.wait_for(fut, 30)
                        transports.append(t)
                        return attempt
                    except (TimeoutError, OSError, WSInvalidStatusError) as exc:
                        # Also 503 "over capacity": SO_REUSEPORT spreads connects unevenly
                        # over worker processes; a new source port may hash to another.
                        status = getattr(getattr(exc, "response", None), "status", None)
                        reasons[f"{type(exc).__name__} {status or exc}"[:80]] += 1
                await asyncio.sleep(0.5 * attempt)  # a loaded server: back off, then retry
            return 0

        await asyncio.gather(*(one(i) for i in range(n)))
        ready.put((len(transports), dict(reasons)))
        while not done.is_set():
            await asyncio.sleep(0.2)

    uvloop.run(run())


def hold(url: str, n: int, tokens: list[str] | None, pids: list[int]) -> tuple[int, int]:
    """Open n connections from client processes; returns (rss before, rss after) in KB."""
    time.sleep(0.5)
    before = rss_kb(pids)
    each_before = [rss_kb([pid]) for pid in pids]
    per_proc = 9000
    ready: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    done = mp.Event()
    procs = []
    for start in range(0, n, per_proc):
        count = min(per_proc, n - start)
        part = tokens[start:start + count] if tokens else None
        p = mp.Process(target=_client_proc, args=(url, part, count, start, ready, done))
        p.start()
        procs.append(p)
    try:
        reports = [ready.get(timeout=900) for _ in procs]
        opened = sum(r[0] for r in reports)
        retried: Counter[str] = Counter()
        for r in reports:
            retried.update(r[1])
        time.sleep(2.0)  # let the server settle (allocator, buffers)
        after = rss_kb(pids)
        growth = [rss_kb([pid]) - b for pid, b in zip(pids, each_before)]
        if len(pids) > 1:  # where the bytes went: the main process vs each worker
            print("# RSS growth per process (MB, main first): "
                  + " ".join(f"{g / 1024:.1f}" for g in growth), flush=True)
    finally:
        done.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    if retried:
        print(f"# {sum(retried.values())} connects retried: {dict(retried.most_common(4))}",
              flush=True)
    assert opened == n, f"only {opened}/{n} connections opened"
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    n = args.connections
    env = {**os.environ, "JWT_SECRET": "bench-secret-0123456789abcdef0123456789",
           # Per worker process (imfast serve divides it): the ~19,000 descriptors one may use.
           "MAX_CONNECTIONS": str(max(n + 100, 19000 * args.workers)), "LOG_LEVEL": "WARNING"}

    # Baseline: plain picows, default settings.
    port = free_port()
    base = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, str(port)],
                            stdout=subprocess.PIPE, env=env)
    assert base.stdout is not None and base.stdout.readline().strip() == b"ready"
    # One plain process can hold at most ~20,000 descriptors here: cap its share.
    base_n = min(n, 15000)
    try:
        b0, b1 = hold(f"ws://127.0.0.1:{port}/", base_n, None, [base.pid])
    finally:
        base.kill()

    # imfast serve, every connection authenticated.
    from imfast.auth import mint_token
    from imfast.config import Settings

    settings = Settings(jwt_secret=env["JWT_SECRET"])
    tokens = [mint_token(settings, f"u{i}") for i in range(n)]
    port = free_port()
    data = tempfile.mkdtemp()
    server = subprocess.Popen([sys.executable, "-m", "imfast", "serve", "--host", "127.0.0.1",
                               "--port", str(port), "--data-dir", data,
                               "--workers", str(args.workers)], env=env,
                              stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    time.sleep(1.0)
    pids = [server.pid, *children(server.pid)]
    try:
        i0, i1 = hold(f"ws://127.0.0.1:{port}/ws", n, tokens, pids)
    finally:
        for pid in pids:  # never leave a server (or its workers) behind
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    from imfast._core import USING_EXTENSIONS

    base_per = (b1 - b0) * 1024 / base_n
    ours_per = (i1 - i0) * 1024 / n
    print(f"# memory_bench: {n} idle connections, python {platform.python_version()}, "
          f"nproc {os.cpu_count()}, Cython core {'on' if USING_EXTENSIONS else 'off'}, "
          f"imfast workers {args.workers}")
    print(f"{'server':<34}{'RSS before':>12}{'RSS after':>12}{'per conn':>12}")
    print(f"{f'picows plain, {base_n} conns':<34}{b0 / 1024:>10.1f}MB{b1 / 1024:>10.1f}MB"
          f"{base_per / 1024:>10.2f}KB")
    print(f"{'imfast serve (authenticated)':<34}{i0 / 1024:>10.1f}MB{i1 / 1024:>10.1f}MB"
          f"{ours_per / 1024:>10.2f}KB")
    print(f"ratio imfast/picows-plain: {ours_per / base_per:.2f}")


if __name__ == "__main__":
    main()
