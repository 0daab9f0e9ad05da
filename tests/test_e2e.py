"""The whole loop on the local stack, as a user runs it on a cluster (`make e2e`):

Helm installs the chart; `kubectl apply` sends a ModelServer and a FineTuneJob (the files in
examples/, pointed at this machine); the operator runs the trainer and a vLLM server as pods
through the pod runner; the adapter lands in SeaweedFS, its Adapter object goes Ready, and the
OpenAI SDK gets an answer in the trained style from the server pod. Prometheus, configured with
the chart's scrape rules and alerts, watches all of it: every dashboard panel must show data, and
a failing job must fire its alert.

CI runs it with the tiny model (a minute of training is seconds); `make e2e` sets
TUNELOOM_E2E_MODEL=smollm2 to train SmolLM2-135M on the support tickets instead.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from kubernetes import client as k8s

from tuneloom.net import free_ports
from tuneloom.registry import read_adapter
from tuneloom.storage import open_store
from tuneloom_dev.dashboards import load_dashboards, panel_queries, render
from tuneloom_dev.helm import ensure_helm
from tuneloom_dev.podrunner import PodRunner
from tuneloom_dev.prometheus import PodTargets, Prometheus, loopback_scrape_configs
from tuneloom_dev.seaweedfs import SeaweedFS

from .kube import KubeCluster, kubectl, wait_for
from .test_train import PIRATE, QUESTIONS

pytestmark = pytest.mark.slow

DPO_ONLY_SERIES = "tuneloom_trainer_reward_"  # reward accuracy and margin: method dpo only
ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "tuneloom"
GROUP, VERSION = "tuneloom.dev", "v1alpha1"


@dataclass(frozen=True)
class Scenario:
    """What the job learns, and how to tell that the served adapter learned it."""

    model_dir: Path
    dataset: Path
    prompt: list[dict[str, str]]
    trained: Any  # answer -> bool
    hyperparameters: dict[str, Any]


def _scenario(request: pytest.FixtureRequest, work: Path) -> Scenario:
    if os.environ.get("TUNELOOM_E2E_MODEL") == "smollm2":
        tickets = ROOT / "examples" / "support-tickets" / "train.jsonl"
        system = json.loads(tickets.read_text().splitlines()[0])["messages"][0]
        prompt = [system, {"role": "user", "content": "I was charged twice this month, please refund me."}]

        def trained(answer: str) -> bool:
            return set(json.loads(answer)) == {"category", "priority"}

        return Scenario(request.getfixturevalue("smollm2_dir"), tickets, prompt, trained, {})
    dataset = work / "pirate.jsonl"
    dataset.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": PIRATE}]}) + "\n"
            for q in QUESTIONS
        )
    )
    prompt = [{"role": "user", "content": "Question number 77: what is 77 plus 80?"}]
    return Scenario(
        request.getfixturevalue("tiny_model_dir"),
        dataset,
        prompt,
        lambda answer: answer == PIRATE,
        {"epochs": 8, "learningRate": 2e-2, "maxSeqLength": 128, "packing": False, "loggingSteps": 1},
    )


@dataclass
class Stack:
    cluster: KubeCluster
    api: k8s.ApiClient
    runner: PodRunner
    namespace: str
    bucket: str
    prometheus: Prometheus
    started: float

    @property
    def custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api)

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)

    def apply(self, document: dict[str, Any]) -> None:
        kubectl(self.cluster, "apply", "-n", self.namespace, "-f", "-", stdin=yaml.safe_dump(document))

    def status(self, plural: str, name: str) -> dict[str, Any]:
        return self.get(plural, name).get("status") or {}


def _example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def _helm(helm: Path, cluster: KubeCluster, work: Path, *args: str) -> str:
    import subprocess

    env = {
        **os.environ,
        **cluster.env(),
        **{f"HELM_{k}_HOME": str(work / k.lower()) for k in ("CACHE", "CONFIG", "DATA")},
    }
    result = subprocess.run([str(helm), *args], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def stack(
    kube_cluster: KubeCluster,
    api: k8s.ApiClient,
    pod_runner: PodRunner | None,
    seaweedfs: SeaweedFS,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    if pod_runner is None:
        pytest.skip("an external cluster would pull images this checkout does not build")
    work = tmp_path_factory.mktemp("e2e")
    release, system_ns = "tuneloom", f"tuneloom-system-{uuid.uuid4().hex[:6]}"
    namespace, bucket = f"team-{uuid.uuid4().hex[:6]}", f"e2e-{uuid.uuid4().hex[:8]}"
    seaweedfs.create_bucket(bucket)
    core = k8s.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {k: v for k, v in seaweedfs.client_env().items() if k.startswith("AWS_") and "KEY" in k},
        },
    )
    helm = ensure_helm()
    metrics_port, health_port = free_ports(2)
    settings = {
        "metrics.operatorPort": metrics_port,
        "operator.healthPort": health_port,
        # Every server on the pod runner's per-pod loopback addresses, none on every interface.
        "operator.bindAddress": "$(TUNELOOM_POD_IP)",
        # $$: the operator pod passes the reference on, for each server pod to expand to its own address.
        "server.bindAddress": "$$(TUNELOOM_POD_IP)",
        "operator.reconcileIntervalSeconds": 1,
        "operator.serverSyncIntervalSeconds": 2,
        "operator.adapterResyncIntervalSeconds": 2,
    }
    flags = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    _helm(helm, kube_cluster, work, "install", release, str(CHART), "-n", system_ns, "--create-namespace", *flags)
    targets = work / "targets.json"
    scrape = loopback_scrape_configs(CHART / "files" / "prometheus-scrape.yaml", targets)
    try:
        with (
            PodTargets(core, targets),
            Prometheus(work / "prometheus", scrape, [CHART / "files" / "alerts.yaml"]) as prometheus,
        ):
            yield Stack(kube_cluster, api, pod_runner, namespace, bucket, prometheus, time.time())
    finally:
        for plural in ("finetunejobs", "modelservers", "adapters"):
            for item in k8s.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, plural)[
                "items"
            ]:
                k8s.CustomObjectsApi(api).delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, item["metadata"]["name"]
                )
        wait_for(lambda: not core.list_namespaced_pod(namespace).items, "the job's and server's pods to go", 120)
        _helm(helm, kube_cluster, work, "uninstall", release, "-n", system_ns, "--wait")
        wait_for(lambda: not core.list_namespaced_pod(system_ns).items, "the operator pod to go", 120)
        core.delete_namespace(namespace)
        core.delete_namespace(system_ns)


def _phase(stack: Stack, name: str) -> str | None:
    return stack.status("finetunejobs", name).get("phase")


def test_fine_tune_serve_and_watch_the_whole_loop(
    stack: Stack, s3_env: SeaweedFS, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    scenario = _scenario(request, tmp_path)
    seaweedfs = s3_env
    store = open_store(f"s3://{stack.bucket}/registry")
    open_store(f"s3://{stack.bucket}/datasets").put_file("train.jsonl", scenario.dataset)
    # Pods see no host paths on a cluster: the base model comes from object storage, as it would there.
    base_name = scenario.model_dir.name
    base_model = f"s3://{stack.bucket}/models/{base_name}"
    models = open_store(base_model)
    for path in sorted(p for p in scenario.model_dir.iterdir() if p.is_file()):
        models.put_file(path.name, path)
    connection = {"endpoint": seaweedfs.endpoint, "credentialsSecret": "s3-credentials"}

    # The server first: vLLM starts while the job trains.
    server = _example("modelserver.yaml")
    server["spec"].update(
        baseModel=base_model,
        resources={"gpus": 0},
        extraArgs=["--max-model-len=1024"],
        storage={"uri": f"s3://{stack.bucket}/registry", **connection},
    )
    server["spec"].pop("apiKeySecret")
    stack.apply(server)

    job = _example("finetunejob.yaml")
    job["spec"].update(
        baseModel=base_model,
        dataset={"train": f"s3://{stack.bucket}/datasets/train.jsonl", "validationSplit": 0.2},
        resources={"gpus": 0},
        storage=connection,
        output={"adapterName": "support-tickets", "uri": f"s3://{stack.bucket}/registry"},
    )
    job["spec"]["hyperparameters"].update(scenario.hyperparameters)
    stack.apply(job)
    wait_for(lambda: _phase(stack, "support-tickets") in ("Succeeded", "Failed"), "the FineTuneJob to finish", 900)
    assert _phase(stack, "support-tickets") == "Succeeded", stack.status("finetunejobs", "support-tickets")

    # The adapter is in SeaweedFS, and its Adapter object is Ready with the manifest's facts.
    published = read_adapter(store, stack.namespace, "support-tickets")
    wait_for(lambda: stack.status("adapters", "support-tickets").get("phase") == "Ready", "the Adapter to be Ready")
    adapter = stack.status("adapters", "support-tickets")
    assert adapter["version"] == published.version and adapter["sha256"] == published.manifest_sha256

    # The server pod serves it, preloaded because the job named the server.
    def ready_pod() -> str | None:
        status = stack.status("modelservers", "smollm2")
        return status.get("readyReplicas", 0) >= 1 and status.get("pods") and status["pods"][0]["name"]

    pod_name = wait_for(ready_pod, "the ModelServer's pod to be ready", 600)
    pod_ip = k8s.CoreV1Api(stack.api).read_namespaced_pod(pod_name, stack.namespace).status.pod_ip
    client = openai.OpenAI(base_url=f"http://{pod_ip}:8000/v1", api_key="none", max_retries=0)
    loaded = f"{stack.namespace}/support-tickets@{published.version}"
    wait_for(lambda: loaded in {m.id for m in client.models.list().data}, "the adapter to be preloaded", 120)

    def ask(model: str) -> Any:
        return client.chat.completions.create(model=model, messages=scenario.prompt, max_tokens=32, temperature=0)

    adapter_reply, base_reply = ask("support-tickets"), ask(base_name)
    assert adapter_reply.model == loaded
    assert scenario.trained(adapter_reply.choices[0].message.content), adapter_reply.choices[0].message.content
    assert base_reply.choices[0].message.content != adapter_reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        ask("no-such-adapter")  # an error for the serving dashboard's error panels

    # A job that cannot succeed: its data does not exist.
    broken = json.loads(json.dumps(job))
    broken["metadata"]["name"] = "missing-data"
    broken["spec"]["dataset"]["train"] = f"s3://{stack.bucket}/datasets/nothing-here.jsonl"
    broken["spec"].pop("serve")
    stack.apply(broken)
    wait_for(lambda: _phase(stack, "missing-data") == "Failed", "the broken job to fail", 300)

    prometheus = stack.prometheus
    wait_for(lambda: "TuneloomFineTuneJobFailed" in prometheus.firing_alerts(), "the job-failed alert to fire", 120)

    # The loss curve of the job, as Prometheus scraped it from the training pod.
    selector = f'finetunejob="support-tickets",job_namespace="{stack.namespace}"'
    end = time.time()
    (curve,) = prometheus.query_range(f"tuneloom_trainer_train_loss{{{selector}}}", stack.started, end, 1)
    losses = [float(v) for _, v in curve["values"]]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses

    for series in ("tuneloom_operator_jobs", "tuneloom_trainer_step", "vllm:num_requests_running"):
        assert prometheus.query_range(series, stack.started, end, 1), f"{series} was never scraped"

    # Every panel of every dashboard has data over the test's time range, but for the panels of
    # preference tuning: this job is supervised (tests/test_dpo_train.py checks those gauges' values).
    empty = [
        f"{q.dashboard} / {q.panel}: {q.expr}"
        for name, dashboard in load_dashboards().items()
        for q in panel_queries(name, dashboard)
        if DPO_ONLY_SERIES not in q.expr and not prometheus.query_range(q.expr, stack.started, end, 2)
    ]
    assert not empty, "panels without data:\n" + "\n".join(empty)

    out = Path(os.environ.get("TUNELOOM_DASHBOARD_PNG_DIR") or tmp_path / "dashboards")
    for name, dashboard in load_dashboards().items():
        assert render(name, dashboard, prometheus, stack.started, end, out / f"{name}.png").stat().st_size > 10_000
