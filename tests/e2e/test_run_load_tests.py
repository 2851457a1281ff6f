"""load_test/run-load-tests.sh as performance engineers run it: a short run against the
embedded node it starts, its verdict and report, and clear refusals (exit 2) of
what it cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.services import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "load_test" / "run-load-tests.sh"
sys.path.insert(0, str(ROOT / "load_test"))

import gen  # load_test/ is not a package: on sys.path above


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_a_short_quick_run_passes_and_writes_its_report(tmp_path: Path) -> None:
    out = run("quick", "--duration", "3", "--connections", "20", "--rate", "20",
              "--report-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PASS  delivery P99" in out.stderr and out.stderr.rstrip().endswith("PASS: quick")
    [run_dir] = tmp_path.iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["totals"]["sent"] > 0 and result["totals"]["lost"] == 0
    assert all(line["ok"] for line in result["verdict"])
    html = (run_dir / "report.html").read_text()
    assert html.count("<svg") >= 5
    for title in ("Delivery latency over time", "Delivery latency histogram", "CPU (% of one core)",
                  "Server memory (RSS)"):
        assert title in html, title


@pytest.mark.parametrize("args,message", [
    (["quick", "--rate", "-5"], "'-5' must be >= 0"),
    (["quick", "--connections", "0"], "'0' must be > 0"),
    (["quick", "--duration", "0"], "'0' must be > 0"),
    (["quick", "--connections", "-1"], "'-1' must be > 0"),
    (["quick", "--target", "ftp://127.0.0.1:1/ws", "--jwt-secret", "x"],
     "is not a ws:// (or http://) URL"),
    (["quick", "--target", "127.0.0.1:1", "--jwt-secret", "x"], "is not a ws:// (or http://) URL"),
    (["quick", "--target", "ws://127.0.0.1:notaport/ws", "--jwt-secret", "x"], "notaport"),
    (["quick", "--target", "ws://10.1.2.3/ws", "--jwt-secret", "x"], "not a loopback address"),
])
def test_what_cannot_run_is_refused_at_once_with_exit_2(
        tmp_path: Path, args: list[str], message: str) -> None:
    out = run(*args, "--report-dir", str(tmp_path), timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no empty report directory left behind


def test_a_target_nobody_listens_on_is_could_not_run_not_an_slo_miss(tmp_path: Path) -> None:
    target = f"ws://127.0.0.1:{free_port()}/ws"
    out = run("quick", "--target", target, "--jwt-secret", "x", "--report-dir", str(tmp_path),
              timeout=30)
    assert out.returncode == 2 and f"cannot connect to {target}" in out.stderr, out.stderr


def test_a_bad_slo_variable_is_refused_before_the_run(tmp_path: Path) -> None:
    out = run("quick", "--report-dir", str(tmp_path), env={"SLO_P99_MS": "abc"}, timeout=30)
    assert out.returncode == 2 and "SLO_P99_MS='abc' is not a number" in out.stderr
    assert "embedded node" not in out.stderr  # nothing was started


def test_a_failed_verdict_line_states_what_happened() -> None:
    result = {"derived": {"error_rate": 0.2, "errors_counted": 10, "delivery_success": 0.5},
              "latency_ms": {"count": 5, "p99": 250.0}, "config": {"scenario": "chat"},
              "totals": {"lost": 3, "unacknowledged": 0}}
    texts = {line["name"]: line["text"] for line in gen.evaluate_slo(result, gen.SLO())}
    assert texts["delivery P99"] == "delivery P99 250.0 ms >= 200 ms"
    assert texts["error rate"].startswith("error rate 20.000 % >= 1 %")
    assert texts["delivery success"].startswith("delivery success 50.000 % <= 99 %")
