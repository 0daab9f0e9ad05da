"""How long a training job will take and what it will cost, before it runs.

A throughput model, standard library only (`tuneloom validate-data` and the operator use it
without torch):

    seconds = FLOPs / (peak FLOP/s per device x utilisation x devices)
    FLOPs   = flops_per_token(method) x N x training tokens + 2 x N x validation tokens

with N the base model's parameters. A training token costs about 6 N FLOPs for a full fine-tune
(forward 2 N, backward 4 N), and about 4 N with LoRA or QLoRA: the frozen weights need no weight
gradients, only the activation gradients flowing through them. QLoRA also dequantises its 4-bit
weights in every forward and backward pass, counted as a time factor (`QLORA_DEQUANT_FACTOR`).
Attention's own FLOPs, which grow with the sequence length, are left out: for sequences of a few
thousand tokens they are a small share of the weights'.

Devices: GPUs at their peak dense bf16 FLOP/s and an assumed utilisation, uncalibrated until our
benchmark measures one. The CPU's effective FLOP/s per core is calibrated from bench/README.md
(SmolLM2-135M, LoRA, 174.8 tokens/s on 2 cores) and scaled by the cores the job has.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# FLOPs per training token per base-model parameter. DPO is LoRA's plus a forward pass of the
# reference policy (the same model, adapter off) over the same tokens.
FLOPS_PER_TOKEN_PER_PARAMETER = {"full": 6.0, "lora": 4.0, "qlora": 4.0, "dpo": 6.0}
# Held-out loss is a forward pass only.
EVALUATION_FLOPS_PER_TOKEN_PER_PARAMETER = 2.0
# An assumption, not a measurement: bitsandbytes' dequantisation makes QLoRA steps about a third
# slower than LoRA's on the same GPU in published comparisons.
QLORA_DEQUANT_FACTOR = 1.35
# A GPU's share of its peak that fine-tuning reaches: an assumption until measured on each GPU.
ASSUMED_GPU_UTILISATION = 0.35

# bench/README.md: SmolLM2-135M-Instruct (134,515,008 parameters), LoRA, our loop on a 2-core
# host: 174.8 tokens/s, i.e. 4 x N x 174.8 / 2 FLOP/s per core.
_BENCH_PARAMETERS, _BENCH_TOKENS_PER_SECOND, _BENCH_CORES = 134_515_008, 174.8, 2
CPU_FLOPS_PER_CORE = 4.0 * _BENCH_PARAMETERS * _BENCH_TOKENS_PER_SECOND / _BENCH_CORES
# The safetensors format's own limit on its header.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Device:
    """One kind of training device: its peak FLOP/s (per GPU, or per core for the CPU) and the
    share of it training reaches."""

    name: str
    peak_flops: float
    utilisation: float
    basis: str  # where the figures come from, said beside every estimate

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"


DEVICES = {
    "h100": Device("h100", 989e12, ASSUMED_GPU_UTILISATION, "peak dense bf16 989 TFLOP/s, utilisation assumed"),
    "h200": Device("h200", 989e12, ASSUMED_GPU_UTILISATION, "peak dense bf16 989 TFLOP/s, utilisation assumed"),
    "a100": Device("a100", 312e12, ASSUMED_GPU_UTILISATION, "peak dense bf16 312 TFLOP/s, utilisation assumed"),
    "l4": Device("l4", 121e12, ASSUMED_GPU_UTILISATION, "peak dense bf16 121 TFLOP/s, utilisation assumed"),
    "cpu": Device("cpu", CPU_FLOPS_PER_CORE, 1.0, "calibrated on bench/README.md's CPU figure, per core"),
}


def device_for_name(name: str) -> Device:
    """The table's entry for a device name such as `cpu`, `h100` or torch's `NVIDIA H100 80GB HBM3`."""
    # Whole words only: an L40S is no L4.
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for key, device in DEVICES.items():
        if key in words:
            return device
    raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")


@dataclass(frozen=True)
class Workload:
    """What a job computes: the base model's size, the method, the tokens and the steps."""

    parameters: int
    method: str  # full | lora | qlora
    tokens_per_epoch: int
    epochs: int
    steps: int  # optimizer steps in all
    validation_tokens_per_epoch: int = 0  # the held-out loss after every epoch
    quantized: bool = False  # a 4-bit base (qlora, or dpo with dpo.qlora): dequantised at every use


@dataclass(frozen=True)
class Estimate:
    tokens_per_epoch: int
    tokens: int
    steps: int
    seconds: float
    device: str
    devices: int  # GPUs, or CPU cores
    gpu_seconds: float  # 0 on CPU
    cost: float | None  # at the price given, None without one
    basis: str

    def to_status(self) -> dict[str, float | int | None]:
        """FineTuneJob `status.estimate` and the manifest's `metrics.estimate`."""
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "cost": self.cost,
        }

    def lines(self) -> list[str]:
        where = f"{self.devices} x {self.device}" if self.device != "cpu" else f"cpu ({self.devices} cores)"
        if self.device == "cpu":
            cost = "no GPU time"
        else:
            cost = "no price given" if self.cost is None else f"{self.cost:.4g} at the price given"
        return [
            f"training tokens: {self.tokens_per_epoch:,} per epoch, {self.tokens:,} in total; "
            f"{self.steps} optimizer steps",
            f"estimated time on {where}: {format_duration(self.seconds)}; cost: {cost} ({self.basis})",
        ]


def estimate(workload: Workload, device: Device, *, devices: int, price_per_gpu_hour: float | None = None) -> Estimate:
    """The throughput model applied to one job on `devices` GPUs (or CPU cores) of `device`."""
    if workload.method not in FLOPS_PER_TOKEN_PER_PARAMETER:
        raise ValueError(f"unknown method {workload.method!r}; known: {', '.join(FLOPS_PER_TOKEN_PER_PARAMETER)}")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    tokens = workload.tokens_per_epoch * workload.epochs
    flops = FLOPS_PER_TOKEN_PER_PARAMETER[workload.method] * workload.parameters * tokens
    flops += (
        EVALUATION_FLOPS_PER_TOKEN_PER_PARAMETER
        * workload.parameters
        * workload.validation_tokens_per_epoch
        * workload.epochs
    )
    seconds = flops / (device.peak_flops * device.utilisation * devices)
    basis = device.basis
    if workload.method == "qlora" or workload.quantized:
        seconds *= QLORA_DEQUANT_FACTOR
        basis += f"; QLoRA dequantisation x{QLORA_DEQUANT_FACTOR} assumed"
    gpu_seconds = seconds * devices if device.is_gpu else 0.0
    return Estimate(
        tokens_per_epoch=workload.tokens_per_epoch,
        tokens=tokens,
        steps=workload.steps,
        seconds=seconds,
        device=device.name,
        devices=devices,
        gpu_seconds=gpu_seconds,
        cost=run_cost(gpu_seconds, price_per_gpu_hour),
        basis=basis,
    )


def run_cost(gpu_seconds: float, price_per_gpu_hour: float | None) -> float | None:
    """What GPU time costs at a price per GPU-hour, to 4 significant digits; None without a price."""
    return None if price_per_gpu_hour is None else float(f"{gpu_seconds / 3600 * price_per_gpu_hour:.4g}")


def format_duration(seconds: float) -> str:
    seconds = math.ceil(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def available_cores() -> int:
    """The CPU cores this process may run on (a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0))


def count_parameters(model_dir: str | Path) -> int:
    """The parameters of a Hugging Face model directory, from its safetensors headers alone: no
    weights are read."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files to count the parameters of")
    return sum(safetensors_parameters(functools.partial(_read_range, path)) for path in files)


def safetensors_parameters(read_range: Callable[[int, int], bytes]) -> int:
    """The parameters one safetensors file holds, from its header (an 8-byte little-endian length,
    then JSON of dtypes and shapes); `read_range(start, length)` reads the file's bytes."""
    (length,) = struct.unpack("<Q", read_range(0, 8))
    if length > MAX_SAFETENSORS_HEADER_BYTES:
        raise ValueError(f"a safetensors header of {length} bytes; the format allows {MAX_SAFETENSORS_HEADER_BYTES}")
    header = json.loads(read_range(8, length))
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


def _read_range(path: Path, start: int, length: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(start)
        return handle.read(length)


def parameters_from_name(name: str) -> int | None:
    """The size a model's name states, as in `SmolLM2-135M-Instruct` or `Llama-3.1-8B`; None when it
    states none. For the operator, which cannot read a hub model before its pod does."""
    sizes = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([MB])(?![A-Za-z])", name.rsplit("/", 1)[-1], flags=re.IGNORECASE)
    if not sizes:
        return None
    number, unit = sizes[-1]
    return round(float(number) * (1e6 if unit.upper() == "M" else 1e9))
