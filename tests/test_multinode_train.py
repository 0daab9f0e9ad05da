"""The trainer's side of a multi-node job: two torchrun agents, one process each, that meet through
c10d rendezvous (the operator's own torchrun options, at 127.0.0.1 instead of rank 0's DNS name)
and train the tiny model with DDP over gloo, through the trainer's real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tuneloom.net import free_port
from tuneloom.operator.multinode import torchrun_args

from .test_train import _dataset, _job, _messages, _steps, _trainer

# Gloo's all-reduce and one process's gradient accumulation add the same two micro-batches'
# gradients; float32 rounding could still differ in the last bits, which Adam carries through 4
# steps. Measured on CPU (torch 2.13): identical, a difference of 0.
WEIGHT_TOLERANCE = 1e-5


def _spec(tiny_model_dir: Path, tmp_path: Path, store: Path, **hyperparameters: int) -> Path:
    spec = _job(
        tiny_model_dir,
        _dataset(tmp_path / "train.jsonl"),
        str(store),
        hyperparameters={"epochs": 1, **hyperparameters},
        evaluation={"metrics": [], "maxExamples": 0, "general": {"enabled": False}, "fewShot": {"k": 0}},
    )
    path = tmp_path / f"{store.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _adapter(store: Path) -> dict[str, torch.Tensor]:
    return load_file(store / "adapters/default/pirate/1/adapter_model.safetensors")


def test_two_nodes_meet_through_c10d_and_train_what_one_process_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two_nodes = _spec(tiny_model_dir, tmp_path, tmp_path / "nodes")
    args = torchrun_args(2, 1, f"127.0.0.1:{free_port()}", uuid.uuid4().hex)
    command = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "tuneloom.trainer", "-f", str(two_nodes)]
    agents = [subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [agent.communicate(timeout=600)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    # 32 examples, 4 a micro-batch, one micro-batch per node a step: 4 steps, reported by rank 0 alone.
    assert sorted(step for log in logs for step in _steps(_messages(log))) == [1, 2, 3, 4]

    # The same global batch in one process: 2 micro-batches a step, the same seed and data order.
    one = _spec(tiny_model_dir, tmp_path, tmp_path / "single", gradientAccumulationSteps=2)
    single = _trainer(one, tmp_path, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    trained, reference = _adapter(tmp_path / "nodes"), _adapter(tmp_path / "single")
    assert trained.keys() == reference.keys()
    # LoRA's B starts at zero: it moved far more than the tolerance, so the match is not trivial.
    moved = max(reference[k].abs().max().item() for k in reference if "lora_B" in k)
    assert moved > 100 * WEIGHT_TOLERANCE
    worst = max((trained[k] - reference[k]).abs().max().item() for k in trained)
    assert worst <= WEIGHT_TOLERANCE
