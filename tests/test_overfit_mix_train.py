"""Overfitting and mixing end to end on the tiny model: a job built to overfit is flagged; blending
general chat into a forgetting-prone job lowers general.nllShift on the same model and data."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from tuneloom.jobfile import parse_job
from tuneloom.registry import AdapterId
from tuneloom.storage import open_store
from tuneloom.trainer.main import run

from .test_train import _job

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "maple",
    "tiger",
    "violet",
    "harbor",
    "quartz",
    "lemon",
    "falcon",
    "meadow",
]


def _code_words(path: Path, count: int = 20) -> Path:
    """Prompts whose answers are random words: learnable by heart only, so held-out loss cannot follow."""
    rng = random.Random(0)
    with path.open("w") as stream:
        for number in range(count):
            answer = " ".join(rng.choice(WORDS) for _ in range(6))
            messages = [{"role": "user", "content": f"Code word {number}?"}, {"role": "assistant", "content": answer}]
            stream.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_a_job_built_to_overfit_is_flagged(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    store_root = str(tmp_path / "store")
    spec = _job(
        tiny_model_dir,
        _code_words(tmp_path / "train.jsonl"),
        store_root,
        hyperparameters={"epochs": 8},
        evaluation={"metrics": [], "everySteps": 2, "general": {"enabled": False}},
    )
    with caplog.at_level(logging.INFO, logger="tuneloom.trainer"):
        adapter = run(parse_job(spec))
    metrics = adapter.manifest.metrics.model_dump()
    print(json.dumps(metrics["history"]))
    assert all(entry["trainLoss"] > 0 for entry in metrics["history"])
    verdict = metrics["overfitting"]
    assert verdict["detected"] and verdict["rule"] in {"risingValidationLoss", "lossRatio"}, verdict
    assert f"overfitting: {verdict['reason']}" in caplog.text
    assert f"warning: overfitting: {verdict['reason']}" in capsys.readouterr().out
    samples = json.loads(
        open_store(store_root).get_bytes(f"{AdapterId('default', 'pirate', '1').store_prefix}/evaluation.json")
    )
    assert samples[-1] == {"check": "overfitting", **verdict}
