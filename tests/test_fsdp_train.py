"""FSDP2 full fine-tuning on the tiny model under torchrun (gloo on CPU): sharded checkpoints in
the object store, a resume on another number of processes, a whole model published."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneloom.jobfile import SpecError, parse_job
from tuneloom.registry import download_adapter
from tuneloom.storage import open_store

from .test_train import (
    _PREEMPTED,
    QUESTIONS,
    _answer_loss,
    _assert_same_losses,
    _committed_steps,
    _dataset,
    _job,
    _messages,
    _one_thread,
    _rank_process,
    _steps,
    _wait_for_step,
)


def _trainer_command(job: Path, processes: int) -> list[str]:
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [sys.executable, *(torchrun if processes > 1 else []), "-m", "tuneloom.trainer", "-f", str(job)]


def _full_job(model: Path, data: Path, store: str, **overrides) -> dict:
    spec = _job(model, data, store, method="full", **overrides)
    del spec["spec"]["lora"]  # method full takes no LoRA settings
    return spec


def _run(job: Path, cwd: Path, processes: int) -> subprocess.CompletedProcess:
    command = _trainer_command(job, processes)
    return subprocess.run(command, cwd=cwd, env=_one_thread(), capture_output=True, text=True, timeout=600)


def test_fsdp_full_fine_tune_checkpoints_sharded_resumes_on_one_process_and_publishes_a_model(
    tiny_model_dir: Path, s3_env, s3_root: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 32 examples, 4 a micro-batch, one micro-batch per rank a step: 4 steps an epoch, 12 in all.
    hyperparameters = {"epochs": 3, "learningRate": 3e-3}
    spec = _full_job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), s3_root, hyperparameters=hyperparameters)
    spec["spec"]["checkpointing"] = {"everySteps": 2, "keep": 1}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))

    # Two processes (strategy unset: fsdp for method full), stopped by SIGTERM to rank 1 after step 5.
    first_log = tmp_path / "first.log"
    with first_log.open("w") as stderr:
        process = subprocess.Popen(_trainer_command(job, 2), cwd=tmp_path, stderr=stderr, env=_one_thread())
    _wait_for_step(process, first_log, 5)
    os.kill(_rank_process(process.pid, 1), signal.SIGTERM)
    assert process.wait(timeout=300) != 0
    first_run = _messages(first_log.read_text())
    preempted_at = next(int(match[1]) for m in first_run if (match := _PREEMPTED.match(m)))
    assert 6 <= preempted_at < 12 and _committed_steps(s3_root) == [preempted_at]
    store = open_store(s3_root)
    step_prefix = f"checkpoints/default/pirate/local/step-{preempted_at:08d}"
    manifest = json.loads(store.get_bytes(f"{step_prefix}/manifest.json"))
    assert manifest["format"] == "sharded" and manifest["processes"] == 2
    # Each rank's shard, DCP's index of them, and the loop's state; no whole copy of the weights.
    assert set(manifest["files"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.json"}

    # One process resumes it: the same step, the same examples per step (now two micro-batches each).
    second = _run(job, tmp_path, 1)
    assert second.returncode == 0, second.stderr[-3000:]
    second_run = _messages(second.stderr)
    assert "loading the sharded checkpoint of 2 process(es)" in second_run
    assert f"event training step={preempted_at} totalSteps=12 startStep={preempted_at}" in second_run
    assert _steps(second_run) == list(range(preempted_at + 1, 13)), "a finished step was redone or lost"

    # The loss curve continues: step for step what an uninterrupted two-process run logs.
    spec["spec"]["output"]["uri"] = str(tmp_path / "uninterrupted")
    job.write_text(yaml.safe_dump(spec))
    reference = _run(job, tmp_path, 2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    _assert_same_losses([first_run, second_run], _messages(reference.stderr), steps=12)

    # The published artefact is a whole transformers model that loads and has learned the answer.
    published = download_adapter(store, "default", "pirate", "1", tmp_path / "published")
    assert published.manifest.kind == "full" and {"config.json", "model.safetensors"} <= set(published.manifest.files)
    metrics = published.manifest.metrics
    assert metrics.adapter.validationLoss < metrics.base.validationLoss / 2
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "published")
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "published")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    question = QUESTIONS[-1]
    assert _answer_loss(tuned, tokenizer, question) < _answer_loss(base, tokenizer, question) / 2


def test_fsdp_refuses_qlora_naming_the_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), str(tmp_path / "s"), method="qlora")
    spec["spec"]["distributed"] = {"strategy": "fsdp"}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    result = _run(job, tmp_path, 1)
    assert result.returncode == 2
    assert "spec.distributed.strategy: fsdp cannot shard qlora's 4-bit base weights" in result.stderr


def test_lora_with_fsdp_learns_step_for_step_what_ddp_learns(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Sharding changes where the tensors live, not the arithmetic: the same loss at every step."""
    logs, adapters = {}, {}
    for strategy in ("ddp", "fsdp"):
        spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), str(tmp_path / strategy))
        spec["spec"]["distributed"] = {"strategy": strategy}
        job = tmp_path / f"{strategy}.yaml"
        job.write_text(yaml.safe_dump(spec))
        result = _run(job, tmp_path, 2)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[strategy] = _messages(result.stderr)
        adapters[strategy] = tmp_path / strategy / "adapters/default/pirate/1"
    _assert_same_losses([logs["fsdp"]], logs["ddp"], steps=12)
    # Published whole: a PEFT adapter with only the LoRA tensors, as DDP's.
    assert (adapters["fsdp"] / "adapter_config.json").is_file()
    assert (adapters["fsdp"] / "adapter_model.safetensors").stat().st_size == (
        adapters["ddp"] / "adapter_model.safetensors"
    ).stat().st_size


@pytest.mark.parametrize(
    ("method", "distributed"), [("lora", {"cpuOffload": True}), ("full", {"strategy": "ddp", "cpuOffload": True})]
)
def test_cpu_offload_without_fsdp_is_refused(method: str, distributed: dict, tmp_path: Path) -> None:
    spec = (_full_job if method == "full" else _job)(tmp_path, tmp_path / "t.jsonl", str(tmp_path / "s"))
    spec["spec"]["distributed"] = distributed
    with pytest.raises(SpecError) as caught:
        parse_job(spec)
    assert "spec.distributed.cpuOffload offloads fsdp's shards: set spec.distributed.strategy" in str(caught.value)
