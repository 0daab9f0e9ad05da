"""Preference tuning (method: dpo): the supervised loop with pairs for examples and DPO for its
objective, so plans, checkpoints, resume, preemption, early stopping and progress are the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneloom.trainer import distributed
from tuneloom.trainer.loop import TrainingLoop
from tuneloom.trainer.modeling import autocast
from tuneloom.trainer.overfitting import detect_overfitting
from tuneloom.trainer.preference import DpoObjective, PairBatch, collate_pairs
from tuneloom.trainer.progress import ProgressReporter, RewardTotals


@dataclass(frozen=True)
class PreferenceResult:
    """Held-out pairs, the model against the reference policy: the mean loss per pair, the share of
    pairs whose preferred answer gets the higher implicit reward and the mean reward margin, and
    `preferenceAccuracy`: the share whose preferred answer the model itself finds likelier, by mean
    log-probability per answer token."""

    loss: float
    reward_accuracy: float
    reward_margin: float
    preference_accuracy: float
    pairs: int

    def metrics(self) -> dict[str, float]:
        return {
            "validationLoss": round(self.loss, 4),
            "preferenceAccuracy": round(self.preference_accuracy, 4),
            "rewardAccuracy": round(self.reward_accuracy, 4),
            "rewardMargin": round(self.reward_margin, 4),
        }


class PreferenceLoop(TrainingLoop):
    """`train` holds `EncodedPair`s, the plan's rows are rows of pairs, and a step's loss is the
    mean over its pairs."""

    def _loss_module(self, model: nn.Module) -> nn.Module:
        return DpoObjective(model, beta=self.spec.dpo.beta, loss=self.spec.dpo.loss)

    def _collate(self, rows: Sequence[Sequence[int]]) -> PairBatch:
        return collate_pairs(self.train, rows)

    def _units(self, batch: PairBatch) -> int:
        return batch.pairs

    def _step_figures(self, outputs: list[tuple[torch.Tensor, ...]], weight: float) -> dict[str, Any]:
        def summed(index: int) -> float:
            return distributed.total(sum(float(output[index]) for output in outputs) * weight, self.ranks)

        return {"rewards": RewardTotals(correct=summed(1), margin=summed(3), pairs=int(summed(2)))}

    def evaluate(self) -> PreferenceResult:
        with autocast(self.device):
            return evaluate_preferences(self.loss_fn, self.validation_batches, self.device)

    def _validation_figures(self, result: PreferenceResult) -> dict[str, float]:
        return result.metrics()

    def _report_validation(self, result: PreferenceResult, reporter: ProgressReporter) -> None:
        reporter.preference_evaluation(result.metrics(), detect_overfitting(self.state.history))


@torch.no_grad()
def evaluate_preferences(objective: nn.Module, batches: Sequence[PairBatch], device: torch.device) -> PreferenceResult:
    was_training = objective.training
    objective.eval()
    totals = [0.0] * 5
    for batch in batches:
        totals = [total + float(value) for total, value in zip(totals, objective(batch.to(device)), strict=True)]
    loss, rewarded, pairs, margin, preferred = totals
    objective.train(was_training)
    count = max(pairs, 1)
    return PreferenceResult(loss / count, rewarded / count, margin / count, preferred / count, int(pairs))
