"""What a finished run found, base model vs few-shot baseline vs adapter on held-out prompts: the
manifest's `metrics`, evaluation.json, and the report a person reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneloom.registry import AdapterVersion
from tuneloom.trainer.checkpoint import LoopState
from tuneloom.trainer.datafile import Example
from tuneloom.trainer.estimate import run_cost
from tuneloom.trainer.evaluate import EvaluationResult, ScoredAnswer, references
from tuneloom.trainer.htmlreport import REPORT_FILE
from tuneloom.trainer.overfitting import OverfittingVerdict, detect_overfitting
from tuneloom.trainer.tokenize import question_text

ANSWER_WIDTH = 72


@dataclass(frozen=True)
class TrainingResult:
    """The loop's state at its end, the seconds this process spent in it, and the steps at which
    earlier runs of the job were preempted."""

    state: LoopState
    seconds: float
    preempted_at: Sequence[int] = ()


@dataclass(frozen=True)
class RunReport:
    held_out: Sequence[Example]
    base: EvaluationResult
    adapter: EvaluationResult
    training: TrainingResult
    peak_memory_bytes: int
    general_prompts: Sequence[Example] = ()
    # The base model prompted with training examples; empty when evaluation.fewShot.k is 0.
    few_shot: EvaluationResult = field(default_factory=EvaluationResult)
    # Before training: what the throughput model expected (`Estimate.to_status`).
    estimate: dict[str, Any] | None = None
    # GPUs that trained (0 on CPU) and the price of one GPU-hour, for the actual cost.
    gpus: int = 0
    price_per_gpu_hour: float | None = None

    def metrics(self) -> dict[str, Any]:
        """The manifest's `metrics`; the operator copies `base`, `fewShot` and `adapter` into the
        job's status."""
        state = self.training.state
        few_shot = {"fewShot": dict(self.few_shot.metrics)} if self.few_shot.metrics else {}
        cost = run_cost(self.gpu_seconds, self.price_per_gpu_hour)
        return {
            "base": dict(self.base.metrics),
            **few_shot,
            "adapter": dict(self.adapter.metrics),
            "steps": state.step,
            "bestStep": state.best_step,
            "stoppedEarly": state.stopped_early,
            "tokensSeen": state.tokens_seen,
            "trainSeconds": round(self.training.seconds, 1),
            "gpuSeconds": round(self.gpu_seconds, 1),
            **({} if cost is None else {"cost": cost}),
            **({} if self.estimate is None else {"estimate": self.estimate}),
            "peakMemoryBytes": self.peak_memory_bytes,
            "history": state.history,
            "overfitting": self.overfitting.to_record(),
            "preemptedAtSteps": list(self.training.preempted_at),
        }

    @property
    def overfitting(self) -> OverfittingVerdict:
        return detect_overfitting(self.training.state.history)

    @property
    def gpu_seconds(self) -> float:
        return self.training.seconds * self.gpus

    def samples(self) -> list[dict[str, Any]]:
        """The held-out part of evaluation.json: each held-out prompt both models answered (a resumed
        run's base may have answered fewer, or none), with its reference answer and both models'
        answers and scores, and the few-shot baseline's where it answered."""
        samples = _pairs(self.held_out, self.base.answers, self.adapter.answers)
        for sample, few_shot in zip(samples, self.few_shot.answers, strict=False):
            sample.update(fewShot=few_shot.text, fewShotScores=few_shot.scores)
        return samples

    def general_samples(self) -> list[dict[str, Any]]:
        """The general-ability part: each general prompt with both answers, the adapter's marked
        `agrees` by the agreement rule, and reference scores where the prompt has a reference."""
        return _pairs(self.general_prompts, self.base.general, self.adapter.general)

    def loss_history(self) -> dict[str, list[dict[str, Any]]]:
        """loss_history.json: the training loss of every step and the validation loss of every evaluation."""
        state = self.training.state
        return {"train": state.train_history, "validation": state.history}

    def evaluation_file(self) -> list[dict[str, Any]]:
        """evaluation.json: the held-out samples, then the general ones, each saying which it is,
        then the overfitting verdict on the run's evaluation history."""
        return [
            *({"check": "heldOut", **sample} for sample in self.samples()),
            *({"check": "general", **sample} for sample in self.general_samples()),
            {"check": "overfitting", **self.overfitting.to_record()},
        ]


def _pairs(
    examples: Sequence[Example], base: Sequence[ScoredAnswer], adapter: Sequence[ScoredAnswer]
) -> list[dict[str, Any]]:
    return [
        {
            "line": example.line,
            "prompt": question_text(example),
            "reference": reference,
            "base": base_answer.text,
            "adapter": adapter_answer.text,
            "baseScores": base_answer.scores,
            "adapterScores": adapter_answer.scores,
        }
        for example, reference, base_answer, adapter_answer in zip(
            examples, references(examples), base, adapter, strict=False
        )
    ]


def _cell(text: str, width: int = ANSWER_WIDTH) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= width else text[: width - 1] + "…"


def _marks(scores: dict[str, bool]) -> str:
    return "  ".join(f"{name} {'yes' if ok else 'no '}" for name, ok in scores.items())


def _value(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.3f}"


def format_samples(samples: list[dict[str, Any]]) -> str:
    """One block per held-out prompt: the expected answer, then each model's answer and scores."""
    lines = ["Held-out prompts: base model vs few-shot baseline vs adapter", ""]
    for sample in samples:
        lines.append(f"line {sample['line']:<5} expected  {_cell(sample['reference'])}")
        lines.append(f"{'':11}base      {_cell(sample['base']):<{ANSWER_WIDTH}}  {_marks(sample['baseScores'])}")
        if "fewShot" in sample:
            lines.append(
                f"{'':11}few-shot  {_cell(sample['fewShot']):<{ANSWER_WIDTH}}  {_marks(sample['fewShotScores'])}"
            )
        lines.append(f"{'':11}adapter   {_cell(sample['adapter']):<{ANSWER_WIDTH}}  {_marks(sample['adapterScores'])}")
    return "\n".join(lines)


def format_metrics_table(summary: dict[str, Any]) -> str:
    base, few_shot, tuned = summary["base"], summary.get("fewShot", {}), summary["adapter"]
    lines = [f"{'held-out metric':<18}{'base':>10}{'few-shot':>10}{'adapter':>10}"]
    lines += [f"{key:<18}{_value(base, key):>10}{_value(few_shot, key):>10}{_value(tuned, key):>10}" for key in tuned]
    return "\n".join(lines)


def few_shot_verdict(summary: dict[str, Any]) -> list[str]:
    """Whether fine-tuning was worth it: per generation metric, the adapter against the few-shot
    baseline (nothing when there was no baseline)."""
    few_shot, tuned = summary.get("fewShot", {}), summary["adapter"]
    compared = [key for key in few_shot if key in tuned]
    beaten = [key for key in compared if tuned[key] > few_shot[key]]
    matched = [key for key in compared if key not in beaten]
    lines = []
    if beaten:
        margins = " and ".join(f"on {key} by {_points(tuned[key] - few_shot[key])} points" for key in beaten)
        lines.append(f"the adapter beats the few-shot baseline {margins}")
    if matched:
        lines.append(
            f"a few-shot prompt does as well as the adapter on {', '.join(matched)}: consider prompting instead"
        )
    return lines


def _points(difference: float) -> str:
    return f"{round(difference * 100, 1):g}"


def print_report(report: RunReport, adapter: AdapterVersion) -> None:
    """What was published, printed: the same samples and metrics the registry holds."""
    summary, samples = report.metrics(), report.samples()
    if samples:
        print("\n" + format_samples(samples))
    print("\n" + format_metrics_table(summary))
    for line in few_shot_verdict(summary):
        print(line)
    if report.overfitting.detected:
        print(f"warning: overfitting: {report.overfitting.reason}")
    promotion = adapter.manifest.promotion
    verdict = "promoted" if promotion.promoted else "NOT promoted: " + "; ".join(promotion.reasons)
    print(
        f"\nadapter {adapter.id}: {verdict}: {adapter.uri}\n"
        f"{summary['steps']} steps, {summary['tokensSeen']} tokens in {summary['trainSeconds']} s\n"
        f"report: {adapter.uri}/{REPORT_FILE}"
    )
