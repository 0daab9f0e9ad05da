"""The API's pure logic: OpenAI parameters to a FineTuneJob, "auto" rules, ids, keys, progress records
to events, and the objects' shapes checked against the `openai` package's own types."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
from openai.types import Model
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from tuneloom.jobfile import parse_job
from tuneloom.names import is_dns_label
from tuneloom.openai_api import inference, jobs
from tuneloom.openai_api.app import create_app
from tuneloom.openai_api.errors import ApiError
from tuneloom.openai_api.keys import KeyRing, RefreshingKeys, add_key, key_hash, keys_file_version, read_keys_file
from tuneloom.openai_api.models import BaseModel
from tuneloom.openai_api.objects import checkpoint_object, event_object, event_seq, job_object, model_object
from tuneloom.openai_api.progress import promotion_event, result_csv, translate
from tuneloom.openai_api.runner import failure
from tuneloom.openai_api.state import CheckpointRecord, EventRecord, JobRecord
from tuneloom.registry import Promotion

RULE = [(10, 10), (20, 5), (34, 3), (100, 3), (1000, 3), (8333, 3), (8334, 2), (10_000, 2), (10**6, 1)]


@pytest.mark.parametrize(("examples", "epochs"), RULE)
def test_auto_epochs_follow_openais_rule(examples: int, epochs: int) -> None:
    assert jobs.auto_epochs(examples) == epochs


def test_auto_epochs_are_clamped() -> None:
    assert jobs.auto_epochs(1) == jobs.MAX_EPOCHS and jobs.auto_epochs(0) == jobs.MAX_EPOCHS


@pytest.mark.parametrize(
    ("examples", "max_seq_length", "batch"),
    [(2, 1024, 1), (40, 1024, 2), (100, 1024, 4), (400, 1024, 16), (10_000, 1024, 32), (10_000, 4096, 8)],
)
def test_auto_batch_size_grows_with_the_data_within_what_fits(examples: int, max_seq_length: int, batch: int) -> None:
    assert jobs.auto_batch_size(examples, max_seq_length) == batch


def test_given_hyperparameters_win_and_the_multiplier_scales_the_lora_default() -> None:
    requested = jobs.HyperparametersRequest(n_epochs=7, batch_size="auto", learning_rate_multiplier=2.0)
    resolved = jobs.resolve_hyperparameters(requested, 100, 1024)
    assert (resolved.n_epochs, resolved.batch_size) == (7, 4)
    assert resolved.learning_rate == pytest.approx(2 * 2e-4)
    assert jobs.resolve_hyperparameters(jobs.HyperparametersRequest(), 100, 1024).learning_rate_multiplier == 1.0


def test_method_hyperparameters_take_precedence_and_unknown_methods_are_refused() -> None:
    request = jobs.CreateJobRequest(
        model="m",
        training_file="file-1",
        hyperparameters={"n_epochs": 1},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4}}},
    )
    assert request.requested_hyperparameters().n_epochs == 4
    other = jobs.CreateJobRequest(model="m", training_file="file-1", method={"type": "reinforcement"})
    with pytest.raises(ApiError) as refused:
        other.requested_hyperparameters()
    assert refused.value.status == 400 and refused.value.param == "method.type"


def _job_document(**changes) -> dict:
    """jobs.finetune_job for 100 uploaded examples (90 trained on), with `changes` to its arguments."""
    arguments = {
        "job_id": "ftjob-abc",
        "project": "team-b",
        "base_model": "/models/tiny",
        "train_uri": "s3://b/root/api/files/team-b/file-1",
        "validation_uri": None,
        "train_count": jobs.train_examples(100, False),
        "hyperparameters": jobs.ResolvedHyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=1.0),
        "seed": 7,
        "adapter": "pirate-ftjob-abc",
        "store": "s3://b/root",
        "max_seq_length": 128,
    }
    return jobs.finetune_job(**{**arguments, **changes})


def test_dpo_requests_map_onto_a_dpo_finetune_job() -> None:
    from tuneloom.api import FineTuneJobSpec

    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 2}}}
    request = jobs.CreateJobRequest(model="m", training_file="file-1", method=method)
    assert request.method_type == "dpo"
    resolved = jobs.resolve_hyperparameters(request.requested_hyperparameters(), 100, 1024, request.method_type)
    assert (resolved.beta, resolved.n_epochs) == (0.3, 2)
    auto = jobs.CreateJobRequest(model="m", training_file="file-1", method={"type": "dpo"})
    assert jobs.resolve_hyperparameters(auto.requested_hyperparameters(), 100, 1024, "dpo").beta == 0.1
    assert jobs.resolve_hyperparameters(jobs.HyperparametersRequest(), 100, 1024).beta is None
    document = _job_document(hyperparameters=resolved, method="dpo")
    spec = FineTuneJobSpec.model_validate(document["spec"])
    assert spec.method.value == "dpo" and spec.dpo.beta == 0.3 and spec.dataset.format.value == "preference"


def test_an_uploaded_file_is_checked_as_pairs_when_its_first_record_is_one(tmp_path) -> None:
    from tuneloom.trainer.datafile import sniff_format

    pair = {"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}
    cases = {"pairs": pair, "chat": {"messages": []}, "neither": {"prompt": "p"}}
    for name, record in cases.items():
        (tmp_path / name).write_text("\n" + json.dumps(record) + "\n")
    (tmp_path / "broken").write_text("not json\n")
    (tmp_path / "empty").write_text("")
    found = {name: sniff_format(tmp_path / name) for name in [*cases, "broken", "empty"]}
    assert found == {"pairs": "preference", "chat": "chat", "neither": "chat", "broken": "chat", "empty": "chat"}


def test_ids_names_and_the_fine_tuned_model_id() -> None:
    job_id = jobs.new_id("ftjob")
    assert is_dns_label(job_id)
    assert jobs.adapter_name("My Pirate_Bot!", job_id) == f"my-pirate-bot-{job_id}"
    assert jobs.adapter_name(None, job_id) == job_id
    assert is_dns_label(jobs.adapter_name("x" * 64, job_id))
    model = jobs.fine_tuned_model_id("HuggingFaceTB/SmolLM2-135M-Instruct", "team-b", "pirate", job_id)
    assert model == f"ft:SmolLM2-135M-Instruct:team-b:pirate:{job_id}"
    assert jobs.fine_tuned_model_id("/models/tiny/", "default", None, job_id) == f"ft:tiny:default::{job_id}"


def test_the_job_document_is_a_valid_finetunejob_that_checkpoints_every_epoch() -> None:
    document = _job_document()
    job = parse_job(document)
    assert (job.metadata.name, job.metadata.namespace, job.metadata.uid) == ("ftjob-abc", "team-b", "ftjob-abc")
    assert job.spec.checkpointing.everySteps == 23 and job.spec.hyperparameters.packing is False
    assert job.spec.dataset.validationSplit == jobs.VALIDATION_SPLIT and job.spec.hyperparameters.seed == 7
    assert job.spec.checkpointing.adapterName == "ftjob-abc-checkpoints"
    assert is_dns_label(jobs.checkpoint_adapter_name(jobs.new_id("ftjob")))
    assert [m.value for m in job.spec.promotion.require] == ["validationLoss"]


def test_a_checkpoint_model_id_names_its_model_and_step() -> None:
    model = "ft:tiny:default:pirate:ftjob-abc"
    assert jobs.split_checkpoint_model_id(jobs.checkpoint_model_id(model, 23)) == (model, 23)
    assert jobs.split_checkpoint_model_id(model) is None
    assert jobs.split_checkpoint_model_id(model + ":ckpt-step-x") is None


def test_the_promotion_verdict_is_an_event_and_decides_the_fine_tuned_model() -> None:
    promoted = promotion_event(Promotion(promoted=True), "ft:m")
    assert promoted.level == "info" and promoted.data == {"promoted": True, "reasons": []}
    reasons = ["validationLoss 2.5000 is not below the base model's 2.5000"]
    refused = promotion_event(Promotion(promoted=False, reasons=reasons), "ft:m")
    assert refused.level == "warn" and reasons[0] in refused.message and refused.data["reasons"] == reasons
    assert job_object(_job(status="succeeded", promotion={"promoted": True, "reasons": []}))["fine_tuned_model"]
    unpromoted = _job(status="succeeded", promotion={"promoted": False, "reasons": reasons})
    assert job_object(unpromoted)["fine_tuned_model"] is None and not unpromoted.model_created


def _job(**changes) -> JobRecord:
    fields = {
        "id": "ftjob-abc",
        "project": "default",
        "created_at": 1,
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "training_file": "file-1",
        "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0},
        "seed": 1,
        "adapter_name": "ftjob-abc",
        "fine_tuned_model": "ft:SmolLM2-135M-Instruct:default::ftjob-abc",
    }
    return JobRecord(**{**fields, **changes})


@pytest.mark.parametrize("status", ["validating_files", "queued", "running", "succeeded", "failed", "paused"])
def test_objects_have_openais_shapes(status: str) -> None:
    shaped = job_object(_job(status=status))
    if status != "paused":  # OpenAI's type lacks the status its API has
        FineTuningJob.model_validate(shaped)
    assert shaped["status"] == status and shaped["object"] == "fine_tuning.job"
    assert (shaped["fine_tuned_model"] is not None) == (status == "succeeded")
    event = event_object(EventRecord(seq=5, job_id="j", created_at=1, level="info", message="m", type="metrics"))
    assert FineTuningJobEvent.model_validate(event).id == "ftevent-000000000005" and event_seq(event["id"]) == 5
    checkpoint = checkpoint_object(_job(), CheckpointRecord(seq=1, job_id="j", step=9, created_at=1, metrics={}))
    assert FineTuningJobCheckpoint.model_validate(checkpoint).fine_tuned_model_checkpoint.endswith(":ckpt-step-9")
    Model.model_validate(model_object("m", 1, "default"))


def test_a_dpo_job_object_carries_its_method_and_beta() -> None:
    hyperparameters = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0, "beta": 0.2}
    shaped = FineTuningJob.model_validate(job_object(_job(method="dpo", hyperparameters=hyperparameters)))
    assert shaped.method.type == "dpo" and shaped.method.dpo.hyperparameters.beta == 0.2
    assert shaped.method.supervised is None


def test_progress_polls_become_events_checkpoints_and_a_result_file() -> None:
    """Successive /progress answers: each figure keeps its last value, as the trainer merges them."""
    polls = [
        {"event": "loading-model"},
        {"event": "training", "step": 0, "totalSteps": 4, "startStep": 0},
        {"event": "progress", "step": 2, "totalSteps": 4, "trainLoss": 2.5, "learningRate": 0.1, "etaSeconds": 3},
        {
            "event": "checkpoint",
            "step": 2,
            "totalSteps": 4,
            "trainLoss": 2.5,
            "learningRate": 0.1,
            "validationLoss": 1.5,
            "tokenAccuracy": 0.5,
            "checkpointStep": 2,
        },
        {
            "event": "progress",
            "step": 4,
            "totalSteps": 4,
            "trainLoss": 0.5,
            "learningRate": 0.0,
            "validationLoss": 1.5,
            "tokenAccuracy": 0.5,
            "checkpointStep": 2,
        },
    ]
    seen: dict = {}
    events, checkpoints = [], []
    for poll in polls:
        out = translate(seen, poll)
        events += out.events
        checkpoints += out.checkpoints
        seen = poll
    assert [e.message for e in events] == [
        "Loading the base model",
        "Training started: 4 steps",
        "Step 2/4: training loss=2.5",
        "Evaluation at step 2: validation loss=1.5, token accuracy=0.5",
        "Checkpoint created at step 2",
        "Step 4/4: training loss=0.5",
    ]
    assert checkpoints == [(2, {"step": 2, "train_loss": 2.5, "valid_loss": 1.5, "valid_mean_token_accuracy": 0.5})]
    stored = [
        EventRecord(seq=i, job_id="j", created_at=1, **e.model_dump(exclude={"created_at"}))
        for i, e in enumerate(events)
    ]
    assert result_csv(stored).decode().splitlines() == [
        "step,train_loss,valid_loss,valid_mean_token_accuracy,learning_rate",
        "2,2.5,1.5,0.5,0.1",
        "4,0.5,,,0.0",
    ]
    resumed = translate({}, {"event": "progress", "step": 7, "totalSteps": 9, "startStep": 5, "trainLoss": 1.0})
    assert resumed.events[0].message == "Training resumed at step 5 of 9"
    assert translate(polls[-1], polls[-1]).events == [], "an unchanged answer adds nothing"


def test_failures_say_what_to_do_and_carry_no_traceback() -> None:
    data = failure(2, "invalid dataset, 1 problem:\n  d.jsonl:3: messages: missing", "")
    assert data["code"] == "invalid_training_file" and "d.jsonl:3" in data["message"]
    model = failure(2, "spec.baseModel: directory /x does not exist; give ...", "")
    assert (model["code"], model["param"]) == ("model_not_found", "model")
    assert failure(-signal.SIGKILL, None, "")["code"] == "out_of_memory"
    log_tail = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: the disk is full\n'
    crashed = failure(1, None, log_tail)
    assert crashed["message"].startswith("Training failed: RuntimeError: the disk is full")
    assert "Traceback" not in crashed["message"] and "x.py" not in crashed["message"]


def test_keys_are_kept_as_hashes_and_found_by_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys.json"
    key = add_key(keys_file, "team-b")
    assert key not in keys_file.read_text() and read_keys_file(keys_file) == {"team-b": [key_hash(key)]}
    assert keys_file.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("API_KEY", "plain")
    ring = KeyRing.load("API_KEY", keys_file)
    assert ring.project_of(key) == "team-b" and ring.project_of("plain") == "default"
    assert ring.project_of("other") is None and ring.projects == ["default", "team-b"]
    with pytest.raises(ValueError, match="DNS label"):
        add_key(keys_file, "Team B")
    monkeypatch.setenv("API_KEY", "")
    with pytest.raises(ValueError, match="unset or empty"):
        KeyRing.load("API_KEY", None)


def test_the_estimate_before_training_is_an_event_once() -> None:
    estimate = {"tokens": 8211, "steps": 24, "seconds": 49.7, "cost": None}
    first = translate({}, {"event": "loading-model", "estimate": estimate})
    [event] = [e for e in first.events if e.data and "estimate" in e.data]
    assert event.message == "Estimated before training: 8211 tokens, 24 steps, about 49.7 s"
    again = translate({"event": "loading-model", "estimate": estimate}, {"event": "training", "estimate": estimate})
    assert not [e for e in again.events if e.data and "estimate" in e.data]


def test_the_upload_route_describes_the_sdks_form() -> None:
    """The route reads its body itself; its OpenAPI entry still says what files.create sends."""
    body = create_app(engine=None).openapi()["paths"]["/v1/files"]["post"]["requestBody"]  # type: ignore[arg-type]
    schema = body["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file", "purpose"] and schema["properties"]["file"]["format"] == "binary"


class _RecordedServer:
    """Stands in for ServingProcess: records the arguments each start was given."""

    started: ClassVar[list[_RecordedServer]] = []

    def __init__(self, base_model: Path, store: str, log_path: Path, **options: object):
        self.args, self.stopped, self.process = options["args"], False, SimpleNamespace(pid=2**22 + 1)

    def start(self) -> _RecordedServer:
        _RecordedServer.started.append(self)
        return self

    def running(self) -> bool:
        return not self.stopped

    def stop(self) -> None:
        self.stopped = True

    @property
    def allowed(self) -> str:
        return self.args[self.args.index("--allowed-namespaces") + 1]


def test_a_server_restarts_for_a_project_whose_key_came_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "ServingProcess", _RecordedServer)
    monkeypatch.setattr(_RecordedServer, "started", [])
    projects = ["default"]
    manager = inference.ServeManager("file:///store", tmp_path, lambda: list(projects), None, 60.0)
    base = BaseModel("tiny", tmp_path)
    try:
        first = asyncio.run(manager.server_for(base, None))
        assert asyncio.run(manager.server_for(base, "default")) is first and first.allowed == "default"
        projects.append("team-c")  # a key added while the server runs
        assert asyncio.run(manager.server_for(base, None)) is first  # a base model needs no restart
        second = asyncio.run(manager.server_for(base, "team-c"))
        assert first.stopped and second.allowed == "default,team-c" and len(_RecordedServer.started) == 2
        assert asyncio.run(manager.server_for(base, "team-c")) is second
    finally:
        manager.close()


def test_keys_are_read_again_when_the_file_changes_and_kept_when_it_breaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file = tmp_path / "keys.json"
    first = add_key(keys_file, "team-a")
    keys = RefreshingKeys(lambda: KeyRing.load(None, keys_file), lambda: keys_file_version(keys_file))
    assert keys.project_of(first) == "team-a"
    second = add_key(keys_file, "team-b")
    assert keys.project_of(second) == "team-b" and keys.projects == ["team-a", "team-b"]
    keys_file.write_text("{not json")
    assert keys.project_of(second) == "team-b"  # the keys last read, with a warning that says why
    assert "keeping the API keys last read" in caplog.text and "keys.json" in caplog.text
