"""Evaluation results and what a run publishes from them: the manifest's `metrics`, evaluation.json
and the checkpoint's record of the base model (pure logic; the training tests run the real thing)."""

from __future__ import annotations

import json
from dataclasses import asdict

from tuneloom.api import GenerationMetric
from tuneloom.trainer.checkpoint import LoopState
from tuneloom.trainer.datafile import Example, Message
from tuneloom.trainer.evaluate import EvaluationResult, ScoredAnswer, run_checks, score
from tuneloom.trainer.report import (
    RunReport,
    TrainingResult,
    few_shot_verdict,
    format_metrics_table,
    format_samples,
)

METRICS = [GenerationMetric.exact_match, GenerationMetric.json_valid]


def _example(line: int, answer: str) -> Example:
    return Example(line=line, messages=(Message("user", f"question {line}"), Message("assistant", answer)))


def _loss(loss: float) -> EvaluationResult:
    return EvaluationResult({"validationLoss": loss, "tokenAccuracy": 0.5})


def test_checks_merge_into_one_result_in_the_order_they_ran() -> None:
    answers = score(['{"a": 1}', "no"], ['{"a": 1}', "yes"], METRICS)
    merged = run_checks([lambda: _loss(2.0), lambda: answers])
    assert list(merged.metrics) == ["validationLoss", "tokenAccuracy", "exact_match", "json_valid"]
    assert merged.metrics == {"validationLoss": 2.0, "tokenAccuracy": 0.5, "exact_match": 0.5, "json_valid": 0.5}
    assert merged.answers == (
        ScoredAnswer('{"a": 1}', {"exact_match": True, "json_valid": True}),
        ScoredAnswer("no", {"exact_match": False, "json_valid": False}),
    )
    assert run_checks([]) == EvaluationResult()


def test_a_checkpoint_from_before_typed_results_resumes_and_is_written_back_the_same() -> None:
    """The checkpoint keeps the base model's result as the plain dict earlier trainers wrote (which
    had no few-shot baseline)."""
    base = {
        "validationLoss": 3.1,
        "tokenAccuracy": 0.02,
        "exact_match": 0.0,
        "answers": ["hello", ""],
        "perExample": [{"exact_match": False}, {"exact_match": False}],
    }
    history = [{"epoch": 1, "step": 8, "validationLoss": 0.4, "tokenAccuracy": 0.9}]
    written_before = json.dumps(
        {
            "step": 9,
            "spec_sha256": "ab",
            "best_validation_loss": 0.4,
            "best_step": 8,
            "evaluations_without_improvement": 0,
            "stopped_early": False,
            "tokens_seen": 1234,
            "base_evaluation": base,
            "history": history,
        }
    )
    state = LoopState.from_json(written_before)
    assert state.base_evaluation == EvaluationResult(
        {"validationLoss": 3.1, "tokenAccuracy": 0.02, "exact_match": 0.0},
        (ScoredAnswer("hello", {"exact_match": False}), ScoredAnswer("", {"exact_match": False})),
    )
    assert (state.step, state.best_step, state.history) == (9, 8, history)
    added_since = {"few_shot_evaluation": None, "train_history": [], "micro_batches_per_step": None}
    assert json.loads(state.to_json()) == {**json.loads(written_before), **added_since}


def test_a_result_without_answers_keeps_only_its_metrics() -> None:
    assert _loss(1.0).to_record() == {"validationLoss": 1.0, "tokenAccuracy": 0.5}
    assert EvaluationResult.from_record(_loss(1.0).to_record()) == _loss(1.0)
    assert json.loads(LoopState().to_json()) == asdict(LoopState())


def _report(base: EvaluationResult, adapter: EvaluationResult, held_out: list[Example]) -> RunReport:
    state = LoopState(step=8, best_step=6, stopped_early=True, tokens_seen=640, history=[{"epoch": 1}])
    return RunReport(held_out, base, adapter, TrainingResult(state, seconds=12.345), peak_memory_bytes=2048)


def test_the_manifest_metrics_hold_both_models_figures_and_the_training() -> None:
    base = EvaluationResult({"validationLoss": 3.0, "exact_match": 0.0}, (ScoredAnswer("x", {"exact_match": False}),))
    adapter = EvaluationResult({"validationLoss": 0.2, "exact_match": 1.0}, (ScoredAnswer("y", {"exact_match": True}),))
    assert _report(base, adapter, [_example(3, "y")]).metrics() == {
        "base": {"validationLoss": 3.0, "exact_match": 0.0},
        "adapter": {"validationLoss": 0.2, "exact_match": 1.0},
        "steps": 8,
        "bestStep": 6,
        "stoppedEarly": True,
        "tokensSeen": 640,
        "trainSeconds": 12.3,
        "gpuSeconds": 0.0,
        "peakMemoryBytes": 2048,
        "history": [{"epoch": 1}],
        "overfitting": {"detected": False, "rule": None, "reason": "no sign of overfitting in the evaluation history"},
        "preemptedAtSteps": [],
    }


def test_evaluation_json_pairs_each_prompt_with_both_answers() -> None:
    held_out = [_example(3, "yes"), _example(7, "no")]
    base = score(["maybe", "no"], ["yes", "no"], METRICS[:1])
    adapter = score(["yes", "no"], ["yes", "no"], METRICS[:1])
    [first, second] = _report(base, adapter, held_out).samples()
    assert first == {
        "line": 3,
        "prompt": "question 3",
        "reference": "yes",
        "base": "maybe",
        "adapter": "yes",
        "baseScores": {"exact_match": False},
        "adapterScores": {"exact_match": True},
    }
    assert (second["line"], second["base"], second["baseScores"]) == (7, "no", {"exact_match": True})


def test_evaluation_json_has_only_prompts_both_models_answered() -> None:
    """A resumed run's base result comes from its checkpoint, made under another evaluation spec."""
    held_out = [_example(3, "yes"), _example(7, "no")]
    adapter = score(["yes", "no"], ["yes", "no"], METRICS[:1])
    assert _report(_loss(3.0), adapter, held_out).samples() == []
    fewer = score(["maybe"], ["yes"], METRICS[:1])
    assert [sample["line"] for sample in _report(fewer, adapter, held_out).samples()] == [3]


def _with_few_shot(few_shot: EvaluationResult, **report) -> RunReport:
    base = score(["x", "{}"], ["y", '{"a": 1}'], METRICS)
    adapter = score(['{"a": 1}', "{}"], ["y", '{"a": 1}'], METRICS)
    state = LoopState(step=8, tokens_seen=640)
    training = TrainingResult(state, seconds=100.0)
    held_out = [_example(3, "y"), _example(7, '{"a": 1}')]
    return RunReport(held_out, base, adapter, training, peak_memory_bytes=1, few_shot=few_shot, **report)


def test_the_few_shot_baseline_is_a_third_column_in_metrics_evaluation_json_and_the_table() -> None:
    few_shot = score(["y", "nope"], ["y", '{"a": 1}'], METRICS)
    report = _with_few_shot(few_shot)
    metrics = report.metrics()
    assert list(metrics)[:3] == ["base", "fewShot", "adapter"]
    assert metrics["fewShot"] == {"exact_match": 0.5, "json_valid": 0.0}
    [first, second] = report.samples()
    assert (first["fewShot"], first["fewShotScores"]) == ("y", {"exact_match": True, "json_valid": False})
    assert second["fewShot"] == "nope" and second["adapter"] == "{}"
    assert format_metrics_table(metrics).splitlines() == [
        "held-out metric         base  few-shot   adapter",
        "exact_match            0.000     0.500     0.000",
        "json_valid             0.500     0.000     1.000",
    ]
    assert "           few-shot  y " in format_samples(report.samples())
    assert few_shot_verdict(metrics) == [
        "the adapter beats the few-shot baseline on json_valid by 100 points",
        "a few-shot prompt does as well as the adapter on exact_match: consider prompting instead",
    ]


def test_without_a_baseline_there_is_no_few_shot_key_column_value_or_verdict() -> None:
    report = _with_few_shot(EvaluationResult())
    assert "fewShot" not in report.metrics()
    assert all("fewShot" not in sample for sample in report.samples())
    assert format_metrics_table(report.metrics()).splitlines()[1] == "exact_match            0.000         -     0.000"
    assert few_shot_verdict(report.metrics()) == []


def test_the_verdict_names_each_metric_the_adapter_wins_by_its_margin() -> None:
    summary = {
        "fewShot": {"exact_match": 0.25, "json_valid": 0.5},
        "adapter": {"exact_match": 0.75, "json_valid": 0.53125},
    }
    assert few_shot_verdict(summary) == [
        "the adapter beats the few-shot baseline on exact_match by 50 points and on json_valid by 3.1 points"
    ]


def test_the_manifest_compares_the_estimate_with_the_gpu_time_and_cost() -> None:
    estimate = {"tokens": 640, "steps": 8, "seconds": 80.0, "cost": 0.1}
    metrics = _with_few_shot(EvaluationResult(), estimate=estimate, gpus=2, price_per_gpu_hour=3.6).metrics()
    assert (metrics["trainSeconds"], metrics["gpuSeconds"], metrics["cost"]) == (100.0, 200.0, 0.2)
    assert metrics["estimate"] == estimate
    on_cpu = _with_few_shot(EvaluationResult()).metrics()
    assert on_cpu["gpuSeconds"] == 0.0 and "cost" not in on_cpu and "estimate" not in on_cpu


def test_a_checkpoint_keeps_the_few_shot_result() -> None:
    state = LoopState(step=3, base_evaluation=_loss(2.0), few_shot_evaluation=score(["a"], ["a"], METRICS[:1]))
    assert LoopState.from_json(state.to_json()) == state
