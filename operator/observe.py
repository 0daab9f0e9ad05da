"""Reading where a training Job stands from the Job and its Pod: pure functions of API objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneloom.api import TRAINER_EXIT_INVALID_INPUT, TRAINER_EXIT_PREEMPTED, Phase

# A pod waiting for one of these will never start by itself.
_HOPELESS_WAITING = {"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}
_PULL_FAILURES = {"ErrImagePull", "ImagePullBackOff"}


@dataclass(frozen=True)
class Observation:
    phase: Phase
    reason: str
    message: str


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def is_finished(job: dict[str, Any]) -> bool:
    """Whether the Job controller has given its verdict (Complete or Failed)."""
    return bool(_condition(job, "Complete") or _condition(job, "Failed"))


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return state["terminated"]
        last = (status.get("lastState") or {}).get("terminated")
        if last:
            return last
    return None


def _waiting(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting")
        if waiting:
            return waiting
    return None


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def failure_of(job: dict[str, Any], pods: list[dict[str, Any]]) -> Observation:
    """Why a Job failed, in words a user can act on."""
    condition = _condition(job, "Failed") or {}
    terminated = next((t for t in map(_terminated, pods) if t), None)
    if condition.get("reason") == "DeadlineExceeded":
        return Observation(
            Phase.failed,
            "DeadlineExceeded",
            f"the run passed spec.scheduling.activeDeadlineSeconds; {condition.get('message', '')}".strip(),
        )
    if terminated and terminated.get("reason") == "OOMKilled":
        return Observation(
            Phase.failed,
            "OOMKilled",
            "the trainer ran out of memory: raise spec.resources.memory, or lower batchSize or maxSeqLength "
            "(or enable gradientCheckpointing)",
        )
    if terminated:
        code = terminated.get("exitCode")
        tail = _tail(terminated.get("message") or "")
        hints = {
            TRAINER_EXIT_INVALID_INPUT: " (invalid input: fix the spec or the data)",
            # Only where preemptions count as failures: clusters without podFailurePolicy.
            TRAINER_EXIT_PREEMPTED: " (preempted once too often: raise spec.scheduling.backoffLimit)",
        }
        hint = hints.get(code, "")
        return Observation(Phase.failed, f"ExitCode{code}", f"trainer exited with code {code}{hint}: {tail}")
    return Observation(Phase.failed, condition.get("reason") or "JobFailed", condition.get("message") or "")


def exit_code(pod: dict[str, Any]) -> int | None:
    """The trainer's exit code, once it has exited."""
    return (_terminated(pod) or {}).get("exitCode")


def invalid_input(pods: list[dict[str, Any]]) -> bool:
    """The trainer exits 2 when the spec or the data is wrong: retrying cannot help."""
    return any(exit_code(pod) == TRAINER_EXIT_INVALID_INPUT for pod in pods)


def observe(job: dict[str, Any], pods: list[dict[str, Any]]) -> Observation:
    """The FineTuneJob phase that a Job and its Pods amount to."""
    if _condition(job, "Complete"):
        return Observation(Phase.succeeded, "Completed", "training finished")
    if _condition(job, "Failed") or invalid_input(pods):
        return failure_of(job, pods)
    for pod in pods:
        waiting = _waiting(pod)
        if waiting and waiting.get("reason") in _HOPELESS_WAITING:
            return Observation(Phase.failed, waiting["reason"], waiting.get("message", ""))
        if waiting and waiting.get("reason") in _PULL_FAILURES:
            return Observation(
                Phase.pending,
                waiting["reason"],
                f"cannot pull the trainer image: {waiting.get('message', '')}; check spec.image and pull secrets",
            )
    if any((pod.get("status") or {}).get("phase") == "Running" for pod in pods):
        return Observation(Phase.running, "Training", "the trainer is running")
    unschedulable = next(
        (
            c.get("message", "")
            for pod in pods
            for c in (pod.get("status") or {}).get("conditions") or []
            if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"
        ),
        None,
    )
    if unschedulable:
        return Observation(Phase.pending, "Unschedulable", unschedulable)
    return Observation(Phase.pending, "PodStarting", "waiting for the training pod to start")


def running_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((p for p in pods if (p.get("status") or {}).get("phase") == "Running"), None)
