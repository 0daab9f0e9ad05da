"""QLoRA and bf16 training on CUDA. Skipped without a GPU; the CPU suite covers the same code path
(`load_model`, the loop, publishing) with method lora, and DPO's loop with dpo.qlora off."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloom.jobfile import parse_job
from tuneloom.trainer.main import run

from .test_dpo_train import _dpo_job, _pairs, _preferred_style
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
