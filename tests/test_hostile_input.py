"""Invalid input fails before it costs compute: `tuneloom train` runs (real CLI, real SeaweedFS, the
tiny model) that must end in seconds with exit 2 and a message naming the FineTuneJob field, never
a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

from tuneloom.storage import open_store
from tuneloom.trainer.datafile import DEFAULT_MAX_LINE_BYTES
from tuneloom_dev.seaweedfs import SeaweedFS

from .measure import MB, Measured, assert_no_traceback, line_length, run_cli, write_huge_line

GOOD = {"messages": [{"role": "user", "content": "Where is my order?"}, {"role": "assistant", "content": "Soon."}]}
# Variables that could hand the child credentials or a hub this test did not choose.
_SCRUBBED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "TUNELOOM_S3_ENDPOINT")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The child's environment: no S3 settings unless given, empty tuneloom and HF caches."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("AWS_ENDPOINT_URL")}
    env.update(
        TUNELOOM_CACHE_DIR=str(tmp_path / "cache"),
        HF_HUB_CACHE=str(tmp_path / "hf"),
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(extra)
    return env


def _job(tmp_path: Path, *, base_model: str, data: str | None = None, output: str | None = None) -> Path:
    if data is None:
        data = str(tmp_path / "train.jsonl")
        Path(data).write_text("".join(json.dumps(GOOD) + "\n" for _ in range(4)))
    spec: dict[str, Any] = {
        "baseModel": base_model,
        "dataset": {"train": data},
        "hyperparameters": {"epochs": 1, "batchSize": 2, "maxSeqLength": 64},
        "checkpointing": {"everySteps": 0},
        "output": {"adapterName": "hostile", "uri": output or str(tmp_path / "store")},
    }
    job = {"apiVersion": "tuneloom.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "hostile"}, "spec": spec}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _train(tmp_path: Path, job: Path, env: dict[str, str]) -> Measured:
    measured = run_cli(["train", "-f", str(job)], tmp_path, env=env, timeout=90)
    assert measured.returncode == 2, measured.stderr[-3000:]
    assert_no_traceback(measured)
    # The first phase logs "event validating-data": the run never began.
    assert "event validating-data" not in measured.stderr, "nothing was read, loaded or tokenized"
    return measured


def _problems(measured: Measured) -> list[str]:
    lines = measured.stderr.splitlines()
    assert lines[0] == "error: the job cannot run:", measured.stderr
    return [line.strip() for line in lines[1:]]


def test_missing_inputs_and_unwritable_output_are_all_named_at_once(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    missing_model, missing_data = tmp_path / "no-model", tmp_path / "no-data.jsonl"
    job = _job(tmp_path, base_model=str(missing_model), data=str(missing_data), output=str(blocker / "store"))
    measured = _train(tmp_path, job, _env(tmp_path))
    problems = _problems(measured)
    assert problems[:2] == [
        f"spec.dataset.train: {missing_data} does not exist; check the path (relative paths start at {tmp_path})",
        f"spec.baseModel: directory {missing_model} does not exist; give an existing Hugging Face model directory",
    ]
    assert problems[2].startswith(f"spec.output.uri: cannot write to file://{blocker}/store: ")
    assert len(problems) == 3


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    measured = _train(tmp_path, _job(tmp_path, base_model=str(tmp_path / "weights")), _env(tmp_path))
    assert _problems(measured) == [
        f"spec.baseModel: {tmp_path / 'weights'} has no config.json, so it is not a Hugging Face model directory; "
        "point it at the folder save_pretrained wrote"
    ]


def test_unprepared_known_model_offline_says_how_to_prepare_it(tmp_path: Path) -> None:
    job = _job(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    measured = _train(tmp_path, job, _env(tmp_path, HF_HUB_OFFLINE="1"))
    assert _problems(measured) == [
        "spec.baseModel: HuggingFaceTB/SmolLM2-135M-Instruct is not a local directory, not prepared and not in "
        "the Hugging Face cache, and offline mode (HF_HUB_OFFLINE) forbids asking the hub; "
        "run `tuneloom models prepare smollm2-135m-instruct`"
    ]


def test_unknown_hub_id_online_asks_the_hub_once_with_a_short_timeout(tmp_path: Path) -> None:
    """Without network the hub does not answer; with it, it has no such model. Either way: seconds."""
    job = _job(tmp_path, base_model=f"tuneloom-tests/no-such-model-{uuid.uuid4().hex[:8]}")
    env = _env(tmp_path)
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    [problem] = _problems(_train(tmp_path, job, env))
    assert "is not a local directory, not prepared and not in the Hugging Face cache, and " in problem
    assert "the Hugging Face hub did not answer" in problem or "the Hugging Face hub has no such model" in problem


def test_a_model_in_the_hugging_face_cache_resolves_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    """resolve_base_model's contract: a hub id found in the HF cache is its snapshot directory."""
    snapshot = tmp_path / "hf" / "models--acme--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for path in tiny_model_dir.iterdir():
        (snapshot / path.name).symlink_to(path)
    (tmp_path / "hf" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hf" / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    code = (
        "from tuneloom.inputs import BaseModelUnavailableError, resolve_base_model\n"
        "assert issubclass(BaseModelUnavailableError, FileNotFoundError)\n"
        "print(resolve_base_model('acme/tiny'))\n"
        "try:\n"
        "    resolve_base_model('acme/other', field='--base-model')\n"
        "except BaseModelUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code],
        env=_env(tmp_path, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    resolved, refusal = result.stdout.splitlines()
    assert resolved == str(snapshot)
    assert refusal.startswith("--base-model: acme/other is not a local directory, not prepared")


def test_s3_without_credentials_says_which_variables_to_set(s3_root: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, base_model=str(tiny_model_dir), output=s3_root)
    endpoint = os.environ["TUNELOOM_S3_ENDPOINT"]
    measured = _train(tmp_path, job, _env(tmp_path, TUNELOOM_S3_ENDPOINT=endpoint))
    assert _problems(measured) == [
        "spec.output.uri: on S3, but no S3 credentials were found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE, or give the workload an IAM role); on Kubernetes, name a Secret holding those two keys in "
        "spec.storage.credentialsSecret"
    ]
    env = _env(tmp_path, TUNELOOM_S3_ENDPOINT=endpoint, AWS_ACCESS_KEY_ID="only-the-key-id")
    [problem] = _problems(_train(tmp_path, job, env))
    assert problem.startswith("spec.output.uri: S3 credentials are incomplete (AWS_SECRET_ACCESS_KEY is missing); ")
    assert "only-the-key-id" not in problem


def test_s3_store_that_refuses_writes(s3_env: SeaweedFS, s3_root: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    wrong = "wrong-secret-" + uuid.uuid4().hex
    env = _env(tmp_path, **{**s3_env.client_env(), "AWS_SECRET_ACCESS_KEY": wrong})
    job = _job(tmp_path, base_model=str(tiny_model_dir), output=s3_root)
    measured = _train(tmp_path, job, env)
    [problem] = _problems(measured)
    assert problem.startswith(f"spec.output.uri: cannot write to {s3_root}: ")
    assert "SignatureDoesNotMatch" in problem and "check the S3 credentials" in problem
    assert wrong not in measured.stderr + measured.stdout

    job = _job(tmp_path, base_model=str(tiny_model_dir), output="s3://no-such-bucket-tuneloom/root")
    [problem] = _problems(_train(tmp_path, job, _env(tmp_path, **s3_env.client_env())))
    assert problem.startswith("spec.output.uri: cannot write to s3://no-such-bucket-tuneloom/root: ")
    assert "NoSuchBucket: bucket 'no-such-bucket-tuneloom' does not exist" in problem


def test_the_write_probe_leaves_nothing_behind(
    s3_env: SeaweedFS, s3_root: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + '{"messages": []}\n')
    job = _job(tmp_path, base_model=str(tiny_model_dir), data=str(data), output=s3_root)
    measured = run_cli(["train", "-f", str(job)], tmp_path, env=_env(tmp_path, **s3_env.client_env()), timeout=90)
    assert measured.returncode == 2, measured.stderr[-3000:]
    assert f"{data}:2: messages: empty" in measured.stderr  # the checks passed; the data check came next
    assert list(open_store(s3_root).list("")) == []


def test_training_on_a_200_mb_line_stops_at_the_line_in_bounded_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    huge = write_huge_line(tmp_path / "huge.jsonl", 200 * MB)
    size = line_length(huge)
    try:
        job = _job(tmp_path, base_model=str(tiny_model_dir), data=str(huge))
        measured = run_cli(["train", "-f", str(job)], tmp_path, env=_env(tmp_path), timeout=120)
    finally:
        huge.unlink()
    assert measured.returncode == 2, measured.stderr[-3000:]
    assert_no_traceback(measured)
    assert (
        f"{huge}:1: line: too long ({size} bytes); the limit is {DEFAULT_MAX_LINE_BYTES} bytes "
        "(--max-line-bytes / dataset.maxLineBytes)" in measured.stderr
    )
    # Before: the kernel killed it at 24 GB, with no message.
    assert measured.peak_rss_bytes < 1024 * MB


def test_generation_prompts_are_cut_to_max_seq_length(tiny_model_dir: Path) -> None:
    """A held-out prompt of 100,000 tokens would not fit in attention memory; its last tokens do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloom.trainer.datafile import Example, Message
    from tuneloom.trainer.evaluate import generate_answers

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    long = Example(line=1, messages=(Message("user", "word " * 100_000), Message("assistant", "ok")))
    [answer] = generate_answers(
        model, tokenizer, [long], max_new_tokens=2, device=torch.device("cpu"), max_prompt_tokens=128
    )
    assert isinstance(answer, str)


def test_an_s3_endpoint_that_does_not_answer_is_an_infrastructure_failure(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Exit 1, not 2: an outage may pass, so the operator's retries are right; the field is named."""
    env = _env(
        tmp_path, AWS_ACCESS_KEY_ID="id", AWS_SECRET_ACCESS_KEY="secret", TUNELOOM_S3_ENDPOINT="http://127.0.0.1:1"
    )
    job = _job(tmp_path, base_model=str(tiny_model_dir), output="s3://bucket/root")
    measured = run_cli(["train", "-f", str(job)], tmp_path, env=env, timeout=90)
    assert measured.returncode == 1
    assert_no_traceback(measured)
    assert measured.stderr.startswith("error: spec.output.uri: s3://bucket/root/checkpoints/default/hostile/local/")
    assert "cannot reach the S3 endpoint http://127.0.0.1:1 (EndpointConnectionError) after retries" in measured.stderr
