"""The trainer's progress, as polled from its /progress endpoint, turned into OpenAI job events,
checkpoints and a result file. Pure functions, so the mapping is unit-tested without a trainer."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

from tuneloom.registry import Promotion

from .state import EventRecord, NewEvent

PHASE_MESSAGES = {
    "loading-model": "Loading the base model",
    "evaluating-base": "Evaluating the base model on the held-out examples",
    "evaluating": "Evaluating the fine-tuned model on the held-out examples",
    "uploading": "Publishing the fine-tuned model",
}
RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "valid_mean_token_accuracy", "learning_rate")
METRICS_COLUMNS = ("train_loss", "learning_rate")


@dataclass
class Translation:
    events: list[NewEvent] = field(default_factory=list)
    checkpoints: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    eta_seconds: float | None = None


def translate(previous: dict[str, Any], current: dict[str, Any]) -> Translation:
    """What changed between two polls of the trainer's /progress (the latest of its records merged
    into one object, so each figure keeps its last value). A step logged between two polls is not
    seen; checkpoints and the resume point are, through fields that only ever move forward."""
    out = Translation()
    kind, at = current.get("event"), int(current.get("time", 0)) or None
    if kind != previous.get("event") and kind in PHASE_MESSAGES:
        out.events.append(NewEvent(message=PHASE_MESSAGES[kind], created_at=at))
    expected = current.get("estimate")
    if expected and not previous.get("estimate"):
        cost = "" if expected.get("cost") is None else f", cost {expected['cost']}"
        message = (
            f"Estimated before training: {expected.get('tokens')} tokens, {expected.get('steps')} steps, "
            f"about {expected.get('seconds')} s{cost}"
        )
        out.events.append(NewEvent(message=message, data={"estimate": expected}, created_at=at))
    total = current.get("totalSteps")
    if total and not previous.get("totalSteps"):
        start = current.get("startStep", 0)
        message = f"Training resumed at step {start} of {total}" if start else f"Training started: {total} steps"
        out.events.append(NewEvent(message=message, created_at=at, data={"step": start, "total_steps": total}))
    if current.get("trainLoss") is not None and current.get("step", 0) > previous.get("step", 0):
        data = {
            "step": current.get("step"),
            "total_steps": total,
            "epoch": current.get("epoch"),
            "train_loss": current.get("trainLoss"),
            "valid_loss": current.get("validationLoss"),
            "learning_rate": current.get("learningRate"),
            "tokens_per_second": current.get("tokensPerSecond"),
        }
        message = f"Step {data['step']}/{total}: training loss={data['train_loss']}"
        out.events.append(NewEvent(message=message, type="metrics", data=data, created_at=at))
        out.eta_seconds = current.get("etaSeconds")
    evaluated = (current.get("validationLoss"), current.get("tokenAccuracy"))
    if evaluated[1] is not None and evaluated != (previous.get("validationLoss"), previous.get("tokenAccuracy")):
        step = current.get("step")
        data = {"step": step, "valid_loss": evaluated[0], "valid_mean_token_accuracy": evaluated[1]}
        message = f"Evaluation at step {step}: validation loss={evaluated[0]}, token accuracy={evaluated[1]}"
        out.events.append(NewEvent(message=message, data=data, created_at=at))
    checkpoint = current.get("checkpointStep")
    if checkpoint is not None and checkpoint != previous.get("checkpointStep"):
        out.checkpoints.append((int(checkpoint), checkpoint_metrics(int(checkpoint), current)))
        message = f"Checkpoint created at step {checkpoint}"
        out.events.append(NewEvent(message=message, data={"step": checkpoint}, created_at=at))
    return out


def checkpoint_metrics(step: int, progress: dict[str, Any]) -> dict[str, Any]:
    figures = {
        "step": step,
        "train_loss": progress.get("trainLoss"),
        "valid_loss": progress.get("validationLoss"),
        "valid_mean_token_accuracy": progress.get("tokenAccuracy"),
    }
    return {k: v for k, v in figures.items() if v is not None}


def comparison_event(base: dict[str, Any], tuned: dict[str, Any]) -> NewEvent:
    """Base model vs fine-tuned model on the held-out examples, from the adapter's manifest."""
    names = [name for name in ("validationLoss", "tokenAccuracy", "exact_match", "json_valid") if name in tuned]
    parts = [f"{name} {base.get(name)} -> {tuned[name]}" for name in names]
    return NewEvent(
        message="Base model vs fine-tuned model on held-out examples: " + ", ".join(parts),
        data={"base": base, "fine_tuned": tuned},
    )


def promotion_event(promotion: Promotion, fine_tuned_model: str) -> NewEvent:
    """The promotion gate's verdict: the model is created, or (a warning) it is not, and why."""
    data = {"promoted": promotion.promoted, "reasons": promotion.reasons}
    if promotion.promoted:
        return NewEvent(message=f"New fine-tuned model created: {fine_tuned_model}", data=data)
    return NewEvent(
        message="The fine-tuned model was not promoted, so no fine_tuned_model is created: "
        + "; ".join(promotion.reasons)
        + ". Its checkpoints can still be served; create the job again with more data, epochs or a higher "
        "learning_rate_multiplier",
        level="warn",
        data=data,
    )


def result_csv(events: list[EventRecord]) -> bytes:
    """`step,train_loss,valid_loss,...`: one row per logged step, evaluations merged in by step."""
    rows: dict[int, dict[str, Any]] = {}
    for event in events:
        data = event.data or {}
        step = data.get("step")
        if step is None or not ({"train_loss", "valid_loss"} & set(data)):
            continue
        row = rows.setdefault(int(step), {"step": int(step)})
        # A metrics event's valid_loss is the last evaluation's; the CSV has each where it was measured.
        columns = METRICS_COLUMNS if event.type == "metrics" else RESULT_COLUMNS
        row.update({k: v for k, v in data.items() if k in columns and v is not None})
    return _csv(rows)


def history_csv(loss_history: dict[str, Any]) -> bytes:
    """The same CSV from a published version's loss_history.json (Kubernetes mode, where no API
    process saw the steps): every step's training loss, each evaluation's figures at its step; the
    learning rate is not in the history."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in loss_history.get("train") or []:
        rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})["train_loss"] = entry["loss"]
    for entry in loss_history.get("validation") or []:
        row = rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        figures = {"valid_loss": entry.get("validationLoss"), "valid_mean_token_accuracy": entry.get("tokenAccuracy")}
        row.update({k: v for k, v in figures.items() if v is not None})
    return _csv(rows)


def _csv(rows: dict[int, dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return buffer.getvalue().encode()
