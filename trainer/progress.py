"""Where a training run stands, told three ways: log lines for people, records for the operator
(the latest one is served at /progress, see `FineTuneRun`), and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tuneloom.api import Progress
from tuneloom.trainer.overfitting import OverfittingVerdict

log = logging.getLogger("tuneloom.trainer")


class _MeasuredGauge:
    """A labelled gauge that appears only once it holds a measurement: a loss exported as 0 before
    the first one would put a false point at the start of every loss curve."""

    def __init__(self, family: Gauge, values: tuple[str, ...]):
        self._family, self._values = family, values

    def set(self, value: float) -> None:
        self._family.labels(*self._values).set(value)


class TrainerMetrics:
    """tuneloom_trainer_* series, labelled with the job so dashboards can plot one curve per job."""

    def __init__(self, registry: CollectorRegistry, namespace: str, name: str):
        labels = ["job_namespace", "finetunejob"]
        values = (namespace, name)

        def gauge(metric: str, doc: str) -> Gauge:
            return Gauge(f"tuneloom_trainer_{metric}", doc, labels, registry=registry).labels(*values)

        def measured(metric: str, doc: str) -> _MeasuredGauge:
            return _MeasuredGauge(Gauge(f"tuneloom_trainer_{metric}", doc, labels, registry=registry), values)

        self.step = gauge("step", "Optimizer steps completed.")
        self.total_steps = gauge("total_steps", "Optimizer steps planned for the run.")
        self.epoch = gauge("epoch", "Fractional epoch reached.")
        self.train_loss = measured("train_loss", "Mean training loss over the last logging interval.")
        self.validation_loss = measured("validation_loss", "Validation loss at the last evaluation.")
        self.validation_accuracy = measured("validation_token_accuracy_ratio", "Next-token accuracy on held-out data.")
        self.learning_rate = measured("learning_rate", "Current learning rate.")
        self.eta = measured("eta_seconds", "Estimated seconds until training ends.")
        self.peak_memory = measured("peak_memory_bytes", "Peak accelerator memory (GPU) or resident memory (CPU).")
        self.reward_accuracy = measured(
            "reward_accuracy_ratio",
            "method: dpo: share of the last logging interval's training pairs whose preferred answer got the higher "
            "implicit reward.",
        )
        self.reward_margin = measured(
            "reward_margin_nats",
            "method: dpo: mean implicit reward (beta x log policy/reference) of the preferred answer minus the "
            "other's, over the last logging interval's training pairs.",
        )
        self.validation_preference_accuracy = measured(
            "validation_preference_accuracy_ratio",
            "method: dpo: share of held-out pairs whose preferred answer has the higher mean log-probability per "
            "answer token, at the last evaluation.",
        )
        # One series per model (base, adapter): the general-ability figures both were measured on.
        by_model = [*labels, "model"]

        def per_model(metric: str, doc: str) -> Gauge:
            return Gauge(f"tuneloom_trainer_{metric}", doc, by_model, registry=registry)

        self._values = values
        self._general = {
            "general.nllShift": per_model(
                "general_nll_shift_nats", "Mean per-token NLL given to the base's general answers, minus the base's."
            ),
            "general.agreement": per_model(
                "general_agreement_ratio", "Share of general prompts answered as the base did (same first sentence)."
            ),
            "general.exact_match": per_model(
                "general_exact_match_ratio", "General prompts answered exactly as expected."
            ),
            "general.contains": per_model(
                "general_contains_ratio", "General prompts whose answer holds the expected one."
            ),
        }
        self.promoted = gauge("adapter_promoted", "1 when the published version passed the promotion gate, else 0.")
        self.tokens = Counter(
            "tuneloom_trainer_tokens", "Tokens processed, padding excluded.", labels, registry=registry
        ).labels(*values)
        self.step_duration = Histogram(
            "tuneloom_trainer_step_duration_seconds",
            "Wall time of one optimizer step.",
            labels,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        ).labels(*values)

    def general(self, model: str, metrics: dict[str, Any]) -> None:
        """One model's (base or adapter) general-ability figures, those it has."""
        for name, family in self._general.items():
            if name in metrics:
                family.labels(*self._values, model).set(metrics[name])


@dataclass(frozen=True)
class RewardTotals:
    """A DPO step's pairs: how many had the preferred answer rewarded higher, and the summed margin."""

    correct: float
    margin: float
    pairs: int


@dataclass
class _Interval:
    """Accumulates the steps between two progress lines."""

    started: float
    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0
    rewarded: float = 0.0
    margin: float = 0.0
    pairs: int = 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressReporter:
    def __init__(
        self,
        *,
        total_steps: int,
        steps_per_epoch: int,
        logging_steps: int,
        metrics: TrainerMetrics | None = None,
        start_step: int = 0,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.logging_steps = logging_steps
        self.metrics = metrics
        self.start_step = start_step
        self.on_record = on_record
        self.run_started = time.monotonic()
        self.interval = _Interval(started=self.run_started)
        self.overfitting_warned = False
        self.state = Progress(step=start_step, totalSteps=total_steps, epoch=start_step / max(steps_per_epoch, 1))
        if metrics:
            metrics.total_steps.set(total_steps)
            metrics.step.set(start_step)

    def event(self, name: str, **fields: Any) -> None:
        """A phase change (validating-data, loading-model, evaluating-base, evaluating-few-shot,
        training, evaluating, uploading, succeeded)."""
        log.info("event %s%s", name, "".join(f" {key}={json.dumps(value)}" for key, value in fields.items()))
        self._emit({"event": name, **fields})

    def step(
        self,
        step: int,
        *,
        loss: float,
        tokens: int,
        learning_rate: float,
        seconds: float,
        rewards: RewardTotals | None = None,
    ) -> None:
        interval = self.interval
        interval.loss_sum += loss
        interval.steps += 1
        interval.tokens += tokens
        if rewards is not None:
            interval.rewarded += rewards.correct
            interval.margin += rewards.margin
            interval.pairs += rewards.pairs
        self.state.step = step
        self.state.percent = 100 * step // max(self.total_steps, 1)
        self.state.epoch = round(step / self.steps_per_epoch, 3)
        if self.metrics:
            self.metrics.step.set(step)
            self.metrics.epoch.set(self.state.epoch)
            self.metrics.tokens.inc(tokens)
            self.metrics.learning_rate.set(learning_rate)
            self.metrics.step_duration.observe(seconds)
        if step % self.logging_steps == 0 or step == self.total_steps:
            self._flush(learning_rate)

    def _flush(self, learning_rate: float) -> None:
        now = time.monotonic()
        interval = self.interval
        elapsed = max(now - interval.started, 1e-9)
        done_here = self.state.step - self.start_step
        rate = done_here / max(now - self.run_started, 1e-9)
        self.state.trainLoss = round(interval.loss_sum / interval.steps, 4)
        self.state.tokensPerSecond = round(interval.tokens / elapsed, 1)
        self.state.etaSeconds = round((self.total_steps - self.state.step) / rate, 1) if rate > 0 else None
        rewards = ""
        if interval.pairs:
            self.state.rewardAccuracy = round(interval.rewarded / interval.pairs, 4)
            self.state.rewardMargin = round(interval.margin / interval.pairs, 4)
            rewards = f" reward accuracy {self.state.rewardAccuracy:.3f} margin {self.state.rewardMargin:.4f}"
        if self.metrics:
            self.metrics.train_loss.set(self.state.trainLoss)
            if self.state.etaSeconds is not None:
                self.metrics.eta.set(self.state.etaSeconds)
            if interval.pairs:
                self.metrics.reward_accuracy.set(self.state.rewardAccuracy)
                self.metrics.reward_margin.set(self.state.rewardMargin)
        eta = _duration(self.state.etaSeconds) if self.state.etaSeconds is not None else "?"
        log.info(
            "step %d/%d (%d%%) epoch %.2f loss %.4f lr %.2e %.0f tok/s eta %s%s",
            self.state.step,
            self.total_steps,
            100 * self.state.step // max(self.total_steps, 1),
            self.state.epoch,
            self.state.trainLoss,
            learning_rate,
            self.state.tokensPerSecond,
            eta,
            rewards,
        )
        self._emit({"event": "progress", **self.state.model_dump(exclude_none=True), "learningRate": learning_rate})
        self.interval = _Interval(started=now)

    def evaluation(self, *, loss: float, accuracy: float, overfitting: OverfittingVerdict) -> None:
        """One evaluation's figures, and the overfitting verdict on the history so far: warned about
        once, when it first turns up, and carried in every later record (the operator's
        `Overfitting` condition)."""
        self.state.validationLoss = round(loss, 4)
        if self.metrics:
            self.metrics.validation_loss.set(loss)
            self.metrics.validation_accuracy.set(accuracy)
        log.info("validation at step %d: loss %.4f token accuracy %.3f", self.state.step, loss, accuracy)
        self._emit_evaluation({"tokenAccuracy": accuracy}, overfitting)

    def _emit_evaluation(self, figures: dict[str, Any], overfitting: OverfittingVerdict) -> None:
        record: dict[str, Any] = {"event": "evaluation", **self.state.model_dump(exclude_none=True)}
        if overfitting.detected:
            if not self.overfitting_warned:
                log.warning("overfitting: %s", overfitting.reason)
                self.overfitting_warned = True
            record["overfitting"] = overfitting.to_record()
        self._emit({**record, **figures})

    def preference_evaluation(self, metrics: dict[str, float], overfitting: OverfittingVerdict) -> None:
        """A DPO run's held-out figures (`PreferenceResult.metrics`), and the overfitting verdict as
        for supervised runs (the rules compare DPO's training and validation loss)."""
        self.state.validationLoss = metrics["validationLoss"]
        if self.metrics:
            self.metrics.validation_loss.set(metrics["validationLoss"])
            self.metrics.validation_preference_accuracy.set(metrics["preferenceAccuracy"])
        log.info(
            "validation at step %d: loss %.4f preference accuracy %.3f reward accuracy %.3f margin %.4f",
            self.state.step,
            metrics["validationLoss"],
            metrics["preferenceAccuracy"],
            metrics["rewardAccuracy"],
            metrics["rewardMargin"],
        )
        # rewardAccuracy and rewardMargin stay the training interval's, as in every progress record.
        self._emit_evaluation({"preferenceAccuracy": metrics["preferenceAccuracy"]}, overfitting)

    def published(self, figures: dict[str, dict[str, Any]], promoted: bool) -> None:
        """The general-ability figures of both models and the promotion verdict, as gauges."""
        if not self.metrics:
            return
        for model, metrics in figures.items():
            self.metrics.general(model, metrics)
        self.metrics.promoted.set(1 if promoted else 0)

    def peak_memory(self, value: int) -> None:
        if self.metrics:
            self.metrics.peak_memory.set(value)

    def _emit(self, record: dict[str, Any]) -> None:
        if self.on_record:
            self.on_record({"time": time.time(), **record})
