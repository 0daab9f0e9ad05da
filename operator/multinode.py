"""The objects a multi-node FineTuneJob (`spec.resources.nodes > 1`) runs as: a headless Service
and one pod per node, whose torchrun agents meet through c10d rendezvous at rank 0's stable DNS
name.

Two shapes, chosen by the API server's version:

- Kubernetes 1.24+: one Indexed Job (`completionMode: Indexed`); the Job controller gives each pod
  its index as JOB_COMPLETION_INDEX and the hostname `<job>-<index>`.
- Older servers: one Job per node rank, `<job>-<rank>`, whose pod template sets the same hostname
  and JOB_COMPLETION_INDEX itself.

Either way node rank r is the pod `<job>-<r>.<service>.<namespace>.svc`, so the rendezvous
endpoint and the status read the same on both. Every Job has backoffLimit 0: a rank that fails
alone cannot rejoin a running group, so the operator restarts the whole group instead (see
`tuneloom.operator.gang`).
"""

from __future__ import annotations

from typing import Any

from tuneloom.api import FineTuneJob
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.jobbuilder import (
    LABEL_JOB,
    job_labels,
    job_object,
    owner_reference,
    pod_template,
    short_name,
)

# torchrun's default c10d port: the rendezvous store that rank 0's agent hosts.
RENDEZVOUS_PORT = 29400
RANK_ENV = "JOB_COMPLETION_INDEX"
LABEL_NODE_RANK = "tuneloom.dev/node-rank"  # on the pods of per-rank Jobs
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"  # on the pods of an Indexed Job
INDEXED_JOB_MIN_MINOR = 24  # Indexed Jobs are on by default (and JOB_COMPLETION_INDEX set) from 1.24


MAX_RANK_SUFFIX = len("-63")  # spec.resources.nodes is at most 64


def service_name(ftj_name: str) -> str:
    return short_name(ftj_name, "nodes")


def group_job_name(ftj_name: str) -> str:
    """The Indexed Job's name: short enough that `<name>-<rank>` is a valid hostname."""
    return short_name(ftj_name, "train", limit=63 - MAX_RANK_SUFFIX)


def rank_job_name(ftj_name: str, rank: int) -> str:
    """The per-rank Job's name, which is also node `rank`'s hostname in both shapes."""
    return f"{group_job_name(ftj_name)}-{rank}"


def rendezvous_endpoint(job: FineTuneJob) -> str:
    """Rank 0's stable DNS name and the rendezvous port: resolvable before the pod is ready, since
    the Service publishes not-ready addresses."""
    host = rank_job_name(job.metadata.name, 0)
    return f"{host}.{service_name(job.metadata.name)}.{job.metadata.namespace}.svc:{RENDEZVOUS_PORT}"


def processes_per_node(job: FineTuneJob) -> int:
    return max(job.spec.resources.gpus, 1)  # CPU nodes run one process each


def torchrun_args(nodes: int, processes: int, endpoint: str, rendezvous_id: str) -> list[str]:
    """torchrun's options for one node of `nodes`. `--max-restarts 0`: the operator restarts the
    group (a rank whose pod is gone cannot be restarted by its agent)."""
    return [
        f"--nnodes={nodes}",
        f"--nproc-per-node={processes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rendezvous_id}",
        "--max-restarts=0",
    ]


def _command(job: FineTuneJob) -> list[str]:
    args = torchrun_args(
        job.spec.resources.nodes, processes_per_node(job), rendezvous_endpoint(job), job.metadata.uid or ""
    )
    return ["torchrun", *args, "-m", "tuneloom.trainer"]


# On the headless Service, which outlives the group's Jobs: a group restart in progress (its
# GroupRestart message), written before the Jobs are deleted so that an operator that dies between
# the deletion and its status patch recreates the group rather than taking it for deleted.
RESTART_ANNOTATION = "tuneloom.dev/group-restart"


def build_headless_service(job: FineTuneJob) -> dict[str, Any]:
    """Gives each node's pod a DNS name (`<hostname>.<service>`); no cluster IP, no load balancing."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(job.metadata.name),
            "namespace": job.metadata.namespace,
            "labels": job_labels(job),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            # Names must resolve while the pods start: rank 0 is waiting for the others at the rendezvous.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.metadata.name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def _node_template(job: FineTuneJob, config: OperatorConfig, labels: dict[str, str], extra_env: list) -> dict:
    template = pod_template(job, config, labels, _command(job), extra_env)
    template["spec"]["subdomain"] = service_name(job.metadata.name)
    return template


def build_indexed_job(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """Kubernetes 1.24+: one Job of `nodes` pods, indexed 0 to nodes - 1."""
    nodes = job.spec.resources.nodes
    labels = job_labels(job)
    job_spec = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "template": _node_template(job, config, labels, []),
    }
    return job_object(job, group_job_name(job.metadata.name), labels, job_spec)


def build_rank_jobs(job: FineTuneJob, config: OperatorConfig) -> list[dict[str, Any]]:
    """Older API servers: one single-pod Job per node rank, with the Indexed Job's hostnames and env."""
    jobs = []
    for rank in range(job.spec.resources.nodes):
        labels = {**job_labels(job), LABEL_NODE_RANK: str(rank)}
        template = _node_template(job, config, labels, [{"name": RANK_ENV, "value": str(rank)}])
        template["spec"]["hostname"] = rank_job_name(job.metadata.name, rank)
        job_spec = {"backoffLimit": 0, "template": template}
        jobs.append(job_object(job, rank_job_name(job.metadata.name, rank), labels, job_spec))
    return jobs


def build_group(job: FineTuneJob, config: OperatorConfig, indexed: bool) -> list[dict[str, Any]]:
    return [build_indexed_job(job, config)] if indexed else build_rank_jobs(job, config)


def supports_indexed_jobs(major: str, minor: str) -> bool:
    """From the API server's /version; a minor such as "24+" (managed clusters) counts as 24."""
    return (int(major), int(minor.rstrip("+"))) >= (1, INDEXED_JOB_MIN_MINOR)


def node_rank(pod: dict[str, Any]) -> int | None:
    """A node pod's rank: its per-rank Job's label or its Indexed Job's annotation."""
    meta = pod.get("metadata") or {}
    text = (meta.get("labels") or {}).get(LABEL_NODE_RANK) or (meta.get("annotations") or {}).get(INDEX_ANNOTATION)
    return int(text) if text is not None and text.isdigit() else None
