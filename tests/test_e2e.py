"""The whole loop on the local stack, as a user runs it on a cluster (`make e2e`):

Helm installs the chart; `kubectl apply` sends a ModelServer and a FineTuneJob (the files in
examples/, pointed at this machine); the operator runs the trainer and a vLLM server as pods
through the pod runner; the adapter lands in SeaweedFS, its Adapter object goes Ready, and the
OpenAI SDK gets an answer in the trained style from the server pod. Prometheus, configured with
the chart's scrape rules and alerts, watches all of it: every dashboard panel must show data, and
a failing job must fire its alert.

The chart also deploys the OpenAI-compatible API (`api.enabled`), run as a pod like the operator:
the OpenAI SDK uploads a file and creates a job through it, the operator runs the trainer, and the
fine-tuned model answers through the API, which routes it to the ModelServer's Service (the pod
runner resolves Service names in its pods).

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

from tuneloom.api import HyperparametersSpec
from tuneloom.net import free_ports
from tuneloom.openai_api.keys import key_hash
from tuneloom.registry import read_adapter
from tuneloom.storage import S3Connection, open_store
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
API_KEY = "tlk-e2e-team-not-a-secret"
API_KEYS_SECRET = "tuneloom-api-keys"
# examples/modelserver.yaml's Secret: the key its server requires, which the API holds too.
SERVER_KEY_SECRET, SERVER_KEY = "tuneloom-api-key", "e2e-server-key-not-a-secret"


@dataclass(frozen=True)
class Scenario:
    """What the job learns, and how to tell that the served adapter learned it."""

    model_dir: Path
    dataset: Path
    prompt: list[dict[str, str]]
    trained: Any  # answer -> bool
    hyperparameters: dict[str, Any]


@pytest.fixture(scope="module")
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    work = tmp_path_factory.mktemp("e2e-data")
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


def _hyperparameters(scenario: Scenario) -> dict[str, Any]:
    """The FineTuneJob's hyperparameters: the example's, with the scenario's changes."""
    return {**_example("finetunejob.yaml")["spec"]["hyperparameters"], **scenario.hyperparameters}


@dataclass
class Stack:
    cluster: KubeCluster
    api: k8s.ApiClient
    runner: PodRunner
    namespace: str
    bucket: str
    prometheus: Prometheus
    started: float
    openai_base_url: str  # the API pod's, from the chart

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
    scenario: Scenario,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    if pod_runner is None:
        pytest.skip("an external cluster would pull images this checkout does not build")
    work = tmp_path_factory.mktemp("e2e")
    release, system_ns = "tuneloom", f"tuneloom-system-{uuid.uuid4().hex[:6]}"
    namespace, bucket = f"team-{uuid.uuid4().hex[:6]}", f"e2e-{uuid.uuid4().hex[:8]}"
    seaweedfs.create_bucket(bucket)
    core = k8s.CoreV1Api(api)
    credentials = {k: v for k, v in seaweedfs.client_env().items() if k.startswith("AWS_") and "KEY" in k}
    for name in (namespace, system_ns):
        core.create_namespace({"metadata": {"name": name}})
        core.create_namespaced_secret(name, {"metadata": {"name": "s3-credentials"}, "stringData": credentials})
        server_key = {"metadata": {"name": SERVER_KEY_SECRET}, "stringData": {"api-key": SERVER_KEY}}
        core.create_namespaced_secret(name, server_key)
    # The API's keys: one key, whose project is the team's namespace.
    keys = {
        "metadata": {"name": API_KEYS_SECRET},
        "stringData": {"keys.json": json.dumps({namespace: [key_hash(API_KEY)]})},
    }
    core.create_namespaced_secret(system_ns, keys)
    helm = ensure_helm()
    metrics_port, health_port, api_port = free_ports(3)
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
        # The API, with the store of the registry the ModelServer serves from, so its jobs' adapters are served.
        "api.enabled": "true",
        "api.port": api_port,
        "api.bindAddress": "$(TUNELOOM_POD_IP)",
        "api.store": f"s3://{bucket}/registry",
        "api.keysSecret": API_KEYS_SECRET,
        "api.jobStorageSecret": "s3-credentials",
        "api.modelServerKeySecret.name": SERVER_KEY_SECRET,
        "api.maxSeqLength": _hyperparameters(scenario)["maxSeqLength"],
        "objectStorage.endpoint": seaweedfs.endpoint,
        "objectStorage.credentialsSecret": "s3-credentials",
    }
    flags = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    _helm(helm, kube_cluster, work, "install", release, str(CHART), "-n", system_ns, "--create-namespace", *flags)
    targets = work / "targets.json"
    scrape = loopback_scrape_configs(CHART / "files" / "prometheus-scrape.yaml", targets)
    try:
        api_ip = wait_for(lambda: _ready_pod_ip(core, system_ns, "app.kubernetes.io/component=api"), "the API pod")
        with (
            PodTargets(core, targets),
            Prometheus(work / "prometheus", scrape, [CHART / "files" / "alerts.yaml"]) as prometheus,
        ):
            openai_base_url = f"http://{api_ip}:{api_port}/v1"
            yield Stack(kube_cluster, api, pod_runner, namespace, bucket, prometheus, time.time(), openai_base_url)
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


def _ready_pod_ip(core: k8s.CoreV1Api, namespace: str, selector: str) -> str | None:
    for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
        if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
            return pod.status.pod_ip
    return None


@dataclass(frozen=True)
class BaseModel:
    """The base model in object storage, and the ModelServer that serves it and its adapters."""

    uri: str
    served_name: str


@pytest.fixture(scope="module")
def base_model(stack: Stack, seaweedfs: SeaweedFS, scenario: Scenario) -> BaseModel:
    # Pods see no host paths on a cluster: the base model comes from object storage, as it would there.
    uri = f"s3://{stack.bucket}/models/{scenario.model_dir.name}"
    s3 = S3Connection(seaweedfs.endpoint, "us-east-1", seaweedfs.access_key, seaweedfs.secret_key)
    models = open_store(uri, connection=s3)
    for path in sorted(p for p in scenario.model_dir.iterdir() if p.is_file()):
        models.put_file(path.name, path)
    # The server first: vLLM starts while the job trains.
    server = _example("modelserver.yaml")
    server["spec"].update(
        baseModel=uri,
        resources={"gpus": 0},
        extraArgs=["--max-model-len=1024"],
        storage={"uri": f"s3://{stack.bucket}/registry", **_connection(seaweedfs)},
    )
    stack.apply(server)
    return BaseModel(uri, scenario.model_dir.name)


def _connection(seaweedfs: SeaweedFS) -> dict[str, str]:
    return {"endpoint": seaweedfs.endpoint, "credentialsSecret": "s3-credentials"}


def _phase(stack: Stack, name: str) -> str | None:
    return stack.status("finetunejobs", name).get("phase")


def test_fine_tune_serve_and_watch_the_whole_loop(
    stack: Stack, s3_env: SeaweedFS, scenario: Scenario, base_model: BaseModel, tmp_path: Path
) -> None:
    store = open_store(f"s3://{stack.bucket}/registry")
    open_store(f"s3://{stack.bucket}/datasets").put_file("train.jsonl", scenario.dataset)
    base_name = base_model.served_name
    job = _example("finetunejob.yaml")
    job["spec"].update(
        baseModel=base_model.uri,
        dataset={"train": f"s3://{stack.bucket}/datasets/train.jsonl", "validationSplit": 0.2},
        resources={"gpus": 0},
        storage=_connection(s3_env),
        output={"adapterName": "support-tickets", "uri": f"s3://{stack.bucket}/registry"},
        hyperparameters=_hyperparameters(scenario),
    )
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
    client = openai.OpenAI(base_url=f"http://{pod_ip}:8000/v1", api_key=SERVER_KEY, max_retries=0)
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


def test_the_openai_sdk_flow_through_the_api_the_chart_deployed(
    stack: Stack, scenario: Scenario, base_model: BaseModel
) -> None:
    """The OpenAI SDK's fine-tuning flow against the API pod: the operator runs the job as a
    FineTuneJob, the trainer pod trains it, and the API routes completions to the ModelServer."""
    client = openai.OpenAI(base_url=stack.openai_base_url, api_key=API_KEY, max_retries=0, timeout=120)
    file = client.files.create(file=scenario.dataset.open("rb"), purpose="fine-tune")
    chosen = _hyperparameters(scenario)
    job = client.fine_tuning.jobs.create(
        training_file=file.id,
        model=base_model.uri,
        suffix="pirate",
        hyperparameters={
            "n_epochs": chosen["epochs"],
            "batch_size": chosen["batchSize"],
            "learning_rate_multiplier": chosen["learningRate"]
            / HyperparametersSpec.model_fields["learningRate"].default,
        },
    )
    assert (
        stack.get("finetunejobs", job.id)["spec"]["baseModel"] == base_model.uri
    )  # a FineTuneJob in the key's namespace

    def finished() -> Any:
        current = client.fine_tuning.jobs.retrieve(job.id)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    job = wait_for(finished, "the API's job to finish", 900)
    assert job.status == "succeeded", (job.error, stack.status("finetunejobs", job.id))
    assert job.fine_tuned_model == f"ft:{base_model.served_name}:{stack.namespace}:pirate:{job.id}"

    # The operator's Events on the FineTuneJob, as the job's events, newest first.
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    reasons = [(event.data or {}).get("reason") for event in events]
    assert {"Running", "Succeeded"} <= set(reasons), [e.message for e in events]
    assert reasons.index("Succeeded") < reasons.index("Running")
    assert events[-1].message == f"Created fine-tuning job: {job.id}"

    # The trainer's committed checkpoints in the store, servable ids included.
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for c in checkpoints)
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)
    assert checkpoints[0].metrics.train_loss is not None

    models = {m.id: m.owned_by for m in client.models.list()}
    assert models[job.fine_tuned_model] == stack.namespace and base_model.served_name in models

    # Through the API to the ModelServer's Service: the adapter answers in the trained style.
    def ask(model: str) -> Any:
        return client.chat.completions.create(model=model, messages=scenario.prompt, max_tokens=32, temperature=0)

    tuned, base = ask(job.fine_tuned_model), ask(base_model.served_name)
    assert tuned.model == job.fine_tuned_model
    assert scenario.trained(tuned.choices[0].message.content), tuned.choices[0].message.content
    assert base.choices[0].message.content != tuned.choices[0].message.content
