"""The operator against a real API server: kubectl applies FineTuneJobs, the operator (running
under its least-privilege ClusterRole, with a real ServiceAccount token) creates Jobs, the pod
runner runs the real trainer on the tiny model, and the adapter lands in SeaweedFS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tuneloom.net import free_port
from tuneloom.registry import checkpoint_manifest, committed_steps, read_adapter, run_prefix
from tuneloom.storage import open_store
from tuneloom_dev.cluster import service_account_kubeconfig
from tuneloom_dev.seaweedfs import SeaweedFS

from .kube import KubeCluster, install_crds, kubectl, wait_for

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "tuneloom.dev", "v1alpha1", "finetunejobs"
OPERATOR_NAMESPACE = "tuneloom-system"


@pytest.fixture(scope="module")
def crds(kube_cluster: KubeCluster, api: k8s.ApiClient) -> None:
    install_crds(kube_cluster, api, [PLURAL])


def _operator_kubeconfig(cluster: KubeCluster, api: k8s.ApiClient, dest: Path) -> Path:
    """A kubeconfig holding a token of the operator's ServiceAccount, bound to the chart's rules."""
    core, rbac = k8s.CoreV1Api(api), k8s.RbacAuthorizationV1Api(api)
    rules = yaml.safe_load((ROOT / "charts/tuneloom/files/operator-rules.yaml").read_text())
    for create, body in (
        (core.create_namespace, {"metadata": {"name": OPERATOR_NAMESPACE}}),
        (
            lambda b: core.create_namespaced_service_account(OPERATOR_NAMESPACE, b),
            {"metadata": {"name": "tuneloom-operator"}},
        ),
        (rbac.create_cluster_role, {"metadata": {"name": "tuneloom-operator"}, "rules": rules}),
        (
            rbac.create_cluster_role_binding,
            {
                "metadata": {"name": "tuneloom-operator"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "tuneloom-operator",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "tuneloom-operator", "namespace": OPERATOR_NAMESPACE}],
            },
        ),
    ):
        try:
            create(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    return service_account_kubeconfig(core, cluster.kubeconfig, OPERATOR_NAMESPACE, "tuneloom-operator", dest)


@dataclass
class Operator:
    kubeconfig: Path
    work_dir: Path
    env: dict[str, str]
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"operator-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        env = {
            **os.environ,
            **self.env,
            "KUBECONFIG": str(self.kubeconfig),
            "TUNELOOM_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "TUNELOOM_OPERATOR_HEALTH_PORT": str(self.health_port),
            "TUNELOOM_BIND_ADDRESS": "127.0.0.1",
            "TUNELOOM_RECONCILE_INTERVAL_SECONDS": "1",
            "TUNELOOM_TRAINER_METRICS_PORT": "9400",
        }
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-m", "tuneloom.cli", "operator"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
            )
        wait_for(self._ready, "the operator to be ready", timeout=60)

    def _ready(self) -> bool:
        """What the chart's readiness probe asks: /healthz answers once start-up is done."""
        assert self.process and self.process.poll() is None, self.logs()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1)
        except OSError:
            return False
        return True

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.work_dir.glob("operator-*.log")))


@pytest.fixture(scope="module")
def operator_kubeconfig(kube_cluster: KubeCluster, api: k8s.ApiClient, crds: None, tmp_path_factory) -> Path:
    return _operator_kubeconfig(kube_cluster, api, tmp_path_factory.mktemp("operator") / "kubeconfig")


@pytest.fixture(scope="module")
def operator(operator_kubeconfig: Path, pod_runner, tmp_path_factory) -> Iterator[Operator]:
    # One operator for the module, with a cap the 50-job test checks (the others run one job at a time).
    runner = Operator(
        operator_kubeconfig, tmp_path_factory.mktemp("operator-logs"), env={"TUNELOOM_MAX_RUNNING_JOBS": "3"}
    )
    runner.start()
    yield runner
    runner.stop()


@dataclass
class Bench:
    """What a FineTuneJob in these tests needs: a namespace, a bucket, a Secret and the tiny model."""

    namespace: str
    bucket_uri: str
    seaweedfs: SeaweedFS
    model: Path
    custom: k8s.CustomObjectsApi
    core: k8s.CoreV1Api
    batch: k8s.BatchV1Api

    def upload_data(self, name: str, lines: list[str]) -> str:
        store = open_store(self.bucket_uri)
        store.put_bytes(f"data/{name}", ("\n".join(lines) + "\n").encode())
        return f"{self.bucket_uri}/data/{name}"

    def manifest(self, name: str, data: str, **spec: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "baseModel": str(self.model),
            "dataset": {"train": data, "validationSplit": 0.2},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "hyperparameters": {
                "epochs": 2,
                "learningRate": 2e-2,
                "batchSize": 4,
                "maxSeqLength": 128,
                "packing": False,
                "loggingSteps": 1,
            },
            "evaluation": {"maxExamples": 0, "general": {"maxExamples": 4, "maxNewTokens": 8}},
            "checkpointing": {"everySteps": 0},
            "resources": {"gpus": 0},
            "storage": {"endpoint": self.seaweedfs.endpoint, "credentialsSecret": "s3-credentials"},
            "output": {"adapterName": name, "uri": f"{self.bucket_uri}/out"},
        }
        for key, value in spec.items():
            body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}

    def manifest_without_secret(self, name: str) -> dict[str, Any]:
        """A job the operator fails before creating anything: its credentials Secret does not exist."""
        return self.manifest(name, "s3://absent/train.jsonl", storage={"credentialsSecret": "absent"})

    def apply(self, manifest: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def wait_phase(self, name: str, *phases: str, timeout: float = 240) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None

        try:
            return wait_for(reached, f"{name} to reach {phases}", timeout=timeout)
        except AssertionError as exc:
            jobs = [j.status.to_dict() for j in self.jobs()]
            raise AssertionError(f"{exc}\nstatus: {self.status(name)}\njobs: {jobs}") from None

    def jobs(self) -> list[k8s.V1Job]:
        return self.batch.list_namespaced_job(self.namespace).items


def _dataset(count: int = 20) -> list[str]:
    return [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                    {"role": "assistant", "content": "Arr, matey!"},
                ]
            }
        )
        for i in range(count)
    ]


@pytest.fixture
def bench(api: k8s.ApiClient, namespace: str, s3_env: SeaweedFS, tiny_model_dir: Path) -> Bench:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_env.create_bucket(bucket)
    core = k8s.CoreV1Api(api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {"AWS_ACCESS_KEY_ID": s3_env.access_key, "AWS_SECRET_ACCESS_KEY": s3_env.secret_key},
        },
    )
    return Bench(
        namespace, f"s3://{bucket}", s3_env, tiny_model_dir, k8s.CustomObjectsApi(api), core, k8s.BatchV1Api(api)
    )


# -- the schema, at apply time -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"lora": {"r": -4}}, "spec.lora.r"),
        ({"method": "lorax"}, "spec.method"),
        ({"hyperparameters": {"learningRate": "fast"}}, "spec.hyperparameters.learningRate"),
        ({"output": None}, "output"),
    ],
)
def test_invalid_specs_are_rejected_by_the_api_server(
    kube_cluster: KubeCluster, crds: None, bench: Bench, patch: dict[str, Any], expected: str
) -> None:
    manifest = bench.manifest("bad", "s3://b/d.jsonl")
    for key, value in patch.items():
        if value is None:
            manifest["spec"].pop(key)
        elif isinstance(value, dict):
            manifest["spec"][key] = {**manifest["spec"].get(key, {}), **value}
        else:
            manifest["spec"][key] = value
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(kube_cluster.kubeconfig), "-n", bench.namespace, "apply", "-f", "-"],
        input=yaml.safe_dump(manifest),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    # The API server says `spec.lora.r: ...`; kubectl's own check says `"output" in ...FineTuneJob.spec`.
    assert expected in result.stderr and "spec" in result.stderr, result.stderr


def test_kubectl_explain_describes_fields(kube_cluster: KubeCluster, crds: None) -> None:
    def explained() -> str | None:
        result = subprocess.run(
            ["kubectl", "--kubeconfig", str(kube_cluster.kubeconfig), "explain", "finetunejob.spec.lora"],
            capture_output=True,
            text=True,
        )
        return result.stdout if result.returncode == 0 else None

    text = wait_for(explained, "kubectl explain to know the CRD")
    assert "LoRA rank" in text and "targetModules" in text


# -- the lifecycle --------------------------------------------------------------------------------


def test_job_runs_to_success_and_status_names_the_adapter(
    kube_cluster: KubeCluster, operator: Operator, bench: Bench
) -> None:
    data = bench.upload_data("train.jsonl", _dataset())
    bench.apply(bench.manifest("pirate", data, hyperparameters={"epochs": 6}))
    # The estimate comes with the first status, before the pod runs: 16 examples, 4 a step, 6 epochs.
    first = bench.wait_phase("pirate", "Pending", "Running", "Succeeded", "Failed")
    estimate = first["estimate"]
    assert estimate["steps"] == 24 and estimate["tokens"] > 0 and estimate["seconds"] > 0, first
    status = bench.wait_phase("pirate", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    adapter = status["adapter"]
    assert adapter["trainSeconds"] > 0 and adapter["gpuSeconds"] == 0 and adapter["estimatedSeconds"] > 0
    assert status["estimate"] == estimate
    stored = read_adapter(open_store(f"{bench.bucket_uri}/out"), bench.namespace, "pirate", adapter["version"])
    assert adapter["sha256"] == stored.manifest_sha256 and adapter["uri"] == stored.uri
    assert adapter["validationLoss"] < adapter["baseValidationLoss"]
    assert status["progress"]["percent"] == 100 and status["progress"]["step"] == 24  # 16 examples, 4 a step, 6 epochs
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    assert len(bench.jobs()) == 1 and status["jobName"] == bench.jobs()[0].metadata.name
    trainer_account = bench.core.read_namespaced_service_account("tuneloom-trainer", bench.namespace)
    assert trainer_account.automount_service_account_token is False
    bindings = k8s.RbacAuthorizationV1Api(bench.core.api_client).list_namespaced_role_binding(bench.namespace).items
    assert not [b for b in bindings if any(s.name == "tuneloom-trainer" for s in b.subjects or [])]
    kubectl(kube_cluster, "-n", bench.namespace, "wait", "--for=condition=Succeeded", "ftj/pirate", "--timeout=10s")
    table = kubectl(kube_cluster, "-n", bench.namespace, "get", "ftj")
    assert "Succeeded" in table and "100" in table and "VAL LOSS" in table
    reasons = [e.reason for e in bench.core.list_namespaced_event(bench.namespace).items]
    assert "Pending" in reasons and "Succeeded" in reasons


def test_a_job_whose_adapter_fails_its_gate_succeeds_not_promoted(operator: Operator, bench: Bench) -> None:
    data = bench.upload_data("train.jsonl", _dataset())
    # json_valid is not measured (no evaluation.metrics): the gate cannot pass, whatever training did.
    bench.apply(bench.manifest("gated", data, hyperparameters={"epochs": 1}, promotion={"require": ["json_valid"]}))
    status = bench.wait_phase("gated", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert status["adapter"]["promotion"]["promoted"] is False
    assert "general.nllShift" in status["adapter"]["metrics"] and "general.agreement" in status["adapter"]["metrics"]
    promoted = {c["type"]: c for c in status["conditions"]}["Promoted"]
    assert promoted["status"] == "False" and promoted["reason"] == "FailedGate"
    assert "not promoted: json_valid: not measured" in promoted["message"]
    # The Event follows the status patch that made the job Succeeded: wait for it.
    event = wait_for(
        lambda: next(
            (e for e in bench.core.list_namespaced_event(bench.namespace).items if e.reason == "NotPromoted"), None
        ),
        "the NotPromoted Event",
    )
    assert "json_valid: not measured" in event.message and event.type == "Warning"


def test_failing_trainer_fails_with_a_reason(operator: Operator, bench: Bench) -> None:
    data = bench.upload_data("bad.jsonl", [*_dataset(5), '{"messages": [{"role": "robot", "content": "x"}]}'])
    bench.apply(bench.manifest("broken", data))
    status = bench.wait_phase("broken", "Succeeded", "Failed")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ExitCode2"
    assert "bad.jsonl:6: messages[0].role" in status["message"]


def test_missing_secret_is_refused_before_any_job(operator: Operator, bench: Bench) -> None:
    bench.apply(bench.manifest_without_secret("nosecret"))
    status = bench.wait_phase("nosecret", "Failed")
    assert "Secret" in status["message"] and "absent" in status["message"]
    assert bench.jobs() == []


def test_cancel_deletes_the_job_and_refuses_other_changes(operator: Operator, bench: Bench) -> None:
    data = bench.upload_data("train.jsonl", _dataset(80))  # long enough to be stopped, never to finish
    bench.apply(bench.manifest("long", data, hyperparameters={"epochs": 1000}))
    bench.wait_phase("long", "Running")
    # The trainer reports over HTTP; the operator copies it into status while the job runs.
    progress = wait_for(
        lambda: (bench.status("long").get("progress") or {}).get("step") and bench.status("long")["progress"],
        "progress in status",
    )
    assert progress["totalSteps"] == 16000 and progress["epoch"] > 0 and "tokensPerSecond" in progress
    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, PLURAL, "long", {"spec": {"hyperparameters": {"epochs": 3}}}
    )
    refused = wait_for(
        lambda: next((c for c in bench.status("long")["conditions"] if c["type"] == "SpecChangeRefused"), None),
        "the spec change to be refused",
    )
    assert refused["status"] == "True" and bench.status("long")["phase"] == "Running"
    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, PLURAL, "long", {"spec": {"cancel": True}}
    )
    bench.wait_phase("long", "Cancelled")
    wait_for(lambda: not bench.jobs(), "the Job to be deleted")
    wait_for(lambda: not bench.core.list_namespaced_pod(bench.namespace).items, "the training pod to be deleted")


def test_deleting_a_running_job_removes_its_job_and_pods(operator: Operator, bench: Bench) -> None:
    data = bench.upload_data("train.jsonl", _dataset(80))  # long enough to be stopped, never to finish
    bench.apply(bench.manifest("doomed", data, hyperparameters={"epochs": 1000}))
    bench.wait_phase("doomed", "Running")
    bench.custom.delete_namespaced_custom_object(GROUP, VERSION, bench.namespace, PLURAL, "doomed")
    wait_for(
        lambda: not bench.custom.list_namespaced_custom_object(GROUP, VERSION, bench.namespace, PLURAL)["items"],
        "the FineTuneJob to go",
    )
    wait_for(lambda: not bench.jobs(), "its Job to be garbage-collected")
    wait_for(lambda: not bench.core.list_namespaced_pod(bench.namespace).items, "its pod to be deleted")


def assert_no_operator_state(body: dict[str, Any]) -> None:
    """Status is the only thing the operator writes on its objects: no finalizer, no annotations."""
    meta = body["metadata"]
    assert not meta.get("finalizers") and not meta.get("annotations"), meta


def test_a_job_carries_no_operator_state_and_deletes_without_the_operator(operator: Operator, bench: Bench) -> None:
    bench.apply(bench.manifest_without_secret("plain"))
    bench.wait_phase("plain", "Failed")
    assert_no_operator_state(bench.get("plain"))
    operator.stop()
    try:
        bench.custom.delete_namespaced_custom_object(GROUP, VERSION, bench.namespace, PLURAL, "plain")
        wait_for(
            lambda: not bench.custom.list_namespaced_custom_object(GROUP, VERSION, bench.namespace, PLURAL)["items"],
            "the FineTuneJob to go while the operator is down",
            timeout=10,
        )
    finally:
        operator.start()


def test_kopf_finalizer_left_by_an_older_operator_is_removed(operator: Operator, bench: Bench) -> None:
    manifest = bench.manifest_without_secret("upgraded")
    manifest["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]  # kopf's default marker
    bench.apply(manifest)
    bench.wait_phase("upgraded", "Failed")
    wait_for(lambda: not bench.get("upgraded")["metadata"].get("finalizers"), "kopf's finalizer to be removed")


def test_operator_restart_mid_job_keeps_one_job(operator: Operator, bench: Bench) -> None:
    data = bench.upload_data("train.jsonl", _dataset())
    bench.apply(bench.manifest("restart", data, hyperparameters={"epochs": 60}))
    bench.wait_phase("restart", "Running")
    operator.kill()
    operator.start()
    status = bench.wait_phase("restart", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert len(bench.jobs()) == 1


def test_a_deleted_pod_is_a_preemption_and_the_retry_resumes_from_its_checkpoint(
    operator: Operator, bench: Bench, pod_runner
) -> None:
    """`kubectl delete pod` while the trainer runs, checkpointing off: counted as a preemption,
    not a failure, and the Job controller's retry continues from the step that was in progress."""
    data = bench.upload_data("train.jsonl", _dataset())  # 16 training examples, 4 a step
    bench.apply(bench.manifest("evicted", data, hyperparameters={"epochs": 30}))  # 120 steps
    bench.wait_phase("evicted", "Running")
    wait_for(lambda: (bench.status("evicted").get("progress") or {}).get("step", 0) >= 2, "training under way")
    (pod,) = bench.core.list_namespaced_pod(bench.namespace).items
    bench.core.delete_namespaced_pod(pod.metadata.name, bench.namespace)  # its grace period: the spec's default

    def counted_or_done() -> dict[str, Any] | None:
        status = bench.status("evicted")
        return status if status.get("preempted") or status.get("phase") in ("Succeeded", "Failed") else None

    seen = wait_for(counted_or_done, "the preemption to be counted", timeout=300)
    assert seen["phase"] in ("Pending", "Running", "Succeeded"), seen
    status = bench.wait_phase("evicted", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded" and status["preempted"] == 1, status
    assert status["progress"]["step"] == 120
    metrics = read_adapter(open_store(f"{bench.bucket_uri}/out"), bench.namespace, "evicted").manifest.metrics
    (preempted_at,) = metrics.preemptedAtSteps
    assert 2 <= preempted_at < 120 and metrics.steps == 120
    events = [
        e
        for e in bench.core.list_namespaced_event(bench.namespace).items
        if e.reason == "Preempted" and e.involved_object.name == "evicted"
    ]
    assert len(events) == 1 and f"preempted at step {preempted_at} " in events[0].message
    (job,) = bench.jobs()
    assert not job.status.failed, "the preemption counted against backoffLimit"
    (retry,) = bench.core.list_namespaced_pod(bench.namespace).items
    assert retry.metadata.uid != pod.metadata.uid
    log = _trainer_log(bench, pod_runner, retry.metadata.name)
    assert f"resumed from the checkpoint at step {preempted_at} of 120" in log
    assert f"event training step={preempted_at} totalSteps=120" in log


def test_a_suspended_job_stops_at_a_checkpoint_and_resumes_from_it(
    operator: Operator, bench: Bench, pod_runner
) -> None:
    """spec.suspend mid-run: the Job and its pod go (the trainer saves a checkpoint on SIGTERM), the
    phase is Suspended; back to false, a new Job's trainer continues from that checkpoint's step."""
    data = bench.upload_data("train.jsonl", _dataset())  # 16 training examples, 4 a step
    bench.apply(bench.manifest("paused", data, hyperparameters={"epochs": 30}))  # 120 steps
    bench.wait_phase("paused", "Running")
    wait_for(lambda: (bench.status("paused").get("progress") or {}).get("step", 0) >= 2, "training under way")
    (pod,) = bench.core.list_namespaced_pod(bench.namespace).items
    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, PLURAL, "paused", {"spec": {"suspend": True}}
    )
    suspended = bench.wait_phase("paused", "Suspended", "Succeeded", "Failed")
    assert suspended["phase"] == "Suspended", suspended
    assert bench.jobs() == [] and not bench.core.list_namespaced_pod(bench.namespace).items
    assert "jobName" not in suspended
    assert {c["type"]: c["status"] for c in suspended["conditions"]}["Suspended"] == "True"
    reasons = [e.reason for e in bench.core.list_namespaced_event(bench.namespace).items]
    assert "Suspended" in reasons

    store = open_store(f"{bench.bucket_uri}/out")
    run = run_prefix(bench.namespace, "paused", bench.get("paused")["metadata"]["uid"])
    (stopped_at,) = committed_steps(store, run)
    assert 2 <= stopped_at < 120
    figures = checkpoint_manifest(store, run, stopped_at)["metrics"]
    assert figures["trainLoss"] > 0 and figures["tokensSeen"] > 0

    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, PLURAL, "paused", {"spec": {"suspend": False}}
    )
    status = bench.wait_phase("paused", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded" and status["progress"]["step"] == 120, status
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "False"
    assert "Resumed" in [e.reason for e in bench.core.list_namespaced_event(bench.namespace).items]
    assert status["adapter"]["tokensSeen"] > figures["tokensSeen"]
    metrics = read_adapter(store, bench.namespace, "paused").manifest.metrics
    assert metrics.steps == 120 and metrics.preemptedAtSteps == [stopped_at]
    # The trainer recorded the suspend's save as it records a preemption; the operator knows better.
    assert status.get("preempted", 0) == 0 and status["suspendSaves"] == 1, status
    assert "Preempted" not in [e.reason for e in bench.core.list_namespaced_event(bench.namespace).items]
    (resumed,) = bench.core.list_namespaced_pod(bench.namespace).items
    assert resumed.metadata.uid != pod.metadata.uid
    log = _trainer_log(bench, pod_runner, resumed.metadata.name)
    assert f"resumed from the checkpoint at step {stopped_at} of 120" in log


def test_a_multi_node_job_restarts_its_whole_group_when_a_rank_fails(
    operator: Operator, bench: Bench, pod_runner
) -> None:
    """Two nodes: a headless Service and the group's Jobs (one Job per rank on this 1.20 cluster,
    one Indexed Job on 1.24+), each pod under torchrun with c10d rendezvous at rank 0's DNS name.
    The test deletes rank 0's pod (not counted), then kills rank 1 twice, with backoffLimit 1.
    Rank 0 is frozen (SIGSTOP) before each kill: its own failure, as the collective breaks,
    would otherwise race rank 1's to the operator."""
    if pod_runner is None:
        pytest.skip("stops and kills a rank's processes through the local pod runner")
    data = bench.upload_data("train.jsonl", _dataset())
    manifest = bench.manifest(
        "gang",
        data,
        resources={"nodes": 2},
        hyperparameters={"epochs": 1000},
        scheduling={"backoffLimit": 1, "queueName": "team-queue"},
        checkpointing={"gracePeriodSeconds": 5},
    )
    bench.apply(manifest)
    version = k8s.VersionApi(bench.core.api_client).get_code()
    indexed = (int(version.major), int(version.minor.rstrip("+"))) >= (1, 24)

    def all_running() -> dict[str, Any] | None:
        status = bench.status("gang")
        nodes = status.get("nodes") or []
        return status if len(nodes) == 2 and all(n["phase"] == "Running" for n in nodes) else None

    first = wait_for(all_running, "both nodes to run")
    assert first["phase"] == "Running" and first["jobName"] == "gang-train", first
    service = bench.core.read_namespaced_service("gang-nodes", bench.namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    jobs = sorted(bench.jobs(), key=lambda j: j.metadata.name)
    assert [j.metadata.name for j in jobs] == (["gang-train"] if indexed else ["gang-train-0", "gang-train-1"])
    for job in jobs:
        assert job.spec.backoff_limit == 0 and job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-queue"
        command = job.spec.template.spec.containers[0].command
        assert command[:5] == [
            "torchrun",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=gang-train-0.gang-nodes.{bench.namespace}.svc:29400",
        ]
        assert f"--rdzv-id={bench.get('gang')['metadata']['uid']}" in command

    def regrouped(before: dict[str, Any], restarts: int) -> dict[str, Any]:
        """The status once a new group, none of whose pods ran before, runs after `restarts` counted ones."""
        old = {n["pod"] for n in before["nodes"]}

        def check() -> dict[str, Any] | None:
            status = bench.status("gang")
            nodes = status.get("nodes") or []
            fresh = len(nodes) == 2 and all(n["phase"] == "Running" and n["pod"] not in old for n in nodes)
            return status if status.get("groupRestarts", 0) == restarts and fresh else None

        return wait_for(check, "the group to be restarted and running again", timeout=180)

    def restart_events() -> list[str]:
        items = bench.core.list_namespaced_event(bench.namespace).items
        # Each message starts "rank R failed": rank 0's restart came first, then rank 1's.
        return sorted(e.message for e in items if e.reason == "GroupRestart")

    def kill_rank_1(status: dict[str, Any]) -> None:
        for rank, sent in ((0, signal.SIGSTOP), (1, signal.SIGKILL)):
            (pid,) = pod_runner.pids(bench.namespace, status["nodes"][rank]["pod"]).values()
            os.killpg(pid, sent)  # torchrun and its worker: the container's process group

    # `kubectl delete pod` of one rank: a preemption, which restarts the group without counting.
    bench.core.delete_namespaced_pod(first["nodes"][0]["pod"], bench.namespace)
    second = regrouped(first, restarts=0)
    assert second["failedRank"] == 0 and second["phase"] == "Running", second
    (deleted,) = restart_events()
    assert deleted.startswith(f"rank 0 failed (PodDeleted): pod {first['nodes'][0]['pod']} was deleted"), deleted
    assert "not counted against spec.scheduling.backoffLimit" in deleted

    kill_rank_1(second)
    third = regrouped(second, restarts=1)
    assert third["failedRank"] == 1 and third["phase"] == "Running", third
    _, crashed = restart_events()
    assert (
        crashed.startswith("rank 1 failed (ExitCode137)") and "restart 1 of spec.scheduling.backoffLimit 1" in crashed
    )
    kill_rank_1(third)
    failed = bench.wait_phase("gang", "Failed", "Succeeded", timeout=120)
    assert failed["phase"] == "Failed" and failed["failedRank"] == 1 and failed["groupRestarts"] == 1, failed
    assert failed["message"].startswith("rank 1 failed (ExitCode137): trainer exited with code 137"), failed
    rank_1 = failed["nodes"][1]
    assert (rank_1["rank"], rank_1["phase"], rank_1["reason"]) == (1, "Failed", "ExitCode137")
    wait_for(lambda: not bench.core.list_namespaced_pod(bench.namespace).items, "the other rank to be stopped")


def _trainer_log(bench: Bench, pod_runner, pod: str) -> str:
    if pod_runner is None:
        return bench.core.read_namespaced_pod_log(pod, bench.namespace)
    return pod_runner.log_path(bench.namespace, pod, "trainer").read_text()


def test_a_two_node_job_trains_and_a_deleted_rank_pod_resumes_from_its_checkpoint(
    operator: Operator, bench: Bench, pod_runner
) -> None:
    """A real 2-node run (one process per node, gloo): deleting rank 1's pod mid-run restarts
    the group without counting, every rank resumes from the checkpoint, and the job succeeds."""
    data = bench.upload_data("train.jsonl", _dataset())  # 16 training examples, 4 a micro-batch
    # backoffLimit: room for start-up rendezvous failures, which this host's load causes now and then.
    spec = {"resources": {"nodes": 2}, "hyperparameters": {"epochs": 30}, "scheduling": {"backoffLimit": 6}}
    bench.apply(bench.manifest("duo", data, **spec))  # 60 steps
    bench.wait_phase("duo", "Running")
    wait_for(lambda: (bench.status("duo").get("progress") or {}).get("step", 0) >= 2, "training under way", timeout=300)
    status = bench.status("duo")
    # A rendezvous that fails as the nodes start is a counted restart of its own (seen under load):
    # what this test asks is that the deleted pod's is not counted.
    restarts_before = status.get("groupRestarts", 0)
    bench.core.delete_namespaced_pod(status["nodes"][1]["pod"], bench.namespace)
    done = bench.wait_phase("duo", "Succeeded", "Failed", timeout=400)
    assert done["phase"] == "Succeeded", done
    assert done["failedRank"] == 1 and done.get("groupRestarts", 0) == restarts_before, done
    assert done["progress"]["step"] == 60, done
    metrics = read_adapter(open_store(f"{bench.bucket_uri}/out"), bench.namespace, "duo").manifest.metrics
    (preempted_at,) = metrics.preemptedAtSteps
    assert 2 <= preempted_at < 60 and metrics.steps == 60 and done["preempted"] == 1
    (restart,) = [
        e.message for e in bench.core.list_namespaced_event(bench.namespace).items if e.reason == "GroupRestart"
    ]
    assert restart.startswith(f"rank 1 failed (PodDeleted): pod {status['nodes'][1]['pod']} was deleted"), restart
    # Rank 0 of the process group (on either node: c10d decides) logs; the new group resumed there.
    logs = "".join(_trainer_log(bench, pod_runner, node["pod"]) for node in done["nodes"])
    assert f"resumed from the checkpoint at step {preempted_at} of 60" in logs


def test_a_group_restart_cut_short_by_an_operator_stop_is_finished(crds: None, bench: Bench) -> None:
    """The operator marks the headless Service, deletes the group's Jobs and stops before its status
    patch says "restarting": the next pass (a new operator) recreates the group, not "JobDeleted"."""
    from tuneloom.api import FineTuneJob
    from tuneloom.operator import multinode
    from tuneloom.operator.common import parse_object
    from tuneloom.operator.config import OperatorConfig
    from tuneloom.operator.metrics import OperatorMetrics
    from tuneloom.operator.reconciler import FineTuneJobReconciler

    data = bench.upload_data("bad.jsonl", ['{"oops": 1}'])  # recreated trainers fail fast
    bench.apply(bench.manifest("cut", data, resources={"nodes": 2}))
    job = parse_object(FineTuneJob, bench.get("cut"))
    service = multinode.build_headless_service(job)
    message = "rank 1 failed (PodDeleted): pod cut-1 was deleted; restarting all 2 nodes (not counted)"
    service["metadata"]["annotations"] = {multinode.RESTART_ANNOTATION: message}
    bench.core.create_namespaced_service(bench.namespace, service)
    # What the status said before the restart began: running, with the group's Jobs (now gone).
    bench.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, bench.namespace, PLURAL, "cut", {"status": {"phase": "Running", "jobName": "cut"}}
    )
    reconciler = FineTuneJobReconciler(OperatorConfig(), bench.core.api_client, OperatorMetrics(), adapters=None)
    reconciler.reconcile(bench.get("cut"))

    status = bench.status("cut")
    assert status["phase"] == "Pending", status
    restart = next(c for c in status["conditions"] if c["type"] == "GroupRestart")
    assert restart["status"] == "False" and restart["reason"] == "GroupRecreated", restart
    names = sorted(j.metadata.name for j in bench.jobs() if j.metadata.labels.get("tuneloom.dev/finetunejob") == "cut")
    assert names == [multinode.rank_job_name("cut", rank) for rank in (0, 1)]
    stored = bench.core.read_namespaced_service(multinode.service_name("cut"), bench.namespace)
    assert not (stored.metadata.annotations or {}).get(multinode.RESTART_ANNOTATION), "the marker outlived the restart"


def test_a_suspended_two_node_job_stops_its_group_and_resumes_it(operator: Operator, bench: Bench, pod_runner) -> None:
    """spec.suspend on a 2-node job: every rank's Job goes, the phase is Suspended; back to false,
    the whole group is created again and resumes from the checkpoint."""
    data = bench.upload_data("train.jsonl", _dataset())
    spec = {"resources": {"nodes": 2}, "hyperparameters": {"epochs": 30}, "scheduling": {"backoffLimit": 6}}
    bench.apply(bench.manifest("duet", data, **spec))  # 60 steps; backoffLimit as in the test above
    bench.wait_phase("duet", "Running")
    wait_for(
        lambda: (bench.status("duet").get("progress") or {}).get("step", 0) >= 2, "training under way", timeout=300
    )
    restarts_before = bench.status("duet").get("groupRestarts", 0)  # a failed start-up rendezvous counts one
    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, PLURAL, "duet", {"spec": {"suspend": True}}
    )
    suspended = bench.wait_phase("duet", "Suspended", "Succeeded", "Failed", timeout=300)
    assert suspended["phase"] == "Suspended" and not suspended.get("nodes"), suspended
    assert bench.jobs() == [] and not bench.core.list_namespaced_pod(bench.namespace).items
    run = run_prefix(bench.namespace, "duet", bench.get("duet")["metadata"]["uid"])
    (stopped_at,) = committed_steps(open_store(f"{bench.bucket_uri}/out"), run)

    bench.custom.patch_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, PLURAL, "duet", {"spec": {"suspend": False}}
    )
    done = bench.wait_phase("duet", "Succeeded", "Failed", timeout=400)
    assert done["phase"] == "Succeeded" and done["progress"]["step"] == 60, done
    assert done.get("groupRestarts", 0) == restarts_before, "suspending and resuming counted as a failure"
    assert done.get("preempted", 0) == 0 and done["suspendSaves"] >= 1, done
    logs = "".join(_trainer_log(bench, pod_runner, node["pod"]) for node in done["nodes"])
    assert f"resumed from the checkpoint at step {stopped_at} of 60" in logs


def test_metrics_are_served_and_lint_clean(operator: Operator) -> None:
    import shutil

    text = operator.metrics()
    for series in (
        'tuneloom_operator_jobs{phase="Succeeded"}',
        "tuneloom_operator_phase_transitions_total",
        "tuneloom_operator_reconcile_duration_seconds_bucket",
        "tuneloom_operator_reconcile_errors_total",
    ):
        assert series in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs Debian's prometheus package"
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_no_secret_value_leaks(api: k8s.ApiClient, operator: Operator, bench: Bench, s3_env: SeaweedFS) -> None:
    data = bench.upload_data("bad.jsonl", ['{"oops": 1}'])
    bench.apply(bench.manifest("leak", data))
    bench.wait_phase("leak", "Failed")
    secret = s3_env.secret_key
    written = [
        bench.get("leak"),
        *[api.sanitize_for_serialization(j) for j in bench.jobs()],
        *[api.sanitize_for_serialization(e) for e in bench.core.list_namespaced_event(bench.namespace).items],
    ]
    assert secret not in json.dumps(written)
    assert secret not in operator.logs()


def test_operator_rules_have_no_wildcards() -> None:
    rules = yaml.safe_load((ROOT / "charts/tuneloom/files/operator-rules.yaml").read_text())
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
    verbs = {verb for rule in rules for verb in rule["verbs"]}
    assert not verbs & {"escalate", "bind", "impersonate", "deletecollection"}


def test_fifty_jobs_respect_the_cap_without_duplicates(operator: Operator, bench: Bench) -> None:
    import threading

    from kubernetes import watch

    created: list[str] = []  # FineTuneJob of each Job, in the order the API server saw them created
    watcher = watch.Watch()

    stopped = threading.Event()

    def record() -> None:
        try:
            for event in watcher.stream(bench.batch.list_namespaced_job, bench.namespace, timeout_seconds=900):
                if event["type"] == "ADDED":
                    created.append(event["object"].metadata.labels["tuneloom.dev/finetunejob"])
        except urllib3.exceptions.ProtocolError:
            if not stopped.is_set():  # once stopped, the stream may end mid-read at teardown
                raise

    threading.Thread(target=record, daemon=True).start()
    data = bench.upload_data("bad.jsonl", ['{"oops": 1}'])  # each trainer starts for real, then fails fast
    names = [f"many-{i:02d}" for i in range(50)]
    for name in names:
        bench.apply(bench.manifest(name, data))
    most_active = 0
    deadline = time.monotonic() + 900
    while True:
        active = [j for j in bench.jobs() if not any(c.status == "True" for c in (j.status.conditions or []))]
        most_active = max(most_active, len(active))
        phases = [bench.status(name).get("phase") for name in names]
        if all(phase in ("Failed", "Succeeded") for phase in phases):
            break
        assert time.monotonic() < deadline, phases
        time.sleep(0.2)
    stopped.set()
    watcher.stop()
    assert most_active <= 3
    assert sorted(created) == names, "a FineTuneJob got no Job, or more than one"
    assert created == names, "Jobs were not started first in, first out"
    assert all("ExitCode2" in str(bench.status(name)["conditions"]) for name in names)
