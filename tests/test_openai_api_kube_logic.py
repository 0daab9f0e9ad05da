"""Kubernetes mode's pure parts: FineTuneJob status and Events as OpenAI's job and events, the
FineTuneJob a request becomes, base-model matching, and file records kept in the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tuneloom.openai_api import kubejobs
from tuneloom.openai_api.errors import ApiError
from tuneloom.openai_api.interface import model_missing_message
from tuneloom.openai_api.objects import job_object
from tuneloom.openai_api.progress import history_csv
from tuneloom.openai_api.state import FileRecord, JobRecord
from tuneloom.openai_api.storefiles import StoreFileIndex
from tuneloom.storage import open_store

JOB_ID = "ftjob-0123456789abcdef01234567"


def _record(**changes: Any) -> JobRecord:
    fields = {
        "id": JOB_ID,
        "project": "team-a",
        "created_at": 1_700_000_000,
        "model": "smollm2-135m-instruct",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "training_file": "file-1",
        "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0},
        "seed": 7,
        "metadata": {"team": "search"},
        "adapter_name": f"pirate-{JOB_ID}",
        "fine_tuned_model": f"ft:SmolLM2-135M-Instruct:team-a:pirate:{JOB_ID}",
        "suffix": "pirate",
    }
    return JobRecord(**{**fields, **changes})


def _build(record: JobRecord) -> dict[str, Any]:
    return kubejobs.build_finetune_job(
        record,
        train_uri="s3://b/api/files/team-a/file-1",
        validation_uri=None,
        train_count=90,
        store="s3://b",
        max_seq_length=128,
        storage={"credentialsSecret": "keys"},
    )


def _object(status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The FineTuneJob as the API server returns it."""
    document = _build(_record())
    document["metadata"] |= {"creationTimestamp": "2023-11-14T22:13:20Z", "uid": "u-1"}
    return document | ({"status": status} if status is not None else {})


def test_the_finetunejob_carries_the_request_and_reads_back_as_the_same_job() -> None:
    body = _object()
    assert "uid" not in _build(_record())["metadata"], "the API server gives it"
    assert body["metadata"]["labels"] == {kubejobs.LABEL_JOB_ID: JOB_ID}
    assert (
        body["spec"]["storage"] == {"credentialsSecret": "keys"} and body["spec"]["baseModel"] == _record().base_model
    )
    read = kubejobs.job_record(body)
    assert read.model_dump(exclude={"status"}) == _record().model_dump(exclude={"status"})
    assert json.loads(body["metadata"]["annotations"]["tuneloom.dev/openai-metadata"]) == {"team": "search"}


def test_a_model_the_spec_refuses_is_a_400_naming_model() -> None:
    with pytest.raises(ApiError) as refused:
        _build(_record(model="ftp://x", base_model="ftp://x"))
    assert refused.value.status == 400 and refused.value.param == "model" and "ftp://" in refused.value.message


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, "validating_files"),
        ({"phase": "Pending"}, "validating_files"),
        ({"phase": "Pending", "conditions": [{"type": "Accepted", "status": "True"}]}, "queued"),
        ({"phase": "Queued"}, "queued"),
        ({"phase": "Running"}, "running"),
        ({"phase": "Succeeded"}, "succeeded"),
        ({"phase": "Failed", "message": "dataset.train: line 3: messages: missing"}, "failed"),
        ({"phase": "Cancelled"}, "cancelled"),
        ({"phase": "Suspended"}, "paused"),
    ],
)
def test_phases_map_to_openai_statuses(status: dict[str, Any] | None, expected: str) -> None:
    record = kubejobs.job_record(_object(status))
    assert record.status == expected
    if expected == "failed":
        assert record.error == {"code": "training_failed", "param": None, "message": status["message"]}


def test_a_succeeded_job_has_its_trained_tokens_and_its_result_file() -> None:
    adapter = {"name": f"pirate-{JOB_ID}", "version": "v1", "uri": "s3://b/adapters/x", "sha256": "0" * 64}
    running = kubejobs.job_record(_object({"phase": "Running", "adapter": {**adapter, "tokensSeen": 5}}))
    assert running.result_files == [], "no result file before the job succeeds"
    done = kubejobs.job_record(_object({"phase": "Succeeded", "adapter": {**adapter, "tokensSeen": 1234}}))
    assert done.trained_tokens == 1234 and done.result_files == [kubejobs.result_file_id(JOB_ID)]
    assert kubejobs.result_file_job(done.result_files[0]) == JOB_ID
    assert kubejobs.result_file_job("file-abc") is None


def test_an_unpromoted_version_is_no_fine_tuned_model() -> None:
    adapter = {"name": f"pirate-{JOB_ID}", "version": "1", "uri": "s3://b/adapters/x", "sha256": "0" * 64}
    reasons = ["validationLoss 2.5000 is not below the base model's 2.5000"]
    verdict = {"promoted": False, "reasons": reasons}
    done = kubejobs.job_record(_object({"phase": "Succeeded", "adapter": {**adapter, "promotion": verdict}}))
    assert done.status == "succeeded" and not done.model_created and job_object(done)["fine_tuned_model"] is None
    assert reasons[0] in model_missing_message(done.fine_tuned_model, done)
    promoted = kubejobs.job_record(_object({"phase": "Succeeded", "adapter": adapter}))
    assert promoted.model_created and job_object(promoted)["fine_tuned_model"] == promoted.fine_tuned_model


@pytest.mark.parametrize(
    ("status", "suspended", "action", "expected"),
    [
        ("running", False, "pause", {"suspend": True}),
        ("queued", False, "pause", {"suspend": True}),
        ("paused", True, "resume", {"suspend": False}),
        ("running", True, "resume", {"suspend": False}),  # paused, its pods not gone yet
        ("paused", True, "cancel", {"cancel": True}),
        ("running", False, "cancel", {"cancel": True}),
        ("running", True, "pause", "already paused"),
        ("running", False, "resume", "only a paused job can be resumed"),
        ("paused", False, "resume", "is resuming"),
        ("succeeded", False, "pause", "already succeeded"),
        ("cancelled", True, "resume", "already cancelled"),
        ("failed", False, "cancel", "already failed"),
    ],
)
def test_cancel_pause_and_resume_are_spec_changes(
    status: str, suspended: bool, action: str, expected: dict[str, bool] | str
) -> None:
    if isinstance(expected, dict):
        assert kubejobs.action_patch(JOB_ID, status, suspended, action) == expected
        return
    with pytest.raises(ApiError) as refused:
        kubejobs.action_patch(JOB_ID, status, suspended, action)
    assert refused.value.status == 400 and refused.value.code == "invalid_state" and expected in refused.value.message


def test_the_result_csv_comes_from_the_loss_history() -> None:
    history = {
        "train": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 0.75}],
        "validation": [{"epoch": 1, "step": 2, "trainLoss": 2.0, "validationLoss": 1.25, "tokenAccuracy": 0.5}],
    }
    assert history_csv(history).decode().splitlines() == [
        "step,train_loss,valid_loss,valid_mean_token_accuracy,learning_rate",
        "1,2.5,,,",
        "2,1.5,1.25,0.5,",
        "3,0.75,,,",
    ]
    assert history_csv({}).decode() == "step,train_loss,valid_loss,valid_mean_token_accuracy,learning_rate\n"


def test_events_are_newest_first_with_the_kubernetes_events_and_the_status() -> None:
    status = {"phase": "Running", "message": "Training", "progress": {"step": 2, "totalSteps": 9, "trainLoss": 0.5}}
    kube_events = [
        {"metadata": {"uid": "e1"}, "type": "Normal", "reason": "Accepted", "message": "Accepted",
         "lastTimestamp": "2023-11-14T22:13:30Z"},
        {"metadata": {"uid": "e2"}, "type": "Warning", "reason": "Preempted", "message": "Preempted at step 1",
         "lastTimestamp": "2023-11-14T22:14:00Z"},
    ]  # fmt: skip
    events = kubejobs.job_events(_object(status), kube_events, now=1_700_000_500)
    assert [e["message"] for e in events] == [
        "Training",
        "Preempted at step 1",
        "Accepted",
        f"Created fine-tuning job: {JOB_ID}",
    ]
    assert events[1]["level"] == "warn" and events[0]["type"] == "metrics" and events[0]["data"]["train_loss"] == 0.5
    assert len({e["id"] for e in events}) == len(events)


def test_base_models_match_by_short_name_or_hub_id() -> None:
    assert kubejobs.same_base_model("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
    assert kubejobs.same_base_model("s3://models/llama/", "s3://models/llama")
    assert not kubejobs.same_base_model("s3://models/llama", "s3://models/mistral")


def test_file_records_in_the_store_page_by_project(tmp_path: Path) -> None:
    index = StoreFileIndex(open_store(str(tmp_path)))
    for n, (project, purpose) in enumerate(
        [("a", "fine-tune"), ("a", "fine-tune-results"), ("a", "fine-tune"), ("b", "fine-tune")]
    ):
        index.add_file(FileRecord(id=f"file-{n}", project=project, filename="f.jsonl", purpose=purpose, bytes=1,
                                  created_at=100 + n, store_key=f"api/files/{project}/file-{n}"))  # fmt: skip
    page, more = index.files("a", purpose=None, after=None, limit=2)
    assert [r.id for r in page] == ["file-2", "file-1"] and more
    assert [r.id for r in index.files("a", purpose=None, after="file-1", limit=2)[0]] == ["file-0"]
    assert [r.id for r in index.files("a", purpose="fine-tune", after=None, limit=9, newest_first=False)[0]] == [
        "file-0",
        "file-2",
    ]
    assert index.file("b", "file-0") is None and index.file("a", "../b/file-3") is None
    index.delete_file("a", "file-0")
    assert index.file("a", "file-0") is None and index.file("b", "file-3") is not None
