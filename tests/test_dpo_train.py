"""method: dpo end to end on the tiny model: real training, the registry, resume after a kill."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tuneloom.jobfile import parse_job
from tuneloom.net import free_port
from tuneloom.registry import download_adapter
from tuneloom.storage import open_store
from tuneloom.trainer.main import run

from .test_train import (
    PIRATE,
    QUESTIONS,
    _answer_loss,
    _dataset,
    _events,
    _job,
    _kill_and_rerun,
    _messages,
    _steps,
    _trainer,
)

# Two fixed styles of answer; the test makes the preferred one the style the base model finds less
# likely, so a high held-out preference accuracy has to be learned.
STYLES = ("Arr, matey! That be a fine question.", "Certainly. Here is a careful answer.")


def _mean_log_prob(model, tokenizer, question: str, answer: str) -> float:
    """Written out: the mean log-probability per answer token after the question."""
    return -_answer_loss(model, tokenizer, question, answer)


def _preferred_style(model_dir: Path) -> tuple[str, str]:
    """(preferred, non-preferred): the style the base gives the lower likelihood on most questions first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    first_likelier = sum(
        _mean_log_prob(model, tokenizer, q, STYLES[0]) > _mean_log_prob(model, tokenizer, q, STYLES[1])
        for q in QUESTIONS
    )
    return (STYLES[1], STYLES[0]) if first_likelier > len(QUESTIONS) / 2 else STYLES


def _pairs(path: Path, preferred: str, non_preferred: str) -> Path:
    with path.open("w") as stream:
        for question in QUESTIONS:
            record = {
                "input": {"messages": [{"role": "user", "content": question}]},
                "preferred_output": [{"role": "assistant", "content": preferred}],
                "non_preferred_output": [{"role": "assistant", "content": non_preferred}],
            }
            stream.write(json.dumps(record) + "\n")
    return path


def _dpo_job(model: Path, data: Path, store: str, **overrides) -> dict:
    """test_train's job as method: dpo on the pairs; `overrides` replace whole sections."""
    dpo = {
        "method": "dpo",
        "dataset": {"train": str(data), "validationSplit": 0.2, "format": "preference"},
        "dpo": {"beta": 0.1},
        "hyperparameters": {"epochs": 2, "learningRate": 1e-2},
    }
    job = _job(model, data, store, **(dpo | overrides))
    job["metadata"]["name"] = "styled"
    job["spec"]["output"]["adapterName"] = "styled"
    return job


def test_dpo_raises_held_out_preference_accuracy(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    preferred, non_preferred = _preferred_style(tiny_model_dir)
    data = _pairs(tmp_path / "pairs.jsonl", preferred, non_preferred)
    store = str(tmp_path / "store")
    port = free_port()
    with caplog.at_level(logging.INFO, logger="tuneloom"):
        adapter = run(parse_job(_dpo_job(tiny_model_dir, data, store)), metrics_port=port)

    metrics = adapter.manifest.model_dump(mode="json")["metrics"]
    base, tuned = metrics["base"], metrics["adapter"]
    # The base prefers the other style on most held-out questions; the adapter the trained one on all.
    assert base["preferenceAccuracy"] <= 0.5 and tuned["preferenceAccuracy"] == 1.0, (base, tuned)
    # Before training policy and reference are one model: no margin, DPO's loss is log 2.
    assert base["rewardMargin"] == 0.0 and base["validationLoss"] == pytest.approx(0.6931, abs=1e-3)
    assert tuned["rewardMargin"] > 1.0 and tuned["rewardAccuracy"] == 1.0
    assert tuned["validationLoss"] < base["validationLoss"] / 2
    assert {"general.nllShift", "general.agreement"} <= set(tuned)  # the general check applies to DPO too
    assert [entry["step"] for entry in metrics["history"]] == [metrics["steps"] // 2, metrics["steps"]]
    assert {"preferenceAccuracy", "rewardAccuracy", "rewardMargin"} <= set(metrics["history"][-1])
    assert re.search(r"step \d+/\d+ .* reward accuracy [01]\.\d{3} margin -?\d", caplog.text)
    # What the operator polls and Prometheus scrapes carry the last interval's reward figures.
    record = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=10).read())
    assert record["rewardAccuracy"] == 1.0 and record["rewardMargin"] > 1.0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    labels = '{finetunejob="styled",job_namespace="default"}'
    assert f"tuneloom_trainer_reward_accuracy_ratio{labels} 1.0" in text
    assert f"tuneloom_trainer_validation_preference_accuracy_ratio{labels} 1.0" in text
    margin = next(line for line in text.splitlines() if line.startswith("tuneloom_trainer_reward_margin_nats{"))
    assert float(margin.split()[-1]) == record["rewardMargin"]

    local = tmp_path / "adapter"
    download_adapter(open_store(store), "default", "styled", "1", local)
    samples = json.loads((local / "evaluation.json").read_text())
    held_out = [sample for sample in samples if sample["check"] == "heldOut"]
    assert held_out and all(sample["reference"] == preferred for sample in held_out)
    # Loaded from the registry as a server would, the adapter prefers the trained style on new questions.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), local)
    for question in ("What is 7 times 8?", "Name a colour."):
        assert _mean_log_prob(tuned_model, tokenizer, question, preferred) > _mean_log_prob(
            tuned_model, tokenizer, question, non_preferred
        )


def test_a_killed_dpo_run_resumes_at_its_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    preferred, non_preferred = _preferred_style(tiny_model_dir)
    data = _pairs(tmp_path / "pairs.jsonl", preferred, non_preferred)
    job = _dpo_job(
        tiny_model_dir,
        data,
        str(tmp_path / "store"),
        checkpointing={"everySteps": 2},
        hyperparameters={"epochs": 6},
        evaluation={"metrics": [], "general": {"enabled": False}},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    # 8 steps an epoch, 48 in all: kill after the step-4 checkpoint and before the run ends.
    killed_at, resumed_from, second_run = _kill_and_rerun(path, tmp_path, after_step=5)
    assert killed_at < 48
    assert 4 <= resumed_from <= killed_at and resumed_from % 2 == 0
    assert _steps(second_run) == list(range(resumed_from + 1, 49)), "steps before the checkpoint were redone or lost"
    assert "evaluating-base" not in _events(second_run), "the base was evaluated again"
    manifest = json.loads((tmp_path / "store/adapters/default/styled/1/manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 48
    assert manifest["metrics"]["adapter"]["preferenceAccuracy"] > manifest["metrics"]["base"]["preferenceAccuracy"]


def test_qlora_dpo_on_cpu_is_refused_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for CPU-only machines (test_gpu runs QLoRA DPO)")
    data = _pairs(tmp_path / "pairs.jsonl", *STYLES)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_dpo_job(tiny_model_dir, data, str(tmp_path / "store"), dpo={"qlora": True})))
    result = _trainer(path, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "spec.dpo.qlora loads the base model in 4-bit NF4" in result.stderr
    assert "use dpo.qlora: false on CPU" in result.stderr
    assert not (tmp_path / "store" / "adapters").exists()


def test_bad_preference_pairs_fail_with_their_lines(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _pairs(tmp_path / "pairs.jsonl", *STYLES)
    with data.open("a") as stream:
        stream.write(json.dumps({"input": {"messages": [{"role": "user", "content": "Hi"}]}}) + "\n")
        same = [{"role": "assistant", "content": "Same."}]
        pair = {"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": same}
        stream.write(json.dumps({**pair, "non_preferred_output": same}) + "\n")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_dpo_job(tiny_model_dir, data, str(tmp_path / "store"))))
    result = _trainer(path, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{data}:41: preferred_output: missing" in result.stderr
    assert f"{data}:42: non_preferred_output[0].content: identical to preferred_output" in result.stderr
    assert _events(_messages(result.stderr)) == ["validating-data"]


def test_dpo_from_a_supervised_adapter_starts_from_it_and_keeps_it_as_reference(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = str(tmp_path / "store")
    quiet = {"metrics": [], "general": {"enabled": False}}
    supervised = _job(tiny_model_dir, _dataset(tmp_path / "sft.jsonl"), store, evaluation=quiet)
    assert run(parse_job(supervised)).version == "1"  # "pirate": answers every question with PIRATE
    # The SFT-then-DPO order: now prefer the other style over the one it was taught.
    data = _pairs(tmp_path / "pairs.jsonl", STYLES[1], PIRATE)
    job = _dpo_job(tiny_model_dir, data, store, dpo={"initAdapter": "pirate@1"}, evaluation=quiet)
    adapter = run(parse_job(job))

    metrics = adapter.manifest.model_dump(mode="json")["metrics"]
    start, tuned = metrics["base"], metrics["adapter"]
    # metrics.base is the starting adapter: it prefers what it was taught, and, being the reference
    # too, starts at DPO's log 2 with no margin (against the bare base model it would not).
    assert start["preferenceAccuracy"] == 0.0 and start["validationLoss"] == pytest.approx(0.6931, abs=1e-3)
    assert start["rewardMargin"] == 0.0
    # Trained against it, the adapter rewards the newly preferred style on every held-out pair. (Whether
    # it also flips the per-token likelihood the SFT adapter had made overwhelming is not asked.)
    assert tuned["rewardAccuracy"] == 1.0 and tuned["rewardMargin"] > 1.0
    assert tuned["validationLoss"] < start["validationLoss"] / 2
    files = adapter.manifest.model_dump(mode="json")["files"]
    assert not any("reference" in name for name in files), files  # only the trained adapter is published

    missing = _dpo_job(tiny_model_dir, data, store, dpo={"initAdapter": "pirate@7"}, evaluation=quiet)
    missing["metadata"]["name"] = "styled-from-nothing"  # not the finished job, which would publish nothing new
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(missing))
    result = _trainer(path, tmp_path)
    assert result.returncode == 2 and "error: spec.dpo.initAdapter: adapter default/pirate version 7" in result.stderr
