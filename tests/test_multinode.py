"""The objects a multi-node FineTuneJob becomes (Indexed Job on 1.24+, one Job per rank before),
and how the group's state reads from its Jobs and Pods (pure logic, no cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from tuneloom.api import NodeStatus, Phase
from tuneloom.jobfile import parse_job
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.gang import observe_group
from tuneloom.operator.jobbuilder import KUEUE_QUEUE_LABEL, LABEL_JOB
from tuneloom.operator.multinode import (
    INDEX_ANNOTATION,
    LABEL_NODE_RANK,
    build_group,
    build_headless_service,
    node_rank,
    supports_indexed_jobs,
)

ENDPOINT = "tickets-train-0.tickets-nodes.team-a.svc:29400"


def _job(**spec: Any):
    body = {
        "baseModel": "s3://models/smollm2",
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"adapterName": "tickets", "uri": "s3://adapters"},
        "resources": {"nodes": 3, "gpus": 4},
        "scheduling": {"queueName": "gpu-queue"},
        **spec,
    }
    return parse_job(
        {
            "apiVersion": "tuneloom.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tickets", "namespace": "team-a", "uid": "1234-abcd"},
            "spec": body,
        }
    )


def _torchrun(nodes: int, processes: int) -> list[str]:
    return [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={processes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={ENDPOINT}",
        "--rdzv-id=1234-abcd",
        "--max-restarts=0",
        "-m",
        "tuneloom.trainer",
    ]


def test_nodes_default_to_one() -> None:
    assert _job(resources={}).spec.resources.nodes == 1


def test_the_headless_service_names_every_node_before_it_is_ready() -> None:
    service = build_headless_service(_job())
    assert service["metadata"]["name"] == "tickets-nodes"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {LABEL_JOB: "tickets"}
    assert service["spec"]["ports"][0]["port"] == 29400
    assert service["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"


def test_an_indexed_job_runs_one_pod_per_node_under_torchrun() -> None:
    (job,) = build_group(_job(), OperatorConfig(), indexed=True)
    spec = job["spec"]
    assert job["metadata"]["name"] == "tickets-train"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["backoffLimit"] == 0, "the operator restarts the group; a lone rank cannot rejoin"
    assert "podFailurePolicy" not in spec
    pod = spec["template"]["spec"]
    # The Job controller names each pod's host <job>-<index> and sets JOB_COMPLETION_INDEX itself.
    assert pod["subdomain"] == "tickets-nodes" and "hostname" not in pod
    (container,) = pod["containers"]
    assert container["command"] == _torchrun(3, 4)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "JOB_COMPLETION_INDEX" not in {item["name"] for item in container["env"]}
    # Kueue's Job integration admits the Indexed Job, all its pods at once, by the Job's label.
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert spec["template"]["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"


def test_older_servers_get_one_job_per_rank_with_the_same_hostnames_and_rank() -> None:
    jobs = build_group(_job(), OperatorConfig(), indexed=False)
    assert [j["metadata"]["name"] for j in jobs] == ["tickets-train-0", "tickets-train-1", "tickets-train-2"]
    for rank, job in enumerate(jobs):
        assert job["spec"]["backoffLimit"] == 0 and "completionMode" not in job["spec"]
        template = job["spec"]["template"]
        pod = template["spec"]
        assert (pod["hostname"], pod["subdomain"]) == (f"tickets-train-{rank}", "tickets-nodes")
        (container,) = pod["containers"]
        assert container["command"] == _torchrun(3, 4)
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["JOB_COMPLETION_INDEX"] == str(rank)
        assert template["metadata"]["labels"][LABEL_NODE_RANK] == str(rank)
        assert template["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
        assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"


def test_cpu_nodes_run_one_process_each() -> None:
    (job,) = build_group(_job(resources={"nodes": 2, "gpus": 0}), OperatorConfig(), indexed=True)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == _torchrun(2, 1)


def test_long_names_leave_room_for_the_rank_in_the_hostname() -> None:
    long = "a" * 63
    body = _job().model_dump(mode="json")
    body["metadata"]["name"] = long
    jobs = build_group(parse_job(body), OperatorConfig(), indexed=False)
    assert all(len(j["spec"]["template"]["spec"]["hostname"]) <= 63 for j in jobs)


@pytest.mark.parametrize(
    ("major", "minor", "indexed"), [("1", "20", False), ("1", "23+", False), ("1", "24", True), ("1", "30+", True)]
)
def test_indexed_jobs_from_kubernetes_1_24(major: str, minor: str, indexed: bool) -> None:
    assert supports_indexed_jobs(major, minor) is indexed


# -- the group's state ---------------------------------------------------------------------------


def _pod(rank: int, phase: str, name: str | None = None, indexed: bool = False, **state: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name or f"tickets-train-{rank}-x", "creationTimestamp": "2026-01-01T00:00:00Z"}
    if indexed:
        meta["annotations"] = {INDEX_ANNOTATION: str(rank)}
    else:
        meta["labels"] = {LABEL_NODE_RANK: str(rank)}
    status: dict[str, Any] = {"phase": phase}
    if state:
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    return {"metadata": meta, "status": status}


def _jobs(condition: str | None = None) -> list[dict[str, Any]]:
    conditions = [{"type": condition, "status": "True"}] if condition else []
    return [{"metadata": {"name": f"tickets-train-{rank}"}, "status": {"conditions": conditions}} for rank in (0, 1)]


def test_node_rank_reads_both_shapes() -> None:
    assert node_rank(_pod(1, "Running", indexed=True)) == 1 and node_rank(_pod(1, "Running")) == 1
    assert node_rank({"metadata": {}}) is None


def test_the_group_runs_only_when_every_node_runs() -> None:
    waiting = observe_group(2, _jobs(), [_pod(0, "Running"), _pod(1, "Pending")], [])
    assert waiting.phase is Phase.pending and "1 running" in waiting.message
    assert [n.phase for n in waiting.nodes] == ["Running", "Pending"]
    running = observe_group(2, _jobs(), [_pod(0, "Running", indexed=True), _pod(1, "Running", indexed=True)], [])
    assert running.phase is Phase.running and len(running.running) == 2 and running.failed is None


def test_a_failed_rank_is_named_with_its_exit_code_and_counts() -> None:
    crashed = {"terminated": {"exitCode": 137, "message": "killed"}}
    seen = observe_group(2, _jobs(), [_pod(0, "Running"), _pod(1, "Failed", **crashed)], [])
    assert seen.failed is not None and seen.failed.rank == 1 and seen.failed.reason == "ExitCode137"
    assert "code 137" in seen.nodes[1].message and seen.counts_as_failure and seen.final is None


def test_a_preempted_rank_restarts_the_group_without_counting() -> None:
    preempted = {"terminated": {"exitCode": 3}}
    seen = observe_group(2, _jobs(), [_pod(0, "Failed", **preempted), _pod(1, "Running")], [])
    assert seen.failed is not None and seen.failed.reason == "Preempted" and not seen.counts_as_failure


def test_a_deleted_pod_is_noticed_whether_terminating_gone_or_replaced() -> None:
    before = [NodeStatus(rank=0, pod="p0", phase="Running"), NodeStatus(rank=1, pod="p1", phase="Running")]
    terminating = _pod(1, "Running", name="p1")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    for pods in (
        [_pod(0, "Running", "p0"), terminating],
        [_pod(0, "Running", "p0")],
        [_pod(0, "Running", "p0"), _pod(1, "Pending", "p1-new")],
    ):
        seen = observe_group(2, _jobs(), pods, before)
        assert seen.failed is not None and (seen.failed.rank, seen.failed.reason) == (1, "PodDeleted"), pods
        assert "p1 was deleted" in seen.failed.message and not seen.counts_as_failure


def test_invalid_input_on_any_rank_fails_without_a_restart() -> None:
    invalid = {"terminated": {"exitCode": 2, "message": "dataset.train line 3: bad"}}
    seen = observe_group(2, _jobs(), [_pod(0, "Running"), _pod(1, "Failed", **invalid)], [])
    assert seen.final is not None and seen.final.phase is Phase.failed and "rank 1" in seen.final.message


def test_success_needs_every_job_complete_and_old_jobs_going_away_are_waited_for() -> None:
    done = [_pod(0, "Succeeded"), _pod(1, "Succeeded")]
    assert observe_group(2, _jobs("Complete"), done, []).phase is Phase.succeeded
    half = [*_jobs("Complete")[:1], *_jobs()[1:]]
    assert observe_group(2, half, [_pod(0, "Succeeded"), _pod(1, "Running")], []).phase is Phase.running
    deleting = _jobs()
    deleting[0]["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    assert observe_group(2, deleting, [], []).deleting
