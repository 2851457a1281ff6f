"""Instructions per message, counted by callgrind: a per-message cost that does not drift.

    python bench/instructions.py [--baseline DIR] [--workers N] [--rate 100] [--seconds 10]

Wall-clock and CPU figures on this VM swing by 20 % from run to run and by 2x
from one evening to the next (docs/performance.md), so a change worth 5 % can
not be told from noise with them.  Here every server process runs under
``valgrind --tool=callgrind``, which counts the instructions it executes
(user space: the interpreter, the Cython core, uvloop, picows, orjson,
SQLite; not the kernel).  The count repeats within 1-2 % for one process and
within about 4 % with ``--workers`` (docs/performance.md), whatever else the
machine is doing.

Per checkout (this one, then ``--baseline DIR``, alternately, ``--repeats``
times): ``python -m imfast serve`` (``--workers N``: its gateway processes too)
starts under callgrind with counting off; ``load_test/gen.py --scenario chat``
(from this checkout, the same seed for both, so the same load) connects
``--connections`` clients and offers ``--rate`` msgs/s (``--scenario max``: a
closed loop of 1:1 messages, one in flight per connection, as the peers'
benchmark runs it); after 3 s of load,
counting is switched on for ``--seconds`` seconds in every process, and the
server's ``messages_accepted`` (``/stats``) at both ends gives the messages
counted.  Printed: instructions per accepted message, in all and per process
role, and the ratio to the baseline.

What the figure means: valgrind runs a process about 50x slower and one
thread at a time, so keep ``--rate`` low (100-200 msgs/s for one process):
each frame is then handled mostly on its own, as at 80K sockets, where
frames seldom share a wake-up.  It counts instructions, not time: cache
misses and the kernel's share (syscalls, TCP, wake-ups: about a quarter of a
server process's CPU) are not in it.  Use it to decide whether a change to
the Python or Cython path saves work; confirm with the wall-clock benchmarks.

A baseline checkout: ``git worktree add --detach /tmp/base REV``, then
``ln -s $PWD/.venv /tmp/base/.venv`` and build its core there
(``.venv/bin/python setup.py -q build_ext --inplace`` in /tmp/base).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = os.path.join(ROOT, "load_test", "gen.py")
sys.path.insert(0, os.path.join(ROOT, "load_test"))

from gen import proc_tree  # the generator's /proc walk: the server and its workers
from runner import free_port  # run-load-tests.sh's

WARMUP = 3.0  # seconds of load before counting: connections settled, caches warm


def log(msg: str) -> None:
    print(f"instructions: {msg}", file=sys.stderr, flush=True)


def accepted(port: int) -> int | None:
    """The node's ``messages_accepted`` (the router counts every accepted send); None while
    a gateway process has no node-wide figures yet (``--workers``: aggregated each second)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=60) as resp:
        value = json.load(resp).get("messages_accepted")
    return None if value is None else int(value)


def _env_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def fresh_accepted(port: int) -> int:
    """``messages_accepted`` just after it changed: with ``--workers`` /stats is the
    node-wide sum a gateway process got up to a second ago, so the count is taken
    when a new sum arrives (within a poll, 20 ms, of its making)."""
    first = accepted(port)
    deadline = time.time() + 30
    while time.time() < deadline:
        time.sleep(0.02)
        value = accepted(port)
        if value is not None and value != first:
            return value
    raise RuntimeError("messages_accepted did not move for 30 s: is the load running?")


def callgrind_control(flag: str, pids: list[int]) -> None:
    """Tell every process at once (so each one's counted window has the same length)."""
    procs = []
    for pid in pids:
        # valgrind names its control pipes after $USER and $HOST as the traced program
        # saw them, and a gateway process gets HOST=127.0.0.1 (its listen address):
        # callgrind_control must run with the same two values to find them.
        child = _env_of(pid)
        env = {k: v for k, v in os.environ.items() if k not in ("USER", "LOGNAME", "HOST")}
        env.update({k: child[k] for k in ("USER", "LOGNAME", "HOST") if k in child})
        procs.append(subprocess.Popen(["callgrind_control", flag, str(pid)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for proc in procs:
        # A pid that is not a callgrind run (it ended, or valgrind does not trace it) is
        # reported by callgrind_control and skipped: its exit status is not checked.
        proc.wait(timeout=120)


def read_totals(workdir: str) -> dict[str, int]:
    """Instructions per process role, summed over the callgrind files of one run."""
    roles: dict[str, int] = {}
    for path in glob.glob(os.path.join(workdir, "cg.*")):
        cmd, total = "", 0
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith("cmd:"):
                    cmd = line
                elif line.startswith("totals:"):
                    total += int(line.split()[1])
        if total:
            role = "gateway workers" if "imfast.workers" in cmd else "main process"
            roles[role] = roles.get(role, 0) + total
    return roles


def _started(gen_log: str) -> bool:
    """True once the generator has printed its first line of load."""
    with open(gen_log, "rb") as f:
        return b"] load" in f.read()


def measure(checkout: str, opts: argparse.Namespace) -> dict[str, Any]:
    """One run against ``checkout``: instructions per accepted message, in all and per role."""
    workdir = tempfile.mkdtemp(prefix="imfast-instr-")
    port = free_port()
    secret = secrets.token_urlsafe(32)
    env = dict(os.environ, JWT_SECRET=secret, LOG_LEVEL="WARNING",
               RATE_MSGS_PER_SEC="100000", RATE_BURST="100000")
    env.pop("IMFAST_CONFIG", None)
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
           f"--callgrind-out-file={workdir}/cg.%p",
           os.path.join(checkout, ".venv", "bin", "python"), "-m", "imfast", "serve",
           "--host", "127.0.0.1", "--port", str(port), "--data-dir", os.path.join(workdir, "data")]
    if opts.workers:
        cmd += ["--workers", str(opts.workers)]
    with open(os.path.join(workdir, "server.log"), "wb") as server_log:
        server = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=server_log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    gen = None
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited; see {workdir}/server.log")
            try:
                accepted(port)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("the server did not answer /stats within 300 s") from None
                time.sleep(0.5)
        gen_log = os.path.join(workdir, "gen.log")
        duration = WARMUP + opts.seconds + 5
        with open(gen_log, "wb") as out:
            gen = subprocess.Popen(
                [sys.executable, GEN, "--url", f"ws://127.0.0.1:{port}/ws",
                 "--scenario", opts.scenario, "--inflight", str(opts.connections),
                 "--connections", str(opts.connections), "--rate", str(opts.rate),
                 "--duration", str(duration), "--seed", str(opts.seed), "--jwt-secret", secret,
                 "--server-pid", "-1", "--json", os.path.join(workdir, "gen.json")]
                + (["--group-share", "0"] if opts.scenario == "max" else []),
                stdout=out, stderr=subprocess.STDOUT)
        while not _started(gen_log):
            if gen.poll() is not None:
                raise RuntimeError(f"the generator exited before its load; see {gen_log}")
            time.sleep(0.2)
        time.sleep(WARMUP)
        pids = proc_tree(server.pid)  # valgrind keeps the pids of the programs it runs
        first = fresh_accepted(port)
        callgrind_control("--instr=on", pids)
        time.sleep(opts.seconds)
        messages = fresh_accepted(port) - first
        callgrind_control("--instr=off", pids)
        callgrind_control("--dump", pids)
        gen.wait(timeout=duration + 120)
        with open(os.path.join(workdir, "gen.json")) as f:
            totals = json.load(f)["totals"]
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    roles = read_totals(workdir)
    if not messages or not roles:
        raise RuntimeError(f"nothing counted ({messages} messages); see {workdir}")
    row = {"checkout": checkout, "messages": messages,
           "per_message": sum(roles.values()) / messages,
           "roles": {role: n / messages for role, n in sorted(roles.items())},
           "sent": totals.get("sent", 0),
           "lost": totals.get("lost", 0) + totals.get("unacknowledged", 0)}
    if not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="another checkout (with its .venv and built core)")
    p.add_argument("--workers", type=int, default=0, help="imfast serve --workers N")
    p.add_argument("--scenario", choices=("chat", "max"), default="chat",
                   help="max: closed loop, 1:1 only, one message in flight per connection")
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--rate", type=int, default=100, help="offered msgs/s (keep it low)")
    p.add_argument("--seconds", type=float, default=10.0, help="counted seconds of load")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the callgrind files")
    p.add_argument("--json", help="also write every run's figures here")
    opts = p.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions: valgrind is needed (apt-get install valgrind)", file=sys.stderr)
        return 2
    checkouts = [ROOT] + ([os.path.abspath(opts.baseline)] if opts.baseline else [])
    for checkout in checkouts:
        if not os.path.exists(os.path.join(checkout, ".venv", "bin", "python")):
            print(f"instructions: {checkout} has no .venv (see --help)", file=sys.stderr)
            return 2
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in checkouts}
    for i in range(opts.repeats):
        for checkout in checkouts:
            row = measure(checkout, opts)
            rows[checkout].append(row)
            log(f"run {i + 1}/{opts.repeats} {checkout}: {row['per_message']:,.0f} "
                f"instructions per message ({row['messages']} messages, lost {row['lost']}; "
                + ", ".join(f"{role} {n:,.0f}" for role, n in row["roles"].items()) + ")")
    load = (f"{opts.rate} msgs/s offered (chat mix)" if opts.scenario == "chat" else
            "closed loop (1:1)")
    print(f"\n{opts.connections} connections, {load}, "
          f"{opts.seconds:g} s counted, workers {opts.workers}; {platform.python_version()}\n")
    print("| checkout | instructions per message (each run) | median | by process role "
          "(last run) | vs this |")
    print("|---|---|---|---|---|")
    medians = {c: sorted(r["per_message"] for r in rs)[len(rs) // 2] for c, rs in rows.items()}
    for checkout, rs in rows.items():
        runs = " / ".join(f"{r['per_message']:,.0f}" for r in rs)
        roles = ", ".join(f"{role} {n:,.0f}" for role, n in rs[-1]["roles"].items())
        ratio = medians[checkout] / medians[ROOT]
        print(f"| {os.path.relpath(checkout, ROOT) if checkout != ROOT else 'this'} | {runs} "
              f"| {medians[checkout]:,.0f} | {roles} | {ratio:.3f}x |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"options": vars(opts), "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
