"""What the HTTP layer calls: one engine per mode, behind the same routes. Files work alike in both
modes (bytes and records in the object store's project prefix, or the local database), so the base
class carries them; jobs, models and inference are each mode's own."""

from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from . import jobs as mapping
from .errors import bad_request, not_found
from .files import FINE_TUNE, FileIndex, FileService, IncomingFile, file_object
from .jobs import CreateJobRequest
from .metrics import ApiMetrics
from .objects import listing
from .settings import ApiSettings
from .state import FileRecord, JobRecord

MAX_PAGE = 100
MAX_FILES_PAGE = 10_000  # OpenAI's own bounds for listing files

# What a proxied inference request returns: status, media type, and the body or its byte stream.
Forwarded = tuple[int, str, bytes | AsyncIterator[bytes]]


class Keys(Protocol):
    def project_of(self, key: str) -> str | None: ...


def page_limit(limit: int | None, default: int = 20, maximum: int = MAX_PAGE) -> int:
    if limit is None:
        return default
    if not 1 <= limit <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}, got {limit}", "limit")
    return limit


def requested_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: a fine-tuned model id (ft:...) or a base model", "model")
    return model


def model_missing_message(model_id: str, job: JobRecord) -> str:
    """Why a fine-tuned model id names no model (yet): its job has not succeeded, or its version
    failed the promotion gate."""
    if job.status != "succeeded":
        return f"model {model_id!r} does not exist yet: its job is {job.status}"
    reasons = "; ".join((job.promotion or {}).get("reasons", []))
    return f"model {model_id!r} does not exist: its job's version was not promoted: {reasons}"


# What each format's lines look like, for the error that says a file does not suit the method.
_FORMAT_SHAPES = {
    "chat": '{"messages": [...]} chat examples',
    "preference": '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]} pairs',
}


def _check_format_fits_method(record: FileRecord, param: str, method: str) -> None:
    wanted = mapping.METHOD_FORMAT[method]
    if record.format != wanted:
        raise bad_request(
            f"{param} {record.id} ({record.filename}) holds {_FORMAT_SHAPES[record.format]}; method.type "
            f"{method!r} trains on {_FORMAT_SHAPES[wanted]}",
            param,
        )


class Engine(ABC):
    settings: ApiSettings
    keys: Keys
    metrics: ApiMetrics
    files: FileService
    file_index: FileIndex

    def start(self) -> None:  # noqa: B027 (a mode with nothing to start keeps this)
        """Begins background work (the local runner); called once the server is up."""

    @abstractmethod
    async def close(self) -> None: ...

    # files

    def receive_file(self, project: str, filename: str) -> IncomingFile:
        return self.files.receive(filename, project, self.metrics.upload_bytes.inc)

    def finish_upload(self, incoming: IncomingFile, purpose: str) -> dict[str, Any]:
        return file_object(incoming.finish(purpose))

    def list_files(self, project: str, purpose: str | None, after: str | None, limit: int | None, order: str):
        if order not in ("asc", "desc"):
            raise bad_request("order must be 'asc' or 'desc'", "order")
        records, more = self.file_index.files(
            project,
            purpose=purpose,
            after=after,
            limit=page_limit(limit, MAX_FILES_PAGE, MAX_FILES_PAGE),
            newest_first=order == "desc",
        )
        return listing([file_object(r) for r in records], more)

    def file(self, project: str, file_id: str) -> dict[str, Any]:
        return file_object(self.files.get(project, file_id))

    def file_content(self, project: str, file_id: str) -> tuple[Path, str]:
        record = self.files.get(project, file_id)
        return self.files.download(record), record.filename

    def remove_download(self, path: Path) -> None:
        self.files.remove_download(path)

    def delete_file(self, project: str, file_id: str) -> dict[str, Any]:
        self.files.delete(self.files.get(project, file_id))
        return {"id": file_id, "object": "file", "deleted": True}

    # jobs

    def training_files(self, project: str, request: CreateJobRequest) -> tuple[FileRecord, FileRecord | None]:
        """The request's training and validation files, each this project's and uploaded for fine-tuning."""
        training = self._training_file(project, request.training_file, "training_file")
        validation = (
            self._training_file(project, request.validation_file, "validation_file")
            if (request.validation_file)
            else None
        )
        if training.examples < 2:
            raise bad_request("training_file needs at least 2 examples (one is held out)", "training_file")
        for record, param in ((training, "training_file"), (validation, "validation_file")):
            if record is not None:
                _check_format_fits_method(record, param, request.method_type)
        return training, validation

    def _training_file(self, project: str, file_id: str, param: str) -> FileRecord:
        record = self.file_index.file(project, file_id)
        if record is None:
            raise not_found("file", file_id, param)
        if record.purpose != FINE_TUNE:
            raise bad_request(
                f"{param} {file_id} has purpose {record.purpose!r}; upload it with purpose='{FINE_TUNE}'", param
            )
        return record

    def new_job(self, project: str, request: CreateJobRequest, base_model: str, training: FileRecord) -> JobRecord:
        """The job a request asks for, its "auto" hyperparameters resolved from the training file."""
        requested = request.requested_hyperparameters()
        job_id = mapping.new_id("ftjob")
        resolved = mapping.resolve_hyperparameters(
            requested, training.examples, self.settings.max_seq_length, request.method_type
        )
        return JobRecord(
            id=job_id,
            project=project,
            created_at=int(time.time()),
            model=request.model,
            base_model=base_model,
            method=request.method_type,
            training_file=training.id,
            validation_file=request.validation_file,
            hyperparameters=resolved.model_dump(),
            suffix=request.suffix,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            metadata=request.metadata,
            integrations=[i.model_dump(mode="json", exclude_none=True) for i in request.integrations or []],
            adapter_name=mapping.adapter_name(request.suffix, job_id),
            fine_tuned_model=mapping.fine_tuned_model_id(base_model, project, request.suffix, job_id),
        )

    @abstractmethod
    def create_job(self, project: str, request: CreateJobRequest) -> dict[str, Any]: ...

    @abstractmethod
    def job(self, project: str, job_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def list_jobs(self, project: str, after: str | None, limit: int | None, metadata: dict[str, str]): ...

    @abstractmethod
    def job_action(self, project: str, job_id: str, action: str) -> dict[str, Any]:
        """cancel, pause or resume."""

    @abstractmethod
    def events(self, project: str, job_id: str, after: str | None, limit: int | None) -> dict[str, Any]: ...

    @abstractmethod
    def checkpoints(self, project: str, job_id: str, after: str | None, limit: int | None) -> dict[str, Any]: ...

    # models and inference

    @abstractmethod
    def list_models(self, project: str) -> dict[str, Any]: ...

    @abstractmethod
    def model(self, project: str, model_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def delete_model(self, project: str, model_id: str) -> dict[str, Any]: ...

    @abstractmethod
    async def forward(self, project: str, path: str, body: dict[str, Any]) -> Forwarded:
        """The inference request `body` (chat, completions or responses at `path`) answered by the
        server of its model, with the client's model name kept."""
