"""Offline checks that docs/runbooks.md is true to the product.

The operators type what the runbooks say, so every name in them is checked
against its source of truth:

* alerts (deploy/prometheus/alerts.yaml): each has a section, found through its
  ``runbook_url`` anchor, that names the alert and the metrics it fires on, and
  a row in the alert index;
* headings: the six seed runbook titles, in order; every ``#anchor`` link and
  every ``runbook_url`` anchor is a GitHub heading slug of this file;
* environment variables: every one is a setting of ``imfast.config.Settings``
  (or, for the few that belong to other programs, set in deploy/k8s); the
  Knobs table's defaults and deployed values match ``Settings.describe()`` and
  the ``imfast-config`` ConfigMap;
* metrics: every ``im_*`` name is exported by imfast's collectors (rendered
  here, not listed by hand); PromQL blocks parse and use known metrics only;
* log phrases (written as ``"quoted code"``): each occurs in the package
  source; every ``kubectl logs ... | grep`` greps a listed phrase or a
  ``key=`` field the logs really print;
* Kubernetes names in commands (Deployments, StatefulSets, HPA, PVCs,
  ConfigMaps, Services, app labels, pods) exist in deploy/k8s, and namespaced
  ``kubectl`` commands say ``-n im-system``; Grafana paths are the dashboards.

No cluster, no network, no skips.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import promql_parser
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from imfast.config import Settings
from tests.deploy.test_manifests import (
    EXTERNAL_METRICS,
    KNOWN_METRICS,
    alert_rules,
    config_map_data,
    metric_names,
)
from tests.deploy.test_manifests import docs as manifest_docs

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks.md"
PACKAGE = ROOT / "imfast"
K8S = ROOT / "deploy" / "k8s"
GRAFANA = ROOT / "deploy" / "grafana"
NAMESPACE = "im-system"

# The seed runbooks' scenarios, in their order (operators map sections 1:1).
SEED_RUNBOOKS = [
    "Runbook 1: Handle Gateway Node Failure",
    "Runbook 2: Handle Database Outage",
    "Runbook 3: Handle Kafka Outage",
    "Runbook 4: Scale Cluster Up",
    "Runbook 5: Scale Cluster Down",
    "Runbook 6: Investigate Message Delivery Issues",
]

# Phrases the contract says an operator can grep for; the runbooks must use them.
CONTRACT_LOG_PHRASES = [
    "user not found in registry",
    "duplicate message detected",
    "sequence number already exists",
    "too many connections",
    "route failed",
]

# Upper-case names in the doc that are not imfast settings, and the manifest
# (kind, name) whose containers define them: passwords the pods get from the
# Secret, and a broker setting of the Kafka StatefulSet.
FOREIGN_ENV = {
    "MYSQL_PASSWORD": ("Deployment", "im-service"),
    "MYSQL_ROOT_PASSWORD": ("StatefulSet", "mysql"),
    "KAFKA_NUM_PARTITIONS": ("StatefulSet", "kafka"),
}

# im_* words that are not metrics: the MySQL database and user (CONTRACT.md).
NOT_METRICS = {"im_chat": "MySQL database", "im_service": "MySQL user"}

ENV_NAME = r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+"


# --------------------------------------------------------------------------
# Parsing the document
# --------------------------------------------------------------------------


@cache
def text() -> str:
    assert RUNBOOKS.exists(), "docs/runbooks.md is missing"
    return RUNBOOKS.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Block:
    lang: str
    body: str


@cache
def split() -> tuple[tuple[str, ...], tuple[Block, ...]]:
    """(prose lines, fenced code blocks); fences may be indented (in lists)."""
    prose: list[str] = []
    blocks: list[Block] = []
    fence: str | None = None
    lang = ""
    body: list[str] = []
    for line in text().splitlines():
        stripped = line.strip()
        if fence is None:
            m = re.match(r"(`{3,})(\w*)\s*$", stripped)
            if m:
                fence, lang, body = m.group(1), m.group(2), []
                continue
            prose.append(line)
        elif stripped == fence:
            blocks.append(Block(lang, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, "unclosed code fence"
    return tuple(prose), tuple(blocks)


def prose_text() -> str:
    return "\n".join(split()[0])


def code_blocks(lang: str | None = None) -> list[Block]:
    return [b for b in split()[1] if lang is None or b.lang == lang]


def inline_code(s: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", s)


def slug_text(heading: str) -> str:
    """What GitHub slugs: the rendered text (no code ticks, link targets, emphasis)."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return heading.replace("`", "").replace("*", "")


def github_slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", slug_text(heading).strip().lower()).replace(" ", "-")


@dataclass(frozen=True)
class Section:
    level: int
    title: str
    slug: str
    body: str  # heading line plus everything up to the next heading of this level or higher


@cache
def sections() -> tuple[Section, ...]:
    """Every heading outside code blocks, with GitHub's -1, -2 ... for repeated slugs."""
    lines = text().splitlines()
    in_code: set[int] = set()
    fence: str | None = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if fence is None:
            m = re.match(r"(`{3,})\w*\s*$", stripped)
            if m:
                fence = m.group(1)
                in_code.add(i)
        else:
            in_code.add(i)
            if stripped == fence:
                fence = None
    heads = []
    for i, line in enumerate(lines):
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and i not in in_code:
            heads.append((i, len(m.group(1)), m.group(2)))
    seen: dict[str, int] = {}
    result = []
    for n, (i, level, title) in enumerate(heads):
        base = github_slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        slug = base if count == 0 else f"{base}-{count}"
        end = len(lines)
        for j, other_level, _ in heads[n + 1 :]:
            if other_level <= level:
                end = j
                break
        result.append(Section(level, title, slug, "\n".join(lines[i:end])))
    return tuple(result)


def slugs() -> dict[str, Section]:
    return {s.slug: s for s in sections()}


def commands() -> Iterator[str]:
    """Shell commands of bash blocks, continuation lines joined, comments dropped."""
    for b in code_blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", b.body)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#\s.*$", "", line).strip()
            if line:
                yield line


def table_rows(section: Section) -> list[list[str]]:
    rows = []
    for line in section.body.splitlines():
        if line.startswith("|") and not re.match(r"\|[-| ]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header


def section_titled(title: str) -> Section:
    hits = [s for s in sections() if s.title == title]
    assert len(hits) == 1, f"expected one section {title!r}, found {len(hits)}"
    return hits[0]


# --------------------------------------------------------------------------
# Sources of truth
# --------------------------------------------------------------------------


@cache
def package_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py")))


@cache
def settings_env() -> dict[str, str]:
    """env var -> default, as `imfast config` prints it."""
    return {env: default for env, default, _doc in Settings.describe()}


def _render(*collectors: Any) -> set[str]:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return _sample_names(generate_latest(registry))


def _sample_names(exposition: bytes) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(exposition.decode()):
        names |= {s.name for s in family.samples}
    return names


async def _gateway_metrics() -> set[str]:
    """What a real gateway's /metrics renders (not started: no sockets, no network)."""
    from imfast.backends.memory import MemoryStore
    from imfast.gateway.server import Gateway
    from imfast.service.router import Router

    settings = Settings()
    router = Router(settings, MemoryStore(), SimpleNamespace())
    gateway = Gateway(settings, None, router, role="gateway")  # type: ignore[arg-type]
    # Labelled counters only show labels that occurred.
    gateway.stats.closes[4001] = 1
    gateway.stats.refused["draining"] = 1
    gateway.stats.errors["bad_json"] = 1
    return _sample_names(gateway.metrics_text())


async def _embedded_metrics() -> set[str]:
    """What ``imfast serve``'s /metrics renders: the SQLite store adds its gauges."""
    from imfast.backends.sqlite import SQLiteStore
    from imfast.gateway.server import Gateway
    from imfast.service.router import Router

    settings = Settings()
    store = SQLiteStore(":memory:")
    router = Router(settings, store, SimpleNamespace())
    gateway = Gateway(settings, None, router, role="embedded")  # type: ignore[arg-type]
    names = _sample_names(gateway.metrics_text())
    await store.close()
    return names


@cache
def exported_metrics() -> frozenset[str]:
    """Every sample name imfast's roles expose on /metrics, rendered by their collectors."""
    import asyncio

    from imfast.backends.memory import MemoryStore
    from imfast.backends.metrics import BackendCollector
    from imfast.link.endpoints import LinkPool, LinkServer
    from imfast.offline.worker import _Collector as OfflineCollector
    from imfast.service.node import _ServiceCollector
    from imfast.service.pusher import ClusterPusher
    from imfast.service.router import Router

    gateway = asyncio.run(_gateway_metrics()) | asyncio.run(_embedded_metrics())
    pusher = ClusterPusher(None, None, LinkPool())
    service = SimpleNamespace(
        pusher=pusher,
        router=Router(Settings(), MemoryStore(), pusher),
        link_server=LinkServer(None),
        sequences=SimpleNamespace(floor_lookups=2),
    )
    bus = SimpleNamespace(consumer_lag=lambda: {("group_msg", 0): 3}, handler_failures=0)
    mysql = SimpleNamespace(pool_stats=lambda: {"max": 20, "open": 3, "idle": 2})
    others = _render(
        _ServiceCollector(service),
        OfflineCollector(SimpleNamespace(stored=1, purged=0, messages_purged=0)),
        BackendCollector([(bus, "gateway-group")], mysql=mysql),
    )
    return frozenset(gateway | others)


def is_exported(name: str) -> bool:
    """A sample name, or a histogram's base name (its _bucket series exists)."""
    return name in exported_metrics() or f"{name}_bucket" in exported_metrics()


@cache
def workloads() -> dict[tuple[str, str], dict[str, Any]]:
    paths = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    return {(d["kind"], d["metadata"]["name"]): d for p in paths for d in manifest_docs(p)}


def names_of(kind: str) -> set[str]:
    return {name for k, name in workloads() if k == kind}


def container_env(kind: str, name: str) -> set[str]:
    w = workloads()[(kind, name)]
    return {
        e["name"] for c in w["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
    }


# --------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------


def test_parser_finds_headings_and_slugs_like_github():
    assert (
        github_slug("Runbook 1: Handle Gateway Node Failure")
        == "runbook-1-handle-gateway-node-failure"
    )
    assert github_slug("Scenario A: Pod Crashed (OOMKilled, CrashLoopBackOff)") == (
        "scenario-a-pod-crashed-oomkilled-crashloopbackoff"
    )
    assert github_slug("Step 1: Scale `im-service`") == "step-1-scale-im-service"
    # Repeated headings get -1, -2, ... as on GitHub.
    verification = [s.slug for s in sections() if s.title == "Verification"]
    assert verification[:2] == ["verification", "verification-1"]
    # Lines starting with # inside code blocks are not headings.
    assert not any(s.title.startswith("Active connections") for s in sections())


def test_seed_runbooks_appear_in_order():
    h2 = [s.title for s in sections() if s.level == 2]
    positions = []
    for title in SEED_RUNBOOKS:
        assert title in h2, f"missing section: ## {title}"
        positions.append(h2.index(title))
    assert positions == sorted(positions), "seed runbooks out of order"
    for title in ("Architecture in one page", "Knobs", "Alert index", "Log phrases"):
        assert title in h2, title
    assert h2.index("Architecture in one page") < positions[0]


@pytest.mark.parametrize("title", SEED_RUNBOOKS)
def test_each_runbook_has_the_operator_parts(title: str):
    body = section_titled(title).body
    subs = {s.title for s in sections() if s.level == 3 and s.body in body}
    assert {"Verification", "Differences from the seed runbook"} <= subs, subs
    assert subs & {"Symptoms", "When to Scale Up", "When to Scale Down"}, subs
    assert subs & {"Diagnosis Steps", "Scaling Steps"}, subs
    assert "kubectl" in body


def test_internal_links_resolve():
    links = re.findall(r"\]\(#([^)]+)\)", prose_text())
    assert links
    missing = sorted(set(links) - set(slugs()))
    assert not missing, missing


# --------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------


def _anchor(rule: dict[str, Any]) -> str:
    url = rule["annotations"]["runbook_url"]
    m = re.fullmatch(r"docs/runbooks\.md#([a-z0-9-]+)", url)
    assert m, url
    return m.group(1)


@pytest.mark.parametrize(
    "rule", alert_rules(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}"
)
def test_alert_has_a_section_naming_it_and_its_metrics(rule: dict[str, Any]):
    anchor = _anchor(rule)
    assert anchor in slugs(), f"{rule['alert']}: no heading with slug {anchor!r}"
    body = slugs()[anchor].body
    assert f"`{rule['alert']}`" in body, f"section #{anchor} does not name {rule['alert']}"
    for metric in metric_names(rule["expr"]):
        assert metric in body, f"section #{anchor} does not show {metric} ({rule['alert']})"


def test_alert_index_lists_every_alert_with_its_anchor():
    rows = table_rows(section_titled("Alert index"))
    index = set()
    for cells in rows:
        names = inline_code(cells[0])
        links = re.findall(r"\]\(#([^)]+)\)", cells[-1])
        assert len(names) == 1 and len(links) == 1, cells
        index.add((names[0], cells[1].split()[0], links[0]))
    expected = {(r["alert"], r["labels"]["severity"], _anchor(r)) for r in alert_rules()}
    assert index == expected, (expected - index, index - expected)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def env_names_in_doc() -> set[str]:
    names = set()
    for span in inline_code(prose_text()):
        m = re.fullmatch(rf"({ENV_NAME})(?:=.*)?", span)
        if m:
            names.add(m.group(1))
    for b in code_blocks():
        names |= set(re.findall(rf"(?<![\w$./-])({ENV_NAME})=", b.body))
        names |= set(re.findall(rf"\$\{{?({ENV_NAME})", b.body))
        for line in b.body.splitlines():
            if "set env" in line:
                names |= set(re.findall(rf"(?<![\w./-])({ENV_NAME})-(?=\s|$)", line))
    return names


def test_env_var_scan_catches_the_usual_forms():
    prose, blocks = split()
    assert "ROUTE_ALL_OFFLINE" in env_names_in_doc()
    assert "DB_MAX_OPEN_CONNS" in env_names_in_doc()
    assert "MYSQL_ROOT_PASSWORD" in env_names_in_doc()  # "$MYSQL_ROOT_PASSWORD" in commands
    assert prose and blocks


def test_every_env_var_is_a_setting():
    known = set(settings_env())
    unknown = env_names_in_doc() - known - set(FOREIGN_ENV)
    assert not unknown, f"not imfast settings: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(FOREIGN_ENV))
def test_foreign_env_vars_exist_where_the_doc_uses_them(name: str):
    kind, workload = FOREIGN_ENV[name]
    assert name not in settings_env(), f"{name} is an imfast setting now: drop it from FOREIGN_ENV"
    assert name in container_env(kind, workload), f"{kind}/{workload} does not set {name}"


def knob_rows() -> list[list[str]]:
    rows = [r for r in table_rows(section_titled("Knobs")) if r and inline_code(r[0])]
    return [r for r in rows if re.fullmatch(ENV_NAME, inline_code(r[0])[0])]


def test_knobs_table_matches_the_settings_and_the_configmap():
    settings = settings_env()
    config = config_map_data("imfast-config")
    app_env = set().union(
        *(
            container_env("Deployment", d)
            for d in ("im-gateway-service", "im-service", "offline-worker")
        )
    )
    rows = knob_rows()
    assert len(rows) >= 15
    for cells in rows:
        (name,) = inline_code(cells[0])
        assert name in settings, name
        default, deployed = cells[1], cells[2]
        expected_default = settings[name] or "-"
        shown = inline_code(default)[0] if inline_code(default) else default
        assert shown == expected_default, (
            f"{name}: default {shown!r}, imfast says {expected_default!r}"
        )
        if deployed == "-":
            assert name not in config and name not in app_env, f"{name} is deployed"
        elif deployed == "Deployment env":
            assert name not in config and name in app_env, name
        else:
            (value,) = inline_code(deployed)
            value = "" if value == '""' else value
            assert config.get(name) == value, (
                f"{name}: doc {value!r}, imfast-config {config.get(name)!r}"
            )


def test_the_contract_knobs_are_in_the_table():
    tabled = {inline_code(r[0])[0] for r in knob_rows()}
    assert {
        "ROUTE_ALL_OFFLINE",
        "FEATURES_DISABLED",
        "MAX_CONNECTIONS",
        "GATEWAY_WORKERS",
        "DB_MAX_OPEN_CONNS",
        "KAFKA_BROKERS",
        "ADMIN_TOKEN",
        "DRAIN_ANNOTATIONS_FILE",
    } <= tabled


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def test_rendered_metrics_cover_the_known_list():
    # The list tests/deploy/test_manifests.py checks alerts and dashboards
    # against must itself be what the collectors export.
    for name in KNOWN_METRICS:
        assert is_exported(name), name
    assert not is_exported("im_gateway_active_connection")  # no prefix matching


def test_every_im_metric_in_the_doc_is_exported():
    used = set(re.findall(r"\bim_[a-z0-9_]+\b", text())) - set(NOT_METRICS)
    assert len(used) >= 10
    unknown = {n for n in used if not is_exported(n)}
    assert not unknown, f"not exported by imfast: {sorted(unknown)}"


def promql_expressions() -> list[str]:
    exprs = []
    for b in code_blocks("promql"):
        for para in re.split(r"\n\s*\n", b.body):
            lines = [
                ln for ln in para.splitlines() if ln.strip() and not ln.strip().startswith("#")
            ]
            if lines:
                exprs.append("\n".join(lines))
    return exprs


def test_promql_blocks_parse_and_use_known_metrics():
    exprs = promql_expressions()
    assert len(exprs) >= 5
    for e in exprs:
        names = metric_names(e)  # raises on a syntax error
        assert names, e
        bad = {n for n in names if not is_exported(n) and n not in EXTERNAL_METRICS}
        assert not bad, f"{bad} in {e}"


def test_success_rate_query_sums_both_sides():
    """The seed's query without sum() always answers 1; ours must aggregate."""
    for e in promql_expressions():
        if 'status="success"' in e:
            parsed = promql_parser.parse(e)
            assert isinstance(parsed, promql_parser.BinaryExpr), e
            for side in (parsed.lhs, parsed.rhs):
                assert isinstance(side, promql_parser.AggregateExpr), e


# --------------------------------------------------------------------------
# Log phrases
# --------------------------------------------------------------------------

_PLACEHOLDER = r"(?:%[-+ #0-9.]*[sdrfgx]|\{[^{}]*\})"


def phrase_pattern(phrase: str) -> re.Pattern[str]:
    """A doc phrase with <placeholders> as a regex over format strings (%s, {x})."""
    parts = re.split(r"<[^<>]+>", phrase)
    return re.compile(_PLACEHOLDER.join(re.escape(p) for p in parts))


def quoted_phrases() -> list[str]:
    return [
        m.group(1) for span in inline_code(prose_text()) if (m := re.fullmatch(r'"([^"]+)"', span))
    ]


def test_phrase_matcher():
    assert phrase_pattern("route failed: gateway <address> unreachable").search(
        'log.warning("route failed: gateway %s unreachable (%d pushes)"'
    )
    assert phrase_pattern("<backend> unavailable: <reason>").search(
        'f"{backend} unavailable: {reason}"'
    )
    assert not phrase_pattern("route failed: <what>").search('"route failed: gateway %s"')


def test_every_quoted_log_phrase_is_in_the_package():
    phrases = quoted_phrases()
    assert len(phrases) >= 30
    missing = sorted({p for p in phrases if not phrase_pattern(p).search(package_source())})
    assert not missing, f"not printed by imfast: {missing}"


def log_table_phrases() -> list[str]:
    rows = table_rows(section_titled("Log phrases"))
    phrases = []
    for cells in rows:
        (span,) = inline_code(cells[0])
        m = re.fullmatch(r'"([^"]+)"', span)
        assert m, f'log phrase not marked as "quoted code": {span}'
        phrases.append(m.group(1))
    return phrases


def test_log_table_covers_the_contract_phrases_and_every_quoted_phrase():
    table = log_table_phrases()
    for phrase in CONTRACT_LOG_PHRASES:
        assert any(phrase in p for p in table), phrase
    untabled = {p for p in quoted_phrases() if not any(p in t or t in p for t in table)}
    assert not untabled, f"quoted in the runbooks but missing from the table: {sorted(untabled)}"


def log_greps() -> list[str]:
    patterns = []
    for cmd in commands():
        if "kubectl logs" not in cmd:
            continue
        for m in re.finditer(r"\|\s*grep((?:\s+-[A-Za-z]+)*)\s+(['\"])(.*?)\2", cmd):
            patterns.append(m.group(3))
    return patterns


def test_log_greps_search_for_what_imfast_prints():
    greps = log_greps()
    assert len(greps) >= 5
    literal = [re.sub(r"<[^<>]+>", "\0", p) for p in log_table_phrases()]
    for pattern in greps:
        field = re.fullmatch(r"([a-z_]+)=(<[^<>]+>|[\w.@:-]+)", pattern)
        if field:
            assert re.search(rf"\b{field.group(1)}=%s", package_source()), pattern
            continue
        assert any(pattern in part for p in literal for part in p.split("\0")), (
            f"grep {pattern!r} matches no phrase of the Log phrases table"
        )


# --------------------------------------------------------------------------
# Kubernetes and Grafana names
# --------------------------------------------------------------------------

_NAME = r"([a-z0-9][a-z0-9.-]*[a-z0-9])"
_WORD = r"(?<![\w.-])"
REFERENCES = [
    ("Deployment", rf"{_WORD}deployments?[ /]{_NAME}"),
    ("StatefulSet", rf"{_WORD}statefulsets?[ /]{_NAME}"),
    ("HorizontalPodAutoscaler", rf"{_WORD}hpa {_NAME}"),
    ("ConfigMap", rf"{_WORD}configmaps? {_NAME}"),
    ("Service", rf"{_WORD}(?:service|endpoints) {_NAME}"),
]


def pvc_names() -> set[str]:
    names = set()
    for (kind, name), w in workloads().items():
        if kind == "StatefulSet":
            for t in w["spec"].get("volumeClaimTemplates", []):
                for i in range(w["spec"]["replicas"]):
                    names.add(f"{t['metadata']['name']}-{name}-{i}")
    return names


def sts_pods() -> set[str]:
    return {
        f"{name}-{i}"
        for (kind, name), w in workloads().items()
        if kind == "StatefulSet"
        for i in range(w["spec"]["replicas"])
    }


def app_labels() -> set[str]:
    return {
        w["spec"]["template"]["metadata"]["labels"]["app"]
        for (kind, _), w in workloads().items()
        if kind in {"Deployment", "StatefulSet"}
    }


def kubectl_commands() -> list[str]:
    """kubectl commands of bash blocks and of inline code in the prose."""
    # A bare verb in prose ("`kubectl set env`") names a command, it is not one.
    inline = [
        s for s in inline_code(prose_text()) if s.startswith("kubectl ") and len(s.split()) >= 4
    ]
    return [c for c in commands() if c.startswith("kubectl ") or " kubectl " in c] + inline


def test_kubernetes_objects_named_in_commands_exist():
    checked = 0
    for cmd in kubectl_commands():
        for kind, pattern in REFERENCES:
            for name in re.findall(pattern, cmd):
                assert name in names_of(kind), f"no {kind} {name}: {cmd}"
                checked += 1
        for name in re.findall(rf"{_WORD}pvc {_NAME}", cmd):
            assert name in pvc_names(), f"no PVC {name}: {cmd}"
            checked += 1
        for name in re.findall(rf"-l app={_NAME}", cmd):
            assert name in app_labels(), f"no workload with app={name}: {cmd}"
            checked += 1
        bare = cmd.replace(f"-n {NAMESPACE}", "")
        for name in re.findall(rf"{_WORD}exec(?:\s+-[a-z]+)*\s+{_NAME}", bare):
            assert name in sts_pods(), f"no pod {name}: {cmd}"
            checked += 1
        for name in re.findall(rf"\bpod/{_NAME}", cmd):
            assert name in sts_pods(), f"no pod {name}: {cmd}"
            checked += 1
    assert checked >= 50


# kubectl subcommands that address nodes or manifest files, not namespaced objects
# (`apply -k deploy/k8s` takes the namespace from the kustomization.)
CLUSTER_COMMANDS = re.compile(
    r"^kubectl (?:cordon|uncordon|drain|get nodes|top nodes|apply -[fk])\b"
)


def test_namespaced_kubectl_commands_name_the_namespace():
    for cmd in kubectl_commands():
        for part in re.split(r"\s*(?:\||;|&&|\$\()\s*", cmd):
            part = part.strip()
            if not part.startswith("kubectl ") or CLUSTER_COMMANDS.match(part):
                continue
            assert f"-n {NAMESPACE}" in part, f"missing -n {NAMESPACE}: {part}"


def test_grafana_paths_are_the_dashboards():
    uids = set(re.findall(r"/d/([a-z0-9-]+)", text()))
    assert uids
    for uid in uids:
        assert (GRAFANA / f"{uid}.json").exists(), uid
