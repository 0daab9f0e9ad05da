"""The API's records as OpenAI's objects, built with the `openai` package's own types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from openai.types import Model
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from .jobs import DPO, checkpoint_model_id
from .state import CheckpointRecord, EventRecord, JobRecord

T = TypeVar("T")

# OpenAI's type lists every status but `paused`, which its API has too: that one is built unchecked.
_CHECKED_STATUSES = set(FineTuningJob.model_fields["status"].annotation.__args__)


def listing(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }


def page_after(items: list[T], after: str | None, limit: int, id_of: Callable[[T], str]) -> tuple[list[T], bool]:
    """The items after the one whose id is `after` (none given: from the first), at most `limit`;
    and whether more follow. An unknown `after` is the end of the list."""
    if after:
        ids = [id_of(item) for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit


def job_object(job: JobRecord) -> dict[str, Any]:
    hyperparameters = {k: job.hyperparameters[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    beta = {"beta": job.hyperparameters["beta"]} if job.method == DPO else {}
    method_hyperparameters = {**hyperparameters, **beta}
    fields = {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "model": job.model,
        "organization_id": job.project,
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": hyperparameters,
        "method": {"type": job.method, job.method: {"hyperparameters": method_hyperparameters}},
        "seed": job.seed,
        "fine_tuned_model": job.fine_tuned_model if job.model_created else None,
        "finished_at": job.finished_at,
        "trained_tokens": job.trained_tokens,
        "estimated_finish": job.estimated_finish,
        "error": job.error,
        "result_files": job.result_files,
        "metadata": job.metadata,
        "integrations": job.integrations or None,
        "user_provided_suffix": job.suffix,
    }
    if job.status in _CHECKED_STATUSES:
        return FineTuningJob.model_validate(fields).model_dump(mode="json")
    return FineTuningJob.model_construct(**fields).model_dump(mode="json", warnings=False)


def event_object(event: EventRecord) -> dict[str, Any]:
    return FineTuningJobEvent(
        id=event_id(event.seq),
        object="fine_tuning.job.event",
        created_at=event.created_at,
        level=event.level,
        message=event.message,
        type=event.type,
        data=event.data or {},
    ).model_dump(mode="json")


def event_id(seq: int) -> str:
    return f"ftevent-{seq:012d}"


def event_seq(event_id_text: str) -> int | None:
    prefix = "ftevent-"
    digits = event_id_text[len(prefix) :] if event_id_text.startswith(prefix) else ""
    return int(digits) if digits.isdigit() else None


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}"


def checkpoint_object(job: JobRecord, checkpoint: CheckpointRecord) -> dict[str, Any]:
    return FineTuningJobCheckpoint(
        id=checkpoint_id(job.id, checkpoint.step),
        object="fine_tuning.job.checkpoint",
        created_at=checkpoint.created_at,
        fine_tuned_model_checkpoint=checkpoint_model_id(job.fine_tuned_model, checkpoint.step),
        fine_tuning_job_id=job.id,
        metrics=checkpoint.metrics,
        step_number=checkpoint.step,
    ).model_dump(mode="json", exclude_none=True)


def model_object(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return Model(id=model_id, object="model", created=created, owned_by=owned_by).model_dump(mode="json")
