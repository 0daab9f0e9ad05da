"""QLoRA and bf16 training on CUDA, and two processes under torchrun with NCCL (FSDP and DDP).
Skipped without a GPU; the CPU suite covers the same code paths (`load_model`, the loop, FSDP and
DDP over gloo, publishing) with method lora, and DPO's loop with dpo.qlora off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneloom.jobfile import parse_job
from tuneloom.trainer.main import run

from .test_dpo_train import _dpo_job, _pairs, _preferred_style
from .test_fsdp_train import _full_job, _run
from .test_train import _dataset, _job

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_training_on_cuda(method: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), str(tmp_path / "s"), method=method)
    adapter = run(parse_job(spec))
    metrics = adapter.manifest.metrics
    assert metrics.adapter.validationLoss < metrics.base.validationLoss
    assert metrics.model_extra["peakMemoryBytes"] > 0


def test_qlora_dpo_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The reference policy is the 4-bit base with the adapter off: no second copy of the model."""
    data = _pairs(tmp_path / "pairs.jsonl", *_preferred_style(tiny_model_dir))
    adapter = run(parse_job(_dpo_job(tiny_model_dir, data, str(tmp_path / "s"), dpo={"qlora": True})))
    manifest = adapter.manifest.model_dump(mode="json")
    assert manifest["spec"]["dpo"]["qlora"] is True
    base, tuned = manifest["metrics"]["base"], manifest["metrics"]["adapter"]
    assert tuned["preferenceAccuracy"] > base["preferenceAccuracy"]
    assert tuned["validationLoss"] < base["validationLoss"]
    assert manifest["metrics"]["peakMemoryBytes"] > 0


@pytest.mark.parametrize(
    ("method", "strategy", "offload"), [("full", "fsdp", False), ("full", "fsdp", True), ("lora", "ddp", False)]
)
def test_two_processes_on_cuda_with_nccl(
    method: str, strategy: str, offload: bool, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """FSDP2 full fine-tuning (bf16 compute, fp32 reduction; shards offloaded to CPU memory or not)
    and DDP LoRA, one GPU per process."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs: NCCL runs one process per GPU")
    make = _full_job if method == "full" else _job
    spec = make(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), str(tmp_path / "s"), method=method)
    spec["spec"]["distributed"] = {"strategy": strategy, "cpuOffload": offload}
    spec["spec"]["checkpointing"] = {"everySteps": 2}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    result = _run(job, tmp_path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "s/adapters/default/pirate/1/manifest.json").read_text())
    assert manifest["kind"] == ("full" if method == "full" else "lora")
    assert manifest["metrics"]["adapter"]["validationLoss"] < manifest["metrics"]["base"]["validationLoss"]
    assert manifest["metrics"]["peakMemoryBytes"] > 0
