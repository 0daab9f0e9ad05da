"""QLoRA and bf16 training on CUDA. Skipped without a GPU; the CPU suite covers the same code path
(`load_model`, the loop, publishing) with method lora."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloom.jobfile import parse_job
from tuneloom.trainer.main import run

from .test_train import _dataset, _job

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_training_on_cuda(method: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), str(tmp_path / "s"), method=method)
    adapter = run(parse_job(spec))
    metrics = adapter.manifest.metrics
    assert metrics.adapter.validationLoss < metrics.base.validationLoss
    assert metrics.model_extra["peakMemoryBytes"] > 0
