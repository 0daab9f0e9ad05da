"""The objects one FineTuneJob runs as: a batch/v1 Job that carries its own job file.

Pure functions of the FineTuneJob and the operator's settings, so they are unit-testable and the
same inputs always give the same objects (names included: a restarted operator finds, rather than
duplicates, what it created).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tuneloom.api import (
    TRAINER_EXIT_INVALID_INPUT,
    TRAINER_EXIT_PREEMPTED,
    FineTuneJob,
    ModelServer,
    ResourcesSpec,
    StorageSpec,
)
from tuneloom.operator.common import LABEL_MANAGED, MANAGER
from tuneloom.operator.config import OperatorConfig

LABEL_JOB = "tuneloom.dev/finetunejob"
ANNOTATION_SPEC_HASH = "tuneloom.dev/spec-sha256"
# The job file the trainer reads, on the pod template; a downward-API volume makes it a file.
ANNOTATION_JOB_FILE = "tuneloom.dev/job-file"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

JOB_FILE_DIR = "/etc/tuneloom"
CACHE_DIR = "/var/cache/tuneloom"
RUN_AS_USER = 1000
# Every pod the operator makes runs as non-root with a read-only root file system; what it
# writes goes to emptyDir volumes.
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "fsGroup": RUN_AS_USER}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def short_name(name: str, suffix: str, limit: int = 63) -> str:
    """`name-suffix` within Kubernetes' 63-character limit for names used as label values."""
    full = f"{name}-{suffix}"
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - len(suffix) - 10]}-{digest}-{suffix}"


def job_name(ftj_name: str) -> str:
    return short_name(ftj_name, "train")


def spec_hash(job: FineTuneJob) -> str:
    """What the running Job was built from; `cancel`, `suspend` and `serve` may change without being a spec change."""
    relevant = job.spec.model_dump(mode="json", exclude={"cancel", "suspend", "serve"})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def owner_reference(owner: FineTuneJob | ModelServer) -> dict[str, Any]:
    return {
        "apiVersion": owner.apiVersion,
        "kind": owner.kind,
        "name": owner.metadata.name,
        "uid": owner.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(job: FineTuneJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tuneloom-trainer",
        LABEL_MANAGED: MANAGER,
        LABEL_JOB: job.metadata.name,
    }


def build_service_account(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """The trainer's identity: bound to no role and given no token, because it needs no API access."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": config.trainer_service_account,
            "namespace": job.metadata.namespace,
            "labels": {LABEL_MANAGED: MANAGER},
        },
        "automountServiceAccountToken": False,
    }


def job_file(job: FineTuneJob) -> str:
    """The job file the trainer reads: the FineTuneJob itself, status left out. JSON, which is
    YAML too, because the operator writes one per job and a YAML dump costs ten times as much."""
    document = {
        "apiVersion": job.apiVersion,
        "kind": job.kind,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace, "uid": job.metadata.uid},
        "spec": job.spec.model_dump(mode="json", exclude_none=True),
    }
    return json.dumps(document, indent=2)


def storage_env(storage: StorageSpec) -> list[dict[str, Any]]:
    """How a pod reaches object storage: endpoint and region as values, credentials by reference."""
    env: list[dict[str, Any]] = []
    if storage.endpoint:
        env.append({"name": "TUNELOOM_S3_ENDPOINT", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    if storage.credentialsSecret:
        # Referenced, never copied: the values stay in the Secret.
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": storage.credentialsSecret, "key": key}}})
    return env


def _env(job: FineTuneJob, config: OperatorConfig) -> list[dict[str, Any]]:
    return [
        {"name": "TUNELOOM_JOB_FILE", "value": f"{JOB_FILE_DIR}/job.yaml"},
        # Where the trainer serves /metrics and /progress: the operator reads progress there and only there.
        {"name": "TUNELOOM_METRICS_PORT", "value": str(config.trainer_metrics_port)},
        {"name": "TUNELOOM_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *storage_env(job.spec.storage),
    ]


def _command(job: FineTuneJob) -> list[str]:
    gpus = job.spec.resources.gpus
    if gpus > 1:
        # One process per GPU; torchrun sets RANK/WORLD_SIZE/MASTER_* for PyTorch distributed.
        return ["torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m", "tuneloom.trainer"]
    return ["python", "-m", "tuneloom.trainer"]


def pod_resources(resources: ResourcesSpec) -> dict[str, Any]:
    """A container's requests and limits: GPUs and memory are limited too, CPU only requested."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if resources.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(resources.gpus)
    if resources.cpu:
        requests["cpu"] = resources.cpu
    if resources.memory:
        requests["memory"] = limits["memory"] = resources.memory
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _volumes(job: FineTuneJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes = [
        # From the pod's own annotation rather than a ConfigMap: one object (and one API call) less
        # per job, and the file can never be missing or newer than the Job.
        {
            "name": "job",
            "downwardAPI": {
                "items": [
                    {"path": "job.yaml", "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_JOB_FILE}']"}}
                ]
            },
        },
        # PyTorch's data loader and NCCL use shared memory; the default 64 MiB /dev/shm is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [
        {"name": "job", "mountPath": JOB_FILE_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    return volumes, mounts


def job_labels(job: FineTuneJob) -> dict[str, str]:
    """The labels of every training Job and Pod; Kueue admits a Job by its queue label."""
    labels = _labels(job)
    if job.spec.scheduling.queueName:
        labels[KUEUE_QUEUE_LABEL] = job.spec.scheduling.queueName
    return labels


def pod_template(
    job: FineTuneJob,
    config: OperatorConfig,
    labels: dict[str, str],
    command: list[str],
    extra_env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The trainer's pod template: the same for one node and for each node of several."""
    spec = job.spec
    volumes, mounts = _volumes(job)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM to SIGKILL: the trainer's time to finish its step and save a checkpoint.
        "terminationGracePeriodSeconds": spec.checkpointing.gracePeriodSeconds,
        "serviceAccountName": config.trainer_service_account,
        "automountServiceAccountToken": False,  # the trainer talks to object storage, not the API server
        "securityContext": POD_SECURITY_CONTEXT,
        "containers": [
            {
                "name": "trainer",
                "image": spec.image or config.trainer_image,
                "command": command,
                "env": [*_env(job, config), *(extra_env or [])],
                "resources": pod_resources(spec.resources),
                "ports": [{"name": "metrics", "containerPort": config.trainer_metrics_port}],
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": CONTAINER_SECURITY_CONTEXT,
            }
        ],
        "volumes": volumes,
    }
    if spec.resources.nodeSelector:
        pod_spec["nodeSelector"] = spec.resources.nodeSelector
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in spec.resources.tolerations]
    if spec.scheduling.priorityClassName:
        pod_spec["priorityClassName"] = spec.scheduling.priorityClassName
    return {
        "metadata": {
            "labels": labels,
            "annotations": {
                ANNOTATION_JOB_FILE: job_file(job),
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(config.trainer_metrics_port),
            },
        },
        "spec": pod_spec,
    }


def job_object(job: FineTuneJob, name: str, labels: dict[str, str], job_spec: dict[str, Any]) -> dict[str, Any]:
    """A batch/v1 Job owned by the FineTuneJob, marked with the spec it was built from."""
    if job.spec.scheduling.activeDeadlineSeconds:
        job_spec["activeDeadlineSeconds"] = job.spec.scheduling.activeDeadlineSeconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": job.metadata.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_SPEC_HASH: spec_hash(job)},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": job_spec,
    }


def build_job(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """The one Job of a single-node FineTuneJob."""
    labels = job_labels(job)
    job_spec: dict[str, Any] = {
        "backoffLimit": job.spec.scheduling.backoffLimit,
        # Kubernetes 1.26+; older API servers drop the field, and the operator stops the retries of
        # invalid input itself. Exit code 2 is invalid input: fail at once instead of retrying. A
        # preempted trainer (exit code 3, or a pod the cluster marked as disrupted) is retried
        # without counting against backoffLimit.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": "trainer",
                        "operator": "In",
                        "values": [TRAINER_EXIT_INVALID_INPUT],
                    },
                },
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": "trainer",
                        "operator": "In",
                        "values": [TRAINER_EXIT_PREEMPTED],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": pod_template(job, config, labels, _command(job)),
    }
    return job_object(job, job_name(job.metadata.name), labels, job_spec)


def needs_gpu(job: FineTuneJob) -> bool:
    return job.spec.quantized_base
