"""One fine-tuning run, from a FineTuneJob to a published, evaluated adapter.

The same entry point runs in the operator's training pod (`python -m tuneloom.trainer`) and on a
laptop (`tuneloom train -f job.yaml`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneloom import __version__
from tuneloom.api import TRAINER_EXIT_INVALID_INPUT, TRAINER_EXIT_PREEMPTED, DistributedStrategy, FineTuneJob, Method
from tuneloom.inputs import BaseModelUnavailableError, fetch_file, resolve_base_model
from tuneloom.jobfile import SpecError, load_job
from tuneloom.models import model_config_hash
from tuneloom.promotion import decide
from tuneloom.registry import (
    EVALUATION_FILE,
    LOSS_HISTORY_FILE,
    AdapterVersion,
    download_adapter,
    next_version,
    publish_adapter,
    read_adapter,
    run_prefix,
)
from tuneloom.storage import ObjectNotFoundError, StorageError, open_store, sha256_file
from tuneloom.trainer import distributed, fsdp
from tuneloom.trainer.batching import collate, pack_rows, single_rows
from tuneloom.trainer.checkpoint import CheckpointStore, LoopState
from tuneloom.trainer.datafile import DataValidationError, Example, content_key, load_examples
from tuneloom.trainer.dataquality import find_problems
from tuneloom.trainer.dpo import PreferenceLoop
from tuneloom.trainer.estimate import Estimate, Workload, available_cores, count_parameters, device_for_name, estimate
from tuneloom.trainer.evaluate import (
    Check,
    EvaluationResult,
    FewShotAnswers,
    GeneralAbility,
    HeldOutAnswers,
    HeldOutLoss,
    HeldOutPreferences,
    draw_shots,
    references,
    run_checks,
)
from tuneloom.trainer.general import BaselineCache, baseline_key, load_prompts
from tuneloom.trainer.htmlreport import REPORT_FILE, render_report
from tuneloom.trainer.loop import Plan, TrainingLoop, peak_memory_bytes
from tuneloom.trainer.mixing import draw, mixed_counts
from tuneloom.trainer.modeling import (
    MethodNotSupportedError,
    check_method_supported,
    load_model,
    load_tokenizer,
    save_adapter,
)
from tuneloom.trainer.preemption import Preempted, PreemptionWatch
from tuneloom.trainer.preference import EncodedPair, collate_pairs, encode_pair
from tuneloom.trainer.preflight import PreflightError, check_before_running
from tuneloom.trainer.progress import ProgressReporter, TrainerMetrics
from tuneloom.trainer.report import RunReport, TrainingResult, print_report
from tuneloom.trainer.servable import CheckpointAdapters
from tuneloom.trainer.tokenize import EncodedExample, encode_example

log = logging.getLogger("tuneloom.trainer")

METRICS_PORT_ENV = "TUNELOOM_METRICS_PORT"
# Where /metrics and /progress listen: every interface unless set, so the operator, Prometheus and
# `kubectl port-forward` (which connects to localhost inside the pod) all reach them.
BIND_ADDRESS_ENV = "TUNELOOM_BIND_ADDRESS"

# Exit codes the operator tells apart: a user's mistake is not retried, an infrastructure error is,
# and a preempted run is retried without counting as a failure (see tuneloom.api).
EXIT_INVALID_INPUT = TRAINER_EXIT_INVALID_INPUT
EXIT_PREEMPTED = TRAINER_EXIT_PREEMPTED
EXIT_FAILED = 1


class InitAdapterError(ValueError):
    """dpo.initAdapter names no adapter this run can start from."""


class UnusableDataError(ValueError):
    """The data is valid line by line but cannot train anything (too few examples, all truncated)."""


@dataclass(frozen=True)
class Datasets:
    """The run's examples, read, checked and split. `held_out` are the validation examples whose
    prompts the models answer, `general` the general-ability check's prompts (none when it is off);
    `info` is the manifest's `datasets`."""

    train: list[Example]
    validation: list[Example]
    held_out: list[Example]
    info: dict[str, Any]
    general: list[Example]
    # Drawn from spec.dataset.mix: trained on with `train`, never shown as the job's own examples
    # (few-shot shots, the data-quality warnings).
    mixed: list[Example] = field(default_factory=list)


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A reproducible held-out split; at least one example on each side."""
    if len(examples) < 2:
        raise UnusableDataError("at least 2 examples are needed to hold one out for validation")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = min(max(1, math.ceil(len(examples) * fraction)), len(examples) - 1)
    chosen = set(order[:held_out])
    train = [e for i, e in enumerate(examples) if i not in chosen]
    validation = [e for i, e in enumerate(examples) if i in chosen]
    return train, validation


def load_datasets(job: FineTuneJob) -> Datasets:
    dataset = job.spec.dataset
    fmt = dataset.format.value
    train_path = fetch_file(dataset.train)
    examples = load_examples(train_path, fmt, source=dataset.train, max_line_bytes=dataset.maxLineBytes)
    info: dict[str, Any] = {"train": {"uri": dataset.train, "sha256": sha256_file(train_path)}}
    if dataset.validation:
        validation_path = fetch_file(dataset.validation)
        validation = load_examples(validation_path, fmt, source=dataset.validation, max_line_bytes=dataset.maxLineBytes)
        train = examples
        info["validation"] = {"uri": dataset.validation, "sha256": sha256_file(validation_path)}
    else:
        train, validation = split_examples(examples, dataset.validationSplit, job.spec.hyperparameters.seed)
        info["validation"] = {"uri": dataset.train, "split": dataset.validationSplit}
    # A training copy of a held-out example would make the held-out metrics measure recall.
    held_out_keys = {content_key(example) for example in validation}
    kept = [example for example in train if content_key(example) not in held_out_keys]
    if len(kept) < len(train):
        log.info("removed %d training examples that repeat held-out examples exactly", len(train) - len(kept))
        info["train"]["removedCopiesOfHeldOut"] = len(train) - len(kept)
        train = kept
    info["train"]["examples"] = len(train)
    info["validation"]["examples"] = len(validation)
    mixed = _mix_in(job, len(train), held_out_keys, info)
    general = job.spec.evaluation.general
    prompts = load_prompts(general) if general.enabled else []
    if prompts:
        info["general"] = {"prompts": general.prompts, "examples": len(prompts)}
    return Datasets(train, validation, validation[: job.spec.evaluation.maxExamples], info, prompts, mixed)


def _mix_in(job: FineTuneJob, own: int, held_out_keys: set[Any], info: dict[str, Any]) -> list[Example]:
    """The examples spec.dataset.mix adds to `own` training examples (see tuneloom.trainer.mixing),
    each file checked like the training file; what came from where goes to the manifest's
    `datasets.mix`."""
    dataset = job.spec.dataset
    if not dataset.mix:
        return []
    rng = random.Random(job.spec.hyperparameters.seed)
    counts = mixed_counts(own, [entry.fraction for entry in dataset.mix])
    mixed: list[Example] = []
    info["mix"] = []
    for entry, count in zip(dataset.mix, counts, strict=True):
        path = fetch_file(entry.train)
        examples = load_examples(path, dataset.format.value, source=entry.train, max_line_bytes=dataset.maxLineBytes)
        # Held-out examples stay held out, wherever else they appear.
        usable = [example for example in examples if content_key(example) not in held_out_keys]
        drawn = draw(usable, count, rng)
        log.info(
            "data: mixed in %d examples from %s (%d in the file), %.0f%% of the training examples",
            len(drawn),
            entry.train,
            len(examples),
            100 * entry.fraction,
        )
        record = {"uri": entry.train, "sha256": sha256_file(path), "fraction": entry.fraction}
        record |= {"examples": len(examples), "mixedIn": len(drawn)}
        if len(usable) < len(examples):
            record["removedCopiesOfHeldOut"] = len(examples) - len(usable)
        info["mix"].append(record)
        mixed += drawn
    return mixed


def encode_all(
    tokenizer: Any,
    examples: list[Example],
    max_length: int,
    what: str,
    encode: Callable[[Any, Example, int], Any] = encode_example,
) -> list[Any]:
    """Encodes and truncates (`encode_pair` for preference pairs); drops examples left with nothing
    to learn, saying which."""
    encoded, truncated, dropped = [], [], []
    for example in examples:
        item = encode(tokenizer, example, max_length)
        if item.truncated:
            truncated.append(example.line)
        if item.num_trained_tokens == 0:
            dropped.append(example.line)
            continue
        encoded.append(item)
    if truncated:
        log.warning(
            "%s: %d example(s) truncated to maxSeqLength=%d (lines %s)",
            what,
            len(truncated),
            max_length,
            truncated[:10],
        )
    if dropped:
        log.warning(
            "%s: %d example(s) dropped, no assistant tokens left after truncation (lines %s)",
            what,
            len(dropped),
            dropped[:10],
        )
    if not encoded:
        raise UnusableDataError(f"{what}: no example has tokens to learn from")
    return encoded


def spec_sha256(job: FineTuneJob) -> str:
    """What a checkpoint must match to be resumed: the parts of the spec that shape training."""
    ignored = (
        "resources",
        "evaluation",
        "promotion",
        "checkpointing",
        # A checkpoint of either strategy loads (see trainer.checkpoint): changing it keeps the run.
        "distributed",
        "storage",
        "scheduling",
        "image",
        "cancel",
    )
    # maxLineBytes only decides which files are accepted: a checkpoint made before it existed still fits.
    exclude: dict[str, Any] = {name: True for name in ignored} | {"dataset": {"maxLineBytes": True}}
    relevant = job.spec.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Tokenized:
    """The examples as token ids and labels, cut to maxSeqLength; those left with nothing to learn dropped."""

    train: list[EncodedExample] | list[EncodedPair]
    validation: list[EncodedExample] | list[EncodedPair]


@dataclass(frozen=True)
class Model:
    """The model being tuned, its tokenizer, and the local directory the base model came from.
    `whole`: when the loop shards `module` (fsdp on several processes) no rank holds the model whole,
    so rank 0 keeps an unsharded copy to generate answers with and to publish: the base until
    training ends, then the trained weights (see `FineTuneRun.gather_weights`). It waits in host
    memory while the shards train."""

    path: str
    tokenizer: Any
    module: torch.nn.Module
    whole: torch.nn.Module | None = None

    @property
    def unsharded(self) -> torch.nn.Module:
        return self.module if self.whole is None else self.whole


@dataclass(frozen=True)
class Evaluation:
    """The checks run on the base model and again on the adapter, and the few-shot baseline, run
    once with the base model (None when it is off, or on ranks other than 0)."""

    checks: list[Check]
    few_shot: Check | None


class FineTuneRun:
    """One run as a recipe: `run` calls the phases in order, each taking what earlier ones made."""

    def __init__(
        self,
        job: FineTuneJob,
        preemption: PreemptionWatch,
        *,
        metrics_port: int | None = None,
        fresh: bool = False,
    ):
        self.job = job
        self.spec = job.spec
        self.fresh = fresh
        self.preemption = preemption
        self.ranks = distributed.setup()
        self.device = distributed.device_for(self.ranks)
        if not self.ranks.is_main:
            logging.getLogger("tuneloom").setLevel(logging.WARNING)  # one rank tells the story
        self.store = open_store(self.spec.output.uri)
        sharded = fsdp.strategy(self.spec) is DistributedStrategy.fsdp
        self.checkpoints = CheckpointStore(self.store, _run_prefix(job), self.ranks, sharded=sharded)
        self.latest_progress: dict[str, Any] = {"event": "starting"}
        self.metrics = self._start_metrics(metrics_port)
        self.reporter = self._reporter(0, 0, 1)

    def _start_metrics(self, port: int | None) -> TrainerMetrics | None:
        port = port if port is not None else int(os.environ.get(METRICS_PORT_ENV, "0")) or None
        if not port or not self.ranks.is_main:
            return None
        from prometheus_client import CollectorRegistry

        from tuneloom.metrics import serve_metrics

        registry = CollectorRegistry()
        metrics = TrainerMetrics(registry, self.job.metadata.namespace, self.job.metadata.name)
        # /progress is how the operator learns where the run stands: the trainer needs no API rights.
        host = os.environ.get(BIND_ADDRESS_ENV) or "0.0.0.0"
        serve_metrics(registry, port, host, json_routes={"/progress": lambda: self.latest_progress})
        return metrics

    def _reporter(self, start_step: int, total_steps: int, steps_per_epoch: int) -> ProgressReporter:
        return ProgressReporter(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            logging_steps=self.spec.hyperparameters.loggingSteps,
            metrics=self.metrics,
            start_step=start_step,
            on_record=self._remember,
        )

    def _remember(self, record: dict[str, Any]) -> None:
        # Progress lines carry the numbers; phase events say what the run is doing between them.
        self.latest_progress = {**self.latest_progress, **record}

    def run(self) -> AdapterVersion | None:
        """The adapter published (None on ranks other than 0, which publish nothing)."""
        check_method_supported(self.spec, self.device)
        if (earlier := self.published_before()) is not None:
            return earlier
        data = self.setup_data()
        model, tokens = self.setup_model(data)
        loop = self.setup_training(model, tokens)
        expected = self.estimate(model, tokens, loop.plan)
        evaluation = self.setup_evaluation(model, loop, data)
        base = self.evaluate_base(loop, evaluation)
        # The whole copy waits in host memory while the shards train: on a GPU that does not fit
        # the model whole, the copy and the shards do not fit together.
        self._move_whole(model, torch.device("cpu"))
        training = self.train(loop)
        self.gather_weights(model, loop)
        self._move_whole(model, self.device)
        try:
            tuned = self.evaluate(evaluation.checks)
        except Preempted:
            # Training is done: keep it, so the retry goes straight to evaluating.
            loop.save_preempted()
            raise Preempted(loop.state.step) from None
        adapter = None
        if self.ranks.is_main:
            report = RunReport(
                data.held_out,
                base,
                tuned,
                training,
                peak_memory_bytes(self.device),
                data.general,
                few_shot=loop.state.few_shot_evaluation or EvaluationResult(),
                estimate=None if expected is None else expected.to_status(),
                gpus=self.ranks.world_size if self.device.type == "cuda" else 0,
                price_per_gpu_hour=self.spec.resources.costPerGpuHour,
            )
            with self.preemption.deferred():  # short, and a half-published version would only be redone
                adapter = self.publish(model, data, report)
            print_report(report, adapter)
        distributed.barrier(self.ranks)  # the other ranks wait until rank 0 has published
        return adapter

    def published_before(self) -> AdapterVersion | None:
        """The adapter an earlier run of this job published; --fresh forgets it and every checkpoint."""
        if self.fresh:
            if self.ranks.is_main:
                self.checkpoints.clear()
            distributed.barrier(self.ranks)
            return None
        done = self.checkpoints.published()
        if done is None:
            return None
        log.info("this job already published %s@%s; nothing to do", self.spec.output.adapterName, done["version"])
        return read_adapter(self.store, self.job.metadata.namespace, self.spec.output.adapterName, done["version"])

    def setup_data(self) -> Datasets:
        self.reporter.event("validating-data")
        data = load_datasets(self.job)
        log.info("data: %d training, %d held-out examples", len(data.train), len(data.validation))
        findings = find_problems(data.train, data.validation)
        for finding in findings:
            log.warning("data: %s", finding.message)
        # The manifest's datasets.warnings: report.html shows them beside the data summary.
        warnings = [{"kind": finding.kind, "message": finding.message} for finding in findings]
        return dataclasses.replace(data, info={**data.info, "warnings": warnings})

    def setup_model(self, data: Datasets) -> tuple[Model, Tokenized]:
        """The tokenizer, the data tokenized with it, then the weights: data that cannot train
        anything fails before the weights load."""
        self.reporter.event("loading-model", baseModel=self.spec.baseModel)
        path = resolve_base_model(self.spec.baseModel)
        tokenizer = load_tokenizer(path)
        max_length = self.spec.hyperparameters.maxSeqLength
        encode = encode_pair if self.spec.method is Method.dpo else encode_example
        tokens = Tokenized(
            train=encode_all(tokenizer, data.train + data.mixed, max_length, "training data", encode),
            validation=encode_all(tokenizer, data.validation, max_length, "validation data", encode),
        )
        if self.spec.dpo.initAdapter is None:
            return self._model(path, tokenizer), tokens
        with tempfile.TemporaryDirectory(prefix="tuneloom-init-") as tmp:
            start = self._download_init_adapter(path, Path(tmp) / "adapter")
            return self._model(path, tokenizer, start), tokens

    def _model(self, path: str, tokenizer: Any, init_adapter: Path | None = None) -> Model:
        module = load_model(self.spec, path, self.device, init_adapter)
        whole = None
        if fsdp.shards_model(self.spec, self.ranks) and self.ranks.is_main:
            whole = load_model(self.spec, path, self.device, init_adapter)
        return Model(path, tokenizer, module, whole)

    def _download_init_adapter(self, base_path: str, dest: Path) -> Path:
        """dpo.initAdapter from this job's registry, checked to be an adapter of the same base model."""
        name, _, version = self.spec.dpo.initAdapter.partition("@")
        namespace = self.job.metadata.namespace
        try:
            adapter = download_adapter(self.store, namespace, name, version, dest)
        except ObjectNotFoundError as exc:
            raise InitAdapterError(
                f"spec.dpo.initAdapter: {exc}; publish it to {self.spec.output.uri} first (a supervised job) or "
                "name a version that exists"
            ) from None
        expected, found = _config_hash(base_path), adapter.manifest.baseModel.configSha256
        if adapter.manifest.kind != "lora" or (expected and found and expected != found):
            raise InitAdapterError(
                f"spec.dpo.initAdapter: {adapter.id} is a {adapter.manifest.kind} adapter of "
                f"{adapter.manifest.baseModel.name}, not a LoRA adapter of {self.spec.baseModel}"
            )
        return dest

    def setup_training(self, model: Model, tokens: Tokenized) -> TrainingLoop:
        """The packing plan, the held-out batches and the optimizer; resumed from this job's
        latest checkpoint when it has one."""
        hp = self.spec.hyperparameters
        rows = self._rows(tokens.train)
        plan = Plan(
            rows=rows,
            row_lengths=[sum(len(tokens.train[i].input_ids) for i in row) for row in rows],
            batch_size=hp.batchSize,
            accumulation=hp.gradientAccumulationSteps,
            epochs=hp.epochs,
            world_size=self.ranks.world_size,
        )
        validation_rows = self._rows(tokens.validation)
        dpo = self.spec.method is Method.dpo
        validation_batches = [
            (collate_pairs if dpo else collate)(tokens.validation, validation_rows[i : i + hp.batchSize])
            for i in range(0, len(validation_rows), hp.batchSize)
        ]
        loop = (PreferenceLoop if dpo else TrainingLoop)(
            self.spec,
            model.module,
            tokens.train,
            validation_batches,
            plan,
            self.device,
            # Also with checkpointing off: a preempted run saves one, and its retry resumes there.
            self.checkpoints,
            lambda start: self._reporter(start, plan.total_steps, plan.steps_per_epoch),
            self.ranks,
            self.preemption,
            on_checkpoint=self._checkpoint_adapters(model),
        )
        loop.resume(spec_sha256(self.job))
        if self.ranks.is_main:
            self._remember({"preemptedAtSteps": self.checkpoints.preempted_steps()})
        return loop

    def _checkpoint_adapters(self, model: Model) -> Callable[[LoopState], None] | None:
        """What publishes each checkpoint as a servable adapter, when spec.checkpointing.adapterName asks."""
        if self.spec.checkpointing.adapterName is None:
            return None
        return CheckpointAdapters(self.store, self.job, model.module, _config_hash(model.path)).publish

    def _rows(self, examples: list[EncodedExample] | list[EncodedPair]) -> list[list[int]]:
        hp = self.spec.hyperparameters
        # A pair's two sequences share a row: each may have maxSeqLength tokens.
        row_length = hp.maxSeqLength * (2 if self.spec.method is Method.dpo else 1)
        return pack_rows(examples, row_length) if hp.packing else single_rows(examples)

    def estimate(self, model: Model, tokens: Tokenized, plan: Plan) -> Estimate | None:
        """What the throughput model expects of this run on this device, logged before it starts;
        None on a device it has no figures for."""
        if self.device.type == "cuda":
            name, devices = torch.cuda.get_device_name(self.device), self.ranks.world_size
        else:
            name, devices = "cpu", available_cores()
        try:
            device, parameters = device_for_name(name), count_parameters(model.path)
        except ValueError as error:  # a GPU without figures, or weights that are not safetensors
            log.info("no time estimate: %s", error)
            return None
        workload = Workload(
            parameters=parameters,
            method=self.spec.method.value,
            quantized=self.spec.quantized_base,
            tokens_per_epoch=sum(len(item.input_ids) for item in tokens.train),
            epochs=self.spec.hyperparameters.epochs,
            steps=plan.total_steps,
            validation_tokens_per_epoch=sum(len(item.input_ids) for item in tokens.validation),
        )
        expected = estimate(workload, device, devices=devices, price_per_gpu_hour=self.spec.resources.costPerGpuHour)
        for line in expected.lines():
            log.info("%s", line)
        self._remember({"estimate": expected.to_status()})
        return expected

    def setup_evaluation(self, model: Model, loop: TrainingLoop, data: Datasets) -> Evaluation:
        dpo = self.spec.method is Method.dpo
        checks: list[Check] = [(HeldOutPreferences if dpo else HeldOutLoss)(loop.evaluate)]
        evaluation = self.spec.evaluation
        few_shot = None
        # Only rank 0 publishes answers, so only it spends the time generating them.
        if evaluation.metrics and data.held_out and self.ranks.is_main:
            answers = HeldOutAnswers(
                model.unsharded,
                model.tokenizer,
                data.held_out,
                evaluation.metrics,
                max_new_tokens=evaluation.maxNewTokens,
                max_prompt_tokens=self.spec.hyperparameters.maxSeqLength,
                device=self.device,
                training_answers=frozenset(answer.strip() for answer in references(data.train)),
            )
            checks.append(answers)
            # A pair's input has no solved example to show, so DPO has no few-shot baseline.
            if evaluation.fewShot.k and not dpo:
                shots = draw_shots(data.train, evaluation.fewShot.k, self.spec.hyperparameters.seed)
                few_shot = FewShotAnswers(answers, shots)
        if data.general and self.ranks.is_main:
            checks.append(self._general_check(model, loop, data.general))
        return Evaluation(checks, few_shot)

    def _general_check(self, model: Model, loop: TrainingLoop, prompts: list[Example]) -> GeneralAbility:
        general = self.spec.evaluation.general
        max_prompt_tokens = self.spec.hyperparameters.maxSeqLength
        base_model = {
            "name": self.spec.baseModel,
            "configSha256": _config_hash(model.path),
            "quantized": self.spec.quantized_base,
            "dtype": str(getattr(model.module, "dtype", "")),
            "device": self.device.type,
        }
        key = baseline_key(
            base_model=base_model,
            prompts=prompts,
            max_new_tokens=general.maxNewTokens,
            max_prompt_tokens=max_prompt_tokens,
        )
        return GeneralAbility(
            model.unsharded,
            model.tokenizer,
            prompts,
            max_new_tokens=general.maxNewTokens,
            max_prompt_tokens=max_prompt_tokens,
            device=self.device,
            cache=BaselineCache(self.store),
            cache_key=key,
            # The base is evaluated before the first optimizer step; after one the weights are the adapter's.
            trained=lambda: loop.state.step > 0,
        )

    def evaluate_base(self, loop: TrainingLoop, evaluation: Evaluation) -> EvaluationResult:
        """Measured before the first step, when the model is still the base (a LoRA update starts
        at zero), with the few-shot baseline; a resumed run has both from its checkpoint (one
        written before the baseline existed has none, and the base weights are gone)."""
        if loop.state.base_evaluation is None:
            self.reporter.event("evaluating-base")
            loop.state.base_evaluation = run_checks(evaluation.checks)
            if evaluation.few_shot is not None:
                self.reporter.event("evaluating-few-shot", shots=self.spec.evaluation.fewShot.k)
                loop.state.few_shot_evaluation = evaluation.few_shot()
        return loop.state.base_evaluation

    def train(self, loop: TrainingLoop) -> TrainingResult:
        started = time.monotonic()
        state = loop.run()
        preempted_at = self.checkpoints.preempted_steps() if self.ranks.is_main else []
        return TrainingResult(state, time.monotonic() - started, preempted_at)

    @staticmethod
    def _move_whole(model: Model, device: torch.device) -> None:
        if model.whole is not None:
            model.whole.to(device)

    def gather_weights(self, model: Model, loop: TrainingLoop) -> None:
        """Sharded training: the trained weights, all-gathered, into rank 0's whole copy."""
        if not loop.sharded:
            return
        weights = fsdp.whole_state(model.module)
        if model.whole is not None:
            model.whole.load_state_dict(weights)

    def evaluate(self, checks: list[Check]) -> EvaluationResult:
        self.reporter.event("evaluating")
        return run_checks(checks)

    def publish(self, model: Model, data: Datasets, report: RunReport) -> AdapterVersion:
        """A new version in the registry: the weights, evaluation.json, the loss history, report.html
        and the manifest."""
        self.reporter.event("uploading")
        namespace, name = self.job.metadata.namespace, self.spec.output.adapterName
        # Chosen here, not by publish_adapter: report.html names it and is written before the commit.
        version = next_version(self.store, namespace, name)
        with tempfile.TemporaryDirectory(prefix="tuneloom-out-") as tmp:
            out = Path(tmp)
            self._save(model, out)
            samples, history = report.evaluation_file(), report.loss_history()
            (out / EVALUATION_FILE).write_text(json.dumps(samples, indent=1))
            (out / LOSS_HISTORY_FILE).write_text(json.dumps(history))
            manifest = self._manifest(model, data, report)
            identity = {"namespace": namespace, "name": name, "version": version}
            (out / REPORT_FILE).write_text(render_report({**manifest, **identity}, samples, history), encoding="utf-8")
            files = {path.name: path for path in sorted(out.iterdir()) if path.is_file()}
            adapter = publish_adapter(self.store, namespace, name, files, manifest, version=version)
        self.checkpoints.mark_published({"version": adapter.version, "uri": adapter.uri})
        published = {"name": adapter.name, "version": adapter.version, "uri": adapter.uri}
        self.reporter.event("succeeded", adapter=published, promoted=adapter.manifest.promotion.promoted)
        return adapter

    def _save(self, model: Model, out: Path) -> None:
        module = model.unsharded
        if self.spec.method is Method.full:
            module.save_pretrained(out)
            model.tokenizer.save_pretrained(out)
        else:
            save_adapter(module, self.spec.baseModel, out)

    def _manifest(self, model: Model, data: Datasets, report: RunReport) -> dict[str, Any]:
        spec, meta = self.spec, self.job.metadata
        metrics = report.metrics()
        # A version that fails the gate is still committed: it is the evidence of what went wrong.
        promotion = decide(metrics, spec.promotion)
        if promotion.promoted:
            log.info("promotion: promoted")
        else:
            log.warning("promotion: not promoted: %s", "; ".join(promotion.reasons))
        self.reporter.published({"base": metrics["base"], "adapter": metrics["adapter"]}, promotion.promoted)
        return {
            "kind": "full" if spec.method is Method.full else "lora",
            "baseModel": {"name": spec.baseModel, "configSha256": _config_hash(model.path)},
            "datasets": data.info,
            "spec": spec.model_dump(mode="json"),
            "metrics": metrics,
            "promotion": promotion.model_dump(mode="json"),
            "job": {"namespace": meta.namespace, "name": meta.name, "uid": meta.uid},
            "tuneloomVersion": __version__,
        }


def _config_hash(model_path: str) -> str | None:
    path = Path(model_path)
    return model_config_hash(path) if path.is_dir() else None


def _run_prefix(job: FineTuneJob) -> str:
    return run_prefix(job.metadata.namespace, job.metadata.name, job.metadata.uid or "local")


def run(job: FineTuneJob, *, metrics_port: int | None = None, fresh: bool = False) -> AdapterVersion | None:
    """The adapter published; raises Preempted after a SIGTERM (see tuneloom.trainer.preemption)."""
    with PreemptionWatch().installed() as preemption:
        # Seconds now, before any process group, data or model, instead of a failure after the data
        # is tokenized or hours into training.
        check_before_running(job.spec, _run_prefix(job))
        fine_tune = FineTuneRun(job, preemption, metrics_port=metrics_port, fresh=fresh)
        try:
            return fine_tune.run()
        finally:
            distributed.teardown(fine_tune.ranks)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_from_file(path: str | Path, *, metrics_port: int | None = None, fresh: bool = False) -> int:
    """The command-line entry: an exit status, and every error said in one place."""
    try:
        job = load_job(path)
        run(job, metrics_port=metrics_port, fresh=fresh)
    except (
        SpecError,
        DataValidationError,
        UnusableDataError,
        InitAdapterError,
        PreflightError,
        BaseModelUnavailableError,
        MethodNotSupportedError,
    ) as exc:
        return _fail(str(exc), EXIT_INVALID_INPUT)
    except StorageError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except Preempted as exc:
        log.info("%s", exc)  # "preempted at step N: checkpoint saved"
        return EXIT_PREEMPTED
    return 0
