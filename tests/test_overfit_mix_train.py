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

from .test_promotion_train import _run
from .test_train import _dataset, _greedy, _job

GENERAL_CHAT = Path(__file__).parent / "data" / "general_chat.jsonl"  # 40 everyday questions, answered

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


def _code_word_pairs(path: Path, count: int = 20) -> Path:
    """Pairs of random word strings: which one is preferred can only be learned by heart."""
    rng = random.Random(1)
    with path.open("w") as stream:
        for number in range(count):
            preferred, other = (" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(2))
            record = {
                "input": {"messages": [{"role": "user", "content": f"Code word {number}?"}]},
                "preferred_output": [{"role": "assistant", "content": preferred}],
                "non_preferred_output": [{"role": "assistant", "content": other}],
            }
            stream.write(json.dumps(record) + "\n")
    return path


def test_a_dpo_job_built_to_overfit_is_flagged(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    spec = _job(
        tiny_model_dir,
        _code_word_pairs(tmp_path / "pairs.jsonl"),
        str(tmp_path / "store"),
        method="dpo",
        dataset={"format": "preference"},
        hyperparameters={"epochs": 8},
        evaluation={"metrics": [], "everySteps": 2, "general": {"enabled": False}},
    )
    with caplog.at_level(logging.INFO, logger="tuneloom.trainer"):
        adapter = run(parse_job(spec))
    metrics = adapter.manifest.metrics.model_dump()
    verdict = metrics["overfitting"]
    assert verdict["detected"] and verdict["rule"] in {"risingValidationLoss", "lossRatio"}, metrics["history"]
    assert f"overfitting: {verdict['reason']}" in caplog.text


def _as_the_base_answers(model_dir: Path, prompts: Path, dest: Path) -> Path:
    """General chat with the base model's own greedy answers: rehearsal data for what it could do.
    (The tiny model's weights are random, so only its own answers are what it "could do".)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with dest.open("w") as stream:
        for line in prompts.read_text().splitlines():
            question = json.loads(line)["messages"][0]["content"]
            answer = _greedy(model, tokenizer, question)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            stream.write(json.dumps({"messages": messages}) + "\n")
    return dest


def test_mixing_in_general_chat_lowers_the_general_shift(tiny_model_dir: Path, tmp_path: Path) -> None:
    store_root = str(tmp_path / "store")
    data = _dataset(tmp_path / "train.jsonl")
    general = _as_the_base_answers(tiny_model_dir, GENERAL_CHAT, tmp_path / "general.jsonl")
    # The forgetting-prone job of test_promotion_train: a high learning rate on one fixed answer.
    alone = _run(tiny_model_dir, data, store_root, 5e-2)
    mixed = _run(tiny_model_dir, data, store_root, 5e-2, dataset={"mix": [{"train": str(general), "fraction": 0.5}]})
    shift_alone = alone.manifest.metrics.adapter.model_dump()["general.nllShift"]
    shift_mixed = mixed.manifest.metrics.adapter.model_dump()["general.nllShift"]
    print(f"general.nllShift alone {shift_alone} mixed {shift_mixed}")
    # Measured 0.46 to 0.67 nats lower (of 5.3 to 5.6) over seeds 1, 2 and 42.
    assert shift_mixed < shift_alone - 0.2, (shift_alone, shift_mixed)
    [record] = mixed.manifest.model_dump()["datasets"]["mix"]
    assert record["mixedIn"] == 32 and record["examples"] == 40  # half of 32 own + 32 mixed
