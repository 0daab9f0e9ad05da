"""The trainer's progress records (JSON lines) turned into OpenAI job events, checkpoints and a
result file. Pure functions over records, so the mapping is unit-tested without a trainer."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

from .state import EventRecord, NewEvent

PHASE_MESSAGES = {
    "loading-model": "Loading the base model",
    "evaluating-base": "Evaluating the base model on the held-out examples",
    "evaluating": "Evaluating the fine-tuned model on the held-out examples",
    "uploading": "Publishing the fine-tuned model",
}
RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "valid_mean_token_accuracy", "learning_rate")
METRICS_COLUMNS = ("train_loss", "learning_rate")


def read_records(text: bytes) -> tuple[list[dict[str, Any]], int]:
    """Complete lines of a progress file's new bytes, and how many bytes they took (a last line
    without its newline is still being written: it is read next time)."""
    end = text.rfind(b"\n") + 1
    records = []
    for line in text[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn line from a killed trainer
    return records, end


@dataclass
class Translation:
    events: list[NewEvent] = field(default_factory=list)
    checkpoints: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    eta_seconds: float | None = None


@dataclass
class RunView:
    """What the translation remembers between records: the latest figures, for checkpoints."""

    train_loss: float | None = None
    valid_loss: float | None = None
    valid_accuracy: float | None = None


def translate(records: list[dict[str, Any]], view: RunView) -> Translation:
    out = Translation()
    for record in records:
        kind, at = record.get("event"), int(record.get("time", 0)) or None
        if kind in PHASE_MESSAGES:
            out.events.append(NewEvent(message=PHASE_MESSAGES[kind], created_at=at))
        elif kind == "training":
            step, total = record.get("step", 0), record.get("totalSteps", 0)
            message = f"Training resumed at step {step} of {total}" if step else f"Training started: {total} steps"
            out.events.append(NewEvent(message=message, created_at=at, data={"step": step, "total_steps": total}))
        elif kind == "progress":
            view.train_loss = record.get("trainLoss")
            data = {
                "step": record.get("step"),
                "total_steps": record.get("totalSteps"),
                "epoch": record.get("epoch"),
                "train_loss": view.train_loss,
                "valid_loss": record.get("validationLoss"),
                "learning_rate": record.get("learningRate"),
                "tokens_per_second": record.get("tokensPerSecond"),
            }
            message = f"Step {data['step']}/{data['total_steps']}: training loss={view.train_loss}"
            out.events.append(NewEvent(message=message, type="metrics", data=data, created_at=at))
            out.eta_seconds = record.get("etaSeconds", out.eta_seconds)
        elif kind == "evaluation":
            view.valid_loss, view.valid_accuracy = record.get("validationLoss"), record.get("tokenAccuracy")
            step = record.get("step")
            data = {"step": step, "valid_loss": view.valid_loss, "valid_mean_token_accuracy": view.valid_accuracy}
            message = (
                f"Evaluation at step {step}: validation loss={view.valid_loss}, token accuracy={view.valid_accuracy}"
            )
            out.events.append(NewEvent(message=message, data=data, created_at=at))
        elif kind == "checkpoint":
            step = int(record["step"])
            out.checkpoints.append((step, checkpoint_metrics(step, view)))
            out.events.append(
                NewEvent(message=f"Checkpoint created at step {step}", data={"step": step}, created_at=at)
            )
    return out


def checkpoint_metrics(step: int, view: RunView) -> dict[str, Any]:
    figures = {
        "step": step,
        "train_loss": view.train_loss,
        "valid_loss": view.valid_loss,
        "valid_mean_token_accuracy": view.valid_accuracy,
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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return buffer.getvalue().encode()
