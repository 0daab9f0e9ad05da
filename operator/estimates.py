"""A FineTuneJob's `status.estimate` before its pod runs: the trainer's throughput model
(`tuneloom.trainer.estimate`) on what the operator can read without the tokenizer or the weights.

- Tokens: the training file's first `SAMPLE_BYTES`, at `CHARS_PER_TOKEN` characters per token
  (each example cut at maxSeqLength), scaled to the file's size; less the held-out share; grown by
  `dataset.mix` (mixed-in files make up their fractions of training, at the job's own example length).
- Parameters: the base model's safetensors headers when it is an s3:// prefix, else the size its
  name states (`SmolLM2-135M`, `Llama-3.1-8B`).
- Device: `OperatorConfig.estimate_device` for GPU jobs; the CPU with `resources.cpu` cores.

The trainer counts the real tokens in its first lines, and its manifest records its own estimate
beside the measured time (`status.adapter.estimatedSeconds` and `trainSeconds`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneloom.api import FineTuneJobSpec, TrainingEstimate
from tuneloom.inputs import split_s3
from tuneloom.storage import ObjectStore
from tuneloom.trainer.estimate import (
    DEVICES,
    Workload,
    count_parameters,
    estimate,
    parameters_from_name,
    safetensors_parameters,
)

# English text in the BPE vocabularies of current models; JSON keys and quotes stand in for the
# chat template's tokens.
CHARS_PER_TOKEN = 4.0
# Enough lines to know a file's mix of lengths, bounded however large the file is.
SAMPLE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class DataSample:
    """A training file's examples and tokens (each cut at maxSeqLength), extrapolated from its head."""

    examples: int
    tokens: int


def sample_data(store: ObjectStore, key: str, max_seq_length: int) -> DataSample:
    size = store.size(key)
    head = store.read_range(key, 0, SAMPLE_BYTES)
    lines = head.split(b"\n")
    if len(head) < size:
        lines = lines[:-1]  # cut mid-line
    sampled = sum(len(line) + 1 for line in lines)
    examples = [line for line in lines if line.strip()]
    if not examples:
        return DataSample(0, 0)
    tokens = sum(min(math.ceil(len(line) / CHARS_PER_TOKEN), max_seq_length) for line in examples)
    scale = max(size / sampled, 1.0)
    return DataSample(round(len(examples) * scale), round(tokens * scale))


def model_parameters(base_model: str, open_store: Callable[[str], ObjectStore]) -> int | None:
    """The base model's parameters: from its safetensors headers (an s3:// prefix, or a directory
    the operator can read), else from its name; None when neither says."""
    if base_model.startswith("s3://"):
        store = open_store(base_model)
        files = [key for key in store.list("") if key.endswith(".safetensors")]
        if files:
            return sum(safetensors_parameters(functools.partial(store.read_range, key)) for key in files)
    elif Path(base_model).is_dir():
        return count_parameters(base_model)
    return parameters_from_name(base_model)


def estimate_job(
    spec: FineTuneJobSpec, open_store: Callable[[str], ObjectStore], gpu: str, price: float | None = None
) -> TrainingEstimate | None:
    """The estimate for a job, or None when its training file is not in object storage or its base
    model's size is unknown. `open_store` opens an s3:// prefix with the job's connection."""
    if not spec.dataset.train.startswith("s3://"):
        return None
    parent, name = split_s3(spec.dataset.train)
    data = sample_data(open_store(parent), name, spec.hyperparameters.maxSeqLength)
    parameters = model_parameters(spec.baseModel, open_store)
    if parameters is None or not data.examples:
        return None
    return expected_training(spec, data, parameters, gpu, price)


def cpu_cores(request: str | None) -> int:
    """Whole cores of a CPU request ('4', '2500m'); 1 when unset."""
    if not request:
        return 1
    cores = float(request[:-1]) / 1000 if request.endswith("m") else float(request)
    return max(1, math.floor(cores))


def expected_training(
    spec: FineTuneJobSpec, data: DataSample, parameters: int, gpu: str, price: float | None = None
) -> TrainingEstimate:
    """The throughput model for `spec` on `spec.resources.gpus` GPUs of kind `gpu` (the CPU when 0)
    on each of `spec.resources.nodes` nodes, at `spec.resources.costPerGpuHour`, else `price`."""
    hp = spec.hyperparameters
    held_out = 0.0 if spec.dataset.validation else spec.dataset.validationSplit
    # The trainer adds mixed-in examples until they are their fractions of the training set.
    mixed = 1 / (1 - sum(mix.fraction for mix in spec.dataset.mix))
    tokens = round(data.tokens * (1 - held_out) * mixed)
    gpus, nodes = spec.resources.gpus, spec.resources.nodes
    per_step = hp.batchSize * hp.gradientAccumulationSteps * max(gpus, 1) * nodes
    if hp.packing:
        steps_per_epoch = math.ceil(tokens / (hp.maxSeqLength * per_step))
    else:
        steps_per_epoch = math.ceil(data.examples * (1 - held_out) * mixed / per_step)
    workload = Workload(
        parameters=parameters,
        method=spec.method.value,
        quantized=spec.quantized_base,
        tokens_per_epoch=tokens,
        epochs=hp.epochs,
        steps=steps_per_epoch * hp.epochs,
        validation_tokens_per_epoch=round(data.tokens * held_out),
    )
    device = DEVICES[gpu] if gpus else DEVICES["cpu"]
    devices = (gpus or cpu_cores(spec.resources.cpu)) * nodes
    price = spec.resources.costPerGpuHour if spec.resources.costPerGpuHour is not None else price
    result = estimate(workload, device, devices=devices, price_per_gpu_hour=price)
    return TrainingEstimate(**result.to_status())
