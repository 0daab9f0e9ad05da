"""Where a multi-node group stands, from its Jobs and Pods: pure functions of API objects.

Gang semantics: the group runs only when every node's pod runs, and a rank that fails, or whose
pod is deleted, stops the group: the operator then restarts all nodes together and the trainer
resumes from the latest checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneloom.api import TRAINER_EXIT_INVALID_INPUT, TRAINER_EXIT_PREEMPTED, NodeStatus, Phase
from tuneloom.operator.multinode import node_rank
from tuneloom.operator.observe import Observation, exit_code, failure_of, observe

# Restarting the group for these needs no retry budget: the trainer saved a checkpoint on SIGTERM.
NOT_COUNTED = {"Preempted", "PodDeleted"}


@dataclass(frozen=True)
class GroupObservation:
    nodes: list[NodeStatus]
    phase: Phase
    message: str
    failed: NodeStatus | None = None  # the first rank that stopped the group
    final: Observation | None = None  # an outcome no group restart changes (success, deadline, bad input)
    deleting: bool = False  # Jobs of an earlier group are still going away
    running: list[dict[str, Any]] = field(default_factory=list)  # the pods that run, rank order

    @property
    def counts_as_failure(self) -> bool:
        return self.failed is not None and self.failed.reason not in NOT_COUNTED


def _newest(pods: list[dict[str, Any]]) -> dict[str, Any]:
    return max(pods, key=lambda pod: (pod["metadata"].get("creationTimestamp") or "", pod["metadata"]["name"]))


def _node(rank: int, pods: list[dict[str, Any]], previous: NodeStatus | None) -> NodeStatus:
    if not pods:
        if previous is not None and previous.pod and previous.phase == "Running":
            # Gone between two passes: the Job controller of a per-rank Job may already be making a new one.
            return NodeStatus(
                rank=rank,
                pod=previous.pod,
                phase="Failed",
                reason="PodDeleted",
                message=f"pod {previous.pod} was deleted",
            )
        return NodeStatus(rank=rank)
    pod = _newest(pods)
    name = pod["metadata"]["name"]
    phase = (pod.get("status") or {}).get("phase") or "Pending"
    if pod["metadata"].get("deletionTimestamp") or (previous is not None and previous.pod not in (None, name)):
        gone = previous.pod if previous is not None and previous.pod not in (None, name) else name
        return NodeStatus(rank=rank, pod=name, phase="Failed", reason="PodDeleted", message=f"pod {gone} was deleted")
    if phase == "Failed":
        code = exit_code(pod)
        if code == TRAINER_EXIT_PREEMPTED:
            return NodeStatus(
                rank=rank,
                pod=name,
                phase=phase,
                reason="Preempted",
                message="the trainer was preempted and saved a checkpoint (exit code 3)",
            )
        why = failure_of({}, [pod])
        return NodeStatus(rank=rank, pod=name, phase=phase, reason=why.reason, message=why.message)
    return NodeStatus(rank=rank, pod=name, phase=phase)


def observe_group(
    nodes: int, jobs: list[dict[str, Any]], pods: list[dict[str, Any]], previous: list[NodeStatus]
) -> GroupObservation:
    """The group's state; `previous`: the nodes as the last pass saw them (tells a deleted pod)."""
    if any(job["metadata"].get("deletionTimestamp") for job in jobs):
        return GroupObservation(
            [], Phase.pending, "restarting the group: waiting for the old pods to stop", deleting=True
        )
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for pod in pods:
        rank = node_rank(pod)
        if rank is not None and 0 <= rank < nodes:
            by_rank.setdefault(rank, []).append(pod)
    before = {node.rank: node for node in previous}
    states = [_node(rank, by_rank.get(rank, []), before.get(rank)) for rank in range(nodes)]
    if jobs and all(observe(job, []).phase is Phase.succeeded for job in jobs):
        return GroupObservation(
            states,
            Phase.succeeded,
            "training finished",
            final=Observation(Phase.succeeded, "Completed", "training finished"),
        )
    invalid = next((s for s in states if s.reason == f"ExitCode{TRAINER_EXIT_INVALID_INPUT}"), None)
    if invalid is not None:
        return GroupObservation(
            states,
            Phase.failed,
            invalid.message,
            failed=invalid,
            final=Observation(Phase.failed, invalid.reason, f"rank {invalid.rank}: {invalid.message}"),
        )
    failed = next((s for s in states if s.phase == "Failed"), None)
    if failed is not None:
        return GroupObservation(states, Phase.pending, f"rank {failed.rank} failed: {failed.message}", failed=failed)
    for job in jobs:
        outcome = observe(job, [])
        if outcome.phase is Phase.failed:  # with no failed pod to show for it: the deadline, say
            return GroupObservation(states, Phase.failed, outcome.message, final=outcome)
    running = [_newest(by_rank[s.rank]) for s in states if s.phase == "Running"]
    # A rank that finished first (one Job per rank) is still part of a group that runs.
    if len(running) + sum(s.phase == "Succeeded" for s in states) == nodes:
        return GroupObservation(states, Phase.running, f"all {nodes} nodes are running", running=running)
    return GroupObservation(states, Phase.pending, f"waiting for all {nodes} nodes to start: {len(running)} running")
