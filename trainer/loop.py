"""The optimisation loop.

Our own loop rather than HF Trainer or TRL: it needs packed rows with per-example position ids
(no cross-example attention), a loss head that runs only on labelled tokens, checkpoints in
object storage that resume at an exact optimizer step with the same data order, and progress in
a form the operator reads. Each of those is a few lines here and a fight with callbacks there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneloom.api import FineTuneJobSpec
from tuneloom.trainer import distributed, fsdp
from tuneloom.trainer.batching import Batch, collate, epoch_batches, within_token_budget
from tuneloom.trainer.checkpoint import CheckpointStore, LoopState, load_trainable_state, trainable_state
from tuneloom.trainer.distributed import Ranks
from tuneloom.trainer.evaluate import LossResult, evaluate_loss
from tuneloom.trainer.modeling import MaskedTokenLoss, autocast
from tuneloom.trainer.overfitting import detect_overfitting
from tuneloom.trainer.preemption import Preempted, PreemptionWatch
from tuneloom.trainer.progress import ProgressReporter
from tuneloom.trainer.tokenize import EncodedExample

log = logging.getLogger("tuneloom.trainer")


@dataclass(frozen=True)
class Plan:
    """How the rows of one run are cut into optimizer steps."""

    rows: Sequence[Sequence[int]]
    row_lengths: Sequence[int]
    batch_size: int
    accumulation: int
    epochs: int
    world_size: int = 1

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    @property
    def micro_batches_per_step(self) -> int:
        """Over all ranks: each rank takes `accumulation` of them."""
        return self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.micro_batches_per_step)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def steps_of_epoch(self, seed: int, epoch: int, rank: int = 0) -> list[list[Sequence[int]]]:
        """This rank's micro-batches of each optimizer step of `epoch`: a list per step. Every rank
        builds the same order from the seed and takes every world_size-th micro-batch of a step."""
        batches = epoch_batches(self.rows, self.row_lengths, self.batch_size, seed=seed, epoch=epoch)
        per_step = self.micro_batches_per_step
        return [batches[i : i + per_step][rank :: self.world_size] for i in range(0, len(batches), per_step)]


def learning_rate(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class TrainingLoop:
    def __init__(
        self,
        spec: FineTuneJobSpec,
        model: nn.Module,
        train: Sequence[EncodedExample],
        validation_batches: Sequence[Batch],
        plan: Plan,
        device: torch.device,
        checkpoints: CheckpointStore,
        reporter_factory: Callable[[int], ProgressReporter],
        ranks: Ranks | None = None,
        preemption: PreemptionWatch | None = None,
        on_checkpoint: Callable[[LoopState], None] | None = None,
    ):
        """`on_checkpoint(state)` runs on rank 0 after each checkpoint is committed, before it is reported."""
        self.spec = spec
        self.hp = spec.hyperparameters
        self.model = model
        self.ranks = ranks or Ranks()
        self.loss_fn = self._loss_module(model)
        # Evaluation calls loss_fn directly; training goes through DDP so gradients are averaged.
        self.train_fn: nn.Module = self.loss_fn
        self.sharded = fsdp.shards_model(spec, self.ranks)
        if self.sharded:
            # In place: loss_fn becomes the FSDP root, and evaluating through it gathers the shards too.
            self.train_fn = fsdp.shard(self.loss_fn, model, spec, device)
        elif self.ranks.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.ranks.local_rank] if device.type == "cuda" else None
            self.train_fn = DistributedDataParallel(self.loss_fn, device_ids=ids)
        self.train = train
        self.validation_batches = validation_batches
        self.plan = plan
        self.device = device
        self.checkpoints = checkpoints
        self.reporter_factory = reporter_factory
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=self.hp.learningRate, weight_decay=self.hp.weightDecay, foreach=True
        )
        self.preemption = preemption or PreemptionWatch()
        self.on_checkpoint = on_checkpoint
        self.state = LoopState(micro_batches_per_step=plan.micro_batches_per_step)
        self.best: dict[str, torch.Tensor] | None = None
        self.saved_step: int | None = None  # the step of the newest checkpoint, saved or resumed from
        self.reporter: ProgressReporter | None = None  # the run's, once training starts

    def _loss_module(self, model: nn.Module) -> nn.Module:
        """The objective: called on a batch, (summed loss, ...) whose sum is over `_units` of it."""
        return MaskedTokenLoss(model)

    def _collate(self, rows: Sequence[Sequence[int]]) -> Batch:
        return collate(self.train, rows)

    def _units(self, batch: Batch) -> int:
        """What a step's loss is the mean over: labelled tokens."""
        return batch.num_trained_tokens

    def _step_figures(self, outputs: list[tuple[torch.Tensor, ...]], weight: float) -> dict[str, Any]:
        """More figures for the step's progress, from each micro-batch's loss outputs: none here."""
        return {}

    def resume(self, spec_sha256: str) -> bool:
        """Loads the latest checkpoint of this job, if any. True when one was loaded."""
        self.state.spec_sha256 = spec_sha256
        loaded = self.checkpoints.load_latest(self.model, self.optimizer, self.device)
        if loaded is None:
            return False
        state, best = loaded
        if state.spec_sha256 != spec_sha256:
            raise RuntimeError(
                f"checkpoints at {self.checkpoints.store.describe(self.checkpoints.prefix)} were made from a "
                "different spec; rerun with --fresh (or give the job a new name) to start over"
            )
        self.state, self.best, self.saved_step = state, best, state.step
        self._keep_global_batch(state.micro_batches_per_step)
        log.info("resumed from the checkpoint at step %d of %d", state.step, self.plan.total_steps)
        return True

    def _keep_global_batch(self, saved: int | None) -> None:
        """A run resumed on another number of processes takes the same micro-batches per optimizer
        step as the run that saved (more or fewer each), so every step holds the same examples."""
        plan = self.plan
        if saved is None or saved == plan.micro_batches_per_step:
            return
        if saved % plan.world_size:
            raise RuntimeError(
                f"the checkpoint's steps are {saved} micro-batches each, which {plan.world_size} processes cannot "
                "share evenly; resume on a number of processes that divides it, or start over with --fresh"
            )
        self.plan = dataclasses.replace(plan, accumulation=saved // plan.world_size)
        log.info(
            "resuming on %d process(es): %d micro-batches each per step, %d in all as when the checkpoint was saved",
            plan.world_size,
            self.plan.accumulation,
            saved,
        )

    def evaluate(self) -> LossResult:
        with autocast(self.device):
            return evaluate_loss(self.loss_fn, self.validation_batches, self.device)

    def run(self) -> LoopState:
        """Trains to the end, or raises Preempted at the first step boundary after a SIGTERM."""
        with self.preemption.deferred():
            self._train()
            self._stop_if_preempted()  # a SIGTERM after the last boundary
        return self.state

    def _train(self) -> None:
        state, plan = self.state, self.plan
        reporter = self.reporter = self.reporter_factory(state.step)
        # startStep and checkpointStep outlive the next record in /progress's merged view, so a poller sees them.
        reporter.event("training", step=state.step, totalSteps=plan.total_steps, startStep=state.step)
        self.model.train()
        first_epoch = state.step // plan.steps_per_epoch
        for epoch in range(first_epoch, plan.epochs):
            if state.stopped_early:
                break
            torch.manual_seed(self.hp.seed + epoch * 7919 + state.step)  # dropout masks; reproducible per resume point
            for index, step_batches in enumerate(plan.steps_of_epoch(self.hp.seed, epoch, self.ranks.rank)):
                if epoch * plan.steps_per_epoch + index < state.step:
                    continue  # done before the checkpoint we resumed from
                self._step(step_batches, reporter)
                if index == plan.steps_per_epoch - 1:
                    break  # the epoch's end is a boundary only after its evaluation
                evaluate_every = self.spec.evaluation.everySteps
                if evaluate_every and state.step % evaluate_every == 0:
                    self._validate(round(state.step / plan.steps_per_epoch, 3), reporter)
                    if state.stopped_early:
                        break
                every = self.spec.checkpointing.everySteps
                if every and state.step % every == 0:
                    self._checkpoint()
                # After the periodic checkpoint: a SIGTERM during its write stops here, with it.
                self._stop_if_preempted()
            if not state.stopped_early:
                self._end_of_epoch(epoch, reporter)
            self._stop_if_preempted()
        reporter.peak_memory(peak_memory_bytes(self.device))
        if self.best is not None and state.best_step != state.step:
            log.info("restoring the weights of step %d, which had the lowest validation loss", state.best_step)
            load_trainable_state(self.model, self.best)

    def _stop_if_preempted(self) -> None:
        """At a step boundary: after a SIGTERM to any rank, every rank stops here, rank 0 saved."""
        if not distributed.any_rank(self.preemption.requested, self.ranks):
            return
        self.save_preempted()
        distributed.barrier(self.ranks)  # no rank exits before the checkpoint is committed
        raise Preempted(self.state.step)

    def save_preempted(self) -> None:
        """Rank 0 saves the state as it stands (checkpointing off or not; every rank for a sharded
        checkpoint) and records the preemption."""
        if not self.checkpoints.saves_here:
            return
        with self.preemption.deferred():  # a further SIGTERM must not cut the write short
            if self.saved_step != self.state.step:
                self._save()
            if self.ranks.is_main:
                self.checkpoints.record_preemption(self.state.step)
        log.info("preempted at step %d: checkpoint saved", self.state.step)

    def _step(self, step_batches: list[Sequence[int]], reporter: ProgressReporter) -> None:
        started = time.monotonic()
        budget = self.hp.microBatchTokens
        batches = [
            self._collate(rows)
            for micro_batch in step_batches
            for rows in within_token_budget(self.train, micro_batch, budget)
        ]
        weight = 1.0
        if not batches:
            # The epoch's last step can leave a rank without a micro-batch. It still has to join
            # the gradient all-reduce, so it runs one with zero weight.
            batches, weight = [self._collate([[0]])], 0.0
        local_tokens = sum(self._units(batch) for batch in batches) * weight
        trained_tokens = distributed.total(local_tokens, self.ranks)
        # DDP averages gradients over ranks; scaling by world_size turns that into a sum, so every
        # labelled token of the step weighs the same whatever rank or micro-batch it landed in.
        scale = weight * self.ranks.world_size / max(trained_tokens, 1)
        loss_total = 0.0
        outputs = []
        for number, batch in enumerate(batches):
            last = number == len(batches) - 1
            with self._gradient_sync(last), autocast(self.device):
                loss_sum, *others = self.train_fn(batch.to(self.device))
                (loss_sum * scale).backward()
            loss_total += loss_sum.detach().item() * weight
            outputs.append((loss_sum.detach(), *others))
        loss_total = distributed.total(loss_total, self.ranks)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.hp.maxGradNorm)
        rate = learning_rate(self.state.step, self.plan.total_steps, self.hp.learningRate, self.hp.warmupRatio)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(distributed.total(sum(batch.num_tokens for batch in batches) * weight, self.ranks))
        self.state.step += 1
        self.state.tokens_seen += tokens
        loss = loss_total / max(trained_tokens, 1)
        self.state.train_history.append({"step": self.state.step, "loss": round(loss, 4)})
        reporter.step(
            self.state.step,
            loss=loss,
            tokens=tokens,
            learning_rate=rate,
            seconds=time.monotonic() - started,
            **self._step_figures(outputs, weight),
        )
        # Every step, not only at the end: the pod's metrics endpoint is gone soon after training,
        # often before Prometheus's next scrape.
        reporter.peak_memory(peak_memory_bytes(self.device))

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Gradients are averaged over the ranks on a step's last micro-batch only."""
        if last or not self.ranks.enabled:
            return contextlib.nullcontext()
        return fsdp.no_gradient_sync(self.train_fn) if self.sharded else self.train_fn.no_sync()

    def _end_of_epoch(self, epoch: int, reporter: ProgressReporter) -> None:
        self._validate(epoch + 1, reporter)
        if epoch + 1 < self.plan.epochs and not self.state.stopped_early:
            self._checkpoint()

    def _validate(self, epoch: float, reporter: ProgressReporter) -> None:
        """Validation loss now (at an epoch's end, or every evaluation.everySteps), recorded in the
        history; early stopping counts these evaluations."""
        state = self.state
        result = self.evaluate()
        # The training loss beside it: the mean of the steps since the previous evaluation (the
        # overfitting rules compare the two). None when a checkpoint from before train_history lacks them.
        previous = state.history[-1]["step"] if state.history else 0
        losses = [entry["loss"] for entry in state.train_history if entry["step"] > previous]
        train_loss = round(sum(losses) / len(losses), 4) if losses else None
        figures = self._validation_figures(result)
        state.history.append({"epoch": epoch, "step": state.step, "trainLoss": train_loss, **figures})
        self._report_validation(result, reporter)
        min_delta = self.hp.earlyStopping.minDelta
        if state.best_validation_loss is None or result.loss < state.best_validation_loss - min_delta:
            state.best_validation_loss, state.best_step = result.loss, state.step
            state.evaluations_without_improvement = 0
            self.best = trainable_state(self.model) if self.hp.earlyStopping.patience else None
        else:
            state.evaluations_without_improvement += 1
            patience = self.hp.earlyStopping.patience
            if patience and state.evaluations_without_improvement >= patience:
                log.info("early stopping: no lower validation loss for %d evaluation(s)", patience)
                state.stopped_early = True

    def _validation_figures(self, result: LossResult) -> dict[str, float]:
        """What the history keeps of an evaluation."""
        return {"validationLoss": result.loss, "tokenAccuracy": result.token_accuracy}

    def _report_validation(self, result: LossResult, reporter: ProgressReporter) -> None:
        """Tells the reporter, once the evaluation is in the history."""
        overfitting = detect_overfitting(self.state.history)
        reporter.evaluation(loss=result.loss, accuracy=result.token_accuracy, overfitting=overfitting)

    def _checkpoint(self) -> None:
        """The periodic checkpoint, when checkpointing is on."""
        if self.spec.checkpointing.everySteps and self.checkpoints.saves_here:
            self._save()

    def _save(self) -> None:
        self.checkpoints.save(self.state, self.model, self.optimizer, self.best, self.spec.checkpointing.keep)
        self.saved_step = self.state.step
        if self.on_checkpoint is not None and self.ranks.is_main:
            self.on_checkpoint(self.state)
        if self.reporter is not None:  # told after the commit, so a reader that sees it can resume from it
            self.reporter.event("checkpoint", step=self.state.step, checkpointStep=self.state.step)
