#!/usr/bin/env python3
"""``run-load-tests.sh MODE``: the load-test modes, the embedded node, verdicts, reports.

Modes (defaults; ``--connections``, ``--rate``, ``--duration`` override):

  quick            1,000 connections, 500 msgs/s for 45 s: about a minute, after a deploy
  full             5,000 connections, 1,000 msgs/s for 5 minutes
  soak             2,000 connections, 300 msgs/s for 30 minutes; also watches server RSS
  stress           1,000 connections; the offered rate grows x1.5 per step (from --rate,
                   default 250/s, --duration s per step, default 10) until the knee:
                   P99 above 150 ms, errors, or the server no longer keeps up
  capacity         hold --connections idle sockets (default 20,000; 100,000 works: several
                   generator processes, source addresses 127.0.0.2...), report what held
                   and the server's memory per connection
  reconnect-storm  2,000 connections chatting at 200 msgs/s; every 10 s half of them
                   drop at once and reconnect at once

Without ``--target`` an embedded node is started (``imfast serve`` on a free loopback
port, temporary data dir, rate limits raised so the offered load is not refused, and for
``capacity`` ``--workers N`` when this imfast has it) and stopped at the end.  With
``--target ws://HOST:PORT/ws`` the node there is used as it is: give its ``JWT_SECRET``
(environment or ``--jwt-secret``), or ``--dev-auth`` if it runs with INSECURE_DEV_AUTH.

Exit status: 0 every SLO line passed (warnings allowed); 1 an SLO line missed
(stress: even the first step missed); 2 the test could not run.  SLO thresholds can be
tightened for testing with SLO_P99_MS, SLO_WARN_P99_MS, SLO_MAX_ERROR_RATE,
SLO_MIN_DELIVERY_SUCCESS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gen
from report import write_report

MODES: dict[str, dict[str, Any]] = {
    "quick": {"scenario": "chat", "connections": 1000, "rate": 500, "duration": 45},
    "full": {"scenario": "chat", "connections": 5000, "rate": 1000, "duration": 300},
    "soak": {"scenario": "chat", "connections": 2000, "rate": 300, "duration": 1800},
    "stress": {"scenario": "chat", "connections": 1000, "rate": 250, "duration": 10},
    "capacity": {"scenario": "hold", "connections": 20000, "rate": 0, "duration": 30},
    "reconnect-storm": {"scenario": "storm", "connections": 2000, "rate": 200,
                        "duration": 40},
}
STRESS_FACTOR = 1.5
STRESS_MAX_STEPS = 12
WORKER_CONNECTIONS = 15_000   # sockets per gateway worker we ask for (fd limit 20,000)


def log(msg: str) -> None:
    print(f"run-load-tests: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except Exception:  # noqa: BLE001
        return 0, b""


class EmbeddedNode:
    """``imfast serve`` in a child process, on a free port, with a throw-away data dir."""

    def __init__(self, report_dir: str, connections: int, want_workers: int) -> None:
        self.port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="imfast-load-")
        self.secret = secrets.token_urlsafe(32)
        self.report_dir = report_dir
        self.workers = 1
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(report_dir, "server.log")
        self.connections = connections
        self.want_workers = want_workers

    def supports_workers(self) -> bool:
        out = subprocess.run([sys.executable, "-m", "imfast", "serve", "--help"],
                             capture_output=True, text=True, timeout=60, check=False)
        return "--workers" in out.stdout

    def start(self) -> None:
        cmd = [sys.executable, "-m", "imfast", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", self.data_dir]
        per_process = self.connections + 100
        if self.want_workers > 1:
            if self.supports_workers():
                self.workers = self.want_workers
                cmd += ["--workers", str(self.workers)]
                # MAX_CONNECTIONS is split evenly; SO_REUSEPORT spreads unevenly, so
                # leave each worker room up to ~18,000 of its 20,000 descriptors.
                per_process = 18_000
            else:
                log(f"`imfast serve` has no --workers: one process (holds < 20,000 sockets, "
                    f"the fd limit), {self.connections} asked")
        env = dict(os.environ)
        env.update({
            "JWT_SECRET": self.secret,
            "RATE_MSGS_PER_SEC": "100000", "RATE_BURST": "100000",
            "MAX_CONNECTIONS": str(per_process * self.workers),
            "LOG_LEVEL": os.environ.get("LOADTEST_SERVER_LOG_LEVEL", "WARNING"),
            "LOG_FORMAT": "json",
        })
        env.pop("IMFAST_CONFIG", None)
        self.logf = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"imfast serve exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            status, _ = http_get(f"http://127.0.0.1:{self.port}/health", 1.0)
            if status == 200:
                if self.workers > 1:
                    self._wait_workers(deadline)
                return
            time.sleep(0.2)
        raise RuntimeError(f"imfast serve did not answer /health within 60 s; see "
                           f"{self.log_path}")

    def _wait_workers(self, deadline: float) -> None:
        while time.time() < deadline:
            status, body = http_get(f"http://127.0.0.1:{self.port}/stats", 1.0)
            try:
                if status == 200 and json.loads(body).get("workers", 0) >= self.workers:
                    return
            except ValueError:
                pass
            time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc is not None:
            self.logf.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def stress_steps(start: float) -> list[float]:
    steps, r = [], start
    for _ in range(STRESS_MAX_STEPS):
        steps.append(round(r))
        r *= STRESS_FACTOR
    return steps


def stress_verdict(result: dict[str, Any], slo: gen.SLO) -> list[dict[str, Any]]:
    """Stress: the SLO lines for the last step below the knee, plus the knee itself."""
    steps = result.get("steps", [])
    good = [s for s in steps if s["ok"]]
    knee = result.get("knee")
    lines = []
    if good:
        best = good[-1]
        lines.append({"name": "max sustainable", "ok": True, "level": "ok",
                      "text": f"highest step within the SLO: {best['rate']:g} msgs/s offered, "
                              f"{best['acknowledged_per_s']:g}/s acknowledged, P99 "
                              f"{best['latency_ms'].get('p99', 0):.1f} ms"})
    else:
        lines.append({"name": "max sustainable", "ok": False, "level": "fail",
                      "text": "even the first step missed: lower --rate or fix the server"})
    if knee:
        lines.append({"name": "knee", "ok": True, "level": "warn",
                      "text": f"knee at {knee['rate']:g} msgs/s offered: "
                              f"{'; '.join(knee['reasons'])}"})
    else:
        lines.append({"name": "knee", "ok": True, "level": "ok",
                      "text": f"no knee up to {steps[-1]['rate']:g} msgs/s" if steps
                              else "no step ran"})
    d = result["derived"]
    lost = result["totals"].get("lost", 0)
    lines.append({"name": "no loss", "ok": lost == 0 and result["totals"].get("duplicates", 0)
                  == 0, "level": "ok" if lost == 0 else "fail",
                  "text": f"lost {lost}, duplicates {result['totals'].get('duplicates', 0)} "
                          f"over all steps (delivery success "
                          f"{100 * (d['delivery_success'] or 0):.3f} %)"})
    return lines


def capacity_lines(result: dict[str, Any], node: EmbeddedNode | None) -> list[dict[str, Any]]:
    lines = []
    srv = result["server"]
    per = srv.get("rss_per_connection_bytes")
    if per:
        at80k = per * 80_000 / 2**30
        lines.append({"name": "memory per connection", "ok": True,
                      "level": "warn" if at80k > 1.0 else "ok",
                      "text": f"server RSS {per} B per connection -> {at80k:.2f} GiB for the "
                              f"planned 80K sockets (pod limit 1 GiB)"})
    if node is not None:
        lines.append({"name": "server layout", "ok": True, "level": "ok",
                      "text": f"embedded imfast serve with {node.workers} gateway "
                              f"process{'es' if node.workers > 1 else ''}"})
    return lines


def soak_lines(result: dict[str, Any]) -> list[dict[str, Any]]:
    rss = [r["server_rss_mb"] for r in result["timeline"]
           if r.get("phase") == "load" and "server_rss_mb" in r]
    if len(rss) < 20:
        return []
    q = len(rss) // 4
    early, late = sum(rss[q:2 * q]) / q, sum(rss[-q:]) / q
    growth = (late - early) / max(early, 1e-6)
    return [{"name": "memory growth", "ok": True, "level": "warn" if growth > 0.2 else "ok",
             "text": f"server RSS {early:.0f} MB (2nd quarter) -> {late:.0f} MB (last quarter): "
                     f"{100 * growth:+.1f} %"}]


def _number(kind: type, low: float, strict: bool) -> Any:
    """An argparse type: a ``kind`` above ``low`` (or at least ``low``), else a usage error."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (strict and value == low) or value != value:  # NaN too
            raise argparse.ArgumentTypeError(
                f"{text!r} must be {'>' if strict else '>='} {low:g}")
        return value

    return parse


def check_target(target: str) -> str | None:
    """Why ``target`` (a ws:// URL) cannot be a load-test target, or None."""
    parts = urlsplit(target)
    if parts.scheme not in ("ws", "wss"):
        return f"{target!r} is not a ws:// (or http://) URL"
    if not parts.hostname:
        return f"{target!r} names no host"
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError as exc:
        return f"{target!r}: {exc}"
    try:
        with socket.create_connection((parts.hostname, port), timeout=3):
            return None
    except OSError as exc:
        return f"cannot connect to {target}: {exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run-load-tests.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--target", help="ws://HOST:PORT/ws of a running node (default: start one)")
    p.add_argument("--duration", type=_number(float, 0, True),
                   help="seconds of load (stress: per step)")
    p.add_argument("--connections", type=_number(int, 0, True))
    p.add_argument("--rate", type=_number(float, 0, False),
                   help="offered msgs/s (stress: the first step)")
    p.add_argument("--processes", type=_number(int, 0, False), default=0,
                   help="generator processes")
    p.add_argument("--workers", type=_number(int, 0, False), default=0,
                   help="embedded node: gateway processes (default: 1, capacity: enough "
                        f"for {WORKER_CONNECTIONS} sockets each)")
    p.add_argument("--distributed", type=_number(int, 0, False), default=0, metavar="GATEWAYS",
                   help="start a local distributed deployment instead of the embedded node: "
                        "real Redis, MariaDB, etcd and Kafka-compatible servers on free ports, "
                        "im-service, offline worker and GATEWAYS gateways; connections are "
                        "spread over the gateways, so messages cross between them")
    p.add_argument("--jwt-secret", default=os.environ.get("JWT_SECRET", ""),
                   help="--target's JWT_SECRET (default $JWT_SECRET)")
    p.add_argument("--dev-auth", action="store_true",
                   help="--target runs INSECURE_DEV_AUTH: connect with ?user=")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --target that is not on 127.0.0.0/8")
    p.add_argument("--storm-jitter", type=_number(float, 0, False), default=0.05,
                   help="reconnect-storm: clients reconnect within this many seconds "
                        "(default 0.05: all at once; real clients back off with jitter)")
    p.add_argument("--report-dir", default=os.path.join(HERE, "reports"))
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    try:
        slo = gen.SLO.from_env()  # a bad SLO_* variable stops us before the run, not after
    except ValueError as exc:
        log(str(exc))
        return 2
    try:
        return _run(args, slo)
    except KeyboardInterrupt:  # the node and its temp dir were stopped on the way out
        log("interrupted")
        return 130


def _run(args: argparse.Namespace, slo: gen.SLO) -> int:
    mode = MODES[args.mode]
    scenario = mode["scenario"]
    connections = args.connections if args.connections is not None else mode["connections"]
    rate = args.rate if args.rate is not None else mode["rate"]
    duration = args.duration if args.duration is not None else mode["duration"]
    target = None
    if args.target and not args.distributed:
        target = args.target
        if target.startswith("http"):
            target = "ws" + target[4:]
        if "://" in target and urlsplit(target).path in ("", "/"):
            target = target.rstrip("/") + "/ws"
        if "://" not in target:
            why: str | None = f"{target!r} is not a ws:// (or http://) URL"
        elif not args.allow_remote and not gen.is_loopback_url(target):
            why = f"refusing {target}: not a loopback address (pass --allow-remote)"
        else:
            why = check_target(target)
        if why is None and not (args.dev_auth or args.jwt_secret):
            why = "--target needs the node's JWT_SECRET (env or --jwt-secret), or --dev-auth"
        if why is not None:
            log(why)
            return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report_dir = os.path.join(args.report_dir, f"{args.mode}-{stamp}")
    os.makedirs(report_dir, exist_ok=True)

    cfg = gen.Config(scenario=scenario, connections=connections, rate=rate, duration=duration,
                     processes=args.processes, allow_remote=args.allow_remote)
    if args.mode == "stress":
        cfg.steps = stress_steps(rate or 250)
        cfg.step_duration = duration
    if scenario == "storm":
        cfg.storm_every, cfg.storm_share, cfg.storm_jitter = 10.0, 0.5, args.storm_jitter
        cfg.drain = 15.0
    if scenario == "hold":
        cfg.connect_timeout = max(120.0, connections / 100)  # ~300-1500/s seen here
        cfg.connect_concurrency = 128
    if args.mode == "full":
        cfg.connect_timeout = 180.0
    # ~300-1,500 connects/s were seen here: give large runs the time to connect.
    cfg.connect_timeout = max(cfg.connect_timeout, connections / 100)

    node: EmbeddedNode | None = None
    cluster: Any = None
    try:
        if args.distributed:
            from cluster import LocalCluster

            log(f"starting a distributed deployment with {args.distributed} gateways "
                f"(services, im-service, offline worker) ...")
            cluster = LocalCluster(report_dir, args.distributed, workers=args.workers or (
                max(1, math.ceil(connections / WORKER_CONNECTIONS)) if scenario == "hold"
                else 1))
            cluster.start()
            cfg.url = ",".join(cluster.urls)
            cfg.jwt_secret = cluster.secret
            cfg.server_pid = cluster.gateway_pids[0]
            log(cluster.describe())
            log(f"gateways {cfg.url}; server CPU/RSS figures are the first gateway's")
        elif target is not None:
            cfg.url = target
            if args.dev_auth:
                cfg.auth = "dev"
            else:
                cfg.jwt_secret = args.jwt_secret
            log(f"target {target} (rate limits there must allow the offered load: "
                f"RATE_MSGS_PER_SEC / RATE_BURST)")
        else:
            want = args.workers or (max(1, math.ceil(connections / WORKER_CONNECTIONS))
                                    if scenario == "hold" else 1)
            node = EmbeddedNode(report_dir, connections, want)
            node.start()
            cfg.url = node.url
            cfg.jwt_secret = node.secret
            cfg.server_pid = node.proc.pid if node.proc else 0
            log(f"embedded node on {node.url} (pid {cfg.server_pid}, {node.workers} gateway "
                f"process{'es' if node.workers > 1 else ''}), log {node.log_path}")
        offered = (f"steps {', '.join(f'{s:g}' for s in cfg.steps)} msgs/s x {duration:g} s"
                   if cfg.steps else f"{rate:g} msgs/s for {duration:g} s")
        log(f"mode {args.mode}: {scenario}, {connections} connections, "
            f"{offered if scenario != 'hold' else f'held {duration:g} s'}")
        result = gen.run(cfg)
    except RuntimeError as exc:
        log(str(exc))
        return 2
    finally:
        if node is not None:
            node.stop()
        if cluster is not None:
            try:
                for line in cluster.hop_figures():
                    log(f"hop {line}")
            finally:
                cluster.stop()

    if not result["totals"].get("connect_ok"):
        failures = {k: v for k, v in result.get("errors", {}).items() if k.startswith("connect")}
        log(f"no connection to {cfg.url} succeeded ({failures or 'no answer'}): "
            f"nothing was measured")
        shutil.rmtree(report_dir, ignore_errors=True)
        return 2
    if args.mode == "stress":
        verdict = stress_verdict(result, slo)
    else:
        verdict = gen.evaluate_slo(result, slo)
    if args.mode == "capacity":
        verdict += capacity_lines(result, node)
    if args.mode == "soak":
        verdict += soak_lines(result)
    result["verdict"] = verdict
    result["mode"] = args.mode
    if node is not None:
        result["server"]["embedded"] = {"workers": node.workers, "port": node.port}

    gen.print_summary(result, sys.stderr)
    print(file=sys.stderr)
    print(f"SLO verdict ({args.mode}):", file=sys.stderr)
    for line in verdict:
        label = {"ok": "PASS", "warn": "WARN", "fail": "FAIL"}[line["level"]]
        print(f"  {label}  {line['text']}", file=sys.stderr)
    ok = all(line["ok"] for line in verdict)
    if not args.no_report:
        with open(os.path.join(report_dir, "result.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        extra = {"mode": args.mode,
                 "server": (f"embedded imfast serve ({node.workers} gateway process"
                            f"{'es' if node.workers > 1 else ''})" if node
                            else f"distributed, {args.distributed} gateways: {cfg.url}"
                            if cluster else cfg.url)}
        write_report(result, verdict, os.path.join(report_dir, "report.html"),
                     f"imfast load test: {args.mode}", extra)
        log(f"report {os.path.join(report_dir, 'report.html')}")
    else:
        shutil.rmtree(report_dir, ignore_errors=True)
    print(f"{'PASS' if ok else 'FAIL'}: {args.mode}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
