"""One connection in many conversations (a bot, a support agent): server CPU per acked message.

    python bench/many_conversations.py [--conversations 200,2000,5000] [--baseline DIR]

An ``agent`` connection receives one message from each of N users (N
conversations), acknowledging each, then more rounds the same way (at least
three, and 15,000 messages); the server's CPU over those rounds
(``/proc/PID/stat``), divided by their messages, is the figure.  The cost of a message and its ack should not
depend on how many conversations the connection is in: the session keeps the
conversations still waiting for an ack apart (``Session.waiting``), where it
used to look at all of them on every ack.  ``--baseline DIR`` (another
checkout with its .venv, see bench/instructions.py) runs the same, alternately,
in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "load_test"))

from runner import free_port  # run-load-tests.sh's

from imfast.auth import mint_token  # this checkout's, for either server
from imfast.config import Settings


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def next_of(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.recv())
        if frame["type"] == kind:
            return frame


async def agent_rounds(port: int, pid: int, n: int, secret: str) -> float:
    """Server CPU seconds per message (with its ack) over rounds of ``n`` senders: at least
    three, and at least 15,000 messages (the CPU clock ticks at 10 ms)."""
    settings = Settings(jwt_secret=secret)
    url = f"ws://127.0.0.1:{port}/ws?token="
    agent = await websockets.connect(url + mint_token(settings, "agent"), max_queue=None)
    await next_of(agent, "resumed")
    users = []
    for i in range(n):
        ws = await websockets.connect(url + mint_token(settings, f"u{i}"))
        await next_of(ws, "resumed")
        users.append(ws)

    async def one_round(tag: str) -> None:
        for i, ws in enumerate(users):
            await ws.send(json.dumps({"type": "send", "cmid": f"{tag}{i}", "to": "agent",
                                      "body": "hello"}))
        for ws in users:
            await next_of(ws, "sent")
        for _ in range(n):
            m = await next_of(agent, "msg")
            await agent.send(json.dumps({"type": "ack", "conv": m["conv"], "seq": m["seq"]}))
        await agent.send(json.dumps({"type": "ping", "id": tag}))
        await next_of(agent, "pong")  # every ack before it has been taken

    await one_round("a")  # the agent is now in n conversations
    rounds = max(3, -(-15_000 // n))
    before = cpu_seconds(pid)
    for r in range(rounds):
        await one_round(f"b{r}")
    spent = cpu_seconds(pid) - before
    for ws in [agent, *users]:
        await ws.close()
    return spent / (rounds * n)


def serve(checkout: str, secret: str, data_dir: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, JWT_SECRET=secret, LOG_LEVEL="WARNING",
               RATE_MSGS_PER_SEC="100000", RATE_BURST="100000")
    env.pop("IMFAST_CONFIG", None)
    proc = subprocess.Popen(
        [os.path.join(checkout, ".venv", "bin", "python"), "-m", "imfast", "serve", "--host",
         "127.0.0.1", "--port", str(port), "--data-dir", data_dir],
        cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"imfast serve in {checkout} did not start") from None
            time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", default="200,2000,5000")
    p.add_argument("--baseline", help="another checkout (with its .venv)")
    opts = p.parse_args()
    sizes = [int(x) for x in opts.conversations.split(",")]
    # Both ends of every connection are on this machine: raise the soft limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 2 * max(sizes) + 100 > hard:
        print(f"many_conversations: {max(sizes)} conversations need {2 * max(sizes) + 100} "
              f"descriptors; this process may hold {hard}", file=sys.stderr)
        return 2
    checkouts = [ROOT] + ([os.path.abspath(opts.baseline)] if opts.baseline else [])
    secret = secrets.token_urlsafe(32)
    data = tempfile.TemporaryDirectory(prefix="imfast-conv-")
    servers = {c: serve(c, secret, os.path.join(data.name, str(i)))
               for i, c in enumerate(checkouts)}
    results: dict[str, dict[int, float]] = {c: {} for c in checkouts}
    try:
        for n in sizes:
            for checkout in checkouts:  # alternately, so both see the same machine
                proc, port = servers[checkout]
                results[checkout][n] = asyncio.run(agent_rounds(port, proc.pid, n, secret))
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        data.cleanup()
    print("\n| checkout | " + " | ".join(f"{n:,} conversations" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for checkout in checkouts:
        name = "this" if checkout == ROOT else os.path.relpath(checkout, ROOT)
        cells = []
        for n in sizes:
            us = results[checkout][n] * 1e6
            ratio = results[checkout][n] / results[ROOT][n]
            cells.append(f"{us:.0f} µs" + ("" if checkout == ROOT else f" ({ratio:.2f}x)"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nserver CPU per message and its ack, one agent connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
