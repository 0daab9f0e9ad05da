"""Checkpoints in object storage, so a restarted job continues where it stopped.

Layout: `<run prefix>/step-<N>/` (see `tuneloom.registry.run_prefix`) holding the trainable weights, the optimizer
state and the loop's state, committed with a manifest written last (a checkpoint without one
was interrupted and is ignored). The manifest's `format` says how the tensors are stored:
`whole` (rank 0 writes safetensors and a torch.save of the optimizer; no `format` in older
checkpoints) or `sharded` (spec.distributed.strategy: fsdp; every rank writes its shards, see
`tuneloom.trainer.shardedcheckpoint`). A run loads either format whatever it writes.
`published.json` beside them records the adapter version a finished run wrote, so a rerun of a
finished job does not publish a second version.
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

from tuneloom.registry import (
    commit_files,
    commit_uploaded,
    committed_steps,
    fetch_committed,
    read_preemptions,
    read_published,
    upload_files,
    write_preemptions,
    write_published,
)
from tuneloom.storage import ObjectStore
from tuneloom.trainer import distributed
from tuneloom.trainer.distributed import Ranks
from tuneloom.trainer.evaluate import EvaluationResult

log = logging.getLogger("tuneloom.trainer")

WHOLE, SHARDED = "whole", "sharded"


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
    # Micro-batches in one optimizer step over all ranks: what a resume on another number of
    # processes keeps (absent from older checkpoints).
    micro_batches_per_step: int | None = None

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
    """The parameters being trained (LoRA weights, or every weight for a full fine-tune), on CPU;
    an FSDP model's stay sharded where they are (a whole copy is what sharding avoids)."""
    from torch.distributed.tensor import DTensor

    return {
        name: p.detach().clone() if isinstance(p, DTensor) else p.detach().to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
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
    """`sharded`: this run writes the sharded format, every rank taking part in each save."""

    def __init__(self, store: ObjectStore, prefix: str, ranks: Ranks | None = None, *, sharded: bool = False):
        self.store = store
        self.prefix = prefix
        self.ranks = ranks or Ranks()
        self.sharded = sharded

    @property
    def saves_here(self) -> bool:
        """Whether this rank takes part in a save: rank 0 alone, or every rank for the sharded format."""
        return self.ranks.is_main or self.sharded

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
        """On rank 0 alone for the whole format, on every rank together for the sharded one."""
        if self.sharded:
            self._save_sharded(state, model, optimizer, best)
        else:
            self._save_whole(state, model, optimizer, best)
        if self.ranks.is_main:
            log.info("checkpoint at step %d saved to %s", state.step, self.store.describe(self.prefix))
            for old in self.committed_steps()[:-keep]:
                self.store.delete_prefix(self._step_prefix(old) + "/")

    def _save_whole(
        self, state: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer, best: dict[str, torch.Tensor] | None
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
            manifest = {"step": state.step, "format": WHOLE, "metrics": checkpoint_metrics(state)}
            commit_files(self.store, self._step_prefix(state.step), files, manifest)

    def _save_sharded(
        self, state: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer, best: dict[str, torch.Tensor] | None
    ) -> None:
        prefix = self._step_prefix(state.step)
        with tempfile.TemporaryDirectory(prefix="tuneloom-ckpt-") as tmp:
            directory = Path(tmp)
            # Imported here: torch.distributed.checkpoint costs every trainer process about 0.6 s
            # (a quarter of its start-up), and only fsdp runs and their resumes write or read shards.
            from tuneloom.trainer.shardedcheckpoint import write_shards

            write_shards(directory, model, optimizer, best)
            if self.ranks.is_main:
                (directory / "state.json").write_text(state.to_json())
            # Each rank uploads what it wrote: on several nodes no disk holds every shard.
            uploaded = upload_files(self.store, prefix, {path.name: path for path in directory.iterdir()})
        recorded = distributed.gathered(uploaded, self.ranks)
        if self.ranks.is_main:
            files = {name: record for part in recorded for name, record in part.items()}
            manifest = {"step": state.step, "format": SHARDED, "processes": self.ranks.world_size}
            manifest["metrics"] = checkpoint_metrics(state)
            manifest["best"] = best is not None
            commit_uploaded(self.store, prefix, files, manifest)

    def _step_prefix(self, step: int) -> str:
        return f"{self.prefix}/step-{step:08d}"

    def load_latest(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> tuple[LoopState, dict[str, torch.Tensor] | None] | None:
        steps = self.committed_steps()
        if not steps:
            return None
        with tempfile.TemporaryDirectory(prefix="tuneloom-ckpt-") as tmp:
            dest = Path(tmp) / "checkpoint"
            manifest = fetch_committed(self.store, self._step_prefix(steps[-1]), dest)
            state = LoopState.from_json((dest / "state.json").read_text())
            if manifest.get("format", WHOLE) == SHARDED:
                log.info("loading the sharded checkpoint of %d process(es)", manifest["processes"])
                from tuneloom.trainer.shardedcheckpoint import read_shards  # as in _save_sharded

                return state, read_shards(dest, model, optimizer, with_best=manifest["best"])
            if self.sharded and self.ranks.enabled:
                raise RuntimeError(
                    f"the checkpoint at step {state.step} holds whole weights (spec.distributed.strategy: ddp), and "
                    "this run shards the model (fsdp); resume it with spec.distributed.strategy: ddp, on one "
                    "process, or start over with --fresh"
                )
            load_trainable_state(model, load_file(dest / "trainable.safetensors"))
            optimizer.load_state_dict(torch.load(dest / "optimizer.pt", map_location=device, weights_only=True))
            best_file = dest / "best.safetensors"
            best = load_file(best_file) if best_file.exists() else None
        return state, best

    def preempted_steps(self) -> list[int]:
        """The steps at which earlier runs of this job were preempted, oldest first."""
        return read_preemptions(self.store, self.prefix)

    def record_preemption(self, step: int) -> list[int]:
        """Adds `step` to the record (one writer: the job's one running trainer); returns the record."""
        steps = [*self.preempted_steps(), step]
        write_preemptions(self.store, self.prefix, steps)
        return steps

    def published(self) -> dict[str, Any] | None:
        return read_published(self.store, self.prefix)

    def mark_published(self, record: dict[str, Any]) -> None:
        write_published(self.store, self.prefix, record)

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix + "/")
