"""The HTML report of a load test: tables and inline SVG charts, no JavaScript, no CDN.

``write_report(result, verdict, path)`` writes one self-contained file that
opens anywhere (a CI artifact, a laptop without network).
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

__all__ = ["histogram_chart", "line_chart", "write_report"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        if v >= lo - step * 1e-9:
            ticks.append(round(v, 10))
        v += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= v <= hi * 1.0001:
                ticks.append(v)
        e += 1
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k" if abs(v) < 1e6 else f"{v / 1e6:g}M"
    if abs(v) >= 1:
        return f"{v:g}"
    return f"{v:.2g}"


def line_chart(series: list[tuple[str, list[tuple[float, float]]]], *, title: str,
               y_label: str, x_label: str = "seconds", log_y: bool = False,
               hlines: list[tuple[float, str, str]] | None = None,
               width: int = 860, height: int = 260) -> str:
    """An SVG line chart; ``series`` is [(name, [(x, y), ...]), ...]."""
    ml, mr, mt, mb = 64, 16, 30, 40
    pw, ph = width - ml - mr, height - mt - mb
    pts = [p for _, s in series for p in s]
    if not pts:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts if not log_y or p[1] > 0]
    for v, _, _ in hlines or []:
        ys.append(v)
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    if log_y:
        y0 = max(min(ys) if ys else 0.1, 0.01) if ys else 0.1
        y1 = max(ys) if ys else 1.0
        y0 = 10 ** math.floor(math.log10(y0))
        y1 = 10 ** math.ceil(math.log10(max(y1, y0 * 10)))

        def sy(y: float) -> float:
            y = max(y, y0)
            span = math.log10(y1) - math.log10(y0)
            return mt + ph - (math.log10(y) - math.log10(y0)) / span * ph
        yticks = _log_ticks(y0, y1)
    else:
        y0, y1 = 0.0, max(ys) * 1.08 if ys and max(ys) > 0 else 1.0

        def sy(y: float) -> float:
            return mt + ph - (y - y0) / (y1 - y0) * ph
        yticks = _nice_ticks(y0, y1)

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="11">'),
           f'<text x="{ml}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in yticks:
        y = sy(t)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{ml - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _nice_ticks(x0, x1, 8):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" '
                   f'stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 4}" text-anchor="middle">'
               f'{html.escape(x_label)}</text>')
    out.append(f'<text x="14" y="{mt + ph / 2}" transform="rotate(-90 14 {mt + ph / 2})" '
               f'text-anchor="middle">{html.escape(y_label)}</text>')
    for i, (v, label, color) in enumerate(hlines or []):
        y = sy(v)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                   f'stroke-dasharray="6 4"/>')
        ty = y - 3 if i % 2 == 0 else y + 11  # alternate above/below: close lines stay legible
        out.append(f'<text x="{ml + pw - 4}" y="{ty:.1f}" text-anchor="end" fill="{color}">'
                   f'{html.escape(label)}</text>')
    lx = ml + 8
    for i, (name, s) in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        pts_s = [(x, y) for x, y in s if not log_y or y > 0]
        if pts_s:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts_s)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" '
                       f'points="{path}"/>')
        out.append(f'<rect x="{lx}" y="{mt + 6}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{lx + 14}" y="{mt + 15}">{html.escape(name)}</text>')
        lx += 24 + 7 * len(name)
    out.append("</svg>")
    return "\n".join(out)


def histogram_chart(buckets: list[tuple[float, float, int]], *, title: str,
                    hlines_x: list[tuple[float, str, str]] | None = None,
                    width: int = 860, height: int = 260) -> str:
    """Latency histogram on a log x axis; ``buckets`` are (low_ms, high_ms, count)."""
    ml, mr, mt, mb = 64, 16, 30, 40
    pw, ph = width - ml - mr, height - mt - mb
    buckets = [b for b in buckets if b[2] > 0]
    if not buckets:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    lo = max(min(b[0] for b in buckets), 0.01)
    hi = max(b[1] for b in buckets)
    for v, _, _ in hlines_x or []:
        hi = max(hi, v * 1.2)
    x0 = 10 ** math.floor(math.log10(lo))
    x1 = 10 ** math.ceil(math.log10(hi))
    # Re-bin into ~60 log-spaced bins so the bars are readable.
    nb = 60
    edges = [x0 * (x1 / x0) ** (i / nb) for i in range(nb + 1)]
    counts = [0] * nb
    for b_lo, b_hi, c in buckets:
        mid = max((b_lo + b_hi) / 2, x0)
        k = min(nb - 1, max(0, int(math.log(mid / x0) / math.log(x1 / x0) * nb)))
        counts[k] += c
    cmax = max(counts)

    def sx(x: float) -> float:
        span = math.log10(x1) - math.log10(x0)
        return ml + (math.log10(max(x, x0)) - math.log10(x0)) / span * pw

    def sy(c: float) -> float:
        return mt + ph - c / cmax * ph

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="11">'),
           f'<text x="{ml}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _nice_ticks(0, cmax, 4):
        y = sy(t)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{ml - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _log_ticks(x0, x1):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" '
                   f'stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 4}" text-anchor="middle">'
               f'delivery latency, ms (log scale)</text>')
    out.append(f'<text x="14" y="{mt + ph / 2}" transform="rotate(-90 14 {mt + ph / 2})" '
               f'text-anchor="middle">deliveries</text>')
    for k, c in enumerate(counts):
        if c:
            xa, xb = sx(edges[k]), sx(edges[k + 1])
            out.append(f'<rect x="{xa:.1f}" y="{sy(c):.1f}" width="{max(1.0, xb - xa - 1):.1f}" '
                       f'height="{mt + ph - sy(c):.1f}" fill="{_COLORS[0]}"/>')
    for i, (v, label, color) in enumerate(hlines_x or []):
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" stroke="{color}" '
                   f'stroke-dasharray="6 4"/>')
        tx, anchor = (x - 3, "end") if i % 2 == 0 else (x + 3, "start")
        out.append(f'<text x="{tx:.1f}" y="{mt + 12}" text-anchor="{anchor}" fill="{color}">'
                   f'{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


def write_report(result: dict[str, Any], verdict: list[dict[str, Any]], path: str,
                 title: str, extra: dict[str, Any] | None = None) -> None:
    """Write the self-contained HTML report of ``result`` to ``path``."""
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from hdr import Histogram

    tl = result.get("timeline", [])
    cfg = result["config"]
    t = result["totals"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        ("<style>body{font-family:sans-serif;max-width:940px;margin:1em auto;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;"
         "padding:2px 8px;text-align:left;font-size:13px}th{background:#f4f4f4}"
         ".ok{color:#1a7f37}.fail{color:#c62828;font-weight:bold}.warn{color:#b26a00;"
         "font-weight:bold}code{background:#f4f4f4;padding:1px 3px}</style></head><body>"),
        f"<h1>{html.escape(title)}</h1>",
    ]
    overall = all(v["ok"] for v in verdict)
    parts.append(f"<p class='{'ok' if overall else 'fail'}'>Overall: "
                 f"{'PASS' if overall else 'FAIL'}</p>")
    parts.append("<h2>SLO verdict</h2><table><tr><th>result</th><th>line</th></tr>")
    for v in verdict:
        label = {"ok": "PASS", "warn": "WARN", "fail": "FAIL"}[v["level"]]
        parts.append(f"<tr><td class='{v['level']}'>{label}</td><td>{html.escape(v['text'])}"
                     f"</td></tr>")
    parts.append("</table>")
    info = [("started", result.get("started")), ("target", cfg["url"]),
            ("scenario", cfg["scenario"]), ("connections", cfg["connections"]),
            ("offered rate", ", ".join(f"{r:g}" for r in cfg["steps"]) if cfg["steps"]
             else f"{cfg['rate']:g} msgs/s"),
            ("load seconds", result.get("load_seconds")),
            ("generator processes", cfg["processes"]),
            ("machine", json.dumps(result.get("machine")))]
    for k, v in (extra or {}).items():
        info.append((k, v))
    parts.append("<h2>Run</h2>" + _table(info))
    parts.append("<h2>Counts</h2>" + _table(
        [(k, t.get(k, 0)) for k in ("sent", "acknowledged", "delivered", "deliveries",
                                     "expected_deliveries", "duplicates", "delivered_after_error",
                                     "redelivered",
                                     "lost", "to_offline", "drain_capped", "unacknowledged",
                                     "gaps",
                                     "error_frames",
                                     "connect_ok", "connect_failed", "unexpected_closes",
                                     "reconnects", "retried_sends", "dedup_hits",
                                     "own_resumed", "connected_at_end")]
        + [("errors by code", json.dumps(result.get("errors", {}))),
           ("server close codes", json.dumps(result.get("closes", {})))]))
    lrows = []
    for name, key in (("delivery (live)", "latency_ms"), ("send -> sent", "ack_latency_ms"),
                      ("delivered by resume", "resume_latency_ms"),
                      ("reconnect", "reconnect_ms"), ("connect", "connect_ms"),
                      ("ping", "ping_ms")):
        s = result.get(key, {})
        if s.get("count"):
            lrows.append(f"<tr><td>{name}</td><td>{s['count']}</td><td>{s['p50']}</td>"
                         f"<td>{s['p90']}</td><td>{s['p99']}</td><td>{s['p99.9']}</td>"
                         f"<td>{s['max']}</td></tr>")
    if lrows:
        parts.append("<h2>Latency (ms)</h2><table><tr><th></th><th>n</th><th>P50</th>"
                     "<th>P90</th><th>P99</th><th>P99.9</th><th>max</th></tr>"
                     + "".join(lrows) + "</table>")
    load = [r for r in tl if r.get("n_lat")]
    if load:
        parts.append(line_chart(
            [("P50", [(r["t"], r["p50_ms"]) for r in load]),
             ("P99", [(r["t"], r["p99_ms"]) for r in load]),
             ("max", [(r["t"], r["max_ms"]) for r in load])],
            title="Delivery latency over time (per second)", y_label="ms (log)", log_y=True,
            hlines=[(200, "SLO 200 ms", "#c62828"), (150, "scale-up 150 ms", "#b26a00")]))
    if tl:
        parts.append(line_chart(
            [("sent/s", [(r["t"], r["sent"]) for r in tl]),
             ("deliveries/s", [(r["t"], r["deliveries"]) for r in tl]),
             ("errors/s", [(r["t"], r["errors"]) for r in tl])],
            title="Throughput over time", y_label="per second"))
        conn_series = [("connections", [(r["t"], r["ready"]) for r in tl])]
        parts.append(line_chart(conn_series, title="Connections ready", y_label="connections"))
        if any("server_rss_mb" in r for r in tl):
            # Two charts: MB and % share no axis.
            parts.append(line_chart(
                [("server CPU %", [(r["t"], r.get("server_cpu_pct", 0)) for r in tl]),
                 ("generator CPU %", [(r["t"], r.get("gen_cpu_pct", 0)) for r in tl])],
                title="CPU (% of one core)", y_label="% of one core"))
            parts.append(line_chart(
                [("server RSS", [(r["t"], r.get("server_rss_mb", 0)) for r in tl])],
                title="Server memory (RSS)", y_label="MB"))
    h = Histogram.from_dict(result.get("latency_hist", {}))
    if h.n:
        parts.append(histogram_chart(
            [(lo / 1000, hi / 1000, c) for lo, hi, c in h.buckets()],
            title=f"Delivery latency histogram ({h.n} deliveries)",
            hlines_x=[(150, "150 ms", "#b26a00"), (200, "200 ms", "#c62828")]))
    if result.get("steps"):
        parts.append("<h2>Stress steps</h2><table><tr><th>offered/s</th><th>sent/s</th>"
                     "<th>acked/s</th><th>deliveries/s</th><th>P50</th><th>P99</th>"
                     "<th>max</th><th>errors</th><th>result</th></tr>")
        for s in result["steps"]:
            sl = s["latency_ms"]
            parts.append(
                f"<tr><td>{s['rate']:g}</td><td>{s['sent_per_s']}</td>"
                f"<td>{s['acknowledged_per_s']}</td><td>{s['deliveries_per_s']}</td>"
                f"<td>{sl.get('p50', '-')}</td><td>{sl.get('p99', '-')}</td>"
                f"<td>{sl.get('max', '-')}</td><td>{s['errors']}</td>"
                f"<td class='{'ok' if s['ok'] else 'fail'}'>"
                f"{'ok' if s['ok'] else html.escape('; '.join(s['reasons']))}</td></tr>")
        parts.append("</table>")
    srv = result.get("server", {})
    parts.append("<h2>Server</h2>" + _table(
        [(k, v if not isinstance(v, dict) else json.dumps(v)) for k, v in srv.items()]))
    parts.append("<h2>Configuration</h2><pre>"
                 + html.escape(json.dumps({k: v for k, v in cfg.items() if k != "jwt_secret"},
                                          indent=1)) + "</pre>")
    parts.append("<p>Raw data: <code>result.json</code> next to this file.</p></body></html>")
    with open(path, "w") as fh:
        fh.write("\n".join(parts))
