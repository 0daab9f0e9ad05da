"""The overfitting detector's two rules on hand-made evaluation histories, and the operator's
condition and Warning Event built from its verdict (pure logic, no cluster)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from kubernetes import client as k8s

from tuneloom.api import FineTuneJobStatus, Phase
from tuneloom.operator.common import set_condition
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.metrics import OperatorMetrics
from tuneloom.operator.reconciler import FineTuneJobReconciler, overfitting_condition
from tuneloom.registry import OverfittingRecord
from tuneloom.trainer.overfitting import (
    MIN_LOSS_RATIO,
    RULE_LOSS_RATIO,
    RULE_RISING_VALIDATION,
    OverfittingVerdict,
    detect_overfitting,
)
from tuneloom.trainer.progress import ProgressReporter


def _history(*losses: tuple[float, float]) -> list[dict]:
    """(training loss, validation loss) at evaluations 5 steps apart."""
    return [
        {"step": 5 * (i + 1), "trainLoss": train, "validationLoss": validation}
        for i, (train, validation) in enumerate(losses)
    ]


def test_validation_rising_twice_while_training_falls_is_overfitting() -> None:
    verdict = detect_overfitting(_history((2.0, 2.1), (1.6, 1.8), (1.4, 1.9), (1.2, 2.0)))
    assert verdict.detected and verdict.rule == RULE_RISING_VALIDATION
    assert verdict.reason == (
        "validation loss rose for two evaluations (1.8000 -> 1.9000 -> 2.0000 at step 10, step 15, step 20) "
        "while training loss fell (1.6000 -> 1.2000)"
    )


def test_validation_rising_once_or_with_training_loss_rising_too_is_not() -> None:
    assert not detect_overfitting(_history((2.0, 2.1), (1.6, 1.8), (1.4, 1.9), (1.2, 1.85))).detected
    # Both rising: the run diverges (too high a learning rate), it does not overfit.
    assert not detect_overfitting(_history((2.0, 2.1), (2.1, 2.2), (2.2, 2.3))).detected


def test_training_loss_far_under_validation_loss_is_overfitting_from_the_second_evaluation() -> None:
    # The first evaluation never counts for the ratio.
    assert not detect_overfitting(_history((0.1, 1.0))).detected
    verdict = detect_overfitting(_history((0.9, 1.0), (0.4, 1.0)))
    assert verdict.detected and verdict.rule == RULE_LOSS_RATIO
    assert verdict.reason == (
        f"training loss 0.4000 is 0.40 times the validation loss 1.0000 at step 10, under the bound {MIN_LOSS_RATIO}"
    )
    # At the bound is not under it.
    assert not detect_overfitting(_history((0.9, 1.0), (0.5, 1.0))).detected
    # Near zero a third is no gap: both losses say the task is learnt.
    assert not detect_overfitting(_history((0.9, 1.0), (0.01, 0.03))).detected
    assert detect_overfitting(_history((0.9, 1.0), (0.01, 0.12))).rule == RULE_LOSS_RATIO


def test_a_healthy_run_and_an_empty_or_old_history_give_no_signal() -> None:
    healthy = detect_overfitting(_history((2.0, 2.1), (1.5, 1.7), (1.2, 1.5), (1.1, 1.45)))
    assert healthy == OverfittingVerdict()
    assert healthy.to_record() == {
        "detected": False,
        "rule": None,
        "reason": "no sign of overfitting in the evaluation history",
    }
    assert detect_overfitting([]) == OverfittingVerdict()
    # Evaluations from a checkpoint written before the history had training losses are skipped.
    old = [{"step": 5, "validationLoss": 1.0}, {"step": 10, "validationLoss": 1.1}]
    assert detect_overfitting([*old, *_history((0.9, 1.0))]) == OverfittingVerdict()


def test_the_first_rule_to_fire_decides_and_a_later_recovery_does_not_undo_it() -> None:
    verdict = detect_overfitting(_history((1.0, 1.1), (0.9, 1.2), (0.3, 1.3), (0.8, 0.9)))
    assert verdict.rule == RULE_RISING_VALIDATION and "step 15" in verdict.reason


# -- the operator's side: the trainer's verdict as the `Overfitting` condition and its Event --------


class _EventRecorder:
    """Stands in for the Kubernetes core API: keeps the Events the reconciler posts."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def create_namespaced_event(self, namespace: str, body: dict, **_: object) -> SimpleNamespace:
        self.events.append(body)
        return SimpleNamespace(data=b"{}")


def _reconciler() -> tuple[FineTuneJobReconciler, _EventRecorder]:
    reconciler = FineTuneJobReconciler(OperatorConfig(), k8s.ApiClient(), OperatorMetrics(), adapters=None)
    reconciler.core = recorder = _EventRecorder()
    return reconciler, recorder


def _job_body(status: dict | None) -> dict:
    meta = {"namespace": "ns", "name": "overfit", "uid": "u-1"}
    return {"apiVersion": "tuneloom.dev/v1alpha1", "kind": "FineTuneJob", "metadata": meta, "status": status}


def test_the_verdict_becomes_the_overfitting_condition() -> None:
    found = detect_overfitting(_history((0.9, 1.0), (0.4, 1.0)))
    assert overfitting_condition(OverfittingRecord.model_validate(found.to_record())) == (
        "Overfitting",
        "True",
        "LossRatio",
        found.reason,
    )
    none = OverfittingRecord.model_validate(OverfittingVerdict().to_record())
    assert overfitting_condition(none) == (
        "Overfitting",
        "False",
        "NoSignal",
        "no sign of overfitting in the evaluation history",
    )


def test_one_warning_event_when_the_condition_turns_true() -> None:
    reconciler, recorder = _reconciler()
    verdict = OverfittingRecord.model_validate(detect_overfitting(_history((0.9, 1.0), (0.4, 1.0))).to_record())
    status = FineTuneJobStatus(phase=Phase.running, conditions=[])
    set_condition(status.conditions, *overfitting_condition(verdict))
    reconciler._record_transition(_job_body({"phase": "Running", "conditions": []}), Phase.running, status)
    [event] = recorder.events
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "Overfitting", verdict.reason)
    # The next pass reads a status that says so already: no second Event, also not at success.
    stored = status.model_dump(mode="json")
    status.phase = Phase.succeeded
    reconciler._record_transition(_job_body(stored), Phase.running, status)
    assert [e["reason"] for e in recorder.events] == ["Overfitting", "Succeeded"]


def test_no_event_without_a_detection() -> None:
    reconciler, recorder = _reconciler()
    status = FineTuneJobStatus(phase=Phase.running, conditions=[])
    set_condition(status.conditions, *overfitting_condition(OverfittingRecord()))
    reconciler._record_transition(_job_body({"phase": "Running", "conditions": []}), Phase.running, status)
    assert recorder.events == []


def test_progress_records_carry_the_verdict_once_detected_and_warn_once(caplog) -> None:
    records: list[dict] = []
    reporter = ProgressReporter(total_steps=20, steps_per_epoch=10, logging_steps=5, on_record=records.append)
    found = detect_overfitting(_history((0.9, 1.0), (0.4, 1.0)))
    with caplog.at_level(logging.WARNING, logger="tuneloom.trainer"):
        reporter.evaluation(loss=1.0, accuracy=0.5, overfitting=OverfittingVerdict())
        reporter.evaluation(loss=1.0, accuracy=0.5, overfitting=found)
        reporter.evaluation(loss=1.1, accuracy=0.5, overfitting=found)
    assert "overfitting" not in records[0]
    assert records[1]["overfitting"] == records[2]["overfitting"] == found.to_record()
    assert [r.getMessage() for r in caplog.records] == [f"overfitting: {found.reason}"]
