"""Checkpoints in object storage, so a restarted job continues where it stopped.

Layout: `<run prefix>/step-<N>/` (see `tuneloom.registry.run_prefix`) holding the trainable weights, the optimizer
state and the loop's state, committed with a manifest written last (a checkpoint without one
was interrupted and is ignored). `published.json` beside them records the adapter version a
finished run wrote, so a rerun of a finished job does not publish a second version.
`preemptions.json` lists the steps at which runs of the job were preempted (see
`tuneloom.trainer.preemption`): kept apart from the checkpoints, because a preemption that comes
while a checkpoint of the same step is being written adds no checkpoint of its own.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneloom.registry import commit_files, committed_steps, fetch_committed, read_published, write_published
from tuneloom.storage import ObjectNotFoundError, ObjectStore
from tuneloom.trainer.evaluate import EvaluationResult

log = logging.getLogger("tuneloom.trainer")

PREEMPTIONS = "preemptions.json"


@dataclass
class LoopState:
    """Everything besides tensors that the training loop needs to continue exactly."""

    step: int = 0
    spec_sha256: str = ""
    best_validation_loss: float | None = None
    best_step: int = 0
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    tokens_seen: int = 0
    base_evaluation: EvaluationResult | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # The training loss of every optimizer step, {"step", "loss"}: the report's curve (absent from older checkpoints).
    train_history: list[dict[str, Any]] = field(default_factory=list)
    # The few-shot baseline, measured with the base model (absent from older checkpoints).
    few_shot_evaluation: EvaluationResult | None = None

    def to_json(self) -> str:
        base, few_shot = self.base_evaluation, self.few_shot_evaluation
        record = asdict(replace(self, base_evaluation=None, few_shot_evaluation=None))
        record["base_evaluation"] = None if base is None else base.to_record()
        record["few_shot_evaluation"] = None if few_shot is None else few_shot.to_record()
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str) -> LoopState:
        record = json.loads(text)
        results = {
            key: EvaluationResult.from_record(value)
            for key in ("base_evaluation", "few_shot_evaluation")
            if (value := record.pop(key, None)) is not None
        }
        return cls(**record, **results)


def checkpoint_metrics(state: LoopState) -> dict[str, Any]:
    """What a checkpoint's manifest says of the run so far, under /progress's names (readers list
    checkpoints with their figures from the manifests alone): the last step's training loss, the
    last evaluation's validation loss and token accuracy, the tokens trained on."""
    figures: dict[str, Any] = {"tokensSeen": state.tokens_seen}
    if state.train_history:
        figures["trainLoss"] = state.train_history[-1]["loss"]
    if state.history:
        evaluation = state.history[-1]
        figures |= {key: evaluation[key] for key in ("validationLoss", "tokenAccuracy") if key in evaluation}
    return figures


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (LoRA weights, or every weight for a full fine-tune), on CPU."""
    return {
        name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}); start with --fresh")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


class CheckpointStore:
    def __init__(self, store: ObjectStore, prefix: str):
        self.store = store
        self.prefix = prefix

    def committed_steps(self) -> list[int]:
        return committed_steps(self.store, self.prefix)

    def save(
        self,
        state: LoopState,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        best: dict[str, torch.Tensor] | None,
        keep: int,
    ) -> None:
        with tempfile.TemporaryDirectory(prefix="tuneloom-ckpt-") as tmp:
            files = {"trainable.safetensors": Path(tmp) / "trainable.safetensors"}
            save_file(trainable_state(model), files["trainable.safetensors"])
            files["optimizer.pt"] = Path(tmp) / "optimizer.pt"
            torch.save(optimizer.state_dict(), files["optimizer.pt"])
            if best is not None:
                files["best.safetensors"] = Path(tmp) / "best.safetensors"
                save_file(best, files["best.safetensors"])
            files["state.json"] = Path(tmp) / "state.json"
            files["state.json"].write_text(state.to_json())
            manifest = {"step": state.step, "metrics": checkpoint_metrics(state)}
            commit_files(self.store, f"{self.prefix}/step-{state.step:08d}", files, manifest)
        log.info("checkpoint at step %d saved to %s", state.step, self.store.describe(self.prefix))
        for old in self.committed_steps()[:-keep]:
            self.store.delete_prefix(f"{self.prefix}/step-{old:08d}/")

    def load_latest(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> tuple[LoopState, dict[str, torch.Tensor] | None] | None:
        steps = self.committed_steps()
        if not steps:
            return None
        with tempfile.TemporaryDirectory(prefix="tuneloom-ckpt-") as tmp:
            dest = Path(tmp) / "checkpoint"
            fetch_committed(self.store, f"{self.prefix}/step-{steps[-1]:08d}", dest)
            state = LoopState.from_json((dest / "state.json").read_text())
            load_trainable_state(model, load_file(dest / "trainable.safetensors"))
            optimizer.load_state_dict(torch.load(dest / "optimizer.pt", map_location=device, weights_only=True))
            best_file = dest / "best.safetensors"
            best = load_file(best_file) if best_file.exists() else None
        return state, best

    def preempted_steps(self) -> list[int]:
        """The steps at which earlier runs of this job were preempted, oldest first."""
        try:
            return json.loads(self.store.get_bytes(f"{self.prefix}/{PREEMPTIONS}"))["steps"]
        except ObjectNotFoundError:
            return []

    def record_preemption(self, step: int) -> list[int]:
        """Adds `step` to the record (one writer: the job's one running trainer); returns the record."""
        steps = [*self.preempted_steps(), step]
        self.store.put_bytes(f"{self.prefix}/{PREEMPTIONS}", json.dumps({"steps": steps}).encode())
        return steps

    def published(self) -> dict[str, Any] | None:
        return read_published(self.store, self.prefix)

    def mark_published(self, record: dict[str, Any]) -> None:
        write_published(self.store, self.prefix, record)

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix + "/")
