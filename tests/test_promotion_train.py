"""The general-ability check and the promotion gate end to end on the tiny model: a job taught a style
with a high learning rate moves far from its base and is not promoted; a gentle one barely moves."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tuneloom.jobfile import parse_job
from tuneloom.registry import AdapterId, list_versions
from tuneloom.serving.adapters import AdapterCatalog, ServingSettings
from tuneloom.serving.names import NotPromoted
from tuneloom.storage import open_store
from tuneloom.trainer.general import BASELINE_PREFIX
from tuneloom.trainer.main import run

from .test_train import _dataset, _job

GENERAL = {"maxExamples": 8, "maxNewTokens": 12}


def _run(model: Path, data: Path, store: str, learning_rate: float, evaluation: dict | None = None, **overrides):
    spec = _job(
        model,
        data,
        store,
        hyperparameters={"epochs": 2, "learningRate": learning_rate},
        evaluation={"metrics": [], "general": GENERAL, **(evaluation or {})},
        **overrides,
    )
    return run(parse_job(spec), fresh=True)


def test_a_forgetting_job_shifts_more_than_a_gentle_one_and_is_not_promoted(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_root = str(tmp_path / "store")
    data = _dataset(tmp_path / "train.jsonl")
    # 8 steps an epoch: validation every 3rd step of the run as well as at each epoch's end.
    gentle = _run(tiny_model_dir, data, store_root, 1e-5, {"metrics": ["exact_match"], "everySteps": 3})
    history = gentle.manifest.metrics.model_dump()["history"]
    steps = [(entry["epoch"], entry["step"]) for entry in history]
    assert steps == [(0.375, 3), (0.75, 6), (1, 8), (1.125, 9), (1.5, 12), (1.875, 15), (2, 16)]
    # Every held-out example expects the taught answer: reciting it is not memorising.
    assert gentle.manifest.metrics.adapter.model_dump()["memorizedFraction"] == 0.0
    store = open_store(store_root)
    assert len([key for key in store.list(BASELINE_PREFIX) if key.endswith("manifest.json")]) == 1

    with caplog.at_level(logging.INFO, logger="tuneloom.trainer"):
        harsh = _run(tiny_model_dir, data, store_root, 5e-2, promotion={"maxGeneralNllShift": 0.5})
    # The base side came from the store: the base model answered nothing the second time.
    assert "answers come from the store's cache" in caplog.text and "with the base model" not in caplog.text
    assert len([key for key in store.list(BASELINE_PREFIX) if key.endswith("manifest.json")]) == 1

    gentle_metrics = gentle.manifest.metrics.model_dump()
    harsh_metrics = harsh.manifest.metrics.model_dump()
    for metrics in (gentle_metrics, harsh_metrics):
        assert metrics["base"]["general.nllShift"] == 0.0 and metrics["base"]["general.agreement"] == 1.0
        assert 0.0 <= metrics["adapter"]["general.agreement"] <= 1.0
        assert "general.exact_match" in metrics["adapter"] and "general.contains" in metrics["base"]
    gentle_shift = gentle_metrics["adapter"]["general.nllShift"]
    harsh_shift = harsh_metrics["adapter"]["general.nllShift"]
    print(f"general.nllShift gentle {gentle_shift} harsh {harsh_shift}")
    assert harsh_shift > 0.5 and harsh_shift > 10 * max(abs(gentle_shift), 0.01), (gentle_shift, harsh_shift)
    assert harsh_metrics["adapter"]["general.agreement"] <= gentle_metrics["adapter"]["general.agreement"]

    assert gentle.manifest.promotion.promoted and gentle.manifest.promotion.reasons == []
    promotion = harsh.manifest.promotion
    assert not promotion.promoted and len(promotion.reasons) == 1
    assert promotion.reasons[0].startswith("general.nllShift ") and "maxGeneralNllShift 0.5" in promotion.reasons[0]
    assert list_versions(store, "default", "pirate") == ["1", "2"]  # the unpromoted version is kept as evidence
    assert "promotion: not promoted: general.nllShift" in caplog.text

    samples = json.loads(store.get_bytes(f"{AdapterId('default', 'pirate', '2').store_prefix}/evaluation.json"))
    general = [sample for sample in samples if sample["check"] == "general"]
    assert len(general) == GENERAL["maxExamples"] and all("agrees" in s["adapterScores"] for s in general)

    # What a server makes of it: the bare name still means the gentle, promoted version.
    catalog = AdapterCatalog(
        ServingSettings(
            store_uri=store_root,
            base_model_dir=tiny_model_dir,
            served_model_name="tiny",
            adapter_cache_dir=tmp_path / "served",
            latest_ttl_s=0.0,
        )
    )
    assert catalog.resolve("pirate").adapter.served_name == "default/pirate@1"
    with pytest.raises(NotPromoted, match=r"'default/pirate@2' was not promoted \(general.nllShift [0-9.]+ is above"):
        catalog.resolve("pirate@2")
