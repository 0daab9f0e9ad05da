"""OpenAI's fine-tuning request mapped onto a FineTuneJob: pure functions, no I/O.

The "auto" rules are OpenAI's published ones where it has them (epochs from the file's size), and
ours where it does not (batch size from the data, learning rate from the method's default).
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Annotated, Any, Literal

from openai.types.fine_tuning.fine_tuning_job_wandb_integration_object import FineTuningJobWandbIntegrationObject
from pydantic import BaseModel, ConfigDict, Field

from tuneloom.api import FULL_API_VERSION, DpoSpec, HyperparametersSpec
from tuneloom.names import is_dns_label

from .errors import bad_request

Auto = Literal["auto"]

# OpenAI's rule: 3 epochs, more when the file is small (at least MIN_TARGET_EXAMPLES examples seen in
# all), fewer when it is large (at most MAX_TARGET_EXAMPLES), clamped to [MIN_EPOCHS, MAX_EPOCHS].
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_EPOCHS, MAX_EPOCHS = 1, 25
# Batch size: the power of two nearest examples / AUTO_EXAMPLES_PER_BATCH (about 25 steps an epoch),
# at most MAX_AUTO_BATCH and at most MAX_AUTO_BATCH_TOKENS tokens a step (what fits a CPU or a small GPU).
AUTO_EXAMPLES_PER_BATCH = 25
MAX_AUTO_BATCH = 32
MAX_AUTO_BATCH_TOKENS = 32_768
# `learning_rate_multiplier` multiplies the trainer's default peak learning rate (the same for both methods).
DEFAULT_LEARNING_RATE = HyperparametersSpec.model_fields["learningRate"].default
DEFAULT_BETA = DpoSpec.model_fields["beta"].default
SUPERVISED, DPO = "supervised", "dpo"
# The data format each method trains on, as the upload check found it (FileRecord.format).
METHOD_FORMAT = {SUPERVISED: "chat", DPO: "preference"}
VALIDATION_SPLIT = 0.1
PROGRESS_EVENTS_PER_RUN = 100  # metrics events a run logs at most, whatever its length
SUFFIX_MAX = 64


class HyperparametersRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | Annotated[int, Field(ge=1, le=1000)] | None = None
    batch_size: Auto | Annotated[int, Field(ge=1, le=4096)] | None = None
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=1000)] | None = None


class DpoHyperparametersRequest(HyperparametersRequest):
    beta: Auto | Annotated[float, Field(gt=0, le=10)] | None = None


class SupervisedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: HyperparametersRequest | None = None


class DpoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparametersRequest | None = None


class MethodRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # a `reinforcement` block is refused by type below
    type: str = SUPERVISED
    supervised: SupervisedRequest | None = None
    dpo: DpoRequest | None = None


class CreateJobRequest(BaseModel):
    """The body of POST /v1/fine_tuning/jobs, as OpenAI's SDK sends it."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: HyperparametersRequest | None = None
    method: MethodRequest | None = None
    suffix: str | None = Field(default=None, max_length=SUFFIX_MAX)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    # Accepted (and reported as ignored) in the shape the job object echoes back: OpenAI's wandb one.
    integrations: list[FineTuningJobWandbIntegrationObject] | None = None

    @property
    def method_type(self) -> str:
        """supervised or dpo; anything else is refused with the types that are."""
        kind = self.method.type if self.method is not None else SUPERVISED
        if kind not in METHOD_FORMAT:
            raise bad_request(f"method.type {kind!r} is not supported; use 'supervised' or 'dpo'", "method.type")
        return kind

    def requested_hyperparameters(self) -> HyperparametersRequest:
        """`method.<type>.hyperparameters` (the current form) or the top-level ones (the old form)."""
        block = getattr(self.method, self.method_type, None) if self.method is not None else None
        nested = block.hyperparameters if block is not None else None
        return nested or self.hyperparameters or HyperparametersRequest()


class ResolvedHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None = None  # dpo only

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LEARNING_RATE * self.learning_rate_multiplier


def auto_epochs(examples: int) -> int:
    """OpenAI's default: 3 epochs, raised so a small file is seen ~100 times, lowered for a large one."""
    examples = max(examples, 1)
    if examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / examples))
    if examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // examples)
    return TARGET_EPOCHS


def auto_batch_size(examples: int, max_seq_length: int) -> int:
    """A power of two near examples/25 (4 for ~100 examples), within MAX_AUTO_BATCH and the token budget."""
    wanted = 2 ** max(0, round(math.log2(max(examples, 1) / AUTO_EXAMPLES_PER_BATCH)))
    fits = max(1, MAX_AUTO_BATCH_TOKENS // max_seq_length)
    return max(1, min(wanted, MAX_AUTO_BATCH, fits))


def resolve_hyperparameters(
    requested: HyperparametersRequest, examples: int, max_seq_length: int, method: str = SUPERVISED
) -> ResolvedHyperparameters:
    def given(value: Any) -> bool:
        return value not in (None, "auto")

    return ResolvedHyperparameters(
        n_epochs=requested.n_epochs if given(requested.n_epochs) else auto_epochs(examples),
        batch_size=requested.batch_size if given(requested.batch_size) else auto_batch_size(examples, max_seq_length),
        learning_rate_multiplier=(
            requested.learning_rate_multiplier if given(requested.learning_rate_multiplier) else 1.0
        ),
        beta=(beta if given(beta := getattr(requested, "beta", None)) else DEFAULT_BETA) if method == DPO else None,
    )


def integrations_notice(integrations: list[dict[str, Any]]) -> str | None:
    """The event that says a job's integrations (wandb) were accepted and are ignored; None without any."""
    if not integrations:
        return None
    kinds = ", ".join(sorted({str(i.get("type", "?")) for i in integrations}))
    return f"Integrations ({kinds}) accepted and ignored: metrics are in this job's events and result file"


def new_id(prefix: str) -> str:
    """OpenAI-style ids; lowercase hex, so a job id is also a DNS label."""
    return f"{prefix}-{secrets.token_hex(12)}"


def base_model_label(model: str) -> str:
    """The base model's part of a fine-tuned model id: a hub id's or a folder's last part (no '/' or ':')."""
    return model.rstrip("/").rsplit("/", 1)[-1].replace(":", "-")


def adapter_name(suffix: str | None, job_id: str) -> str:
    """The registry name: the suffix made a DNS label, then the job id (unique, so names never clash)."""
    slug = re.sub(r"[^a-z0-9]+", "-", (suffix or "").lower()).strip("-")
    room = 63 - len(job_id) - 1
    name = f"{slug[:room].strip('-')}-{job_id}" if slug else job_id
    assert is_dns_label(name), name
    return name


def fine_tuned_model_id(model: str, project: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's form `ft:<base>:<project>:<suffix>:<job-id>` (the suffix may be empty)."""
    return f"ft:{base_model_label(model)}:{project}:{suffix or ''}:{job_id}"


CHECKPOINT_MARK = ":ckpt-step-"
# A fine-tuned model is made available only when it beats its base model on the held-out examples.
PROMOTION_REQUIRE = ["validationLoss"]


def checkpoint_model_id(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}{CHECKPOINT_MARK}{step}"


def split_checkpoint_model_id(model_id: str) -> tuple[str, int] | None:
    """(the job's fine_tuned_model, the step) of a checkpoint's model id; None for any other id."""
    model, mark, step = model_id.rpartition(CHECKPOINT_MARK)
    return (model, int(step)) if mark and step.isdigit() else None


def checkpoint_adapter_name(job_id: str) -> str:
    """The registry name a job's checkpoints are published under, one version per step."""
    return f"{job_id}-checkpoints"


def train_examples(examples: int, has_validation_file: bool) -> int:
    """Examples trained on: without a validation file the trainer holds out VALIDATION_SPLIT of them."""
    return examples if has_validation_file else examples - max(1, math.ceil(examples * VALIDATION_SPLIT))


def finetune_job(
    *,
    job_id: str,
    project: str,
    base_model: str,
    train_uri: str,
    validation_uri: str | None,
    train_count: int,
    hyperparameters: ResolvedHyperparameters,
    seed: int,
    adapter: str,
    store: str,
    max_seq_length: int,
    method: str = SUPERVISED,
) -> dict[str, Any]:
    """The FineTuneJob document the trainer runs (`method`: OpenAI's method.type). Name and uid are
    the job id, so a rerun after a pause or a restart finds this job's checkpoints and goes on from
    the latest."""
    steps_per_epoch = max(1, math.ceil(train_count / hyperparameters.batch_size))
    total_steps = steps_per_epoch * hyperparameters.n_epochs
    dataset: dict[str, Any] = {"train": train_uri, "format": METHOD_FORMAT[method]}
    method_fields = {"method": "dpo", "dpo": {"beta": hyperparameters.beta}} if method == DPO else {"method": "lora"}
    if validation_uri:
        dataset["validation"] = validation_uri
    else:
        dataset["validationSplit"] = VALIDATION_SPLIT
    return {
        "apiVersion": FULL_API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": job_id, "namespace": project, "uid": job_id},
        "spec": {
            "baseModel": base_model,
            "dataset": dataset,
            **method_fields,
            "hyperparameters": {
                "epochs": hyperparameters.n_epochs,
                "learningRate": hyperparameters.learning_rate,
                "batchSize": hyperparameters.batch_size,
                "maxSeqLength": max_seq_length,
                # Unpacked, so batch_size counts examples, as it does for OpenAI.
                "packing": False,
                "seed": seed,
                "loggingSteps": max(1, total_steps // PROGRESS_EVENTS_PER_RUN),
            },
            "evaluation": {"metrics": ["exact_match"], "maxNewTokens": 64, "maxExamples": 8},
            "promotion": {"require": PROMOTION_REQUIRE},
            # The trainer also checkpoints at every epoch's end while steps are on: one a epoch at least.
            # Each is published as an adapter too, so its fine_tuned_model_checkpoint can be served.
            "checkpointing": {
                "everySteps": steps_per_epoch,
                "keep": 2,
                "adapterName": checkpoint_adapter_name(job_id),
            },
            "output": {"adapterName": adapter, "uri": store},
        },
    }
