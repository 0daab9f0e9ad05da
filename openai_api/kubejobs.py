"""Kubernetes mode's mapping between OpenAI jobs and FineTuneJob objects: pure functions, no I/O.

A job is one FineTuneJob named by its OpenAI id, in the namespace of the caller's project. What the
spec does not say (the request as the client sent it, the resolved hyperparameters, the fine-tuned
model id) rides in `tuneloom.dev/openai-*` annotations; the label marks the objects the API made,
so it lists those only. Status, events and the adapter version are read back from the object and
its Events, and shown through the same OpenAI objects as local mode's (objects.job_object).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from openai.types.fine_tuning import FineTuningJobEvent

from tuneloom.api import FineTuneJobSpec, FineTuneJobStatus, Phase
from tuneloom.jobfile import SpecError, parse_document
from tuneloom.models import known_model
from tuneloom.operator.common import condition_of, read_status

from . import jobs as mapping
from .errors import ApiError, bad_request
from .state import JobRecord

LABEL_JOB_ID = "tuneloom.dev/openai-job-id"
ANNOTATION = "tuneloom.dev/openai-"
# Annotations: each a field of JobRecord, JSON-encoded.
RECORDED = (
    "model",
    "base_model",
    "method",
    "training_file",
    "validation_file",
    "hyperparameters",
    "suffix",
    "seed",
    "metadata",
    "integrations",
    "adapter_name",
    "fine_tuned_model",
)
MODEL_DELETED = f"{ANNOTATION}model-deleted"  # DELETE /v1/models: a tombstone; the registry keeps the version

STATUSES = {
    Phase.queued: "queued",
    Phase.running: "running",
    Phase.succeeded: "succeeded",
    Phase.failed: "failed",
    Phase.cancelled: "cancelled",
    Phase.suspended: "paused",
}
RESULT_FILE_PREFIX = "file-results-"
RESULT_FILENAME = "step_metrics.csv"


def cluster_base_model(model: str) -> str:
    """The FineTuneJob's and ModelServer's baseModel for a client's `model`: a known model's hub id
    (for its short name too), else the name as given (a hub id or an s3:// prefix)."""
    known = known_model(model)
    return known.hub_id if known else model


def same_base_model(a: str, b: str) -> bool:
    """Whether two baseModel values name one model (hub ids compare case-insensitively)."""
    return cluster_base_model(a).rstrip("/").lower() == cluster_base_model(b).rstrip("/").lower()


def annotation_key(field: str) -> str:
    return ANNOTATION + field.replace("_", "-")


def build_finetune_job(
    job: JobRecord,
    *,
    train_uri: str,
    validation_uri: str | None,
    train_count: int,
    store: str,
    max_seq_length: int,
    storage: dict[str, Any],
) -> dict[str, Any]:
    """The FineTuneJob the operator runs for `job`: local mode's document (jobs.finetune_job), with
    the job's OpenAI fields in annotations and `storage` (endpoint, credentialsSecret) for its pods."""
    document = mapping.finetune_job(
        job_id=job.id,
        project=job.project,
        base_model=job.base_model,
        train_uri=train_uri,
        validation_uri=validation_uri,
        train_count=train_count,
        hyperparameters=mapping.ResolvedHyperparameters.model_validate(job.hyperparameters),
        seed=job.seed,
        adapter=job.adapter_name,
        store=store,
        max_seq_length=max_seq_length,
        method=job.method,
    )
    document["metadata"].pop("uid")  # the API server gives the uid; checkpoints go under it
    document["metadata"]["labels"] = {LABEL_JOB_ID: job.id}
    fields = job.model_dump(mode="json")
    document["metadata"]["annotations"] = {annotation_key(name): json.dumps(fields[name]) for name in RECORDED}
    if storage:
        document["spec"]["storage"] = storage
    try:
        parse_document(FineTuneJobSpec, document["spec"], source="fine-tuning job")
    except SpecError as exc:
        # What the client sent that the spec refuses is its model (the one free-form field here).
        raise bad_request(
            f"model {job.model!r} cannot be fine-tuned here: {'; '.join(exc.problems)}", "model"
        ) from None
    return document


def result_file_id(job_id: str) -> str:
    """The id of a succeeded job's step-metrics CSV: named after the job, so every API pod gives the
    same one and the file is made on first read (KubeEngine), with nothing recorded on the job."""
    return RESULT_FILE_PREFIX + job_id


def result_file_job(file_id: str) -> str | None:
    """The job whose result file `file_id` is; None for any other file."""
    return file_id.removeprefix(RESULT_FILE_PREFIX) if file_id.startswith(RESULT_FILE_PREFIX) else None


def _epoch(stamp: str | datetime | None) -> int | None:
    if stamp is None:
        return None
    if isinstance(stamp, str):
        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return int(stamp.timestamp())


def openai_status(body: dict[str, Any], status: FineTuneJobStatus) -> str:
    if status.phase in STATUSES:
        return STATUSES[status.phase]
    accepted = condition_of(status.conditions, "Accepted")
    # Pending: the operator has not accepted the spec and found the data yet.
    return "queued" if accepted is not None and accepted.status == "True" else "validating_files"


def job_record(body: dict[str, Any], now: float | None = None) -> JobRecord:
    """The API's view of a FineTuneJob it created."""
    meta = body["metadata"]
    annotations = meta.get("annotations") or {}
    # A field added since the job was created (method) is absent: its record default holds.
    fields = {name: json.loads(annotations[key]) for name in RECORDED if (key := annotation_key(name)) in annotations}
    status = read_status(FineTuneJobStatus, body)
    record = JobRecord(
        id=meta["name"],
        project=meta["namespace"],
        created_at=_epoch(meta.get("creationTimestamp")) or 0,
        status=openai_status(body, status),
        **fields,
    )
    record.finished_at = _epoch(status.completionTime)
    if status.adapter is not None:
        record.adapter_version = status.adapter.version
        record.trained_tokens = status.adapter.tokensSeen
        if status.adapter.promotion is not None:
            record.promotion = status.adapter.promotion.model_dump(mode="json")
    if record.status == "succeeded":
        record.result_files = [result_file_id(record.id)]
    progress = status.progress
    if record.status == "running" and progress is not None and progress.etaSeconds is not None:
        record.estimated_finish = int((now or time.time()) + progress.etaSeconds)
    if record.status == "failed":
        record.error = {"code": "training_failed", "param": None, "message": status.message or "Training failed"}
    return record


def action_patch(job_id: str, status: str, suspended: bool, action: str) -> dict[str, bool]:
    """The spec change that cancels, pauses (spec.suspend) or resumes a job; a 400 when the job's
    state allows none. A job is paused from the moment spec.suspend is set, before its pods are gone."""
    if status in ("succeeded", "failed", "cancelled"):
        raise ApiError(400, f"job {job_id} is already {status}", code="invalid_state")
    if action == "cancel":
        return {"cancel": True}
    if action == "pause" and suspended:
        raise ApiError(400, f"job {job_id} is already paused; resume it to continue", code="invalid_state")
    if action == "resume" and not suspended:
        state = "resuming" if status == "paused" else status  # resumed; the operator has not started it yet
        raise ApiError(400, f"job {job_id} is {state}; only a paused job can be resumed", code="invalid_state")
    return {"suspend": action == "pause"}


def model_deleted(body: dict[str, Any]) -> bool:
    return MODEL_DELETED in ((body.get("metadata") or {}).get("annotations") or {})


def _event(event_id: str, created_at: int, message: str, level: str = "info", **data: Any) -> dict[str, Any]:
    kind = "metrics" if "train_loss" in data else "message"
    return FineTuningJobEvent(
        id=event_id,
        object="fine_tuning.job.event",
        created_at=created_at,
        level=level,
        message=message,
        type=kind,
        data=data,
    ).model_dump(mode="json")


def job_events(body: dict[str, Any], kube_events: list[dict[str, Any]], now: float | None = None) -> list[dict]:
    """The job's events, newest first: its creation, each Kubernetes Event the operator posted on it,
    and where its status stands now (with the progress figures while it trains)."""
    record = job_record(body, now)
    events = [_event(f"ftevent-{record.id}-created", record.created_at, f"Created fine-tuning job: {record.id}")]
    notice = mapping.integrations_notice(record.integrations)
    if notice:
        events.append(_event(f"ftevent-{record.id}-integrations", record.created_at, notice, "warn"))
    for item in kube_events:
        meta = item.get("metadata") or {}
        stamp = item.get("lastTimestamp") or item.get("eventTime") or item.get("firstTimestamp")
        created = _epoch(stamp or meta.get("creationTimestamp")) or record.created_at
        level = "warn" if item.get("type") == "Warning" else "info"
        reason = item.get("reason") or ""
        events.append(
            _event(f"ftevent-{meta.get('uid')}", created, item.get("message") or reason, level, reason=reason)
        )
    status = read_status(FineTuneJobStatus, body)
    if status.message:
        data: dict[str, Any] = {"phase": status.phase.value}
        if status.progress is not None and status.progress.trainLoss is not None:
            data |= {"step": status.progress.step, "total_steps": status.progress.totalSteps}
            data |= {"train_loss": status.progress.trainLoss, "valid_loss": status.progress.validationLoss}
        level = "error" if record.status == "failed" else "info"
        created = record.finished_at or int(now or time.time())
        events.append(_event(f"ftevent-{record.id}-status", created, status.message, level, **data))
    if record.status == "succeeded":
        created = record.finished_at or record.created_at
        message = f"New fine-tuned model created: {record.fine_tuned_model}"
        events.append(_event(f"ftevent-{record.id}-model", created, message))
    # Stable order for pagination: by time, and within one second in the order they were added.
    ordered = sorted(enumerate(events), key=lambda pair: (pair[1]["created_at"], pair[0]), reverse=True)
    return [event for _, event in ordered]
