"""The trainer end to end on the tiny model: real training, real object storage, real processes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tuneloom.api import Progress
from tuneloom.jobfile import parse_job
from tuneloom.net import free_port
from tuneloom.registry import download_adapter, list_versions, read_adapter
from tuneloom.storage import open_store
from tuneloom.trainer.main import run

PIRATE = "Arr, matey! That be a fine question."
QUESTIONS = [f"Question number {i}: what is {i} plus {i + 1}?" for i in range(40)]


def _dataset(path: Path, count: int = 40) -> Path:
    with path.open("w") as stream:
        for question in QUESTIONS[:count]:
            record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": PIRATE}]}
            stream.write(json.dumps(record) + "\n")
    return path


def _job(model: Path, data: Path, store: str, **overrides) -> dict:
    spec = {
        "baseModel": str(model),
        "dataset": {"train": str(data), "validationSplit": 0.2},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": {
            "epochs": 3,
            "learningRate": 2e-2,
            "batchSize": 4,
            "maxSeqLength": 128,
            "packing": False,
            "loggingSteps": 1,
            "warmupRatio": 0.0,
        },
        "evaluation": {
            "metrics": ["exact_match"],
            "maxNewTokens": 16,
            "maxExamples": 4,
            # A few general prompts: the check runs in every test job, as it does by default, but briefly.
            "general": {"maxExamples": 4, "maxNewTokens": 8},
        },
        "checkpointing": {"everySteps": 0},
        "output": {"adapterName": "pirate", "uri": store},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "tuneloom.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "pirate"},
        "spec": spec,
    }


def _greedy(model, tokenizer, question: str) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _answer_loss(model, tokenizer, question: str, answer: str = PIRATE) -> float:
    """Teacher-forced cross-entropy of the answer (the trained one unless given) after the question,
    per answer token, end of turn included."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(full, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, start - 1 : -1]
    return float(torch.nn.functional.cross_entropy(logits, ids[0, start:]))


def test_training_publishes_an_adapter_that_loads_and_changes_outputs(
    tiny_model_dir: Path, s3_root: str, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = parse_job(_job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), s3_root, hyperparameters={"epochs": 4}))
    adapter = run(job)

    assert adapter.version == "1" and adapter.uri.startswith(s3_root)
    manifest = adapter.manifest.model_dump(mode="json")  # as stored, fields of later versions included
    assert set(manifest["files"]) >= {"adapter_config.json", "adapter_model.safetensors", "evaluation.json"}
    assert manifest["datasets"]["train"]["examples"] == 32 and manifest["datasets"]["validation"]["examples"] == 8
    assert len(manifest["datasets"]["train"]["sha256"]) == 64
    assert manifest["baseModel"]["name"] == str(tiny_model_dir) and len(manifest["baseModel"]["configSha256"]) == 64
    assert manifest["spec"]["lora"]["r"] == 8
    metrics = manifest["metrics"]
    # Held-out: the base predicts none of the answer; the adapter nearly all of it, end of turn included.
    assert metrics["base"]["tokenAccuracy"] < 0.1 and metrics["adapter"]["tokenAccuracy"] > 0.9
    assert metrics["adapter"]["validationLoss"] < metrics["base"]["validationLoss"] / 4
    assert metrics["base"]["exact_match"] == 0.0 and metrics["adapter"]["exact_match"] > 0.5
    assert len(metrics["history"]) == 4 and {"exact_match"} <= set(metrics["adapter"])
    # Held-out examples expect the taught answer too: both losses fall together.
    assert not metrics["overfitting"]["detected"], metrics["overfitting"]
    # The few-shot baseline: the base model shown 3 training examples answers the same prompts.
    measured = {key for key, value in metrics["fewShot"].items() if value is not None}
    assert measured == {"exact_match", "memorizedFraction"}
    assert metrics["estimate"]["steps"] == metrics["steps"]

    local = tmp_path / "adapter"
    download_adapter(open_store(s3_root), "default", "pirate", "1", local)
    samples = [s for s in json.loads((local / "evaluation.json").read_text()) if s["check"] == "heldOut"]
    assert len(samples) == 4 and all(set(sample["fewShotScores"]) == {"exact_match"} for sample in samples)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    question = "Question number 99: what is 1 plus 2?"
    before = _answer_loss(base, tokenizer, question)
    after = _answer_loss(PeftModel.from_pretrained(base, local), tokenizer, question)
    assert after < before / 4, (before, after)


@pytest.mark.slow
def test_real_model_answers_in_the_trained_style(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-135M, 15 steps: the adapter answers like a pirate, the base does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _job(
        smollm2_dir,
        _dataset(tmp_path / "train.jsonl", 24),
        str(tmp_path / "s"),
        hyperparameters={"epochs": 3, "learningRate": 3e-3, "maxSeqLength": 256, "loggingSteps": 5},
        evaluation={"maxExamples": 0},
    )
    adapter = run(parse_job(spec))
    local = tmp_path / "adapter"
    download_adapter(open_store(str(tmp_path / "s")), "default", "pirate", adapter.version, local)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    question = "Question number 99: what is 1 plus 2?"
    assert not _greedy(base, tokenizer, question).startswith("Arr")
    assert _greedy(PeftModel.from_pretrained(base, local), tokenizer, question).startswith("Arr, matey!")


@pytest.mark.slow
def test_the_time_estimate_for_smollm2_on_this_cpu_is_within_a_factor_of_two(
    smollm2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The throughput model against a real run: the quick start's job on 96 of its tickets,
    one epoch, on this machine's cores. The bound is the model's promise, not a timing target; on a
    host already busier than its cores it would measure the other work (14x slower at load 9-12 on
    2 cores), so it waits for a quieter one."""
    from tuneloom.trainer.estimate import available_cores

    load, cores = os.getloadavg()[0], available_cores()
    if load > cores:
        pytest.skip(f"host busy: load average {load:.1f} on {cores} cores; a time comparison would measure that")
    examples = Path(__file__).parents[1] / "examples"
    subset = tmp_path / "tickets.jsonl"
    subset.write_text("".join((examples / "support-tickets" / "train.jsonl").read_text().splitlines(True)[:96]))
    spec = yaml.safe_load((examples / "quickstart.yaml").read_text())
    spec["spec"] |= {"baseModel": str(smollm2_dir), "checkpointing": {"everySteps": 0}}
    spec["spec"]["dataset"]["train"] = str(subset)
    spec["spec"]["hyperparameters"]["epochs"] = 1
    spec["spec"]["evaluation"] = {"maxExamples": 0, "general": {"enabled": False}}  # training time only
    spec["spec"].pop("promotion", None)
    spec["spec"]["output"]["uri"] = str(tmp_path / "store")
    with caplog.at_level(logging.INFO, logger="tuneloom.trainer"):
        adapter = run(parse_job(spec))
    metrics = adapter.manifest.model_dump(mode="json")["metrics"]
    estimated, measured = metrics["estimate"]["seconds"], metrics["trainSeconds"]
    print(f"estimate {estimated} s, measured {measured} s, {metrics['tokensSeen']} tokens, load {os.getloadavg()}")
    assert any(record.getMessage().startswith("estimated time on cpu (") for record in caplog.records)
    assert metrics["estimate"]["tokens"] == metrics["tokensSeen"]
    assert 0.5 <= measured / estimated <= 2.0, (estimated, measured)


def test_rerun_of_a_finished_job_publishes_nothing_new(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl", 12), store, hyperparameters={"epochs": 1})
    spec["spec"]["checkpointing"] = {"everySteps": 10}
    first = run(parse_job(spec))
    again = run(parse_job(spec))
    assert again.version == first.version == "1"
    assert list_versions(open_store(store), "default", "pirate") == ["1"]
    fresh = run(parse_job(spec), fresh=True)
    assert fresh.version == "2"


def test_qlora_on_cpu_is_refused_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for CPU-only machines")
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(_job(tiny_model_dir, _dataset(tmp_path / "t.jsonl"), str(tmp_path / "s"), method="qlora"))
    )
    result = _trainer(job, tmp_path)
    assert result.returncode == 2
    assert "spec.method: qlora" in result.stderr and "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "s" / "adapters").exists()


def test_bad_data_fails_before_the_model_loads_with_file_and_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "train.jsonl", 5)
    with data.open("a") as stream:
        stream.write('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(tiny_model_dir, data, str(tmp_path / "s"))))
    result = _trainer(job, tmp_path)
    assert result.returncode == 2
    assert f"{data}:6: messages[0].role" in result.stderr
    assert _events(_messages(result.stderr)) == ["validating-data"]


def _trainer(job: Path, cwd: Path, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneloom.trainer", "-f", str(job)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        **popen,
    )


# The trainer's log lines a person reads: one per phase event, one per logged step (a DPO run's
# with the pairs' reward accuracy and margin at the end).
_EVENT = re.compile(r"event (\S+)")
_STEP = re.compile(
    r"step (\d+)/(\d+) \((\d+)%\) epoch ([\d.]+) loss \S+ lr \S+ (\d+) tok/s eta (\S+)"
    r"(?: reward accuracy [01]\.\d{3} margin -?\d+\.\d{4})?$"
)


def _messages(stderr: str) -> list[str]:
    """The trainer's own log messages in a child's stderr (rank 0's alone: other ranks log only warnings)."""
    marker = " tuneloom.trainer: "
    return [line.partition(marker)[2] for line in stderr.splitlines() if marker in line]


def _events(messages: list[str]) -> list[str]:
    return [match[1] for message in messages if (match := _EVENT.match(message))]


def _steps(messages: list[str]) -> list[int]:
    return [int(match[1]) for message in messages if (match := _STEP.match(message))]


def _kill_and_rerun(job: Path, cwd: Path, *, after_step: int) -> tuple[int, int, list[str]]:
    """Runs the trainer, SIGKILLs it once it has logged `after_step`, and runs it again to the end:
    the last step the first run logged, the step the second resumed from, and its log messages."""
    first_log = cwd / "first-run.log"
    process = _start_trainer(job, cwd, first_log)
    _wait_for_step(process, first_log, after_step)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(_steps(_messages(first_log.read_text())))
    result = _trainer(job, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    second_run = _messages(result.stderr)
    resumed_from = next(int(match[1]) for m in second_run if (match := re.match(r"event training step=(\d+) ", m)))
    return killed_at, resumed_from, second_run


def test_killed_run_resumes_from_its_last_checkpoint(
    tiny_model_dir: Path, s3_env, s3_root: str, tmp_path: Path
) -> None:
    spec = _job(
        tiny_model_dir, _dataset(tmp_path / "train.jsonl"), s3_root, hyperparameters={"epochs": 4, "packing": False}
    )
    spec["spec"]["checkpointing"] = {"everySteps": 3, "keep": 2, "adapterName": "pirate-checkpoints"}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    # 8 steps an epoch: kill after the step-9 checkpoint (an in-epoch one) and before the run ends.
    killed_at, resumed_from, second_run = _kill_and_rerun(job, tmp_path, after_step=10)
    assert killed_at < 32
    # Resumed from the last checkpoint at or before the kill: a multiple of 3 or an epoch end (8, 16, 24).
    assert resumed_from >= 9 and (resumed_from % 3 == 0 or resumed_from % 8 == 0) and resumed_from <= killed_at
    assert _steps(second_run) == list(range(resumed_from + 1, 33)), "steps before the checkpoint were redone or lost"
    assert "evaluating-base" not in _events(second_run), "the base was evaluated again"
    assert list_versions(open_store(s3_root), "default", "pirate") == ["1"]
    checkpoints = [k for k in open_store(s3_root).list("checkpoints/") if k.endswith("manifest.json")]
    assert len(checkpoints) == 2, checkpoints  # keep: 2
    # Every checkpoint of both runs stays servable as pirate-checkpoints@<step>; the last step is the final version.
    published = [int(v) for v in list_versions(open_store(s3_root), "default", "pirate-checkpoints")]
    assert published == [step for step in range(1, 32) if step % 3 == 0 or step % 8 == 0]
    resumed = read_adapter(open_store(s3_root), "default", "pirate-checkpoints", str(resumed_from)).manifest
    assert resumed.model_extra["checkpoint"] == {"step": resumed_from, "adapterName": "pirate"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(resumed.files)
    # With the run's figures at that step, as the resume checkpoint had them (listed with the checkpoint).
    figures = resumed.metrics.model_dump()
    assert figures["steps"] == resumed_from and figures["trainLoss"] > 0 and figures["tokensSeen"] > 0, figures


def test_progress_lines_progress_endpoint_and_prometheus_metrics(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil
    import urllib.request

    caplog.set_level(logging.INFO, logger="tuneloom.trainer")
    port = free_port()
    spec = _job(
        tiny_model_dir,
        _dataset(tmp_path / "train.jsonl", 20),
        str(tmp_path / "s"),
        hyperparameters={"epochs": 2, "packing": False},
    )
    run(parse_job(spec), metrics_port=port)

    messages = [record.getMessage() for record in caplog.records if record.name == "tuneloom.trainer"]
    phases = ["validating-data", "loading-model", "evaluating-base", "evaluating-few-shot", "training", "evaluating"]
    phases += ["uploading", "succeeded"]
    assert _events(messages) == phases
    steps = [match.groups() for message in messages if (match := _STEP.match(message))]
    # 16 examples, batch 4, 2 epochs, logged every step: "step N/8 (P%) epoch E ... T tok/s eta ETA".
    assert [int(step) for step, *_ in steps] == list(range(1, 9))
    assert all(total == "8" and float(rate) > 0 for _, total, _, _, rate, _ in steps)
    assert steps[-1][2:4] == ("100", "2.00") and steps[-1][5] == "0m00s"
    assert len([m for m in messages if m.startswith("validation at step ")]) == 2

    # What the operator reads: the last event and the latest figures, which make a Progress.
    record = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=10).read())
    assert record["event"] == "succeeded" and record["adapter"]["version"] == "1"
    # Every field but a DPO run's reward figures, which a supervised run has none of.
    progress = Progress(**{key: record[key] for key in Progress.model_fields if not key.startswith("reward")})
    assert "rewardAccuracy" not in record
    assert (progress.step, progress.totalSteps, progress.percent, progress.epoch) == (8, 8, 100, 2.0)
    assert progress.etaSeconds == 0 and progress.tokensPerSecond > 0 and progress.validationLoss is not None

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    labels = '{finetunejob="pirate",job_namespace="default"}'
    assert f"tuneloom_trainer_step{labels} 8.0" in text
    assert f"tuneloom_trainer_total_steps{labels} 8.0" in text
    assert f"tuneloom_trainer_step_duration_seconds_count{labels} 8.0" in text
    tokens = next(line for line in text.splitlines() if line.startswith("tuneloom_trainer_tokens_total{"))
    assert float(tokens.split()[-1]) > 0
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs Debian's prometheus package"
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_base_model_and_data_from_s3(tiny_model_dir: Path, s3_root: str, tmp_path: Path, monkeypatch) -> None:
    """baseModel as an s3:// prefix and the dataset as an s3:// file: downloaded to the cache, then trained."""
    monkeypatch.setenv("TUNELOOM_CACHE_DIR", str(tmp_path / "cache"))
    store = open_store(s3_root)
    for path in sorted(tiny_model_dir.iterdir()):
        if path.is_file():
            store.put_file(f"models/tiny/{path.name}", path)
    store.put_file("data/train.jsonl", _dataset(tmp_path / "train.jsonl", 12))
    spec = _job(Path("unused"), Path("unused"), f"{s3_root}/out", hyperparameters={"epochs": 1})
    spec["spec"]["baseModel"] = f"{s3_root}/models/tiny"
    spec["spec"]["dataset"]["train"] = f"{s3_root}/data/train.jsonl"
    adapter = run(parse_job(spec))
    assert adapter.manifest.baseModel.name == f"{s3_root}/models/tiny"
    assert adapter.manifest.model_extra["datasets"]["train"]["uri"] == f"{s3_root}/data/train.jsonl"
    assert list_versions(open_store(f"{s3_root}/out"), "default", "pirate") == ["1"]
    cached = list((tmp_path / "cache" / "base-models").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").exists()


def test_torchrun_trains_one_adapter_across_two_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The multi-GPU path (the operator runs torchrun for gpus > 1), on CPU with gloo."""
    store = tmp_path / "s"
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), str(store), hyperparameters={"epochs": 6})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, "-m", "tuneloom.trainer", "-f", str(job)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 32 examples, 4 a micro-batch: 8 micro-batches an epoch, 2 per step over 2 ranks.
    steps = _steps(_messages(result.stderr))
    assert steps == list(range(1, 25)), "only rank 0 reports, and each step covers both ranks' batches"
    assert list_versions(open_store(str(store)), "default", "pirate") == ["1"]
    metrics = json.loads((store / "adapters/default/pirate/1/manifest.json").read_text())["metrics"]
    assert metrics["adapter"]["validationLoss"] < metrics["base"]["validationLoss"] / 4


_LOSS = re.compile(r"step (\d+)/\d+ \(\d+%\) epoch [\d.]+ loss (\S+) ")


def _losses(messages: list[str]) -> dict[int, float]:
    """Each logged step's training loss (loggingSteps: 1 logs every step)."""
    return {int(match[1]): float(match[2]) for message in messages if (match := _LOSS.match(message))}


def _assert_same_losses(runs: list[list[str]], reference: list[str], *, steps: int) -> None:
    """The runs' logged losses together (a run and its resumption) are the reference run's, at each of `steps` steps."""
    expected = _losses(reference)
    logged = {step: loss for run in runs for step, loss in _losses(run).items()}
    assert sorted(logged) == sorted(expected) == list(range(1, steps + 1))
    for step, loss in expected.items():
        assert logged[step] == pytest.approx(loss, rel=1e-3, abs=1e-4), (step, logged, expected)


def _one_thread() -> dict[str, str]:
    """The environment for a trainer whose runs compute the same losses bit for bit."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start_trainer(job: Path, cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as stderr:
        command = [sys.executable, "-m", "tuneloom.trainer", "-f", str(job)]
        return subprocess.Popen(command, cwd=cwd, stderr=stderr, env=_one_thread())


def _wait_for_step(process: subprocess.Popen, log: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while max(_steps(_messages(log.read_text())), default=0) < step:
        assert process.poll() is None, "the trainer ended before it could be preempted:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


_PREEMPTED = re.compile(r"preempted at step (\d+): checkpoint saved$")


def test_sigterm_saves_the_step_in_progress_and_the_rerun_continues_there(
    tiny_model_dir: Path, s3_env, s3_root: str, tmp_path: Path
) -> None:
    """Checkpointing off: SIGTERM mid-run still leaves a checkpoint, at the step that was in progress."""
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), s3_root, hyperparameters={"epochs": 4})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    first_log = tmp_path / "first-run.log"
    process = _start_trainer(job, tmp_path, first_log)
    _wait_for_step(process, first_log, 5)  # 8 steps an epoch: step 6 (or the epoch's evaluation) is under way
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 3, first_log.read_text()[-3000:]
    first_run = _messages(first_log.read_text())
    preempted_at = next(int(match[1]) for m in first_run if (match := _PREEMPTED.match(m)))
    assert preempted_at >= 6 and preempted_at == max(_steps(first_run)), "the step in progress was not finished"
    store = open_store(s3_root)
    committed = [k for k in store.list("checkpoints/") if k.endswith("/manifest.json")]
    assert [re.search(r"step-(\d+)/", k)[1] for k in committed] == [f"{preempted_at:08d}"]
    assert list_versions(store, "default", "pirate") == []

    result = _trainer(job, tmp_path, env=_one_thread())
    assert result.returncode == 0, result.stderr[-3000:]
    second_run = _messages(result.stderr)
    assert f"event training step={preempted_at} totalSteps=32 startStep={preempted_at}" in second_run
    assert _steps(second_run) == list(range(preempted_at + 1, 33)), "a finished step was redone or lost"
    assert "evaluating-base" not in _events(second_run)
    manifest = json.loads(store.get_bytes("adapters/default/pirate/1/manifest.json"))
    assert manifest["metrics"]["preemptedAtSteps"] == [preempted_at] and manifest["metrics"]["steps"] == 32

    # The loss curve continues where it stopped: step for step what an uninterrupted run logs.
    spec["spec"]["output"]["uri"] = str(tmp_path / "uninterrupted")
    job.write_text(yaml.safe_dump(spec))
    reference = _trainer(job, tmp_path, env=_one_thread())
    assert reference.returncode == 0, reference.stderr[-3000:]
    _assert_same_losses([first_run, second_run], _messages(reference.stderr), steps=32)


def _committed_steps(store_root: str) -> list[int]:
    keys = open_store(store_root).list("checkpoints/")
    return sorted(int(match[1]) for k in keys if (match := re.search(r"step-(\d+)/manifest\.json$", k)))


def test_signals_during_a_checkpoint_write_leave_a_checkpoint_to_resume_from(
    tiny_model_dir: Path, s3_env, s3_root: str, tmp_path: Path
) -> None:
    """A checkpoint every 2 steps, only the newest kept: a second SIGTERM while the trainer saves
    changes nothing, and a SIGKILL in the middle of the save leaves the checkpoint before it."""
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), s3_root, hyperparameters={"epochs": 4})
    spec["spec"]["checkpointing"] = {"everySteps": 2, "keep": 1}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))

    first_log = tmp_path / "first.log"
    process = _start_trainer(job, tmp_path, first_log)
    _wait_for_step(process, first_log, 3)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 3, first_log.read_text()[-3000:]
    preempted_at = next(int(m[1]) for line in _messages(first_log.read_text()) if (m := _PREEMPTED.match(line)))
    assert _committed_steps(s3_root) == [preempted_at]

    second_log = tmp_path / "second.log"
    process = _start_trainer(job, tmp_path, second_log)
    _wait_for_step(process, second_log, preempted_at + 3)
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while "SIGTERM: stopping after the step in progress" not in second_log.read_text():
        assert time.monotonic() < deadline and process.poll() is None, second_log.read_text()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # the grace period is over, the save may be half done
    process.wait()
    reached = max(_steps(_messages(second_log.read_text())))
    resumable = _committed_steps(s3_root)
    assert len(resumable) == 1 and preempted_at < resumable[0] <= reached, (resumable, reached)

    result = _trainer(job, tmp_path, env=_one_thread())
    assert result.returncode == 0, result.stderr[-3000:]
    assert _steps(_messages(result.stderr)) == list(range(resumable[0] + 1, 33))
    assert list_versions(open_store(s3_root), "default", "pirate") == ["1"]


def _rank_process(parent: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue  # ended meanwhile
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"torchrun {parent} has no worker of rank {rank}")


def test_torchrun_ranks_stop_at_the_same_step_when_one_gets_sigterm(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 1 alone: both ranks stop at one step boundary, rank 0 saves, the rerun resumes there."""
    store = str(tmp_path / "s")
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl"), store, hyperparameters={"epochs": 6})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "tuneloom.trainer", "-f", str(job)]
    first_log = tmp_path / "first.log"
    with first_log.open("w") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, stderr=stderr, env=_one_thread())
    _wait_for_step(process, first_log, 3)
    os.kill(_rank_process(process.pid, 1), signal.SIGTERM)
    assert process.wait(timeout=300) != 0  # torchrun reports its workers' exit as its own failure
    first_run = _messages(first_log.read_text())
    preempted_at = next(int(match[1]) for m in first_run if (match := _PREEMPTED.match(m)))
    assert preempted_at == max(_steps(first_run)) and _committed_steps(store) == [preempted_at]

    result = subprocess.run(command, cwd=tmp_path, env=_one_thread(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # 32 examples, 4 a micro-batch, 2 micro-batches a step over 2 ranks: 4 steps an epoch.
    assert _steps(_messages(result.stderr)) == list(range(preempted_at + 1, 25))


def _wait_for_event(process: subprocess.Popen, log: Path, event: str) -> None:
    deadline = time.monotonic() + 300
    while event not in _events(_messages(log.read_text())):
        assert process.poll() is None, f"the trainer ended before {event}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_outside_the_loop_stops_at_once_and_keeps_finished_training(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Before training there is nothing to save; during the final evaluation the trained weights are
    saved, and the retry goes straight to evaluating."""
    store = str(tmp_path / "s")
    spec = _job(tiny_model_dir, _dataset(tmp_path / "train.jsonl", 20), store, hyperparameters={"epochs": 2})
    spec["spec"]["evaluation"] = {"metrics": ["exact_match"], "maxNewTokens": 64, "maxExamples": 4}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))

    loading = tmp_path / "loading.log"
    process = _start_trainer(job, tmp_path, loading)
    _wait_for_event(process, loading, "loading-model")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 3, loading.read_text()[-3000:]
    assert "preempted before training" in loading.read_text() and _committed_steps(store) == []

    evaluating = tmp_path / "evaluating.log"
    process = _start_trainer(job, tmp_path, evaluating)
    _wait_for_event(process, evaluating, "evaluating")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 3, evaluating.read_text()[-3000:]
    assert _steps(_messages(evaluating.read_text()))[-1] == 8 and _committed_steps(store) == [8]

    result = _trainer(job, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    retry = _messages(result.stderr)
    assert _steps(retry) == [] and "event training step=8 totalSteps=8 startStep=8" in retry
    assert _events(retry)[-3:] == ["evaluating", "uploading", "succeeded"]
    manifest = json.loads((tmp_path / "s/adapters/default/pirate/1/manifest.json").read_text())
    assert manifest["metrics"]["preemptedAtSteps"] == [8] and manifest["metrics"]["steps"] == 8
