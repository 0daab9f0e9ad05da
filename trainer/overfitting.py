"""Whether a run overfits, read from its evaluation history (standard library only).

Two rules, checked at each evaluation in order; the first that fires decides the verdict:

- **rising validation loss**: the validation loss rose at each of two evaluations in a row while
  the training loss fell over the same span (the training loss at the later evaluation is lower
  than two evaluations before);
- **loss ratio**: from the second evaluation on, the training loss is under `MIN_LOSS_RATIO` times
  the validation loss, and at least `MIN_LOSS_GAP` nats under it: the model fits its training data
  far better than data it has not seen.

The training loss of an evaluation is the mean loss of the optimizer steps since the previous one
(history entries without it, written by older checkpoints, are skipped). Once a rule has fired the
verdict stays: a later evaluation does not undo what the run went through (early stopping keeps
the best weights either way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Training loss under half the validation loss: the gap a held-out set should not show on a
# behaviour the training data teaches; the first evaluation is left out, as it averages the first
# steps' high losses and cannot tell.
MIN_LOSS_RATIO = 0.5
# Near zero the ratio is noise (0.01 against 0.03 is a third): a gap under this many nats is none.
MIN_LOSS_GAP = 0.1
RULE_RISING_VALIDATION = "risingValidationLoss"
RULE_LOSS_RATIO = "lossRatio"


@dataclass(frozen=True)
class OverfittingVerdict:
    """`detected`, which rule fired (None when none did) and why, with the numbers."""

    detected: bool = False
    rule: str | None = None
    reason: str = "no sign of overfitting in the evaluation history"

    def to_record(self) -> dict[str, Any]:
        """The manifest's `metrics.overfitting` and /progress's `overfitting`."""
        return asdict(self)


def _rising_validation(previous: Sequence[Mapping[str, Any]], latest: Mapping[str, Any]) -> str | None:
    first, second = previous
    losses = [entry["validationLoss"] for entry in (first, second, latest)]
    if not (losses[0] < losses[1] < losses[2] and latest["trainLoss"] < first["trainLoss"]):
        return None
    steps = ", ".join(f"step {entry['step']}" for entry in (first, second, latest))
    return (
        f"validation loss rose for two evaluations ({' -> '.join(f'{loss:.4f}' for loss in losses)} at {steps}) "
        f"while training loss fell ({first['trainLoss']:.4f} -> {latest['trainLoss']:.4f})"
    )


def _loss_ratio(latest: Mapping[str, Any]) -> str | None:
    validation = latest["validationLoss"]
    train = latest["trainLoss"]
    if validation - train < MIN_LOSS_GAP or train / validation >= MIN_LOSS_RATIO:
        return None
    return (
        f"training loss {train:.4f} is {train / validation:.2f} times the validation "
        f"loss {validation:.4f} at step {latest['step']}, under the bound {MIN_LOSS_RATIO}"
    )


def detect_overfitting(history: Sequence[Mapping[str, Any]]) -> OverfittingVerdict:
    """The verdict on a history of evaluations, each with `step`, `trainLoss` and `validationLoss`."""
    entries = [entry for entry in history if entry.get("trainLoss") is not None]
    for index, latest in enumerate(entries):
        if index >= 2 and (reason := _rising_validation(entries[index - 2 : index], latest)):
            return OverfittingVerdict(True, RULE_RISING_VALIDATION, reason)
        if index >= 1 and (reason := _loss_ratio(latest)):
            return OverfittingVerdict(True, RULE_LOSS_RATIO, reason)
    return OverfittingVerdict()
