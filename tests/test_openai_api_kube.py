"""`tuneloom api --kubernetes` on the local cluster, with the official OpenAI SDK: a real API process
acting as the ServiceAccount the chart renders (its ClusterRole and keys Role applied from `helm
template`), SeaweedFS as the store, keys in a Secret. No operator runs: the tests write a
FineTuneJob's status and Events as the operator would, and read them back through the API."""

from __future__ import annotations

import json
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

from tuneloom.openai_api.keys import key_hash
from tuneloom.operator.common import post_event
from tuneloom.registry import ADAPTER_FILES, LOSS_HISTORY_FILE, publish_adapter, run_prefix
from tuneloom.storage import S3Connection, open_store
from tuneloom_dev.apiprocess import ApiProcess
from tuneloom_dev.cluster import service_account_kubeconfig
from tuneloom_dev.helm import ensure_helm
from tuneloom_dev.seaweedfs import SeaweedFS

from .kube import KubeCluster, install_crds, kubectl
from .test_chart import by_kind, run_helm

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, JOBS = "tuneloom.dev", "v1alpha1", "finetunejobs"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY_A, KEY_B = "tlk-test-project-a-not-a-secret", "tlk-test-project-b-not-a-secret"
STORAGE_SECRET = "store-keys"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@dataclass
class KubeApi:
    process: ApiProcess
    custom: k8s.CustomObjectsApi
    core: k8s.CoreV1Api
    project_a: str
    project_b: str
    store: str
    args: list[str]
    env: dict[str, str]
    work: Path
    s3: S3Connection

    def client(self, key: str = KEY_A) -> openai.OpenAI:
        return self.process.client(key, timeout=60)

    def job_object(self, job_id: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.project_a, JOBS, job_id)

    def set_status(self, job_id: str, status: dict[str, Any]) -> None:
        """What the operator would write."""
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.project_a, JOBS, job_id, {"status": status}
        )

    def restart(self) -> None:
        self.process.kill()
        self.process = ApiProcess(self.args, self.env, self.work / "api-2.log").start()


def _data(path: Path, count: int = 20) -> Path:
    lines = [
        {"messages": [{"role": "user", "content": f"Ticket {i}"}, {"role": "assistant", "content": "Arr!"}]}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _chart_rbac(release: str, namespace: str, keys_secret: str, store: str) -> list[dict[str, Any]]:
    settings = ["--set", "api.enabled=true", "--set", f"api.store={store}", "--set", f"api.keysSecret={keys_secret}"]
    out = run_helm(ensure_helm(), "template", release, str(ROOT / "charts" / "tuneloom"), "-n", namespace, *settings)
    rendered = [doc for doc in yaml.safe_load_all(out) if doc]
    return [
        doc for doc in rendered if doc["kind"] in RBAC_KINDS and doc["metadata"]["name"].endswith(("-api", "-keys"))
    ]


@pytest.fixture(scope="module")
def kube_api(
    kube_cluster: KubeCluster, api: k8s.ApiClient, seaweedfs: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KubeApi]:
    install_crds(kube_cluster, api, [JOBS, "modelservers"])
    core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)
    tag = uuid.uuid4().hex[:8]
    release_ns, project_a, project_b = f"tla-{tag}", f"pa-{tag}", f"pb-{tag}"
    for name in (release_ns, project_a, project_b):
        core.create_namespace({"metadata": {"name": name}})
    keys = {project_a: [key_hash(KEY_A)], project_b: [key_hash(KEY_B)]}
    secret = {"metadata": {"name": "api-keys"}, "stringData": {"keys.json": json.dumps(keys)}}
    core.create_namespaced_secret(release_ns, secret)
    bucket = f"kapi-{tag}"
    seaweedfs.create_bucket(bucket)
    store = f"s3://{bucket}/root"
    rbac = _chart_rbac(f"tl{tag}", release_ns, "api-keys", store)
    kubectl(kube_cluster, "apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    (account,) = by_kind(rbac, "ServiceAccount")
    work = tmp_path_factory.mktemp("kube-api")
    kubeconfig = service_account_kubeconfig(
        core, kube_cluster.kubeconfig, release_ns, account["metadata"]["name"], work / "kubeconfig"
    )
    args = ["--kubernetes", "--store", store, "--keys-secret", f"{release_ns}/api-keys"]
    args += ["--state-dir", str(work / "state"), "--max-seq-length", "128"]
    args += ["--job-s3-endpoint", seaweedfs.endpoint, "--job-storage-secret", STORAGE_SECRET]
    env = {**seaweedfs.client_env(), "KUBECONFIG": str(kubeconfig)}
    process = ApiProcess(args, env, work / "api.log").start()
    s3 = S3Connection(seaweedfs.endpoint, "us-east-1", seaweedfs.access_key, seaweedfs.secret_key)
    bench = KubeApi(process, custom, core, project_a, project_b, store, args, env, work, s3)
    try:
        yield bench
    finally:
        bench.process.stop()
        for doc in by_kind(rbac, "ClusterRole") + by_kind(rbac, "ClusterRoleBinding"):
            kubectl(kube_cluster, "delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found")
        for name in (release_ns, project_a, project_b):
            core.delete_namespace(name)
        seaweedfs.delete_bucket(bucket)


def test_a_job_is_a_finetunejob_in_the_keys_namespace(kube_api: KubeApi, tmp_path: Path) -> None:
    client = kube_api.client()
    data = _data(tmp_path / "train.jsonl")
    file = client.files.create(file=open(data, "rb"), purpose="fine-tune")  # noqa: SIM115 (as users write it)
    job = client.fine_tuning.jobs.create(
        training_file=file.id,
        model=BASE,
        suffix="pirate",
        hyperparameters={"n_epochs": 2},
        metadata={"team": "search"},
        integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
    )
    assert job.status == "validating_files" and job.fine_tuned_model is None

    body = kube_api.job_object(job.id)
    assert body["metadata"]["labels"]["tuneloom.dev/openai-job-id"] == job.id
    assert json.loads(body["metadata"]["annotations"]["tuneloom.dev/openai-metadata"]) == {"team": "search"}
    spec = body["spec"]
    assert spec["baseModel"] == BASE and spec["method"] == "lora" and spec["cancel"] is False
    train = f"{kube_api.store}/api/files/{kube_api.project_a}/{file.id}"
    assert {"train": train, "validationSplit": 0.1}.items() <= spec["dataset"].items()
    assert spec["hyperparameters"]["epochs"] == 2 and spec["hyperparameters"]["maxSeqLength"] == 128
    assert spec["output"] == {"adapterName": f"pirate-{job.id}", "uri": kube_api.store}
    assert spec["storage"]["credentialsSecret"] == STORAGE_SECRET and spec["storage"]["endpoint"]

    # The operator accepts it and trains.
    kube_api.set_status(
        job.id,
        {
            "phase": "Running",
            "message": "Training: step 3 of 10",
            "progress": {"step": 3, "totalSteps": 10, "trainLoss": 1.25, "etaSeconds": 60},
        },
    )
    post_event(kube_api.core, body, "Normal", "Started", "Training pod started")
    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.estimated_finish > time.time()
    events = client.fine_tuning.jobs.list_events(job.id).data  # newest first
    messages = [e.message for e in events]
    assert messages[-1] == f"Created fine-tuning job: {job.id}" and "Training pod started" in messages
    assert any("wandb" in m and "ignored" in m for m in messages)
    (metrics,) = [e for e in events if e.type == "metrics"]
    assert metrics.data["train_loss"] == 1.25 and metrics.data["step"] == 3
    first = client.fine_tuning.jobs.list_events(job.id, limit=1)
    assert first.has_more and client.fine_tuning.jobs.list_events(job.id, after=first.data[0].id).data == events[1:]

    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search"})] == [job.id]
    assert not client.fine_tuning.jobs.list(metadata={"team": "other"}).data

    # Another project sees none of it: 404, never 403.
    other = kube_api.client(KEY_B)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(file.id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.cancel(job.id)
    assert not other.fine_tuning.jobs.list().data and not other.files.list().data
    with pytest.raises(openai.AuthenticationError):
        kube_api.client("tlk-wrong").fine_tuning.jobs.list()

    # Pause and resume are spec.suspend; the operator stops the pods, then says Suspended.
    pausing = client.fine_tuning.jobs.pause(job.id)
    assert kube_api.job_object(job.id)["spec"]["suspend"] is True and pausing.status == "running"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(job.id)
    kube_api.set_status(job.id, {"phase": "Suspended", "message": "spec.suspend is true"})
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.resume(job.id)
    assert client.fine_tuning.jobs.resume(job.id).status == "paused"
    assert kube_api.job_object(job.id)["spec"]["suspend"] is False
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)
    kube_api.set_status(job.id, {"phase": "Running", "message": "Training: step 4 of 10"})

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert kube_api.job_object(job.id)["spec"]["cancel"] is True and cancelled.status == "running"
    kube_api.set_status(job.id, {"phase": "Cancelled", "message": "Cancelled: spec.cancel is true"})
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):  # only a succeeded job has a result file
        client.files.content(f"file-results-{job.id}")
    code, metrics_text = kube_api.process.get("/metrics")  # counted from the cluster's FineTuneJobs
    assert code == 200 and 'tuneloom_api_jobs{status="cancelled"} 1.0' in metrics_text

    # The state is on the cluster and in the store: a new API process lists the same.
    kube_api.restart()
    client = kube_api.client()
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert [f.id for f in client.files.list()] == [file.id]


def test_a_succeeded_job_is_a_model_routed_to_its_modelserver(kube_api: KubeApi, tmp_path: Path) -> None:
    client = kube_api.client()
    file = client.files.create(file=_data(tmp_path / "train.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=file.id, model=BASE, suffix="ok")
    # What the trainer publishes, with the loss history the result file is made from.
    store = open_store(kube_api.store, connection=kube_api.s3)
    history = {
        "train": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.25}],
        "validation": [{"epoch": 1, "step": 2, "trainLoss": 1.9, "validationLoss": 1.5, "tokenAccuracy": 0.25}],
    }
    (tmp_path / LOSS_HISTORY_FILE).write_text(json.dumps(history))
    for name in ADAPTER_FILES:
        (tmp_path / name).write_bytes(b"{}")
    files = {name: tmp_path / name for name in (*ADAPTER_FILES, LOSS_HISTORY_FILE)}
    final = {"steps": 10, "tokensSeen": 640, "adapter": {"validationLoss": 0.5, "tokenAccuracy": 0.9}}
    final["history"] = [{"epoch": 1, "step": 10, "trainLoss": 0.625, "validationLoss": 0.5, "tokenAccuracy": 0.9}]
    version = publish_adapter(store, kube_api.project_a, f"ok-{job.id}", files, {"metrics": final})
    adapter = {"name": version.name, "version": version.version, "uri": version.uri, "sha256": version.manifest_sha256}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"phase": "Succeeded", "message": "Done", "adapter": {**adapter, "tokensSeen": 640}}
    kube_api.set_status(job.id, status | {"completionTime": stamp})
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.finished_at and done.trained_tokens == 640
    (result,) = done.result_files
    # Listed before anyone read it, as OpenAI lists a job's result files.
    assert result in {f.id for f in client.files.list()}
    assert client.files.content(result).text.splitlines() == [
        "step,train_loss,valid_loss,valid_mean_token_accuracy,learning_rate",
        "1,2.5,,,",
        "2,1.25,1.5,0.25,",
    ]
    assert client.files.retrieve(result).purpose == "fine-tune-results"
    assert result in {f.id for f in client.files.list(purpose="fine-tune-results")}
    with pytest.raises(openai.NotFoundError):  # the job is project A's
        kube_api.client(KEY_B).files.content(result)
    assert done.fine_tuned_model == f"ft:{BASE.rsplit('/', 1)[-1]}:{kube_api.project_a}:ok:{job.id}"
    models = {m.id: m.owned_by for m in client.models.list()}
    assert models[done.fine_tuned_model] == kube_api.project_a

    # Checkpoints: those the trainer published as servable adapters (every one it saved), the resume
    # checkpoints the store still keeps (all an older trainer left), and the final version.
    run = run_prefix(kube_api.project_a, job.id, kube_api.job_object(job.id)["metadata"]["uid"])
    store.put_bytes(f"{run}/step-00000004/manifest.json", b'{"step": 4}')  # older trainers wrote no metrics
    figures = {"trainLoss": 0.5, "validationLoss": 0.75, "tokenAccuracy": 0.8, "tokensSeen": 320}
    store.put_bytes(f"{run}/step-00000008/manifest.json", json.dumps({"step": 8, "metrics": figures}).encode())
    store.put_bytes(f"{run}/step-00000012/trainable.safetensors", b"")  # interrupted: no manifest
    servable = f"{job.id}-checkpoints"
    publish_adapter(store, kube_api.project_a, servable, files, {"metrics": {"steps": 2, "trainLoss": 1.25}}, "2")
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [10, 8, 4, 2]
    assert checkpoints[0].metrics.valid_loss == 0.5 and checkpoints[0].metrics.valid_mean_token_accuracy == 0.9
    assert checkpoints[0].metrics.train_loss == 0.625
    assert checkpoints[1].metrics.train_loss == 0.5 and checkpoints[1].metrics.valid_loss == 0.75
    assert checkpoints[1].metrics.valid_mean_token_accuracy == 0.8 and checkpoints[2].metrics.train_loss is None
    assert checkpoints[3].metrics.train_loss == 1.25
    assert checkpoints[1].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-8"
    assert done.fine_tuned_model not in {m.id for m in kube_api.client(KEY_B).models.list()}
    # A published checkpoint and the final step resolve to a version its ModelServer would serve (there
    # is none here: the 404 names the ModelServer); a resume-only checkpoint and another step do not.
    for step, servable_step in ((2, True), (10, True), (8, False), (3, False)):
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(
                model=f"{done.fine_tuned_model}:ckpt-step-{step}", messages=[{"role": "user", "content": "hi"}]
            )
        assert ("ModelServer" in refused.value.body["message"]) is servable_step, (step, refused.value.body)

    # No ModelServer in the namespace serves its base: a 404 in OpenAI's shape that says what to do.
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    error = refused.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and "ModelServer" in error["message"]

    # Deleting the model is a tombstone on the job; the job stays.
    assert client.models.delete(done.fine_tuned_model).deleted
    assert done.fine_tuned_model not in {m.id for m in client.models.list()}
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


def test_a_modelserver_that_requires_a_key_the_api_lacks_is_a_503_saying_what_to_set(kube_api: KubeApi) -> None:
    server = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelServer",
        "metadata": {"name": "secured"},
        "spec": {
            "baseModel": BASE,
            "apiKeySecret": {"name": "tuneloom-api-key", "key": "api-key"},
            "storage": {"uri": kube_api.store},
        },
    }
    kube_api.custom.create_namespaced_custom_object(GROUP, VERSION, kube_api.project_b, "modelservers", server)
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            kube_api.client(KEY_B).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}])
        error = refused.value.body
        assert refused.value.status_code == 503 and error["code"] == "server_unavailable", error
        assert "ModelServer secured requires an API key" in error["message"]
        assert "api.modelServerKeySecret" in error["message"] and "--modelserver-key-env" in error["message"]
    finally:
        kube_api.custom.delete_namespaced_custom_object(GROUP, VERSION, kube_api.project_b, "modelservers", "secured")
