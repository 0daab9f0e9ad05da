"""status.estimate before a pod runs: the operator's reading of the data's head and the model's
headers in real object storage (SeaweedFS), and the throughput model on them."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from tuneloom.api import FineTuneJobSpec
from tuneloom.operator.estimates import CHARS_PER_TOKEN, cpu_cores, estimate_job, sample_data
from tuneloom.storage import open_store
from tuneloom.trainer.estimate import count_parameters


def _line(words: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "word " * words}]}).encode() + b"\n"


def _spec(train: str, base_model: str, **changes) -> FineTuneJobSpec:
    spec = {
        "baseModel": base_model,
        "dataset": {"train": train, "validationSplit": 0.25},
        "hyperparameters": {"epochs": 2, "batchSize": 2, "maxSeqLength": 64},
        "resources": {"gpus": 1, "costPerGpuHour": 2.0},
        "output": {"adapterName": "x", "uri": "s3://out"},
    }
    for key, value in changes.items():
        spec[key] = {**spec[key], **value}
    return FineTuneJobSpec.model_validate(spec)


def test_the_data_is_sampled_from_its_head_and_scaled_to_its_size(s3_root: str) -> None:
    store = open_store(s3_root)
    store.put_bytes("small.jsonl", _line(10) * 3 + _line(400))
    per_line, long = math.ceil(len(_line(10).strip()) / CHARS_PER_TOKEN), 64
    assert sample_data(store, "small.jsonl", 64).__dict__ == {"examples": 4, "tokens": 3 * per_line + long}
    store.put_bytes("big.jsonl", _line(10) * 200_000)  # 12 MB: three times the sample
    sampled = sample_data(store, "big.jsonl", 64)
    assert sampled.examples == pytest.approx(200_000, rel=0.01)
    assert sampled.tokens == pytest.approx(200_000 * per_line, rel=0.01)


def _safetensors(shapes: dict[str, list[int]]) -> bytes:
    header = json.dumps(
        {name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()}
    )
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64


def test_an_s3_job_gets_tokens_steps_seconds_and_cost(s3_root: str) -> None:
    store = open_store(s3_root)
    store.put_bytes("data/train.jsonl", _line(10) * 40)
    store.put_bytes("model/model-1.safetensors", _safetensors({"a": [1000, 1000]}))
    store.put_bytes("model/model-2.safetensors", _safetensors({"b": [500, 2000]}))
    spec = _spec(f"{s3_root}/data/train.jsonl", f"{s3_root}/model")
    expected = estimate_job(spec, open_store, "a100")
    per_line = math.ceil(len(_line(10).strip()) / CHARS_PER_TOKEN)
    tokens = round(40 * per_line * 0.75)
    assert expected is not None and expected.tokens == 2 * tokens
    assert expected.steps == 2 * math.ceil(tokens / (64 * 2))
    seconds = (4 * 2_000_000 * 2 * tokens + 2 * 2_000_000 * 2 * (40 * per_line - tokens)) / (312e12 * 0.35)
    assert expected.seconds == round(seconds, 1) and expected.cost == pytest.approx(seconds / 3600 * 2.0, rel=1e-3)
    # Two nodes of one GPU: each step takes twice the batch, and the same GPU-hours cost the same.
    two_nodes = estimate_job(_spec(spec.dataset.train, f"{s3_root}/model", resources={"nodes": 2}), open_store, "a100")
    assert two_nodes is not None and two_nodes.steps == 2 * math.ceil(tokens / (64 * 2 * 2))
    assert two_nodes.cost == pytest.approx(expected.cost, rel=1e-3)


def test_mixed_in_data_adds_its_share_of_training_tokens(s3_root: str) -> None:
    store = open_store(s3_root)
    store.put_bytes("data/train.jsonl", _line(10) * 40)
    store.put_bytes("model/model.safetensors", _safetensors({"a": [1000, 1000]}))
    train, model = f"{s3_root}/data/train.jsonl", f"{s3_root}/model"
    alone = estimate_job(_spec(train, model), open_store, "a100")
    # A fifth of training from another file: the job's own tokens are the other four fifths.
    mix = {"mix": [{"train": f"{s3_root}/data/general.jsonl", "fraction": 0.2}]}
    mixed = estimate_job(_spec(train, model, dataset=mix), open_store, "a100")
    assert alone is not None and mixed is not None
    assert mixed.tokens == pytest.approx(alone.tokens / 0.8, abs=2)  # each rounded once
    assert mixed.steps > alone.steps and mixed.cost > alone.cost


def test_a_hub_model_is_sized_by_its_name_and_a_cpu_job_by_its_cores(s3_root: str, smollm2_dir: Path) -> None:
    open_store(s3_root).put_bytes("train.jsonl", _line(10) * 40)
    train = f"{s3_root}/train.jsonl"
    by_name = estimate_job(_spec(train, "HuggingFaceTB/SmolLM2-135M-Instruct"), open_store, "h100")
    by_headers = estimate_job(_spec(train, str(smollm2_dir)), open_store, "h100")
    assert by_name is not None and by_headers is not None
    assert by_name.seconds == pytest.approx(by_headers.seconds * 135e6 / count_parameters(smollm2_dir), abs=0.1)
    on_cpu = estimate_job(_spec(train, str(smollm2_dir), resources={"gpus": 0, "cpu": "2"}), open_store, "h100")
    assert on_cpu is not None and on_cpu.seconds > 100 * by_headers.seconds and on_cpu.cost == 0.0
    assert estimate_job(_spec(train, "org/unsized-model"), open_store, "h100") is None
    assert estimate_job(_spec("/data/train.jsonl", str(smollm2_dir)), open_store, "h100") is None


def test_cpu_requests_in_whole_cores() -> None:
    assert [cpu_cores(request) for request in (None, "", "4", "2500m", "500m", "1.5")] == [1, 1, 4, 2, 1, 1]
