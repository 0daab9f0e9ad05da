"""Typed status: what a reconciler reads, and the merge patch it writes back (no cluster needed)."""

from __future__ import annotations

from typing import Any

from tuneloom.api import AdapterPhase, AdapterStatus, FineTuneJobStatus, ModelServerStatus, Phase
from tuneloom.operator.common import read_status, set_condition, status_patch

EARLIER = "2026-01-01T00:00:00Z"


def _body(status: dict[str, Any] | None) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "x"}, **({"status": status} if status is not None else {})}


def test_a_new_object_gets_only_the_fields_every_pass_writes() -> None:
    status = read_status(ModelServerStatus, _body(None), conditions=[])
    status.observedGeneration = 1
    # No replicas, readyReplicas or pods: this pass did not look at any.
    assert status_patch({}, status) == {"conditions": [], "observedGeneration": 1}


def test_a_field_set_to_none_is_deleted_and_untouched_fields_are_not_written() -> None:
    stored = {
        "phase": "Ready",
        "model": "ns/a@1",
        "version": "1",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Verified", "lastTransitionTime": EARLIER}],
        # Another writer's field (each ModelServer writes its own entry): never part of the patch.
        "loadedOn": [{"modelServer": "s", "namespace": "ns", "pods": ["p"]}],
    }
    status = read_status(AdapterStatus, _body(stored), phase=AdapterPhase.pending, conditions=[])
    status.model, status.phase = None, AdapterPhase.failed
    set_condition(status.conditions, "Ready", "False", "NotFound", "gone")
    changes = status_patch(stored, status)
    assert changes.keys() == {"phase", "model", "conditions"}
    assert changes["model"] is None and changes["phase"] == "Failed"
    [ready] = changes["conditions"]
    assert ready["reason"] == "NotFound" and ready["lastTransitionTime"] != EARLIER


def test_a_condition_keeps_its_transition_time_while_its_status_stays() -> None:
    stored = {"conditions": [{"type": "Running", "status": "True", "reason": "A", "lastTransitionTime": EARLIER}]}
    status = read_status(FineTuneJobStatus, _body(stored), phase=Phase.pending, conditions=[])
    set_condition(status.conditions, "Running", "True", "", "")
    # Empty reason and message are left out, not written as "".
    assert status_patch(stored, status)["conditions"] == [
        {"type": "Running", "status": "True", "lastTransitionTime": EARLIER}
    ]
    assert status_patch(stored, status)["phase"] == "Pending"


def test_an_unchanged_status_needs_no_patch() -> None:
    stored = {
        "phase": "Running",
        "conditions": [
            {"type": "Running", "status": "True", "reason": "A", "message": "m", "lastTransitionTime": EARLIER}
        ],
        "startTime": EARLIER,
        "progress": {"percent": 5, "step": 1, "totalSteps": 20, "epoch": 0.05, "trainLoss": 1.5},
    }
    status = read_status(FineTuneJobStatus, _body(stored), phase=Phase.pending, conditions=[])
    assert status_patch(stored, status) == {}


def test_an_unreadable_field_is_dropped_and_deleted() -> None:
    stored = {"phase": "Sideways", "jobName": "j"}
    status = read_status(FineTuneJobStatus, _body(stored), phase=Phase.pending, conditions=[])
    assert status.phase is Phase.pending and status.jobName == "j"
    assert status_patch(stored, status) == {"phase": "Pending", "conditions": []}
